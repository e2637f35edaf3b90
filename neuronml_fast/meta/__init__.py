"""Meta-learning tasks (and, to come, the reference meta-learner: MAML, NeuronML, plastic head).

`SinusoidTasks` (Finn et al. 2017) and `Omniglot` + `NWayKShot` read from the official archive layout.
"""

from .tasks import NWayKShot, Omniglot, SinusoidTasks

__all__ = ["NWayKShot", "Omniglot", "SinusoidTasks"]
