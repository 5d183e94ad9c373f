"""The lossless scheme's stand-in on CUDA in stream mode: a bfloat16 Linear weight re-encoded at load into
the exponent-coded layout of ``codecllm.kernels.expcode_triton`` (12 bits per weight, bit for bit), which
the one-row matmul of a decode step computes from as it is. No bfloat16 copy of the weight is ever kept;
more rows decode it a block of rows at a time into a workspace that cuBLAS multiplies.

Eager calls go through an ``ExpCodeMatmul`` prepared once; under ``torch.compile`` the layer calls the
``codecllm::expcode_linear`` operator, which the compiler sees as one node.
"""

from __future__ import annotations

import torch
from torch import nn

from ...gpu.fusion import FusableLinear
from ...kernels import expcode_triton as expcode
from ...kernels.launch import DEQUANT_BLOCK_BYTES
from ...qmodules import QLinear, QuantizedWeight
from . import exponents


MAX_ESCAPES = 0.01  # beyond this share of escaped weights the layout saves little (10 bytes per escape)


class LosslessCudaLinear(FusableLinear, QLinear):
    fusable = False
    relative_speed = 1.09  # L8x4 in bfloat16 on an H100: a decode step 1.406 ms, 1.531 ms with bf16 weights

    @classmethod
    def held_bytes(cls, rec, dtype):
        return rec.numel * 3 // 2 + 4 * (rec.shape[0] + 1)  # the layout, its escapes left out (under 1% of weights)

    @classmethod
    def shared_bytes(cls, recs, dtype):
        # more than one row: the block of rows decoded for cuBLAS (``launch.cublas_linear``)
        return max(min(DEQUANT_BLOCK_BYTES, r.numel * dtype.itemsize) for r in recs)

    @classmethod
    def from_float(cls, module, scheme, parts, compute_dtype, device):
        """The stand-in, or, for a weight whose exponents spread too wide for the layout to pay (a 2:4-sparse
        weight's zeros all escape), an ``nn.Linear`` with the decoded weight, as resident mode gives it."""
        sm = parts["data"]
        t = expcode.encode(sm, exponents(parts))
        if t["esc_row"].numel() > MAX_ESCAPES * sm.numel():
            dense = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            dense.weight = nn.Parameter(scheme.dequantize(parts, compute_dtype), requires_grad=False)
            dense.bias = module.bias  # the loader may fill it later, as for a stand-in
            return dense
        base = t.pop("base")
        new = super().from_float(module, scheme, t, compute_dtype, device)
        new.base = base
        return new

    def layout(self) -> dict:
        return {**{n: self._buffers[n] for n in expcode.TENSORS}, "base": self.base}

    @staticmethod
    def op(x: torch.Tensor, src) -> torch.Tensor:
        b = src._buffers
        return torch.ops.codecllm.expcode_linear(x, *(b[n] for n in expcode.TENSORS), src.base, src.bias)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        if type(self._parameters["weight"]) is not QuantizedWeight:  # a float weight assigned after load
            return QLinear.forward(self, x)
        mm = self.__dict__.get("_mm")
        if mm is None or mm.t["sm"] is not self._buffers["sm"] or mm.bias is not self._parameters.get("bias"):
            mm = self.__dict__["_mm"] = expcode.ExpCodeMatmul(self.layout(), self.bias)
        return mm(x)

    def linear(self, x, parts):
        return expcode.ExpCodeMatmul({**parts, "base": self.base}, self.bias)(x)

    def dequantized(self) -> torch.Tensor:
        n, k = self._buffers["sm"].shape
        w = torch.empty((n, k), dtype=torch.bfloat16, device=self.device)
        return expcode.decode_into(self.layout(), 0, n, w).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", stream: 12-bit exponent-coded bfloat16"
