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
from ...kernels import launch
from ...qmodules import QLinear, QuantizedWeight, eager_only
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
        return max(min(launch.DEQUANT_BLOCK_BYTES, r.numel * dtype.itemsize) for r in recs)

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

    def dequantized(self) -> torch.Tensor:
        n, k = self._buffers["sm"].shape
        w = torch.empty((n, k), dtype=torch.bfloat16, device=self.device)
        return expcode.decode_into(self.layout(), 0, n, w).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", stream: 12-bit exponent-coded bfloat16"


# -- the small operating point: the codes entropy-coded too -----------------------------------------------

SMALL_BLOCK_BYTES = 32 << 20  # code bytes decoded at a time: the workspace (a vocabulary head is cut into blocks of rows)
ANS_CHUNK = 1 << 16


class _Workspace:
    """Where the small layers of one model decode their codes (``LosslessSmallLinear.finish_load``): as
    large as the largest block, with nvCOMP's temp buffer. One stream at a time computes with a model."""

    def __init__(self, device: torch.device, nbytes: int, temp_bytes: int):
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.temp = torch.empty(max(temp_bytes, 1), dtype=torch.uint8, device=device)


class _Block:
    """Rows ``r0:r1`` of a small layer: their codes as nvCOMP ANS chunks, and the layout that the matmul
    reads once they are decoded into the workspace (escapes renumbered from ``r0``)."""

    def __init__(self, t: dict, r0: int, r1: int):
        from ...gpu import nvcomp

        code = t["code"][r0:r1]
        self.r0, self.r1, self.nbytes = r0, r1, code.numel()
        comp, offsets, sizes = nvcomp.ans_encode(code, ANS_CHUNK)
        outs = [min(ANS_CHUNK, self.nbytes - i) for i in range(0, self.nbytes, ANS_CHUNK)]
        dev = code.device
        self.table = nvcomp.ChunkTable(nvcomp.ANS, comp, offsets, sizes, 0, outs, ANS_CHUNK,
                                       torch.zeros(len(outs), dtype=torch.int32, device=dev), torch.zeros(len(outs), dtype=torch.int64, device=dev))
        if r0 == 0 and r1 == t["code"].shape[0]:  # the whole weight: its own tensors
            self.rest = {n: t[n] for n in ("sm", "row_ptr", "esc_row", "esc_col", "esc_bits", "base")}
        else:
            e0, e1 = int(t["row_ptr"][r0]), int(t["row_ptr"][r1])
            self.rest = {"sm": t["sm"][r0:r1], "row_ptr": t["row_ptr"][r0:r1 + 1] - e0, "esc_row": t["esc_row"][e0:e1] - r0,
                         "esc_col": t["esc_col"][e0:e1], "esc_bits": t["esc_bits"][e0:e1], "base": t["base"]}
        self.out_for = self.mm_ws = self.mm_bias = None  # what the output table and the matmul were made for

    def decode(self, ws: _Workspace) -> torch.Tensor:
        """Enqueue the decode of the codes into the workspace; returns their view there."""
        if self.out_for is not ws:
            self.out_ptrs, self.out_for = self.table.out_table(ws.buf.data_ptr(), ANS_CHUNK), ws
        self.table.decode(ws.temp, out_ptrs=self.out_ptrs)
        return ws.buf[:self.nbytes].view(self.r1 - self.r0, -1)

    def matmul(self, ws: _Workspace, bias: torch.Tensor | None) -> "expcode.ExpCodeMatmul":
        if self.mm_ws is not ws or self.mm_bias is not bias:
            code = ws.buf[:self.nbytes].view(self.r1 - self.r0, -1)
            self.mm = expcode.ExpCodeMatmul({**self.rest, "code": code}, None if bias is None else bias[self.r0:self.r1])
            self.mm_ws, self.mm_bias = ws, bias
        return self.mm


