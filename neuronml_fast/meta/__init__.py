"""The reference meta-learner: tasks, models, MAML / NeuronML / plastic head, and a CLI.

* tasks: `SinusoidTasks` (Finn et al. 2017), `Omniglot` + `NWayKShot` (official archive layout)
* models: `Conv4`, `MLP` (built from the masked layers; functional for meta-learning)
* learners: `MAML`, `NeuronML`, `PlasticHead`, each on ``backend="reference"`` (plain PyTorch,
  tasks in a loop) or ``"fused"`` (our ops, tasks batched)
* CLI: ``python -m neuronml_fast.meta train|compare|scaling``; ``train`` also runs on N processes
  under ``torchrun`` (`neuronml_fast.meta.distributed`)
"""

from .learners import MAML, NeuronML, PlasticHead
from .models import MLP, Conv4
from .tasks import NWayKShot, Omniglot, SinusoidTasks

__all__ = ["MAML", "MLP", "Conv4", "NWayKShot", "NeuronML", "Omniglot", "PlasticHead", "SinusoidTasks"]
