"""CPU int8 and int4 weight-only linear: ``y = x @ W.T + bias`` without a float copy of the weight for small
batches.

Measured on SmolLM2-135M shapes with 2 threads (``scripts/bench_cpu_kernels.py``): the only stock
PyTorch route that reads the int8 weight directly and beats an fp32 ``F.linear`` on one-token inputs
is ``aten._weight_int8pack_mm`` with **bfloat16** activations (AVX512-BF16 code path, fp32 accumulate).
Its float32 and float16 paths are scalar and 8-30x slower; dequantizing the whole weight per call costs
~9x an fp32 linear. For many rows (prefill) the bf16 kernel grows linearly with M, and a dequantized
weight with MKL's fp32 GEMM wins, with fp32-exact results.

Numerics of the small-M path: activations are rounded to bf16 (8 significant bits), products
accumulate in fp32, the unscaled row sums are rounded to bf16 once more, then multiplied by the fp32
scale. Relative error against a float64 reference of the same int8 weight: ~2.4e-3 (int8 rounding of
the weight itself costs ~7e-3 on Gaussian weights). Deterministic run to run, and each output row
does not depend on the other rows of the batch.

int4 (``int4_linear``): ``aten._weight_int4pack_mm_for_cpu``, bf16 activations, on codes repacked once
into its tiled layout (``int4_pack_codes``) with its scale/offset pairs, ``w = (q - 8) * scale + offset``, in
bf16: ours are ``w = (q - zero) * scale``, so ``offset = (8 - zero) * scale`` (rounding scale and offset to
bf16 moves a weight by about 0.2% of its group's step size, well under int4's own rounding). It takes N a
multiple of 16 and K of the group size and of 32; other weights are dequantized per call.

int8 as two 4-bit planes (``int8_planes``, for CPU stream mode): ``q + 128 = 16 * high + low``, each plane
a nibble per weight in the int4 kernel's layout, so that ``x @ q.T = x @ (16 * (high - 8) + 8).T + x @ (low - 8).T``
is two calls of the int4 kernel with constant (scale, offset) pairs, (16, 8) and (1, 0) (``_plane_pairs``):
every weight is an exact small integer in bf16. Stream mode entropy-codes only the high plane (about 3.2 of its 4 bits
carry information on trained weights, the low plane's 4 nearly all), which halves the bytes decoded per
call. The layout (blocks of 64 rows; per column, 32 bytes whose low nibbles are the block's first 32 rows
and high nibbles its last 32) is checked against ``_convert_weight_to_int4pack_for_cpu`` once per process
(``planes_fit``): a torch whose layout differs keeps the file's int8 codes instead.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

SMALL_M = 32  # rows up to which the bf16 int8 kernel beats dequantize + fp32 GEMM (crossover ~48-64)
K_MULTIPLE = 16  # _weight_int8pack_mm reads K in 16-wide vectors with no tail: other K crash or go wrong

_int8pack_mm = torch.ops.aten._weight_int8pack_mm
INT4_N_MULTIPLE, INT4_K_MULTIPLE = 16, 32
PLANE_ROWS = 64  # the int4 kernel packs rows in blocks of 64
PLANE_GROUPS = (256, 128, 64, 32)  # group sizes the int4 kernel takes: the planes' constant pairs use the largest that divides K


@lru_cache(maxsize=None)
def _unit(n: int) -> torch.Tensor:
    """bf16 ones of length ``n``: the kernel's scale argument. The true fp32 scale is applied after, so
    that no per-row scale is rounded to bf16 (that would bias a whole output row by up to 0.4%)."""
    return torch.ones(n, dtype=torch.bfloat16)


def fits(qweight: torch.Tensor) -> bool:
    """Whether ``qweight`` can take the int8 kernel: contiguous ``[N, K]`` int8 on the CPU, K % 16 == 0."""
    return (qweight.dtype == torch.int8 and qweight.dim() == 2 and qweight.is_contiguous()
            and qweight.shape[1] % K_MULTIPLE == 0 and qweight.device.type == "cpu")


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias`` on the CPU, in ``x``'s dtype.

    ``x``: ``[..., K]`` float32/bfloat16/float16. ``qweight``: int8 ``[N, K]``, contiguous (checked by
    :func:`fits`; a weight that does not fit is dequantized per call). ``scale``: float32 ``[N]``.
    """
    n, k = qweight.shape
    x2 = x.reshape(-1, k)
    if x2.shape[0] <= SMALL_M and fits(qweight):
        y = _int8pack_mm(x2.to(torch.bfloat16).contiguous(), qweight, _unit(n))
        y = torch.mul(y, scale)  # bf16 * fp32 -> fp32 in one pass
        if bias is not None:
            y = y.add_(bias)
        y = y.to(x.dtype)
    else:
        y = F.linear(x2, torch.mul(qweight, scale[:, None]).to(x.dtype), bias)
    return y.reshape(*x.shape[:-1], n)


