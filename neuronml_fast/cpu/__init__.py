"""Python launchers of the C++ CPU backend (ATen dense cores around the fused C++ kernels)."""
