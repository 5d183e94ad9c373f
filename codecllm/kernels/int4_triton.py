"""The fused int4 weight-only matmul of the ``int4`` scheme: ``y = x @ W.T + bias`` with
``W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]``, ``g = k // GS``, read straight from the packed codes
(two per byte, the even column in the low nibble) and the per-group fp16 scales and zero points.

One row (a decode step), fp16 activations: ``_int4_gemv_half2_kernel``. No tensor cores. The codes are
read as int32 words of eight and turned into fp16 pairs by one ``lop3`` each (OR-ed into the mantissa of
1024.0, then one packed subtraction or fma leaves ``q`` exactly); a word's eight products are summed in
packed fp16 (inline PTX, ``_HALF2_DOT``) and widened to float32, where everything else is added: each
word's sum times its group's scale, and per group ``scale * zero * sum_k x_k``. The K loop is
software-pipelined through shared memory (``tl.range(num_stages=...)``). About 3.2 instructions per
weight in the loop against the byte kernel's 7.4 (sm_90 SASS of the tuned tiles).

One row otherwise (bf16 or fp32 activations, odd layouts): ``_int4_gemv_kernel``, on bytes. A nibble
becomes a float32 by OR-ing it into the mantissa of 2^23, giving ``2^23 + q`` (``2^23 + 16 q`` for the
high nibble, left in place, whose activation is pre-divided by 16), and one subtraction leaves ``q``
exactly. Per group, the dot product of the codes with the activations is taken first; scale and zero
point are applied once per group: ``sum_g scale_g * (sum_k q_k x_k - zero_g * sum_k x_k)``.

2-128 rows of fp16 or bf16 activations: ``_int4_mm_deq_kernel``, a tensor-core GEMM whose K steps span
several groups (up to 256 columns), each weight made in registers in the activation dtype before the
product (bf16: ``q * scale - zero * scale`` in float32, rounded once, as the dequantize-then-cuBLAS path
rounds it; fp16: one fma of the exact code and the scale with ``-zero * scale`` rounded to fp16 first, an
error of at most ``|zero * scale| * 2^-12`` more, under 0.4% of a quantization step); the
activations are read as whole rows of the step and split into even and odd columns in registers. On
Llama-3-8B's shapes (H100, benchmarks/NOTES.md) this runs at 1.31-2.00x of fp16 at 16 rows and 0.49-1.07x
at 64, where the exact-code GEMM below (steps of one group, activations read at stride 2) ran at 0.56-1.03x
and 0.10-0.24x. From 65 rows it takes larger, grouped row tiles and is timed against cuBLAS per shape. It stops
at 128 rows: at 256 it reached only 0.39-0.47x of fp16 (about what cuBLAS on the dequantize kernel's output
gives, by estimate), and one bucket of 65-256 rows tuned at 128 ran 256 rows at 0.22-0.44x.

More rows, or float32: ``_int4_mm_kernel``, a tensor-core GEMM on the codes themselves, widened exactly to the
activation dtype in registers by the same mantissa trick (``_codes``), as two half-depth products: the
even columns against the low nibbles, the odd ones against the high. One group per K step (``BLOCK_K``
divides the group size), so scale and zero point apply to the step's product on the accumulator:
``acc += scale * (x @ q - zero * sum(x))``.

K may be split over programs for small M, with the int8 kernels' deterministic reduction (partials in a
scratch buffer, added in split order by the last program of a tile): results never depend on timing. For
large M, the GEMM is timed against dequantizing into a workspace for cuBLAS, as for int8.

Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (how the CPU tests check its logic; there the
packed-fp16 GEMV multiplies in exact float32 instead of the inline PTX, which the interpreter cannot run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (INTERPRET, LARGE_M, LAUNCHERS, PATHS, SCRATCH, SMALL_M, SPLIT_MAX_N, bucket_of, cdiv, choose_path, cublas_linear, k_steps, launch_grid,
                     scratch_at, scratch_for, split_fits, tile_of, tuned_launcher)

_MAGIC = tl.constexpr(0x4B000000)  # the bits of 2^23 as float32


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, count_ptr, N, K, G, stride_xk, stride_wn,
    GS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_K // 2  # bytes of a row per step
    GPB: tl.constexpr = BLOCK_K // GS  # groups per step
    pid = tl.program_id(0)
    kb0, kb1 = k_steps(tl.cdiv(K, BLOCK_K), SPLIT_K)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    rg = tl.arange(0, GPB)
    row_ok = rn < N
    half_k = K // 2
    acc = tl.zeros((BLOCK_N, GPB), dtype=tl.float32)
    for kb in range(kb0, kb1):
        j = kb * HALF + rj
        j_ok = j < half_k
        xe = tl.load(x_ptr + (2 * j) * stride_xk, mask=j_ok, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + (2 * j + 1) * stride_xk, mask=j_ok, other=0.0).to(tl.float32)
        b = tl.load(w_ptr + rn[:, None] * stride_wn + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0).to(tl.int32)
        lo = ((b & 0xF) | _MAGIC).to(tl.float32, bitcast=True) - 8388608.0  # q
        hi = ((b & 0xF0) | _MAGIC).to(tl.float32, bitcast=True) - 8388608.0  # 16 q
        p = lo * xe[None, :] + hi * (xo * 0.0625)[None, :]
        xsum = tl.sum(tl.reshape(xe + xo, (GPB, GS // 2)), axis=1)
        g = kb * GPB + rg
        gmask = row_ok[:, None] & (g < G)[None, :]
        s = tl.load(s_ptr + rn[:, None] * G + g[None, :], mask=gmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None] * G + g[None, :], mask=gmask, other=0.0).to(tl.float32)
        dots = tl.sum(tl.reshape(p, (BLOCK_N, GPB, GS // 2)), axis=2)
        acc += s * (dots - z * xsum[None, :])
    _finish_row(tl.sum(acc, axis=1), rn, N, b_ptr, y_ptr, part_ptr, count_ptr, HAS_BIAS, BLOCK_N, SPLIT_K)


@triton.jit
def _finish_row(row, rn, N, b_ptr, y_ptr, part_ptr, count_ptr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store a program's rows, or with a K split its partial, the last of a tile's programs adding the
    partials in split order and storing."""
    if SPLIT_K > 1:
        pid = tl.program_id(0)
        parts = part_ptr + pid * (SPLIT_K * BLOCK_N)
        tl.store(parts + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N), row)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # last of this tile's programs: add the partials in split order
            row = tl.load(parts + tl.arange(0, BLOCK_N), cache_modifier=".cg")
            for sp in range(1, SPLIT_K):
                row += tl.load(parts + sp * BLOCK_N + tl.arange(0, BLOCK_N), cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed", scope="gpu")  # ready for the next call
            _store_row(row, rn, N, b_ptr, y_ptr, HAS_BIAS)
    else:
        _store_row(row, rn, N, b_ptr, y_ptr, HAS_BIAS)


@triton.jit
def _store_row(row, rn, N, b_ptr, y_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        row += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, row.to(y_ptr.dtype.element_ty), mask=rn < N)


# Two fp16 codes per 32-bit register, as Marlin and FasterTransformer make them: a code OR-ed into the
# low mantissa bits of 1024.0 (0x6400) reads as 1024 + q, and one packed subtraction leaves q exactly. A
# word of the codes holds eight (column 8i + t at bits 4t), taken as pairs (t, t + 4) that sit 16 bits
# apart: masking the word with 0x000F000F gives codes 0 and 4 in place; 0x00F000F0 gives codes 1 and 5 at
# 16 q, which a packed fma by 1/16 brings back (exactly); the word shifted by 8 gives codes 2, 6 and 3, 7.
# The activations come in the same pairs (one byte permutation per pair, shared by a thread's rows). The
# word's eight products are summed in packed fp16 (two lanes of four, each product exact inside its fma)
# and widened to float32: 16 instructions per eight weights, and one fma by the scale outside. Pairing
# codes (2j, 2j + 1) instead, as the bytes hold them, needs a byte permutation per pair of codes and
# measured 9-20% slower.
_HALF2_DOT = tl.constexpr("""
{
.reg .b32 w2, e0, e1, e2, e3, m0, m1, c, k16, o1, o16, p;
.reg .f16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 m0, 0x000F000F;
mov.b32 m1, 0x00F000F0;
mov.b32 c, 0x64006400;
mov.b32 k16, 0x2C002C00;
mov.b32 o1, 0x64006400;
mov.b32 o16, 0xD400D400;
shr.u32 w2, $1, 8;
lop3.b32 e0, $1, m0, c, 0xEA;
lop3.b32 e1, $1, m1, c, 0xEA;
lop3.b32 e2, w2, m0, c, 0xEA;
lop3.b32 e3, w2, m1, c, 0xEA;
sub.rn.f16x2 e0, e0, o1;
fma.rn.f16x2 e1, e1, k16, o16;
sub.rn.f16x2 e2, e2, o1;
fma.rn.f16x2 e3, e3, k16, o16;
mul.rn.f16x2 p, e0, $2;
fma.rn.f16x2 p, e1, $3, p;
fma.rn.f16x2 p, e2, $4, p;
fma.rn.f16x2 p, e3, $5, p;
mov.b32 {lo, hi}, p;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}
""")  # 0xEA: (a & b) | c; 0x2C00 = 1/16, 0xD400 = -64 (so 1024 + 16 q -> q)
_HALF2_PAIRS = tl.constexpr("""
{
.reg .b32 k;
mov.b32 k, 0x2C002C00;
prmt.b32 $0, $4, $6, 0x5410;
prmt.b32 $1, $4, $6, 0x7632;
prmt.b32 $2, $5, $7, 0x5410;
prmt.b32 $3, $5, $7, 0x7632;
mul.rn.f16x2 $0, $0, k;
mul.rn.f16x2 $1, $1, k;
mul.rn.f16x2 $2, $2, k;
mul.rn.f16x2 $3, $3, k;
}
""")  # (x0, x1), (x2, x3), (x4, x5), (x6, x7) -> (x0, x4), (x1, x5), (x2, x6), (x3, x7), each / 16
# The activations enter the packed products divided by 16 (exact but for those under 2^-10, which lose low
# bits as fp16 subnormals: at most 2^-25 each, 16 * 15 * 2^-25 in a product), and the word's float32 sum
# is multiplied back: a lane sums four products of codes up to 15, which overflows fp16 for activations
# above about 1,090 without the division (outlier channels of large models reach that, at down_proj's
# input), and above about 17,000 with it.
_X_SCALE = tl.constexpr(16.0)


@triton.jit
def _half(pair, high: tl.constexpr):
    """One fp16 of an int32 holding two, as float32."""
    bits = (pair >> 16) & 0xFFFF if high else pair & 0xFFFF
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _word_dot(w, xa, xb, xc, xd, ASM: tl.constexpr):
    """``sum_t q_t x_t`` over the eight codes of each int32 ``w`` (code t at bits 4t), as float32, where
    ``xa``..``xd`` hold the activations (x0, x1), (x2, x3), (x4, x5), (x6, x7) as fp16 pairs. With ``ASM``,
    packed fp16 arithmetic (``_HALF2_DOT``); without (the interpreter), exact float32 arithmetic."""
    if ASM:
        xa, xb, xc, xd = tl.inline_asm_elementwise(_HALF2_PAIRS, "=r,=r,=r,=r,r,r,r,r", [xa, xb, xc, xd],
                                                   dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        return tl.inline_asm_elementwise(_HALF2_DOT, "=f,r,r,r,r,r", [w, xa[None, :], xb[None, :], xc[None, :], xd[None, :]],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        dot = ((w & 0xF).to(tl.float32) * _half(xa, False)[None, :] + ((w >> 4) & 0xF).to(tl.float32) * _half(xa, True)[None, :]
               + ((w >> 8) & 0xF).to(tl.float32) * _half(xb, False)[None, :] + ((w >> 12) & 0xF).to(tl.float32) * _half(xb, True)[None, :])
        dot += (((w >> 16) & 0xF).to(tl.float32) * _half(xc, False)[None, :] + ((w >> 20) & 0xF).to(tl.float32) * _half(xc, True)[None, :]
                + ((w >> 24) & 0xF).to(tl.float32) * _half(xd, False)[None, :] + ((w >> 28) & 0xF).to(tl.float32) * _half(xd, True)[None, :])
        return dot


@triton.jit
def _int4_gemv_half2_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, count_ptr, N, K, G, stride_w,
    GS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr, EVEN: tl.constexpr,
):
    """One row of fp16 activations (contiguous), ``K`` and ``GS`` multiples of 8: the codes read as int32
    words (eight codes; ``stride_w`` words a row) and multiplied in packed fp16 (``_word_dot``). Each
    word's product is scaled on its own (``acc[n, word] += scale * dot``); the zero point is applied per
    group with the group's sum of activations (``zacc``); both are summed once, at the end. The K loop is
    software-pipelined ``STAGES`` deep (the loads of the next steps go to shared memory while this one
    computes); ``EVEN`` (``BLOCK_N`` divides N, ``BLOCK_K`` divides K) drops the bounds checks."""
    WPG: tl.constexpr = GS // 8  # words per group
    GPB: tl.constexpr = BLOCK_K // GS  # groups per step
    WPB: tl.constexpr = BLOCK_K // 8  # words of a row per step
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    x32 = x_ptr.to(tl.pointer_type(tl.int32))  # activation pairs
    pid = tl.program_id(0)
    kb0, kb1 = k_steps(tl.cdiv(K, BLOCK_K), SPLIT_K)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rn < N
    acc = tl.zeros((BLOCK_N, GPB, WPG), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_N, GPB), dtype=tl.float32)
    for kb in tl.range(kb0, kb1, num_stages=STAGES):
        i = kb * WPB + tl.arange(0, WPB)  # words
        g = kb * GPB + tl.arange(0, GPB)  # groups
        kx = kb * BLOCK_K + tl.arange(0, BLOCK_K)  # columns
        if EVEN:
            w = tl.load(w32 + rn[:, None] * stride_w + i[None, :])
            xa, xb, xc, xd = tl.load(x32 + 4 * i), tl.load(x32 + 4 * i + 1), tl.load(x32 + 4 * i + 2), tl.load(x32 + 4 * i + 3)
            s = tl.load(s_ptr + rn[:, None] * G + g[None, :]).to(tl.float32)
            z = tl.load(z_ptr + rn[:, None] * G + g[None, :]).to(tl.float32)
            xs = tl.load(x_ptr + kx).to(tl.float32)
        else:
            i_ok = i < K // 8
            w = tl.load(w32 + rn[:, None] * stride_w + i[None, :], mask=row_ok[:, None] & i_ok[None, :], other=0)
            xa = tl.load(x32 + 4 * i, mask=i_ok, other=0)
            xb = tl.load(x32 + 4 * i + 1, mask=i_ok, other=0)
            xc = tl.load(x32 + 4 * i + 2, mask=i_ok, other=0)
            xd = tl.load(x32 + 4 * i + 3, mask=i_ok, other=0)
            gmask = row_ok[:, None] & (g < G)[None, :]
            s = tl.load(s_ptr + rn[:, None] * G + g[None, :], mask=gmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + rn[:, None] * G + g[None, :], mask=gmask, other=0.0).to(tl.float32)
            xs = tl.load(x_ptr + kx, mask=kx < K, other=0.0).to(tl.float32)
        dot = tl.reshape(_word_dot(w, xa, xb, xc, xd, ASM), (BLOCK_N, GPB, WPG))
        xsum = tl.sum(tl.reshape(xs, (GPB, GS)), axis=1)
        acc += dot * (s * _X_SCALE if ASM else s)[:, :, None]
        zacc += s * z * xsum[None, :]
    row = tl.sum(tl.sum(acc, axis=2) - zacc, axis=1)
    _finish_row(row, rn, N, b_ptr, y_ptr, part_ptr, count_ptr, HAS_BIAS, BLOCK_N, SPLIT_K)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _int4_mm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, G, M_BUCKET, stride_xm, stride_xk, stride_wn, stride_ym, stride_yn,
    GS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = tile_of(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    kb0, kb1 = k_steps(tl.cdiv(K, BLOCK_K), SPLIT_K)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    half_k = K // 2
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        j = kb * HALF + rj
        j_ok = j < half_k
        xmask = m_ok[:, None] & j_ok[None, :]
        xe = tl.load(x_ptr + rm[:, None] * stride_xm + (2 * j)[None, :] * stride_xk, mask=xmask, other=0.0)
        xo = tl.load(x_ptr + rm[:, None] * stride_xm + (2 * j + 1)[None, :] * stride_xk, mask=xmask, other=0.0)
        b = tl.load(w_ptr + rn[None, :] * stride_wn + j[:, None], mask=n_ok[None, :] & j_ok[:, None], other=0)
        g = (kb * BLOCK_K) // GS
        s = tl.load(s_ptr + rn * G + g, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn * G + g, mask=n_ok, other=0.0).to(tl.float32)
        we, wo = _codes(b, xe.dtype)
        if IEEE:
            part = tl.dot(xe, we, input_precision="ieee")
            part = tl.dot(xo, wo, part, input_precision="ieee")
        else:
            part = tl.dot(xe, we)
            part = tl.dot(xo, wo, part)
        xsum = tl.sum(xe.to(tl.float32) + xo.to(tl.float32), axis=1)
        acc += part * s[None, :] - xsum[:, None] * (s * z)[None, :]
    _finish_tile(acc, rm, rn, M, N, b_ptr, y_ptr, part_ptr, count_ptr, stride_ym, stride_yn, HAS_BIAS, BLOCK_M, BLOCK_N, SPLIT_K)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _int4_mm_deq_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, G, M_BUCKET, stride_xm, stride_xk, stride_wn, stride_ym, stride_yn,
    GS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    STAGES: tl.constexpr,
):
    """2-128 rows of fp16 or bf16 activations: K steps of several groups (``BLOCK_K`` a multiple of
    ``GS``), each weight made in registers in the activation dtype as ``q * scale + c``, ``c = -zero *
    scale`` (fp16: ``c`` rounded to fp16, then one fma on the exact code; bf16: all in float32, rounded
    once), then one tensor-core product per half step. The loop is software-pipelined ``STAGES`` deep."""
    HALF: tl.constexpr = BLOCK_K // 2
    GPB: tl.constexpr = BLOCK_K // GS  # groups per step
    dt: tl.constexpr = x_ptr.dtype.element_ty
    pid_m, pid_n = tile_of(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    kb0, kb1 = k_steps(tl.cdiv(K, BLOCK_K), SPLIT_K)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    half_k = K // 2
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in tl.range(kb0, kb1, num_stages=STAGES):
        j = kb * HALF + rj
        j_ok = j < half_k
        b = tl.load(w_ptr + rn[:, None] * stride_wn + j[None, :], mask=n_ok[:, None] & j_ok[None, :], other=0)
        kx = kb * BLOCK_K + tl.arange(0, BLOCK_K)  # the step's columns, read whole and split into even and odd
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kx[None, :] * stride_xk, mask=m_ok[:, None] & (kx < K)[None, :], other=0.0)
        xe, xo = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))
        g = kb * GPB + tl.arange(0, GPB)
        gmask = n_ok[:, None] & (g < G)[None, :]
        s = tl.load(s_ptr + rn[:, None] * G + g[None, :], mask=gmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None] * G + g[None, :], mask=gmask, other=0.0).to(tl.float32)
        lo, hi = _codes(b, tl.float16 if dt == tl.float16 else tl.float32)
        lo = _scaled(lo, s, z, dt, BLOCK_N, GPB, GS)
        hi = _scaled(hi, s, z, dt, BLOCK_N, GPB, GS)
        acc = tl.dot(xe, tl.trans(lo), acc)
        acc = tl.dot(xo, tl.trans(hi), acc)
    _finish_tile(acc, rm, rn, M, N, b_ptr, y_ptr, part_ptr, count_ptr, stride_ym, stride_yn, HAS_BIAS, BLOCK_M, BLOCK_N, SPLIT_K)


