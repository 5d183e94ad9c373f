"""The int8 scheme's stand-ins on CUDA: the fused Triton int8 weight-only matmul
(``codecllm.kernels.int8_triton``) on codes resident in GPU memory or decoded into the stream workspace.

Eager calls go through an ``Int8Matmul`` prepared once per weight tensor, whose launch costs less host
time than an fp16 ``nn.Linear``; under ``torch.compile`` the layer calls the ``codecllm::int8_linear``
operator instead, which the compiler sees as one node. Resident layers that read the same input (q/k/v,
gate/up) may run as one launch (``codecllm.gpu.fusion`` asks ``can_fuse`` and ``join``).
"""

from __future__ import annotations

import torch
from torch import nn

from ...gpu.fusion import FusableLinear
from ...gpu.stream import CudaStream
from ...kernels.int8_triton import Int8Matmul
from ...qmodules import QLinear, QuantizedWeight
from . import Int8Linear


class Int8CudaLinear(FusableLinear, Int8Linear):
    @staticmethod
    def op(x: torch.Tensor, src) -> torch.Tensor:
        """The ``codecllm::int8_linear`` operator on the tensors of ``src`` (a layer or its group's matmul)."""
        return torch.ops.codecllm.int8_linear(x, src.qweight, src.scale, src.bias)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """This layer alone, through the matmul prepared for its tensors."""
        if type(self._parameters["weight"]) is not QuantizedWeight:  # a float weight assigned after load
            return QLinear.forward(self, x)
        mm = self.__dict__.get("_mm")
        buffers = self._buffers
        if mm is None or mm.qweight is not buffers["qweight"] or mm.scale is not buffers["scale"] or mm.bias is not self._parameters.get("bias"):
            mm = self.__dict__["_mm"] = self._matmul(buffers["qweight"], buffers["scale"])
        return mm(x)

    def linear(self, x, parts):
        return self._matmul(parts["qweight"], parts["scale"])(x)

    def _matmul(self, q: torch.Tensor, s: torch.Tensor) -> Int8Matmul:
        """The matmul prepared for these tensors (kept per tensor: a stream layer's codes are in one of
        two workspaces)."""
        mms = self.__dict__.setdefault("_mms", {})
        mm = mms.get(id(q))
        if mm is None or mm.qweight is not q or mm.scale is not s or mm.bias is not self.bias:
            mm = mms[id(q)] = Int8Matmul(q, s, self.bias)
        return mm

    # -- sibling fusion --

    def can_fuse(self, other: nn.Module) -> bool:
        return (type(other) is type(self) and self.in_features == other.in_features and (self.bias is None) == (other.bias is None)
                and self.qweight.is_contiguous() and other.qweight.is_contiguous() and self.qweight.device == other.qweight.device
                and (self.bias is None or self.bias.dtype == other.bias.dtype))

    @staticmethod
    def join(run: list["Int8CudaLinear"]) -> Int8Matmul | None:
        """Give the layers of ``run`` one weight, scale and bias tensor each (theirs become views) and
        return the group's matmul, or None where their weights cannot form one matrix."""
        ws = [m.qweight for m in run]
        rows, k = sum(w.shape[0] for w in ws), ws[0].shape[1]
        storage = ws[0].untyped_storage().data_ptr()
        if all(b.untyped_storage().data_ptr() == storage and b.data_ptr() == a.data_ptr() + a.nbytes for a, b in zip(ws, ws[1:])):
            weight = ws[0].as_strided((rows, k), (k, 1))  # back to back already
        elif all(w.untyped_storage().nbytes() == w.nbytes for w in ws):
            weight = torch.cat(ws)  # each member's own weight is freed once it points here
        else:
            return None
        scale = torch.cat([m.scale for m in run])
        bias = torch.cat([m.bias.detach() for m in run]) if run[0].bias is not None else None
        start = 0
        for m in run:
            m.__dict__.pop("_mm", None)  # prepared for the tensors being replaced
            m.__dict__.pop("_mms", None)
            end = start + m.out_features
            m.qweight, m.scale = weight[start:end], scale[start:end]
            if bias is not None:
                m.bias = nn.Parameter(bias[start:end], requires_grad=False)
            start = end
        return Int8Matmul(weight, scale, bias)


class Int8CudaStreamLinear(CudaStream, Int8CudaLinear):
    """The int8 codes stay compressed in GPU memory and are decoded into the stream workspace."""

    fusable = False

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return Int8Linear.forward(self, x)  # the codes come from the workspace: ``CudaStream.parts``
