"""``none``: the tensor bit for bit (any dtype, any shape). Resident, it is an ordinary parameter; in
stream mode a Linear keeps it compressed and decodes it per call (``codecllm.qmodules``)."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ...qmodules import CpuStream, QLinear
from .. import PartSpec, Scheme, register, register_module


@register
class NoneScheme(Scheme):
    id = "none"
    lossless = True
    main_part = "data"

    def layout(self, dtype, shape):
        return {"data": PartSpec(dtype, tuple(shape))}

    def quantize(self, w, importance=None):
        return {"data": w.contiguous()}

    def dequantize(self, parts, dtype):
        t = parts["data"]
        return t.to(dtype) if t.is_floating_point() and dtype is not None else t


class NoneLinear(QLinear):
    """A Linear whose float weight is the stored tensor (``QLinear.linear``: cast to the input's dtype)."""


class NoneStreamLinear(CpuStream, NoneLinear):
    """A Linear whose float weight stays compressed and is decoded on each call (CPU)."""


# stream mode only: resident "none" weights are plain parameters
for _float in (nn.Linear, Conv1D):
    register_module(NoneScheme, _float, "cpu-stream", NoneStreamLinear)
    register_module(NoneScheme, _float, "cuda-stream", "codecllm.schemes.none.cuda:NoneCudaStreamLinear")
