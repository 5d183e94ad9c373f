"""The int8 scheme's stand-ins on CUDA: the fused Triton int8 weight-only matmul
(``codecllm.kernels.int8_triton``) on codes resident in GPU memory or decoded into the stream workspace.

A one-row input (a decode step) goes through a ``RowMatmul`` prepared once per weight tensor, whose
launch costs less host time than an fp16 ``nn.Linear``. Resident layers that read the same input (q/k/v,
gate/up) may run as one launch (``codecllm.gpu.fusion`` asks ``can_fuse`` and ``join``).
"""

from __future__ import annotations

import torch
from torch import nn

from ...gpu.stream import CudaStream
from ...kernels.int8_triton import RowMatmul, int8_linear
from ...qmodules import QuantizedWeight
from . import Int8Linear


class Int8CudaLinear(Int8Linear):
    fusable = True
    runner = None  # set by ``codecllm.gpu.fusion`` to run this layer together with its siblings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runner is not None:
            return self.runner(self, x)
        return self.plain(x)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and type(self._parameters["weight"]) is QuantizedWeight:  # the decode step
            row = self._row(self._buffers["qweight"], self._buffers["scale"])
            if row is not None:
                return row(x)
        return super().forward(x)

    def linear(self, x, parts):
        q, s = parts["qweight"], parts["scale"]
        if x.numel() == self.in_features:  # one token: the decode step's hot path
            row = self._row(q, s)
            if row is not None:
                return row(x)
        return int8_linear(x, q, s, self.bias)

    def _row(self, q: torch.Tensor, s: torch.Tensor) -> RowMatmul | None:
        """The one-row matmul prepared for these tensors (None where their layout has none)."""
        rows = self.__dict__.setdefault("_rows", {})
        row = rows.get(id(q))
        if row is None or row.qweight is not q or row.scale is not s or row.bias is not self.bias:
            try:
                row = rows[id(q)] = RowMatmul(q, s, self.bias)
            except ValueError:
                return None
        return row

    # -- sibling fusion --

    def can_fuse(self, other: nn.Module) -> bool:
        return (type(other) is type(self) and self.in_features == other.in_features and (self.bias is None) == (other.bias is None)
                and self.qweight.is_contiguous() and other.qweight.is_contiguous() and self.qweight.device == other.qweight.device
                and (self.bias is None or self.bias.dtype == other.bias.dtype))

    @staticmethod
    def join(run: list["Int8CudaLinear"]) -> RowMatmul | None:
        """Give the layers of ``run`` one weight, scale and bias tensor each (theirs become views) and
        return the group's one-row matmul, or None where their weights cannot form one matrix."""
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
            m.__dict__.pop("_rows", None)  # prepared for the tensors being replaced
            end = start + m.out_features
            m.qweight, m.scale = weight[start:end], scale[start:end]
            if bias is not None:
                m.bias = nn.Parameter(bias[start:end], requires_grad=False)
            start = end
        return RowMatmul(weight, scale, bias)


class Int8CudaStreamLinear(CudaStream, Int8CudaLinear):
    """The int8 codes stay compressed in GPU memory and are decoded into the stream workspace."""

    fusable = False

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return Int8Linear.forward(self, x)  # the codes come from the workspace: ``CudaStream.parts``
