"""Fused kernels (Triton, csrc/ CUDA, CPU C++) and the dispatcher that picks the best available one."""
