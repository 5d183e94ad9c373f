"""The ``none`` scheme's stand-in on CUDA: a float Linear weight kept compressed in GPU memory (stream mode)."""

from ...gpu.stream import CudaStream
from . import NoneLinear


class NoneCudaStreamLinear(CudaStream, NoneLinear):
    """Decoded by nvCOMP into the model's stream workspace just before use."""
