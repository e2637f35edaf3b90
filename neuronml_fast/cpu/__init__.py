"""The C++ CPU backend's buffer pool: its large outputs come from it (see neuronml_fast/_alloc.py);
these mirror torch.cuda's caching-allocator controls for it. The backend's launchers live with
their ops, in ``neuronml_fast/ops/<family>/cpu.py``.
"""

from .._alloc import cpu_pool_stats as pool_stats
from .._alloc import empty_cpu_cache as empty_cache
from .._alloc import set_cpu_pool_limit as set_pool_limit

__all__ = ["empty_cache", "pool_stats", "set_pool_limit"]
