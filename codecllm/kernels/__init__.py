"""Compute kernels: the CPU int8 and int4 weight-only linears (``cpu``), the fused Triton int8 and int4
matmuls for CUDA (``int8_triton``, ``int4_triton``) and what those share (``launch``)."""
