"""Triton kernels of neuronml_fast, installed as ``neuronml_fast.kernels``.

One module per op family, each holding its ``@triton.jit`` kernels and a launcher named
``<op>_out(*inputs, *outputs)`` that the backend registry calls. Importing this package
imports triton; ``neuronml_fast`` itself imports it only when a Triton kernel first runs.
"""
