"""The fused int8 weight-only matmul: ``y = x @ (q * scale[:, None]).T + bias`` without ever writing a
dequantized weight. Each program loads int8 tiles of ``q``, widens them to the activation dtype in
registers (exact: |q| <= 127) and accumulates in float32; the per-output-channel scale is applied once to
the accumulator. At small batch the kernel reads half the bytes an fp16 matmul reads.

At small M (decode steps) an [M, N] output has too few tiles to keep every SM reading, so K may be split
over ``SPLIT_K`` programs per tile. Their float32 partials are added up deterministically: each program
writes its partial to a scratch buffer and bumps the tile's counter; the program that finds it is last
adds the partials in split order, writes the tile and resets the counter. The result therefore never
depends on which program finished first (atomic adds into the output would), and it is the same in eager
runs and CUDA-graph replays.

Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (how the CPU tests check its logic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (INTERPRET, LARGE_M, LAUNCHERS, PATHS, SCRATCH, SMALL_M, SPLIT_MAX_N, Launcher, bucket_of, cdiv, choose_path, cublas_linear,
                     k_steps, launch_grid, scratch_at, scratch_for, split_fits, tile_of, tuned_launcher)



def _configs() -> list[triton.Config]:
    cfgs = []
    # small M (decode steps): thin tiles over N and K split over several programs, so that the grid
    # keeps enough loads in flight on every SM
    for bn, bk, w, s in ((16, 256, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 8, 4), (32, 128, 2, 4),
                         (16, 512, 4, 3)):
        for split in (1, 2, 4, 8):
            cfgs.append(triton.Config({"BLOCK_M": SMALL_M, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": split},
                                      num_warps=w, num_stages=s))
    # medium M (batches): few output tiles at N = 1024-4096, so K may be split in two there (what the
    # scratch holds at 64 rows: ``split_fits``)
    for bm, bn, bk, w, s in ((32, 32, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 4)):
        for split in (2,):
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": split}, num_warps=w, num_stages=s))
    # medium and large M (prefill, batches): GEMM tiles
    for bm, bn, bk, w, s in ((32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3),
                             (128, 64, 64, 4, 4), (128, 256, 64, 8, 3)):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=w, num_stages=s))
    return cfgs


def _prune(configs, named_args, **kwargs):
    m, n, k, bucket = named_args["M"], named_args["N"], named_args["K"], named_args["M_BUCKET"]
    if m <= SMALL_M:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] == SMALL_M]
    elif m <= 64:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] in (32, 64)]
    else:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] >= 64 and c.kwargs["SPLIT_K"] == 1]
    keep = [c for c in keep if split_fits(c, bucket, n, k)]
    return keep or [c for c in configs if c.kwargs["SPLIT_K"] == 1]


@triton.jit
def _epilogue(acc, rm, rn, M, N, s_ptr, b_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS: tl.constexpr):
    scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _int8_mm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = tile_of(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    kb0, kb1 = k_steps(tl.cdiv(K, BLOCK_K), SPLIT_K)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (kb0 * BLOCK_K + rk)[None, :] * stride_xk
    w_ptrs = w_ptr + rn[None, :] * stride_wn + (kb0 * BLOCK_K + rk)[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        k_left = K - kb * BLOCK_K
        x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(rn[None, :] < N) & (rk[:, None] < k_left), other=0)
        if IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if SPLIT_K == 1:
        _epilogue(acc, rm, rn, M, N, s_ptr, b_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS)
    else:
        pid = tl.program_id(0)
        tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        parts = part_ptr + pid * (SPLIT_K * BLOCK_M * BLOCK_N)
        tl.store(parts + tl.program_id(1) * (BLOCK_M * BLOCK_N) + tile, acc)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # last of this tile's programs: add the partials in split order
            acc = tl.load(parts + tile, cache_modifier=".cg")
            for s in range(1, SPLIT_K):
                acc += tl.load(parts + s * (BLOCK_M * BLOCK_N) + tile, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed", scope="gpu")  # ready for the next call
            _epilogue(acc, rm, rn, M, N, s_ptr, b_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS)


def _gemv_configs() -> list[triton.Config]:
    # measured on an H100 at Llama-3-8B's shapes (benchmarks/NOTES.md): 4 warps, 4-32 rows of 256-1024
    # columns, the K loop pipelined 3-4 deep; K split for the narrow matrices
    cfgs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "STAGES": st}, num_warps=4, num_stages=1)
            for bn, bk in ((4, 1024), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256)) for st in (3, 4)]
    cfgs += [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "STAGES": 3}, num_warps=4, num_stages=1)
             for bn, bk in ((4, 1024), (8, 512), (16, 256)) for split in (2, 4, 8)]
    return cfgs


def _prune_gemv(configs, named_args, **kwargs):
    """Splits only where K holds them, each configuration told whether its blocks divide N and K (``EVEN``)."""
    n, k = named_args["N"], named_args["K"]
    keep = [c for c in configs if c.kwargs["SPLIT_K"] == 1 or (n <= SPLIT_MAX_N and k >= c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"])]
    return [triton.Config({**c.kwargs, "EVEN": n % c.kwargs["BLOCK_N"] == 0 and k % c.kwargs["BLOCK_K"] == 0}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in keep]


@triton.jit
def _int8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, count_ptr, N, K, stride_xk,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
    EVEN: tl.constexpr,
):
    """One activation row (M = 1, a decode step) against a contiguous ``[N, K]`` weight: no tensor
    cores, just wide int8 loads and float32 multiply-adds, each program reducing a [BLOCK_N, BLOCK_K]
    tile per step. The K loop is software-pipelined ``STAGES`` deep (the next steps' loads go to shared
    memory while this one computes); ``EVEN`` (``BLOCK_N`` divides N, ``BLOCK_K`` divides K) drops the
    bounds checks."""
    pid = tl.program_id(0)
    kb0, kb1 = k_steps(tl.cdiv(K, BLOCK_K), SPLIT_K)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for kb in tl.range(kb0, kb1, num_stages=STAGES):
        k = kb * BLOCK_K + rk
        if EVEN:
            x = tl.load(x_ptr + k * stride_xk).to(tl.float32)
            w = tl.load(w_ptr + rn[:, None] * K + k[None, :])
        else:
            x = tl.load(x_ptr + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rn[:, None] * K + k[None, :], mask=(rn[:, None] < N) & (k[None, :] < K), other=0)
        acc += w.to(tl.float32) * x[None, :]
    row = tl.sum(acc, axis=1)
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
            _gemv_epilogue(row, rn, N, s_ptr, b_ptr, y_ptr, HAS_BIAS)
    else:
        _gemv_epilogue(row, rn, N, s_ptr, b_ptr, y_ptr, HAS_BIAS)


@triton.jit
def _gemv_epilogue(row, rn, N, s_ptr, b_ptr, y_ptr, HAS_BIAS: tl.constexpr):
    row = row * tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    if HAS_BIAS:
        row += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, row.to(y_ptr.dtype.element_ty), mask=rn < N)


_tuned_gemv = triton.autotune(configs=_gemv_configs(), key=["N", "K"], prune_configs_by={"early_config_prune": _prune_gemv})(_int8_gemv_kernel)
_tuned = triton.autotune(
    configs=_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune}
)(_int8_mm_kernel)
_CONSTS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K")
_GEMV_CONSTS = ("BLOCK_N", "BLOCK_K", "SPLIT_K", "STAGES", "EVEN")
# the interpreter has no benchmarking driver: it runs one fixed configuration (tests change SPLIT_K)
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "SPLIT_K": 1}
_INTERPRET_GEMV_BLOCKS = {"BLOCK_N": 4, "BLOCK_K": 32}




@triton.jit
def _dequant_kernel(w_ptr, s_ptr, o_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``o[n, k] = q[n, k] * scale[n]`` (float32 product, rounded once to ``o``'s dtype)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    q = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    tl.store(o_ptr + rn[:, None] * K + rk[None, :], (q.to(tl.float32) * s[:, None]).to(o_ptr.dtype.element_ty), mask=mask)


def dequantize_into(qweight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[:] = qweight * scale[:, None]`` for a contiguous ``[N, K]`` int8 ``qweight``."""
    n, k = qweight.shape
    _dequant_kernel[(cdiv(n, 8), cdiv(k, 1024))](qweight, scale, out, n, k, BLOCK_N=8, BLOCK_K=1024, num_warps=4)
    return out


