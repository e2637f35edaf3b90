"""Python launchers of the C++ CPU backend (ATen dense cores around the fused C++ kernels).

The backend's large outputs come from a buffer pool (see neuronml_fast/_alloc.py); these
mirror torch.cuda's caching-allocator controls for it.
"""

from .._alloc import cpu_pool_stats as pool_stats
from .._alloc import empty_cpu_cache as empty_cache
from .._alloc import set_cpu_pool_limit as set_pool_limit

__all__ = ["empty_cache", "pool_stats", "set_pool_limit"]