def int4_fits(n: int, k: int, group_size: int) -> bool:
    """Whether an ``[n, k]`` int4 weight in groups of ``group_size`` can take the int4 kernel."""
    return n % INT4_N_MULTIPLE == 0 and k % INT4_K_MULTIPLE == 0 and k % group_size == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int4_pack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Packed codes ``qweight`` (uint8 ``[N, K / 2]``, the even column in the low nibble) in the kernel's
    tiled layout."""
    codes = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)


def int4_pairs(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The kernel's bf16 ``[groups, N, 2]`` (scale, offset) pairs for fp16 ``scale``, ``zero`` ``[N, groups]``."""
    s, z = scale.to(torch.float32), zero.to(torch.float32)
    return torch.stack([s.t(), ((8 - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()


def int4_linear(x: torch.Tensor, packed: torch.Tensor, pairs: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` on the CPU in ``x``'s dtype, ``W`` given by the kernel's operands (``int4_pack_codes``,
    ``int4_pairs``)."""
    k = x.shape[-1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, k).to(torch.bfloat16).contiguous(), packed, group_size, pairs)
    y = y.to(x.dtype)
    if bias is not None:
        y = y.add_(bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# --- int8 as two 4-bit planes ----------------------------------------------------------------------------

def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 16) ``[N, K]`` (N a multiple of 64) as the int4 kernel's packed bytes, flat."""
    n, k = codes.shape
    b = codes.reshape(n // PLANE_ROWS, 2, PLANE_ROWS // 2, k).transpose(2, 3)  # [blocks, half, K, 32]
    return (b[:, 0] | (b[:, 1] << 4)).reshape(-1)


def _rows(first: torch.Tensor, last: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``[n, k]`` from the values of each 64-row block's first and last 32 rows, laid out as the packed bytes."""
    return torch.stack([first, last], 1).transpose(2, 3).reshape(n, k)


def unpack_nibbles(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The uint8 codes ``[n, k]`` that ``pack_nibbles`` packed."""
    b = packed.reshape(n // PLANE_ROWS, k, PLANE_ROWS // 2)
    return _rows(b & 15, b >> 4, n, k)


@lru_cache(maxsize=None)
def _layout_known() -> bool:
    """Whether this torch's int4 kernel exists and packs as ``pack_nibbles`` does."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    codes = torch.randint(0, 16, (2 * PLANE_ROWS, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    except RuntimeError:
        return False
    return torch.equal(theirs.reshape(-1), pack_nibbles(codes))


def planes_fit(n: int, k: int) -> bool:
    """Whether an ``[n, k]`` int8 weight can be kept as two 4-bit planes (``int8_planes``)."""
    return n % PLANE_ROWS == 0 and k % INT4_K_MULTIPLE == 0 and _layout_known()


def int8_planes(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): the packed 4-bit planes of int8 ``qweight`` ``[N, K]``, ``q + 128 = 16 * high + low``,
    each ``N * K / 2`` bytes."""
    u = qweight.view(torch.uint8) ^ 0x80
    return pack_nibbles(u >> 4), pack_nibbles(u & 15)


def int8_from_planes(high: torch.Tensor, low: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The int8 ``[n, k]`` weight ``int8_planes`` split."""
    h, l = high.reshape(n // PLANE_ROWS, k, PLANE_ROWS // 2), low.reshape(n // PLANE_ROWS, k, PLANE_ROWS // 2)
    first, last = ((h & 15) << 4) | (l & 15), (h & 0xF0) | (l >> 4)  # q + 128, joined before the one unpacking pass
    return (_rows(first, last, n, k) ^ 0x80).view(torch.int8)


@lru_cache(maxsize=None)
def _plane_pairs(n: int, k: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The group size and the int4 kernel's (scale, offset) pairs that read a high-plane code ``c`` as
    ``16 * (c - 8) + 8`` and a low-plane one as ``c - 8``: the two sum to the int8 code, and each plane's
    values are centred, so that the low plane's result is small and its rounding to bf16 costs little."""
    gs = next(g for g in PLANE_GROUPS if k % g == 0)

    def pairs(scale, offset):
        return torch.tensor([scale, offset], dtype=torch.bfloat16).expand(k // gs, n, 2).contiguous()

    return gs, pairs(16.0, 8.0), pairs(1.0, 0.0)


def planes_linear(x: torch.Tensor, high: torch.Tensor, low: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (q * scale[:, None]).T + bias`` for ``q`` given as its planes (``int8_planes``), through two
    calls of the int4 kernel (bf16 activations, fp32 accumulation, each result rounded to bf16 once)."""
    n, k = scale.shape[0], x.shape[-1]
    gs, hi_pairs, lo_pairs = _plane_pairs(n, k)
    x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    y = mm(x2, high.view(n, k // 2), gs, hi_pairs).to(torch.float32)
    y = y.add_(mm(x2, low.view(n, k // 2), gs, lo_pairs)).mul_(scale)
    if bias is not None:
        y = y.add_(bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
