"""The rule codes every plastic kernel takes (csrc/common/plastic_rule.h for the C++ and CUDA ones;
each extension exports its codes as ``PLASTIC_RULE_CODES`` and a test compares them with these).
Framework-free: the Triton kernels read them as compile-time constants."""

HEBB, OJA, MODULATED = 0, 1, 2
RULE_CODES = {"hebb": HEBB, "oja": OJA}
