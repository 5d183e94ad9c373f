"""The int4 scheme's stand-ins on CUDA: the fused Triton int4 weight-only matmul
(``codecllm.kernels.int4_triton``) on packed codes resident in GPU memory or decoded into the stream
workspace.

Eager calls go through an ``Int4Matmul`` prepared once per weight tensor; under ``torch.compile`` the
layer calls the ``codecllm::int4_linear`` operator instead, which the compiler sees as one node. Resident
layers that read the same input (q/k/v, gate/up) may run as one launch (``codecllm.gpu.fusion``).
"""

from __future__ import annotations

import torch
from torch import nn

from ...gpu.fusion import FusableLinear
from ...gpu.stream import CudaStream
from ...kernels.int4_triton import Int4Matmul
from ...qmodules import QLinear, QuantizedWeight
from . import Int4Linear


class Int4CudaLinear(FusableLinear, Int4Linear):
    @classmethod
    def held_bytes(cls, rec, dtype):
        return QLinear.held_bytes(rec, dtype)  # the parts as stored (the CPU's repacked codes are not made here)

    def op(self, x: torch.Tensor, src) -> torch.Tensor:
        """The ``codecllm::int4_linear`` operator on the tensors of ``src`` (this layer or its group's matmul)."""
        return torch.ops.codecllm.int4_linear(x, src.qweight, src.scale, src.zero, self.scheme.group_size, src.bias)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """This layer alone, through the matmul prepared for its tensors."""
        if type(self._parameters["weight"]) is not QuantizedWeight:  # a float weight assigned after load
            return QLinear.forward(self, x)
        return self._matmul(self._buffers["qweight"])(x)

    def linear(self, x, parts):
        return self._matmul(parts["qweight"])(x)

    def _matmul(self, q: torch.Tensor) -> Int4Matmul:
        """The matmul prepared for these tensors (kept per codes tensor: a stream layer's codes are in one
        of two workspaces)."""
        mms = self.__dict__.setdefault("_mms", {})
        mm = mms.get(id(q))
        b = self._buffers
        if mm is None or mm.qweight is not q or mm.scale is not b["scale"] or mm.zero is not b["zero"] or mm.bias is not self.bias:
            mm = mms[id(q)] = Int4Matmul(q, b["scale"], b["zero"], self.scheme.group_size, self.bias)
        return mm

    # -- sibling fusion --

    def can_fuse(self, other: nn.Module) -> bool:
        return (type(other) is type(self) and self.in_features == other.in_features and self.scheme == other.scheme
                and (self.bias is None) == (other.bias is None) and self.qweight.device == other.qweight.device
                and self.qweight.is_contiguous() and other.qweight.is_contiguous()
                and (self.bias is None or self.bias.dtype == other.bias.dtype))

    @staticmethod
    def join(run: list["Int4CudaLinear"]) -> Int4Matmul | None:
        """Give the layers of ``run`` one tensor per part and one bias (theirs become views of them) and
        return the group's matmul, or None where their codes cannot form one matrix without a copy that
        would stay beside them."""
        ws = [m.qweight for m in run]
        rows, half = sum(w.shape[0] for w in ws), ws[0].shape[1]
        storage = ws[0].untyped_storage().data_ptr()
        if all(b.untyped_storage().data_ptr() == storage and b.data_ptr() == a.data_ptr() + a.nbytes for a, b in zip(ws, ws[1:])):
            qweight = ws[0].as_strided((rows, half), (half, 1))  # back to back already
        elif all(w.untyped_storage().nbytes() == w.nbytes for w in ws):
            qweight = torch.cat(ws)  # each member's own codes are freed once it points here
        else:
            return None
        joined = {"qweight": qweight, **{n: torch.cat([m._buffers[n] for m in run]) for n in ("scale", "zero")}}
        bias = torch.cat([m.bias.detach() for m in run]) if run[0].bias is not None else None
        start = 0
        for m in run:
            m.__dict__.pop("_mms", None)  # prepared for the tensors being replaced
            end = start + m.out_features
            for n, t in joined.items():
                m._buffers[n] = t[start:end]
            if bias is not None:
                m.bias = nn.Parameter(bias[start:end], requires_grad=False)
            start = end
        return Int4Matmul(joined["qweight"], joined["scale"], joined["zero"], run[0].scheme.group_size, bias)


class Int4CudaStreamLinear(CudaStream, Int4CudaLinear):
    """The int4 codes stay compressed in GPU memory and are decoded into the stream workspace."""

    fusable = False

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return Int4Linear.forward(self, x)  # the codes come from the workspace: ``CudaStream.parts``
