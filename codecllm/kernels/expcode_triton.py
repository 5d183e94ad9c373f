"""A bfloat16 weight kept bit for bit in 12 bits per weight, and computed from as it is.

Layout of an ``[N, K]`` weight (``K`` even), built by ``encode`` from the weight's sign+mantissa bytes and
exponents:

- ``sm``: uint8 ``[N, K]``, the sign (bit 7) and the 7 mantissa bits of each weight;
- ``code``: uint8 ``[N, K / 2]``, a 4-bit exponent code per weight: byte ``[n, j]`` holds weight ``(n, j)``
  in its low nibble and weight ``(n, j + K / 2)`` in its high nibble. Code ``c < 15`` stands for the
  exponent ``base + c``; code 15 is an escape;
- ``base``: the start of the 15 consecutive exponents that hold the most weights (an int kept on the host);
- the escaped weights, sorted by row then column: ``esc_row``, ``esc_col`` (int32) and ``esc_val`` (their
  bfloat16 values), with ``row_ptr`` (int32 ``[N + 1]``): row ``n``'s escapes are ``row_ptr[n]:row_ptr[n + 1]``.

A trained or random-normal weight's exponents span few values: 15 of them cover 99.98% of random-normal
weights and 99.75% of SmolLM2's weights cast to bfloat16, so the layout holds 0.75x of the bfloat16 bytes
plus about 10 bytes per escape. The one-row matmul (a decode step) reads those 12 bits per weight and
rebuilds each weight in registers (exactly: the bits are the weight's own), escapes counted as zero in
the tile loop and added once per row from the list. More rows run through cuBLAS on the weight decoded a
block of rows at a time (``codecllm.kernels.launch.cublas_linear``).

Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (how the CPU tests check its logic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, LAUNCHERS, SCRATCH, SPLIT_MAX_N, Launcher, cdiv, cublas_linear, k_steps, launch_grid, scratch_at, scratch_for, tuned_launcher

CODES = 15  # exponents a code stands for; code 15 escapes
ESCAPE = 15
_ESC_BLOCK = 32  # escapes a program handles per step


def encode(sm: torch.Tensor, exponent: torch.Tensor) -> dict:
    """The layout of a bfloat16 weight given its sign+mantissa bytes ``sm`` (uint8 ``[N, K]``, ``K`` even)
    and its 8-bit exponents (uint8, ``N * K`` of them, row-major). Returns the tensors (on ``sm``'s device)
    and ``base``."""
    n, k = sm.shape
    if k % 2:
        raise ValueError(f"the exponent-coded layout needs an even number of columns, not {k}")
    e = exponent.reshape(n, k)
    counts = torch.bincount(e.reshape(-1), minlength=256)
    sums = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    base = int(torch.argmax(sums[CODES:] - sums[:-CODES]))  # the lowest start of the fullest window
    c = e - base  # uint8: mod 256
    esc = c >= CODES
    c = c.masked_fill(esc, ESCAPE)
    code = c[:, :k // 2] | (c[:, k // 2:] << 4)
    rows, cols = torch.nonzero(esc, as_tuple=True)
    s, ee = sm[rows, cols].to(torch.int32), e[rows, cols].to(torch.int32)
    bits = ((s & 0x80) << 8) | (ee << 7) | (s & 0x7F)
    val = bits.to(torch.int16)  # int32 -> int16 keeps the low 16 bits
    row_ptr = torch.zeros(n + 1, dtype=torch.int32, device=sm.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return {"sm": sm.contiguous(), "code": code.contiguous(), "row_ptr": row_ptr, "esc_row": rows.to(torch.int32),
            "esc_col": cols.to(torch.int32), "esc_bits": val, "base": base}


TENSORS = ("sm", "code", "row_ptr", "esc_row", "esc_col", "esc_bits")


def decode_reference(t: dict) -> torch.Tensor:
    """The bfloat16 weight of layout ``t`` (torch operations; what the kernels are tested against)."""
    sm, code = t["sm"], t["code"]
    c = torch.cat([code & 15, code >> 4], dim=1).to(torch.int32)
    s = sm.to(torch.int32)
    bits = ((s & 0x80) << 8) | ((c + t["base"]) << 7) | (s & 0x7F)
    w = bits.to(torch.int16).view(torch.bfloat16).clone()
    w[c == ESCAPE] = 0
    w[t["esc_row"].long(), t["esc_col"].long()] = t["esc_bits"].view(torch.bfloat16)
    return w


def nbytes(t: dict) -> int:
    return sum(t[n].numel() * t[n].element_size() for n in TENSORS)


@triton.jit
def _weight(s, c, BASE23):
    """Weights (float32) from sign+mantissa bytes ``s`` and codes ``c``; an escape counts as zero.
    ``BASE23`` is ``base << 23``. Few integer operations per weight (the one-row matmul is bound by
    them, not by memory): ``s * 0x01010000`` puts the byte at bits 16-23 and again at 24-31, and the
    mask keeps the mantissa from the first copy and the sign from the second."""
    t = s.to(tl.int32) * 0x01010000
    bits = (t & -2139160576) | (c.to(tl.int32) * 8388608 + BASE23)  # 0x807F0000; c << 23
    return tl.where(c == 15, 0.0, bits.to(tl.float32, bitcast=True))


@triton.jit
def _bf16_bits(b):
    """float32 values of bfloat16 bit patterns ``b`` (int16), exactly (subnormals included)."""
    return ((b.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["BASE"])
def _gemv_kernel(
    x_ptr, sm_ptr, code_ptr, row_ptr, esc_row_ptr, esc_col_ptr, esc_bits_ptr, b_ptr, y_ptr, part_ptr, count_ptr,
    N, K, stride_xk, BASE,
    HAS_BIAS: tl.constexpr, ESC_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """One activation row against the layout: each program reduces ``BLOCK_N`` rows over its share of the
    ``K / 2`` code columns, ``BLOCK_K`` at a time (two weights per code byte, one from each half of K)."""
    pid = tl.program_id(0)
    kh = K // 2
    kb0, kb1 = k_steps(tl.cdiv(kh, BLOCK_K), SPLIT_K)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for kb in range(kb0, kb1):
        k = kb * BLOCK_K + rk
        mk = k < kh
        mask = (rn[:, None] < N) & mk[None, :]
        c = tl.load(code_ptr + rn[:, None] * kh + k[None, :], mask=mask, other=255)  # masked: escapes, zero weights
        lo = tl.load(sm_ptr + rn[:, None] * K + k[None, :], mask=mask, other=0)
        hi = tl.load(sm_ptr + rn[:, None] * K + (k + kh)[None, :], mask=mask, other=0)
        xl = tl.load(x_ptr + k * stride_xk, mask=mk, other=0.0).to(tl.float32)
        xh = tl.load(x_ptr + (k + kh) * stride_xk, mask=mk, other=0.0).to(tl.float32)
        acc += _weight(lo, c & 15, BASE << 23) * xl[None, :] + _weight(hi, c >> 4, BASE << 23) * xh[None, :]
    row = tl.sum(acc, axis=1)
    if tl.program_id(1) == 0:  # the escaped weights of these rows, once
        e0 = tl.load(row_ptr + pid * BLOCK_N)
        e1 = tl.load(row_ptr + tl.minimum(pid * BLOCK_N + BLOCK_N, N))
        re = tl.arange(0, ESC_BLOCK)
        for e in range(e0, e1, ESC_BLOCK):
            i = e + re
            m = i < e1
            r = tl.load(esc_row_ptr + i, mask=m, other=-1)
            col = tl.load(esc_col_ptr + i, mask=m, other=0)
            v = _bf16_bits(tl.load(esc_bits_ptr + i, mask=m, other=0)) * tl.load(x_ptr + col * stride_xk, mask=m, other=0.0).to(tl.float32)
            row += tl.sum(tl.where(r[None, :] == rn[:, None], v[None, :], 0.0), axis=1)
    if SPLIT_K > 1:
        parts = part_ptr + pid * (SPLIT_K * BLOCK_N)
        tl.store(parts + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N), row)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # last of this tile's programs: add the partials in split order
            row = tl.load(parts + tl.arange(0, BLOCK_N), cache_modifier=".cg")
            for s in range(1, SPLIT_K):
                row += tl.load(parts + s * BLOCK_N + tl.arange(0, BLOCK_N), cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed", scope="gpu")  # ready for the next call
            _store_row(row, rn, N, b_ptr, y_ptr, HAS_BIAS)
    else:
        _store_row(row, rn, N, b_ptr, y_ptr, HAS_BIAS)


@triton.jit
def _store_row(row, rn, N, b_ptr, y_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        row += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, row.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _out(v, bits, o_ptr):
    """What ``o`` gets for float32 values ``v`` whose bfloat16 bit patterns are ``bits`` (int32): the bits
    themselves for a bfloat16 ``o`` (a conversion could flush subnormals), else ``v`` rounded."""
    if o_ptr.dtype.element_ty == tl.bfloat16:
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    return v.to(o_ptr.dtype.element_ty)


@triton.jit(do_not_specialize=["ROW0", "N", "BASE"])
def _decode_kernel(sm_ptr, code_ptr, row_ptr, esc_row_ptr, esc_col_ptr, esc_bits_ptr, o_ptr, ROW0, N, K, BASE,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ESC_BLOCK: tl.constexpr):
    """Rows ``ROW0:ROW0 + N`` of the weight into ``o`` (``[N, K]``, contiguous, any float dtype): each
    program decodes a tile of ``BLOCK_N`` rows by ``BLOCK_K`` code columns (the weights at those columns
    in both halves of K), then overwrites the escapes among them (after a barrier: the same program's
    threads wrote the places first)."""
    kh = K // 2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    mask = (rn[:, None] < N) & (k[None, :] < kh)
    g = ROW0 + rn[:, None]
    c = tl.load(code_ptr + g * kh + k[None, :], mask=mask, other=0).to(tl.int32)
    out = o_ptr + rn[:, None] * K + k[None, :]
    for half in tl.static_range(2):
        ch = (c >> (4 * half)) & 15
        s = tl.load(sm_ptr + g * K + (k + half * kh)[None, :], mask=mask, other=0).to(tl.int32)
        bits = ((s & 0x80) << 8) | ((ch + BASE) << 7) | (s & 0x7F)
        tl.store(out + half * kh, _out(_bf16_bits(bits), bits, o_ptr), mask=mask)
    tl.debug_barrier()
    e0 = tl.load(row_ptr + ROW0 + tl.program_id(0) * BLOCK_N)
    e1 = tl.load(row_ptr + ROW0 + tl.minimum(tl.program_id(0) * BLOCK_N + BLOCK_N, N))
    re = tl.arange(0, ESC_BLOCK)
    for e in range(e0, e1, ESC_BLOCK):
        i = e + re
        col = tl.load(esc_col_ptr + i, mask=i < e1, other=-1)
        j = tl.where(col >= kh, col - kh, col)  # its code column
        m = (i < e1) & (j >= k0) & (j < k0 + BLOCK_K)
        r = tl.load(esc_row_ptr + i, mask=m, other=0) - ROW0
        eb = tl.load(esc_bits_ptr + i, mask=m, other=0).to(tl.int32) & 0xFFFF
        tl.store(o_ptr + r * K + col, _out(_bf16_bits(eb), eb, o_ptr), mask=m)


def decode_into(t: dict, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
    """``out[:] = W[n0:n1]`` for the weight of layout ``t`` (``out`` contiguous ``[n1 - n0, K]``, any float
    dtype: the bfloat16 weights, rounded to it)."""
    k = t["sm"].shape[1]
    bn, bk = (4, 32) if INTERPRET else (DECODE_BLOCK_N, DECODE_BLOCK_K)
    grid = (cdiv(n1 - n0, bn), cdiv(k // 2, bk))
    _decode_kernel[grid](*(t[n] for n in TENSORS), out, n0, n1 - n0, k, t["base"], BLOCK_N=bn, BLOCK_K=bk, ESC_BLOCK=_ESC_BLOCK,
                         num_warps=DECODE_WARPS)
    return out


DECODE_BLOCK_N, DECODE_BLOCK_K, DECODE_WARPS = 8, 256, 4


def _gemv_configs() -> list[triton.Config]:
    cfgs = []
    for bn, bk, w, st in ((2, 1024, 4, 2), (4, 512, 4, 2), (4, 1024, 8, 2), (8, 256, 4, 3), (8, 512, 4, 2), (16, 256, 4, 2),
                          (16, 128, 4, 3), (32, 128, 4, 2)):
        for split in (1, 2, 4, 8):
            cfgs.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=w, num_stages=st))
    return cfgs


def _prune_gemv(configs, named_args, **kwargs):
    n, kh = named_args["N"], named_args["K"] // 2
    keep = [c for c in configs if c.kwargs["SPLIT_K"] == 1 or (n <= SPLIT_MAX_N and kh >= c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"])]
    return keep or configs[:1]


_tuned_gemv = triton.autotune(configs=_gemv_configs(), key=["N", "K"], prune_configs_by={"early_config_prune": _prune_gemv})(_gemv_kernel)
_GEMV_CONSTS = ("BLOCK_N", "BLOCK_K", "SPLIT_K")
# the interpreter has no benchmarking driver: it runs one fixed configuration (tests change SPLIT_K)
INTERPRET_GEMV = {"BLOCK_N": 4, "BLOCK_K": 32, "SPLIT_K": 1}


class ExpCodeMatmul:
    """``y = x @ W.T + bias`` for the weight of layout ``t`` (``encode``), fixed when it is made. One
    activation row (a decode step) runs the GEMV kernel through a launcher prepared at its first call;
    more rows run cuBLAS on the weight decoded a block of rows at a time. Holds references to its
    tensors: if a layer's tensors are replaced, make a new one."""

    def __init__(self, t: dict, bias: torch.Tensor | None = None):
        self.t, self.bias = t, bias
        self.n, self.k = t["sm"].shape
        self.device, self.index = t["sm"].device, t["sm"].device.index
        if bias is not None and not bias.is_contiguous():
            raise ValueError("ExpCodeMatmul needs a contiguous bias")
        self.tensors = tuple(t[n] for n in TENSORS)
        self.tail = (*(p.data_ptr() for p in self.tensors), (bias if bias is not None else t["sm"]).data_ptr())
        self.aligned = tuple(p % 16 == 0 for p in self.tail)  # Triton specializes on 16-byte alignment
        self.has_bias = bias is not None
        self.launchers: dict[tuple, Launcher] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape[-1] != self.k:
            raise ValueError(f"input has {shape[-1]} features, the weight {self.k}")
        if x.numel() != self.k:
            return self._rows(x)
        y = torch.empty((*shape[:-1], self.n), dtype=x.dtype, device=self.device)
        sx = x.stride(-1)
        if INTERPRET:
            _gemv_kernel[launch_grid(INTERPRET_GEMV)(1, self.n)](*self._args(x, y, scratch_for(self.device)), HAS_BIAS=self.has_bias,
                                                                 ESC_BLOCK=_ESC_BLOCK, **INTERPRET_GEMV)
            return y
        xp = x.data_ptr()
        launch = self.launchers.get((x.dtype, sx, xp % 16 == 0))
        if launch is None:
            return self._first(x, y)
        stream = torch._C._cuda_getCurrentRawStream(self.index)
        scratch = SCRATCH.get((self.index, stream)) or scratch_at(self.index, stream, self.device)
        launch((launch.row_grid, launch.split, 1), stream,
               (xp, *self.tail, y.data_ptr(), *scratch.ptrs, self.n, self.k, sx, self.t["base"], self.has_bias, _ESC_BLOCK),
               lambda: (*self._args(x, y, scratch), self.has_bias, _ESC_BLOCK))
        return y

    def _args(self, x, y, scratch) -> tuple:
        b = self.bias if self.bias is not None else self.t["sm"]
        return (x, *self.tensors, b, y, scratch.parts, scratch.counts, self.n, self.k, x.stride(-1), self.t["base"])

    def _first(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Tune (or find) the GEMV for this layout; computes ``y`` on the way."""
        sx, xa = x.stride(-1), x.data_ptr() % 16 == 0
        key = ("expcode-gemv", x.dtype, self.bias.dtype if self.has_bias else None, self.n, self.k, sx, xa, self.aligned, self.index)
        done = key in LAUNCHERS
        args = list(self._args(x, y, scratch_for(self.device)))
        self.launchers[(x.dtype, sx, xa)] = tuned_launcher(_gemv_kernel, _tuned_gemv, _GEMV_CONSTS, key, args,
                                                           {"HAS_BIAS": self.has_bias, "ESC_BLOCK": _ESC_BLOCK}, 1, self.n,
                                                           f"expcode gemv N={self.n} K={self.k} {x.dtype}")
        return self(x) if done else y

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.k)
        y = torch.empty((x2.shape[0], self.n), dtype=x.dtype, device=self.device)
        if x2.shape[0]:
            cublas_linear(x2, self.n, self.k, lambda n0, n1, out: decode_into(self.t, n0, n1, out), self.bias, y)
        return y.reshape(*x.shape[:-1], self.n)


# -- the op that compiled graphs see ------------------------------------------------------------------


@torch.library.custom_op("codecllm::expcode_linear", mutates_args=())
def expcode_linear_op(x: torch.Tensor, sm: torch.Tensor, code: torch.Tensor, row_ptr: torch.Tensor, esc_row: torch.Tensor,
                      esc_col: torch.Tensor, esc_bits: torch.Tensor, base: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``ExpCodeMatmul`` as a torch operator, which ``torch.compile`` traces as one node."""
    t = {"sm": sm, "code": code, "row_ptr": row_ptr, "esc_row": esc_row, "esc_col": esc_col, "esc_bits": esc_bits, "base": base}
    return ExpCodeMatmul(t, bias)(x)


@expcode_linear_op.register_fake
def _(x, sm, code, row_ptr, esc_row, esc_col, esc_bits, base, bias):
    if x.shape[-1] != sm.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {sm.shape[1]}")
    return x.new_empty((*x.shape[:-1], sm.shape[0]))
