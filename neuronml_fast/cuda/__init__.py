"""Python launchers of the CUDA C++ backend (device-side planning around the compiled kernels)."""