def _cublas_linear(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   y: torch.Tensor) -> None:
    """``y = x2 @ (qweight * scale).T + bias`` through cuBLAS on blocks of dequantized rows."""
    n, k = qweight.shape
    cublas_linear(x2, n, k, lambda n0, n1, out: dequantize_into(qweight[n0:n1], scale[n0:n1], out), bias, y)


class Int8Matmul:
    """``int8_linear`` with the weight, scale and bias fixed when it is made, as a layer's are. A call
    allocates the output and launches with arguments prepared ahead: one row (a decode step) through the
    GEMV kernel, with less host time than an fp16 ``F.linear``; more rows through the GEMM kernel, or for
    large M through cuBLAS on dequantized blocks where that measured faster. The weight must be a
    contiguous ``[N, K]`` int8 tensor; ``x`` any tensor whose last dimension is ``K``.

    Holds references to its tensors: if a layer's tensors are replaced, make a new one."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        n, k = qweight.shape
        if qweight.stride() != (k, 1) or not scale.is_contiguous() or (bias is not None and not bias.is_contiguous()):
            raise ValueError("Int8Matmul needs a contiguous [N, K] weight, scale and bias")
        self.qweight, self.scale, self.bias = qweight, scale, bias
        self.n, self.k = n, k
        self.device, self.index = qweight.device, qweight.device.index
        b = bias if bias is not None else scale  # not read without a bias; any valid pointer
        self.tail = (qweight.data_ptr(), scale.data_ptr(), b.data_ptr())
        self.aligned = tuple(p % 16 == 0 for p in self.tail)
        self.has_bias = bias is not None
        self.flags = {"HAS_BIAS": self.has_bias}
        self.launchers: dict[tuple, Launcher] = {}  # (x dtype, x stride, x aligned) -> GEMV launcher
        self.mms: dict[tuple, object] = {}  # (M bucket, x dtype, x strides, x aligned) -> GEMM launcher or "cublas"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape[-1] != self.k:
            raise ValueError(f"input has {shape[-1]} features, the weight {self.k}")
        if x.numel() != self.k:
            return self._rows(x)
        y = torch.empty((*shape[:-1], self.n), dtype=x.dtype, device=self.device)
        xp, sx = x.data_ptr(), x.stride(-1)
        if INTERPRET:
            c = {**_INTERPRET_GEMV_BLOCKS, "SPLIT_K": _INTERPRET_CONFIG["SPLIT_K"], "STAGES": 2,
                 "EVEN": self.n % _INTERPRET_GEMV_BLOCKS["BLOCK_N"] == 0 and self.k % _INTERPRET_GEMV_BLOCKS["BLOCK_K"] == 0}
            _int8_gemv_kernel[launch_grid(c)(1, self.n)](*self._tensors(x, y, scratch_for(self.device)), sx, **self.flags, **c)
            return y
        launch = self.launchers.get((x.dtype, sx, xp % 16 == 0))
        if launch is None:
            return self._first(x, y)
        stream = torch._C._cuda_getCurrentRawStream(self.index)
        scratch = SCRATCH.get((self.index, stream)) or scratch_at(self.index, stream, self.device)
        launch((launch.row_grid, launch.split, 1), stream, (xp, *self.tail, y.data_ptr(), *scratch.ptrs, self.n, self.k, sx, self.has_bias),
               lambda: (*self._tensors(x, y, scratch), sx, self.has_bias))
        return y

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.n, self.k
        if INTERPRET or x.numel() == 0:
            return int8_linear(x, self.qweight, self.scale, self.bias)
        if x.is_contiguous():  # the rows as they are (a reshape costs host time that a batch's call feels)
            x2, m, xs = x, x.numel() // k, (k, 1)
        else:
            x2 = x.reshape(-1, k)
            m, xs = x2.shape[0], x2.stride()
        bucket = bucket_of(m)
        path = self.mms.get((bucket, x.dtype, xs, x2.data_ptr() % 16 == 0))
        if path is None:
            return self._first_rows(x, x2.reshape(m, k), m)
        y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=self.device)
        if path == "cublas":
            _cublas_linear(x2.reshape(m, k), self.qweight, self.scale, self.bias, y.view(m, n))
            return y
        stream = torch._C._cuda_getCurrentRawStream(self.index)
        scratch = SCRATCH.get((self.index, stream)) or scratch_at(self.index, stream, self.device)
        ints = (m, n, k, bucket, xs[0], xs[1], k, 1, n, 1, self.has_bias, x.dtype == torch.float32)
        path(path.grid(m, n), stream, (x2.data_ptr(), *self.tail, y.data_ptr(), *scratch.ptrs, *ints),
             lambda: (x2.reshape(m, k), self.qweight, self.scale, self.bias if self.has_bias else self.scale, y.view(m, n), scratch.parts,
                      scratch.counts, *ints))
        return y

    def _first_rows(self, x: torch.Tensor, x2: torch.Tensor, m: int) -> torch.Tensor:
        """Tune (or find) this layout's kernel, and for large M choose between it and cuBLAS: computes
        the output on the way."""
        y = int8_linear(x, self.qweight, self.scale, self.bias)
        pkey = _path_key(x2, self.qweight, self.scale, self.bias)
        if m >= LARGE_M and pkey not in PATHS:  # called during a CUDA-graph capture: chosen later
            return y
        key = _mm_key(x2, self.qweight, self.scale, self.bias, y.reshape(m, self.n))
        path = "cublas" if m >= LARGE_M and PATHS[pkey] == "cublas" else LAUNCHERS[key]
        self.mms[(bucket_of(m), x.dtype, x2.stride(), x2.data_ptr() % 16 == 0)] = path
        return y

    def _tensors(self, x, y, scratch) -> tuple:
        b = self.bias if self.bias is not None else self.scale
        return (x, self.qweight, self.scale, b, y, scratch.parts, scratch.counts, self.n, self.k)

    def _first(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Tune (or find) the kernel for this layout; computes ``y`` on the way."""
        sx, xa = x.stride(-1), x.data_ptr() % 16 == 0
        key = ("gemv", x.dtype, self.scale.dtype, self.bias.dtype if self.has_bias else None, self.n, self.k, sx, xa,
               self.aligned, self.index)
        args = [*self._tensors(x, y, scratch_for(self.device)), sx]
        done = key in LAUNCHERS
        self.launchers[(x.dtype, sx, xa)] = tuned_launcher(_int8_gemv_kernel, _tuned_gemv, _GEMV_CONSTS, key, args, self.flags, 1, self.n,
                                                            f"gemv N={self.n} K={self.k} {x.dtype}")
        return self(x) if done else y


