"""Compute kernels: the CPU int8 weight-only linear (``cpu``) and the fused Triton int8 matmuls for CUDA
(``int8_triton``)."""