class LosslessSmallLinear(LosslessCudaLinear):
    """``mode="stream"`` with ``gpu_stream_codec="ans"``: the exponent-coded layout with its 4-bit codes
    kept as nvCOMP ANS chunks (about 2.7 bits per weight, the sign+mantissa bytes as they are: about
    0.67x of bfloat16's bytes). Before each use the codes are decoded into a workspace shared by the
    model's small layers (blocks of at most ``SMALL_BLOCK_BYTES``), which the same matmul then reads.
    Eager only: the decode goes through nvCOMP's C API (CUDA graphs capture it)."""

    relative_speed = 0.56  # L8x4 in bfloat16 on an H100: a decode step 2.711 ms, 1.531 ms with bf16 weights

    @classmethod
    def held_bytes(cls, rec, dtype):
        coded = sum(sum(p.chunks) or p.nbytes for n, p in rec.parts.items() if n.startswith("exponent"))  # the file's, about ANS's
        return rec.numel + coded + 4 * (rec.shape[0] + 1)

    @classmethod
    def shared_bytes(cls, recs, dtype):
        block = max(min(r.numel // 2, SMALL_BLOCK_BYTES // (r.shape[1] // 2) * (r.shape[1] // 2)) for r in recs)
        return block + super().shared_bytes(recs, dtype)

    @classmethod
    def from_float(cls, module, scheme, parts, compute_dtype, device):
        new = super().from_float(module, scheme, parts, compute_dtype, device)
        if isinstance(new, cls):
            new._entropy_code()
        return new

    def _entropy_code(self) -> None:
        """Cut the layout into blocks, ANS-code each block's codes, check that every block decodes back to
        them, and drop the codes."""
        t = self.layout()
        n, kh = t["code"].shape
        rows = max(1, min(n, SMALL_BLOCK_BYTES // kh))
        self.blocks = [_Block(t, r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]
        self.block_bytes = max(b.nbytes for b in self.blocks)
        self.temp_bytes = max(b.table.temp_bytes for b in self.blocks)
        self.ws = None  # the model's, from ``finish_load``
        ws = _Workspace(self.device, self.block_bytes, self.temp_bytes)
        for i, b in enumerate(self.blocks):
            got = b.decode(ws)
            if not torch.equal(got, t["code"][b.r0:b.r1]) or bool((b.table.statuses != 0).any()):
                from ...errors import DecodeError

                raise DecodeError("nvCOMP ANS did not give back the exponent codes it was given")
            self.register_buffer(f"ans{i}", b.table.comp, persistent=False)  # (the module's memory shows them)
            b.out_for = b.out_ptrs = None  # (this workspace is freed now)
        del self._buffers["code"]
        self.part_names = tuple(p for p in self.part_names if p != "code")

    @classmethod
    def finish_load(cls, layers: list) -> None:
        """One workspace for the model's small layers, as large as the largest block of any."""
        ws = _Workspace(layers[0].device, max(l.block_bytes for l in layers), max(l.temp_bytes for l in layers))
        for layer in layers:
            layer.ws = ws

    def _workspace(self) -> _Workspace:
        if self.ws is None:  # a layer made outside the loader
            self.ws = _Workspace(self.device, self.block_bytes, self.temp_bytes)
        return self.ws

    @eager_only
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self._parameters["weight"]) is not QuantizedWeight:  # a float weight assigned after load
            return QLinear.forward(self, x)
        ws = self._workspace()
        if len(self.blocks) == 1:
            b = self.blocks[0]
            b.decode(ws)
            return b.matmul(ws, self.bias)(x)
        y = x.new_empty((*x.shape[:-1], self.out_features))
        for b in self.blocks:
            b.decode(ws)
            y[..., b.r0:b.r1] = b.matmul(ws, self.bias)(x)
        return y

    plain = forward

    def dequantized(self) -> torch.Tensor:
        ws = self._workspace()
        w = torch.empty((self.out_features, self.in_features), dtype=torch.bfloat16, device=self.device)
        for b in self.blocks:
            expcode.decode_into({**b.rest, "code": b.decode(ws)}, 0, b.r1 - b.r0, w[b.r0:b.r1])
        return w.to(self.compute_dtype)

    def extra_repr(self) -> str:
        return QLinear.extra_repr(self) + f", stream: exponent-coded bfloat16, codes ANS-coded in {len(self.blocks)} block(s)"
