"""Triton kernels of neuronml_fast, installed as ``neuronml_fast.kernels``.

One module per op family, holding its ``@triton.jit`` kernels and nothing else: each family's
launcher (tiles, grids, launches) is ``neuronml_fast/ops/<family>/triton.py``, beside the
family's reference, custom op and other backends. Importing this package imports triton;
``neuronml_fast`` itself imports it only when a Triton kernel first runs.
"""
