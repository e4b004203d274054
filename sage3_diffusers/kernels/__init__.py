"""GPU kernels. Subpackages import their compilers (triton, CUDA extensions) lazily."""