@triton.jit
def _scaled(codes, s, z, dt: tl.constexpr, BLOCK_N: tl.constexpr, GPB: tl.constexpr, GS: tl.constexpr):
    """``[BLOCK_N, GPB * GS / 2]`` codes (one nibble of each byte; fp16 for fp16 activations, else float32)
    times their group's scale, plus ``-zero * scale``, in ``dt``."""
    c = -(z * s)
    q = tl.reshape(codes, (BLOCK_N, GPB, GS // 2))
    if dt == tl.float16:  # exact codes, fp16 scale, c rounded to fp16: one fma
        w = q * s.to(dt)[:, :, None] + c.to(dt)[:, :, None]
    else:
        w = (q * s[:, :, None] + c[:, :, None]).to(dt)
    return tl.reshape(w, (BLOCK_N, GPB * (GS // 2)))


@triton.jit
def _finish_tile(acc, rm, rn, M, N, b_ptr, y_ptr, part_ptr, count_ptr, stride_ym, stride_yn, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store a GEMM program's tile, or with a K split its partial, the last of a tile's programs adding the
    partials in split order and storing."""
    if SPLIT_K == 1:
        _store_tile(acc, rm, rn, M, N, b_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS)
    else:
        pid = tl.program_id(0)
        tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        parts = part_ptr + pid * (SPLIT_K * BLOCK_M * BLOCK_N)
        tl.store(parts + tl.program_id(1) * (BLOCK_M * BLOCK_N) + tile, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.load(parts + tile, cache_modifier=".cg")
            for sp in range(1, SPLIT_K):
                acc += tl.load(parts + sp * (BLOCK_M * BLOCK_N) + tile, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed", scope="gpu")
            _store_tile(acc, rm, rn, M, N, b_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _codes(b, dtype: tl.constexpr):
    """The low and high nibbles of a uint8 tile as exact integers in ``dtype``, without a conversion
    instruction: OR-ed into the mantissa of a power of two whose unit in the last place is 1, which is
    then subtracted (1024 in float16, 128 in bfloat16, 2^23 in float32)."""
    if dtype == tl.float16:
        bi = b.to(tl.int16)
        lo = ((bi & 0xF) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
        hi = ((bi >> 4) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    elif dtype == tl.bfloat16:
        bi = b.to(tl.int16)
        lo = ((bi & 0xF) | 0x4300).to(tl.bfloat16, bitcast=True) - 128.0
        hi = ((bi >> 4) | 0x4300).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        bi = b.to(tl.int32)
        lo = ((bi & 0xF) | _MAGIC).to(tl.float32, bitcast=True) - 8388608.0
        hi = ((bi >> 4) | _MAGIC).to(tl.float32, bitcast=True) - 8388608.0
    return lo.to(dtype), hi.to(dtype)


@triton.jit
def _store_tile(acc, rm, rn, M, N, b_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, z_ptr, o_ptr, N, K, G, GS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``o[n, k] = (q[n, k] - zero[n, k // GS]) * scale[n, k // GS]`` (float32, rounded once to ``o``'s dtype).
    Where a block holds whole groups (``GS`` a power of two dividing ``BLOCK_K``), scale and zero point
    are read once per group, not gathered per weight (1.4-1.7x faster on an H100, about 2.5 TB/s)."""
    HALF: tl.constexpr = BLOCK_K // 2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(1) * HALF + tl.arange(0, HALF)
    n_ok = rn < N
    b = tl.load(w_ptr + rn[:, None] * (K // 2) + j[None, :], mask=n_ok[:, None] & (j < K // 2)[None, :], other=0)
    lo, hi = _codes(b, tl.float32)
    if BLOCK_K % GS == 0:  # (BLOCK_K a power of two: so is GS then)
        GPB: tl.constexpr = BLOCK_K // GS
        g = tl.program_id(1) * GPB + tl.arange(0, GPB)
        gmask = n_ok[:, None] & (g < G)[None, :]
        s = tl.load(s_ptr + rn[:, None] * G + g[None, :], mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        z = tl.load(z_ptr + rn[:, None] * G + g[None, :], mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        even = tl.reshape((tl.reshape(lo, (BLOCK_N, GPB, GS // 2)) - z) * s, (BLOCK_N, HALF))
        odd = tl.reshape((tl.reshape(hi, (BLOCK_N, GPB, GS // 2)) - z) * s, (BLOCK_N, HALF))
    else:
        mask = n_ok[:, None] & (j < K // 2)[None, :]
        g = (2 * j) // GS
        s = tl.load(s_ptr + rn[:, None] * G + g[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None] * G + g[None, :], mask=mask, other=0.0).to(tl.float32)
        even = (lo - z) * s
        odd = (hi - z) * s
    w = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))  # interleaved back: column 2j, then 2j + 1
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(o_ptr + rn[:, None] * K + rk[None, :], w.to(o_ptr.dtype.element_ty), mask=n_ok[:, None] & (rk[None, :] < K))


def _gemv_configs() -> list[triton.Config]:
    cfgs = []
    for bn, bk, w, st in ((4, 1024, 4, 2), (8, 1024, 4, 2), (16, 512, 4, 2), (16, 256, 4, 3), (32, 256, 4, 2), (16, 1024, 8, 2)):
        for split in (1, 2, 4, 8):
            cfgs.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=w, num_stages=st))
    return cfgs


def _half2_configs() -> list[triton.Config]:
    # measured on an H100 at Llama-3-8B's shapes (benchmarks/NOTES.md): 4 warps, 16-32 rows of 512-2048
    # columns, the loop 3-4 deep; 8 warps and deeper pipelines were slower everywhere
    cfgs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "STAGES": st}, num_warps=4, num_stages=1)
            for bn, bk in ((16, 1024), (32, 1024), (16, 2048), (32, 512), (64, 512)) for st in (3, 4)]
    # two steps of 2048 columns, double-buffered: the fastest of 54 tiles on the fused gate/up 28672 x 4096
    # (28.8 us against 29.7 at 3 deep; exp sweep with per-copy scales)
    cfgs.append(triton.Config({"BLOCK_N": 16, "BLOCK_K": 2048, "SPLIT_K": 1, "STAGES": 2}, num_warps=4, num_stages=1))
    cfgs += [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "STAGES": 3}, num_warps=4, num_stages=1)
             for bn, bk in ((16, 1024), (32, 512)) for split in (2, 4)]  # few rows, long K
    return cfgs


def _prune_half2(configs, named_args, **kwargs):
    """``_prune_gemv``'s choice, each configuration told whether its blocks divide N and K (``EVEN``)."""
    n, k = named_args["N"], named_args["K"]
    return [triton.Config({**c.kwargs, "EVEN": n % c.kwargs["BLOCK_N"] == 0 and k % c.kwargs["BLOCK_K"] == 0}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in _prune_gemv(configs, named_args, **kwargs)]


def _prune_gemv(configs, named_args, **kwargs):
    n, k, gs = named_args["N"], named_args["K"], kwargs.get("GS", named_args.get("GS"))
    keep = [c for c in configs if c.kwargs["BLOCK_K"] % gs == 0
            and (c.kwargs["SPLIT_K"] == 1 or (n <= SPLIT_MAX_N and k >= c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"]))]
    return keep or [c for c in configs if c.kwargs["BLOCK_K"] % gs == 0][:1]


def _mm_configs() -> list[triton.Config]:
    cfgs = []
    for bn, bk, w, s in ((32, 64, 4, 4), (64, 64, 4, 6), (64, 128, 4, 3), (128, 64, 4, 5), (256, 64, 8, 4), (32, 128, 4, 4), (64, 32, 4, 4)):
        for split in (1, 2, 4):
            cfgs.append(triton.Config({"BLOCK_M": SMALL_M, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": split}, num_warps=w, num_stages=s))
    for bm, bn, bk, w, s in ((32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
                             (128, 256, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 32, 4, 4)):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=w, num_stages=s))
    return cfgs


def _deq_configs() -> list[triton.Config]:
    # measured on an H100 at Llama-3-8B's shapes (benchmarks/NOTES.md). Up to 64 rows (tuned at 16): 128
    # columns of 256 (8 warps) or 128 (4 warps), 2-3 deep, K split for the narrow matrices. 65-128 rows: the
    # three tiles that won on some shape at 128 rows, row tiles grouped by 8
    small = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": split, "STAGES": st}, num_warps=w, num_stages=1)
             for bm in (SMALL_M, 64) for bn, bk, w, st in ((128, 256, 8, 3), (128, 256, 8, 2), (128, 128, 4, 3), (64, 256, 4, 3))
             for split in (1, 2, 4)]
    return small + [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": 1, "STAGES": st}, num_warps=w, num_stages=1)
                    for bm, bn, bk, w, st in ((128, 64, 128, 4, 3), (64, 64, 256, 4, 3), (128, 128, 256, 8, 2))]


def _prune_deq(configs, named_args, **kwargs):
    n, k, gs, bucket = named_args["N"], named_args["K"], kwargs.get("GS", named_args.get("GS")), named_args["M_BUCKET"]
    if bucket > 64:
        keep = [c for c in configs if c.kwargs["BLOCK_K"] % gs == 0 and c.kwargs["GROUP_M"] > 1]
    else:
        bm = SMALL_M if bucket <= SMALL_M else 64
        keep = [c for c in configs if c.kwargs["BLOCK_K"] % gs == 0 and c.kwargs["BLOCK_M"] == bm and c.kwargs["GROUP_M"] == 1]
    return [c for c in keep if split_fits(c, bucket, n, k)]  # every tile has an unsplit configuration


def _prune_mm(configs, named_args, **kwargs):
    m, n, k, gs = named_args["M"], named_args["N"], named_args["K"], kwargs.get("GS", named_args.get("GS"))
    ok = [c for c in configs if gs % c.kwargs["BLOCK_K"] == 0]
    if m <= SMALL_M:
        keep = [c for c in ok if c.kwargs["BLOCK_M"] == SMALL_M]
    elif m <= 64:
        keep = [c for c in ok if c.kwargs["BLOCK_M"] in (32, 64)]
    else:
        keep = [c for c in ok if c.kwargs["BLOCK_M"] >= 64]
    keep = [c for c in keep if split_fits(c, named_args["M_BUCKET"], n, k)]
    return keep or [c for c in ok if c.kwargs["SPLIT_K"] == 1]


_tuned_gemv = triton.autotune(configs=_gemv_configs(), key=["N", "K", "GS"], prune_configs_by={"early_config_prune": _prune_gemv})(_int4_gemv_kernel)
_tuned_mm = triton.autotune(configs=_mm_configs(), key=["M_BUCKET", "N", "K", "GS"], prune_configs_by={"early_config_prune": _prune_mm})(_int4_mm_kernel)
_tuned_half2 = triton.autotune(configs=_half2_configs(), key=["N", "K", "GS"], prune_configs_by={"early_config_prune": _prune_half2})(
    _int4_gemv_half2_kernel)
_tuned_deq = triton.autotune(configs=_deq_configs(), key=["M_BUCKET", "N", "K", "GS"], prune_configs_by={"early_config_prune": _prune_deq})(
    _int4_mm_deq_kernel)
_GEMV_CONSTS = ("BLOCK_N", "BLOCK_K", "SPLIT_K")
_DEQ_DTYPES = (torch.float16, torch.bfloat16)
DEQ_MAX_M = 128  # the last row of M bucket 128; more rows take the exact-code GEMM (dequantizing per row tile costs more there)
_DEQ_CONSTS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "STAGES")
_HALF2_CONSTS = ("BLOCK_N", "BLOCK_K", "SPLIT_K", "STAGES", "EVEN")
_MM_CONSTS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K")
# the interpreter has no benchmarking driver: it runs one fixed configuration (tests change SPLIT_K)
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "SPLIT_K": 1}
INTERPRET_GEMV = {"BLOCK_N": 4, "BLOCK_K": 128, "SPLIT_K": 1}  # both one-row kernels
INTERPRET_DEQ = {"BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 2, "SPLIT_K": 1, "STAGES": 2}  # steps of two groups


def check(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, k: int | None = None) -> tuple[int, int, int]:
    """(N, K, groups) of packed int4 parts the kernels can take, else ValueError: contiguous, ``K`` a
    multiple of 2 and the parts' shapes agreeing."""
    n, half = qweight.shape
    kk = 2 * half
    groups = -(-kk // group_size)
    if k is not None and k != kk:
        raise ValueError(f"input has {k} features, the weight {kk}")
    if (qweight.dtype != torch.uint8 or scale.dtype != torch.float16 or zero.dtype != torch.float16
            or tuple(scale.shape) != (n, groups) or tuple(zero.shape) != (n, groups)):
        raise ValueError(f"int4 parts disagree: codes {tuple(qweight.shape)} {qweight.dtype}, scale {tuple(scale.shape)} {scale.dtype}, "
                         f"zero {tuple(zero.shape)} {zero.dtype}, group size {group_size} (uint8 codes, float16 scale and zero)")
    if not (qweight.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()):
        raise ValueError("the int4 kernels take contiguous codes, scales and zero points")
    return n, kk, groups


def dequantize_into(qweight, scale, zero, group_size: int, out: torch.Tensor) -> torch.Tensor:
    """``out[:] = W`` for packed ``[N, K / 2]`` codes (``out`` contiguous ``[N, K]``)."""
    n, k, g = check(qweight, scale, zero, group_size)
    bk = min(2048, triton.next_power_of_2(k))  # blocks of 4096 weights (H100: 2 x 2048 measured best of 1-32 rows)
    bn = 4096 // bk
    _int4_dequant_kernel[(cdiv(n, bn), cdiv(k, bk))](qweight, scale, zero, out, n, k, g, GS=group_size, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return out


def _cublas_linear(x2, qweight, scale, zero, group_size, bias, y) -> None:
    """``y = x2 @ W.T + bias`` through cuBLAS on blocks of dequantized rows."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    cublas_linear(x2, n, k, lambda n0, n1, out: dequantize_into(qweight[n0:n1], scale[n0:n1], zero[n0:n1], group_size, out), bias, y)


class Int4Matmul:
    """``int4_linear`` with the parts and bias fixed when it is made, as a layer's are: one row through
    the GEMV kernel, more through the GEMM (or, for large M where it measured faster, cuBLAS on
    dequantized blocks). After the first call of a layout, kernels launch through prepared launchers
    (``launch.Launcher``), with little host time."""

    def __init__(self, qweight, scale, zero, group_size: int, bias: torch.Tensor | None = None):
        self.n, self.k, self.groups = check(qweight, scale, zero, group_size)
        if bias is not None and not bias.is_contiguous():
            raise ValueError("Int4Matmul needs a contiguous bias")
        self.qweight, self.scale, self.zero, self.bias, self.group_size = qweight, scale, zero, bias, group_size
        self.device, self.index = qweight.device, qweight.device.index
        self.has_bias = bias is not None
        self.deq_groups = group_size in (8, 16, 32, 64, 128, 256)
        b = bias if bias is not None else scale  # not read without a bias; any valid pointer
        self.tail = (qweight.data_ptr(), scale.data_ptr(), zero.data_ptr(), b.data_ptr())
        self.aligned = tuple(p % 16 == 0 for p in self.tail)
        self.launchers: dict[tuple, object] = {}  # (M bucket, x dtype, x strides, x aligned) -> launcher or "cublas"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.k:
            raise ValueError(f"input has {x.shape[-1]} features, the weight {self.k}")
        x2 = x.reshape(-1, self.k)
        m = x2.shape[0]
        y = torch.empty((m, self.n), dtype=x.dtype, device=self.device)
        if m:
            self._run(x2, y)
        return y.reshape(*x.shape[:-1], self.n)

    def _run(self, x2: torch.Tensor, y: torch.Tensor) -> None:
        m, n = x2.shape[0], self.n
        gemv = m == 1
        bucket = 1 if gemv else bucket_of(m)
        if INTERPRET:
            scratch = scratch_for(self.device)
            cfg = INTERPRET_GEMV if gemv else INTERPRET_CONFIG
            if gemv and self._half2(x2):
                even = n % cfg["BLOCK_N"] == 0 and self.k % cfg["BLOCK_K"] == 0
                _int4_gemv_half2_kernel[launch_grid(cfg)(m, n)](*self._args(x2, y, scratch, bucket, False), **cfg, STAGES=2, EVEN=even)
            elif self._deq(x2):
                cfg = {**INTERPRET_DEQ, "BLOCK_K": 2 * self.group_size}
                _int4_mm_deq_kernel[launch_grid(cfg)(m, n)](*self._args(x2, y, scratch, bucket, False), **cfg)
            else:
                (_int4_gemv_kernel if gemv else _int4_mm_kernel)[launch_grid(cfg)(m, n)](*self._args(x2, y, scratch, bucket, False), **cfg)
            return
        lkey = (bucket, x2.dtype, x2.stride(), x2.data_ptr() % 16 == 0)
        launch = self.launchers.get(lkey)
        if launch == "cublas":
            _cublas_linear(x2, self.qweight, self.scale, self.zero, self.group_size, self.bias, y)
            return
        stream = torch._C._cuda_getCurrentRawStream(self.index)
        scratch = SCRATCH.get((self.index, stream)) or scratch_at(self.index, stream, self.device)
        args = self._args(x2, y, scratch, bucket, True)
        tensors = lambda: self._args(x2, y, scratch, bucket, False)  # noqa: E731
        if launch is None:
            self._first(x2, y, lkey, args, tensors, stream)
        else:
            launch(launch.grid(m, n), stream, args, tensors)

    def _args(self, x2, y, scratch, bucket: int, ptrs: bool) -> tuple:
        """The kernel's arguments in signature order, up to its configuration's constants; tensors as
        pointers (``ptrs``, for a prepared launcher) or as tensors."""
        b = self.bias if self.has_bias else self.scale  # not read without a bias; any valid pointer
        tensors = (x2, self.qweight, self.scale, self.zero, b, y, scratch.parts, scratch.counts)
        head = (x2.data_ptr(), *self.tail, y.data_ptr(), *scratch.ptrs) if ptrs else tensors
        m, n, k, g = x2.shape[0], self.n, self.k, self.groups
        if m == 1 and self._half2(x2):
            return (*head, n, k, g, k // 8, self.group_size, self.has_bias, not INTERPRET)
        if m == 1:
            return (*head, n, k, g, x2.stride(1), k // 2, self.group_size, self.has_bias)
        mm = (*head, m, n, k, g, bucket, x2.stride(0), x2.stride(1), k // 2, y.stride(0), y.stride(1), self.group_size, self.has_bias)
        return mm if self._deq(x2) else (*mm, x2.dtype == torch.float32)

    def _half2(self, x2: torch.Tensor) -> bool:
        """Whether a one-row call takes the packed-fp16 GEMV: fp16 activations, contiguous and 16-byte
        aligned (read as pairs), codes 16-byte aligned, K a multiple of 8 (words of eight codes) and the
        group size one of 8, 16, ..., 512 (a whole number of words that divides every block). Decided by the launcher key's fields, so a key keeps its kernel."""
        return (x2.dtype == torch.float16 and x2.stride(1) == 1 and x2.data_ptr() % 16 == 0 and self.aligned[0]
                and self.k % 8 == 0 and 512 % self.group_size == 0 and self.group_size % 8 == 0)

    def _deq(self, x2: torch.Tensor) -> bool:
        """Whether a call of several rows takes the GEMM that dequantizes in registers (``_int4_mm_deq_kernel``):
        2 to ``DEQ_MAX_M`` rows of fp16 or bf16 activations and a group size (a power of two from 8 to
        256) that a 256-column step holds whole; from ``LARGE_M`` rows it is timed against cuBLAS. Decided by
        the launcher key's fields."""
        return 1 < x2.shape[0] <= DEQ_MAX_M and self.deq_groups and x2.dtype in _DEQ_DTYPES

    def _first(self, x2, y, lkey, args, tensors, stream) -> None:
        """Tune (or find) the kernel for this layout, computing ``y`` on the way; for large M, time it
        against cuBLAS on dequantized blocks and keep the faster for this shape."""
        m, n = x2.shape[0], self.n
        gemv = m == 1
        key = ("int4", lkey, self.groups, self.group_size, n, self.k, self.scale.dtype, self.bias.dtype if self.has_bias else None,
               self.aligned, self.index)
        t = tensors()
        if gemv and self._half2(x2):
            kernel, tuned, names, nflags = _int4_gemv_half2_kernel, _tuned_half2, _HALF2_CONSTS, 3
            flags = {"GS": self.group_size, "HAS_BIAS": self.has_bias, "ASM": True}
        elif gemv:
            kernel, tuned, names, nflags = _int4_gemv_kernel, _tuned_gemv, _GEMV_CONSTS, 2
            flags = {"GS": self.group_size, "HAS_BIAS": self.has_bias}
        elif self._deq(x2):
            kernel, tuned, names, nflags = _int4_mm_deq_kernel, _tuned_deq, _DEQ_CONSTS, 2
            flags = {"GS": self.group_size, "HAS_BIAS": self.has_bias}
        else:
            kernel, tuned, names, nflags = _int4_mm_kernel, _tuned_mm, _MM_CONSTS, 3
            flags = {"GS": self.group_size, "HAS_BIAS": self.has_bias, "IEEE": x2.dtype == torch.float32}
        done = key not in LAUNCHERS  # a first call tunes the kernel, which computes y on the way
        launch = tuned_launcher(kernel, tuned, names, key, list(t[:-nflags]), flags, m, n,
                                        f"int4 {('gemv-half2' if kernel is _int4_gemv_half2_kernel else 'gemv') if gemv else ('mm-deq' if kernel is _int4_mm_deq_kernel else 'mm')} M<={lkey[0]} N={n} K={self.k} GS={self.group_size} {x2.dtype}")
        run = lambda: launch(launch.grid(m, n), stream, args, tensors)  # noqa: E731
        cublas = lambda: _cublas_linear(x2, self.qweight, self.scale, self.zero, self.group_size, self.bias, y)  # noqa: E731
        path = "triton"
        if m >= LARGE_M:
            pkey = ("int4", lkey[0], n, self.k, self.group_size, x2.dtype, self.index)
            path = PATHS.get(pkey)
            if path is None:
                if torch.cuda.is_current_stream_capturing():  # no timing inside a capture: chosen at a later call
                    if not done:
                        run()
                    return
                path, done = choose_path(pkey, run, cublas, x2.device), False
        self.launchers[lkey] = "cublas" if path == "cublas" else launch
        if path == "cublas":
            cublas()
        elif not done:
            run()


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., K] @ W.T + bias[N]`` in ``x``'s dtype, ``W`` the int4 weight of packed ``qweight``
    ``[N, K / 2]`` and per-group ``scale`` and ``zero`` ``[N, ceil(K / group_size)]``."""
    if x.shape[-1] != 2 * qweight.shape[-1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {2 * qweight.shape[-1]}")
    return Int4Matmul(qweight, scale, zero, group_size, bias if bias is None else bias.contiguous())(x)


@torch.library.custom_op("codecllm::int4_linear", mutates_args=())
def int4_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``int4_linear`` as an operator ``torch.compile`` traces as one node (its fake implementation
    gives the output's shape and dtype)."""
    return int4_linear(x, qweight, scale, zero, group_size, bias)


@int4_linear_op.register_fake
def _(x, qweight, scale, zero, group_size, bias):
    if x.shape[-1] != 2 * qweight.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {2 * qweight.shape[1]}")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
