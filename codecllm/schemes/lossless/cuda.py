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
from ...gpu.stream import aligned
from ...kernels import expcode_triton as expcode
from ...kernels import launch
from ...qmodules import QLinear, QuantizedWeight, eager_only
from . import exponents


MAX_ESCAPES = 0.01  # beyond this share of escaped weights the layout saves little (10 bytes per escape)


class LosslessCudaLinear(FusableLinear, QLinear):
    fusable = False
    relative_speed = 1.09  # L8x4 in bfloat16 on an H100: a decode step 1.410 ms, 1.533 ms with bf16 weights

    @classmethod
    def held_bytes(cls, rec, dtype):
        return rec.numel * 3 // 2 + 4 * (rec.shape[0] + 1)  # the layout, its escapes left out (under 1% of weights)

    @classmethod
    def shared_bytes(cls, held, dtype):
        # more than one row: the block of rows decoded for cuBLAS (``launch.cublas_linear``)
        return max(min(launch.DEQUANT_BLOCK_BYTES, r.numel * dtype.itemsize) for _, r in held)

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


def _block_rows(n: int, k: int) -> int:
    """Rows per block of an ``[n, k]`` weight (``k // 2`` code bytes a row)."""
    return max(1, min(n, SMALL_BLOCK_BYTES // (k // 2)))


def _groups(sizes: list) -> list[list[int]]:
    """Runs of consecutive single-block layers (``sizes``: their code bytes, None for a layer of several
    blocks), each holding at most as many code bytes as the largest single-block layer (so the workspace
    grows by nothing), as lists of indices."""
    cap = max([aligned(n) for n in sizes if n is not None], default=0)
    groups, cur, total = [], [], 0
    for i, n in enumerate(sizes):
        if cur and (n is None or total + aligned(n) > cap):
            groups.append(cur)
            cur, total = [], 0
        if n is not None:
            cur.append(i)
            total += aligned(n)
    if cur:
        groups.append(cur)
    return groups


def _workspace_bytes(shapes: list[tuple[int, int]]) -> int:
    """The workspace the small layers of these weight shapes need: the largest block (a group holds no
    more than its largest single-block layer, ``_groups``)."""
    return max(aligned(_block_rows(n, k) * (k // 2)) for n, k in shapes)


class _Workspace:
    """Where the small layers of one model decode their codes (``LosslessSmallLinear.finish_load``): as
    large as the largest block, with nvCOMP's temp buffer. One stream at a time computes with a model."""

    def __init__(self, device: torch.device, nbytes: int, temp_bytes: int):
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.temp = torch.empty(max(temp_bytes, 1), dtype=torch.uint8, device=device)
        self.holder = None  # the ``_Group`` whose codes the workspace holds (on the stream, in order)


class _Group:
    """Single-block layers next to each other in the model (an attention block's q, k, v and o
    projections), whose codes one nvCOMP call decodes, each at its offset in the workspace: the first of
    them to run decodes them all (nvCOMP costs about 14 us a call, more than a k projection's codes take
    to decode). The workspace's ``holder`` says when the codes are still there."""

    def __init__(self, blocks: list["_Block"], offsets: list[int], ws: _Workspace):
        from ...gpu import nvcomp

        total, dev = sum(b.table.num_chunks for b in blocks), ws.buf.device
        self.table = nvcomp.ChunkTable.concat([b.table for b in blocks], torch.zeros(total, dtype=torch.int32, device=dev),
                                              torch.zeros(total, dtype=torch.int64, device=dev))
        self.out_ptrs = torch.cat([b.table.out_table(ws.buf.data_ptr() + o, ANS_CHUNK) for b, o in zip(blocks, offsets)])


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
        self.out_for = self.mm_ws = self.mm_bias = self.mm_offset = None  # what the output table and the matmul were made for

    def decode(self, ws: _Workspace) -> torch.Tensor:
        """Enqueue the decode of the codes into the workspace (at its start); returns their view there."""
        if self.out_for is not ws:
            self.out_ptrs, self.out_for = self.table.out_table(ws.buf.data_ptr(), ANS_CHUNK), ws
        self.table.decode(ws.temp, out_ptrs=self.out_ptrs)
        ws.holder = None
        return ws.buf[:self.nbytes].view(self.r1 - self.r0, -1)

    def matmul(self, ws: _Workspace, bias: torch.Tensor | None, offset: int = 0) -> "expcode.ExpCodeMatmul":
        """The matmul reading the codes at ``offset`` in the workspace."""
        if self.mm_ws is not ws or self.mm_bias is not bias or self.mm_offset != offset:
            code = ws.buf[offset:offset + self.nbytes].view(self.r1 - self.r0, -1)
            self.mm = expcode.ExpCodeMatmul({**self.rest, "code": code}, None if bias is None else bias[self.r0:self.r1])
            self.mm_ws, self.mm_bias, self.mm_offset = ws, bias, offset
        return self.mm


class LosslessSmallLinear(LosslessCudaLinear):
    """``mode="stream"`` with ``gpu_stream_codec="ans"``: the exponent-coded layout with its 4-bit codes
    kept as nvCOMP ANS chunks (about 2.7 bits per weight, the sign+mantissa bytes as they are: about
    0.67x of bfloat16's bytes). Before each use the codes are decoded into a workspace shared by the
    model's small layers (blocks of at most ``SMALL_BLOCK_BYTES``; neighbouring single-block layers decode
    in one call, ``_Group``), which the same matmul then reads.
    Eager only: the decode goes through nvCOMP's C API (CUDA graphs capture it)."""

    relative_speed = 0.62  # L8x4 in bfloat16 on an H100: a decode step 2.485 ms, 1.536 ms with bf16 weights
    compiles = False

    @classmethod
    def held_bytes(cls, rec, dtype):
        coded = sum(sum(p.chunks) or p.nbytes for n, p in rec.parts.items() if n.startswith("exponent"))  # the file's, about ANS's
        return rec.numel + coded + 4 * (rec.shape[0] + 1)

    @classmethod
    def shared_bytes(cls, held, dtype):
        return _workspace_bytes([tuple(r.shape) for _, r in held]) + super().shared_bytes(held, dtype)

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
        rows = _block_rows(n, 2 * kh)
        self.decode_group = self.offset = None  # from ``finish_load``
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
        """One workspace for the model's small layers, and their groups (``_Group``, in model order)."""
        ws = _Workspace(layers[0].device, _workspace_bytes([(l.out_features, l.in_features) for l in layers]), 1)
        temp = max(l.temp_bytes for l in layers)
        for g in _groups([l.blocks[0].nbytes if len(l.blocks) == 1 else None for l in layers]):
            offsets = [sum(aligned(layers[j].blocks[0].nbytes) for j in g[:i]) for i in range(len(g))]
            group = _Group([layers[i].blocks[0] for i in g], offsets, ws)
            temp = max(temp, group.table.temp_bytes)
            for i, off in zip(g, offsets):
                layers[i].decode_group, layers[i].offset = group, off
        ws.temp = torch.empty(max(temp, 1), dtype=torch.uint8, device=ws.buf.device)
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
        if self.decode_group is not None:
            if ws.holder is not self.decode_group:
                self.decode_group.table.decode(ws.temp, out_ptrs=self.decode_group.out_ptrs)
                ws.holder = self.decode_group
            return self.blocks[0].matmul(ws, self.bias, self.offset)(x)
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