def _mm_key(x2, qweight, scale, bias, y) -> tuple:
    tensors = (x2, qweight, scale, bias if bias is not None else scale)
    return (x2.dtype, scale.dtype, None if bias is None else bias.dtype, bucket_of(x2.shape[0]), tuple(qweight.shape), x2.stride(),
            qweight.stride(), y.stride(), tuple(t.data_ptr() % 16 == 0 for t in tensors), x2.device.index)


def _path_key(x2, qweight, scale, bias) -> tuple:
    return (bucket_of(x2.shape[0]), tuple(qweight.shape), x2.dtype, scale.dtype, None if bias is None else bias.dtype, x2.device.index)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., K] @ (qweight[N, K] * scale[N, None]).T + bias[N]`` in ``x``'s dtype."""
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {k}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 1 and qweight.stride() == (k, 1) and scale.is_contiguous() and (bias is None or bias.is_contiguous()):
        return Int8Matmul(qweight, scale, bias)(x)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    scratch = scratch_for(x.device)
    bucket = bucket_of(m)
    b = bias if bias is not None else scale
    tensors = [x2, qweight, scale, b, y, scratch.parts, scratch.counts]
    ints = [m, n, k, bucket, x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), y.stride(0), y.stride(1)]
    flags = {"HAS_BIAS": bias is not None, "IEEE": x.dtype == torch.float32}
    if INTERPRET:
        _int8_mm_kernel[launch_grid(_INTERPRET_CONFIG)(m, n)](*tensors, *ints, **flags, **_INTERPRET_CONFIG)
        return y.reshape(*x.shape[:-1], n)
    key = _mm_key(x2, qweight, scale, bias, y)
    launch = LAUNCHERS.get(key)
    stream = torch._C._cuda_getCurrentRawStream(x2.device.index)
    run = lambda: launch(launch.grid(m, n), stream, (*[t.data_ptr() for t in tensors], *ints, *flags.values()),  # noqa: E731
                         lambda: (*tensors, *ints, *flags.values()))
    done = launch is None  # a first call tunes the kernel, which computes y on the way
    if done:
        launch = tuned_launcher(_int8_mm_kernel, _tuned, _CONSTS, key, tensors + ints, flags, m, n, f"mm M<={bucket} N={n} K={k} {x.dtype}")
    path = "triton"
    if m >= LARGE_M and qweight.stride() == (k, 1):
        pkey = _path_key(x2, qweight, scale, bias)
        path = PATHS.get(pkey)
        if path is None:
            if torch.cuda.is_current_stream_capturing():  # no timing inside a capture: chosen at a later call
                path = "triton"
            else:
                path, done = choose_path(pkey, run, lambda: _cublas_linear(x2, qweight, scale, bias, y), x2.device), False
    if path == "cublas":
        _cublas_linear(x2, qweight, scale, bias, y)
    elif not done:
        run()
    return y.reshape(*x.shape[:-1], n)


# -- the op that compiled graphs see ------------------------------------------------------------------


@torch.library.custom_op("codecllm::int8_linear", mutates_args=())
def int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``int8_linear`` as a torch operator: ``torch.compile`` traces it as one node (its fake below gives
    the output's shape), Inductor fuses the work around it, and CUDA graphs capture its launch. Eager
    layers call their prepared ``Int8Matmul`` instead, which costs less host time than the dispatcher."""
    return int8_linear(x, qweight, scale, bias)


@int8_linear_op.register_fake
def _(x, qweight, scale, bias):
    if x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {qweight.shape[1]}")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
