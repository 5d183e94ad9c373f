"""What the fused Triton matmuls of every scheme share (``int8_triton``, ``int4_triton``): the split-K
scratch of each CUDA stream, launchers prepared once per tuned kernel and layout, and for large M the
choice, timed once per shape, between a scheme's Triton GEMM and cuBLAS on its weight dequantized into a
workspace a block of rows at a time.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import triton
import triton.language as tl

from ..errors import DeviceError
from ..gpu.graphs import events_ms

MAX_SPLIT_K = 8
SPARE_SCRATCH = 4  # scratch made ahead per device (``reserve_scratch``)
SPLIT_MAX_N = 8192  # wider outputs have tiles enough: K is not split for them
SMALL_M = 16
# the interpreter has no benchmarking driver: each kernel runs one fixed configuration there
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def split_fits(c: triton.Config, m_bucket: int, n: int, k: int) -> bool:
    """Whether a K-split configuration may run: a wide enough K, and partials that fit the scratch
    (``MAX_SPLIT_K * SMALL_M`` float32 rows per output column, ``SPLIT_MAX_N`` columns)."""
    kw = c.kwargs
    if kw["SPLIT_K"] == 1:
        return True
    rows = cdiv(m_bucket, kw["BLOCK_M"]) * kw["BLOCK_M"]
    return n <= SPLIT_MAX_N and k >= kw["SPLIT_K"] * kw["BLOCK_K"] and rows * kw["SPLIT_K"] <= MAX_SPLIT_K * SMALL_M


@triton.jit
def tile_of(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile (row tile, column tile): ``GROUP_M`` row tiles take each column tile in
    turn, so that the programs running together share its weights through L2 (the last group of row tiles
    may be shorter)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


@triton.jit
def k_steps(k_blocks, SPLIT_K: tl.constexpr):
    """This program's K steps ``[first, last)`` of ``k_blocks``, split over ``SPLIT_K`` programs along
    grid axis 1 (the last ones may get fewer, or none)."""
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    first = tl.program_id(1) * per_split
    return first, tl.minimum(first + per_split, k_blocks)


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a constexpr function there: a microsecond or more
    a call, on a path whose whole budget is a few microseconds)."""
    return -(-a // b)


def bucket_of(m: int) -> int:
    return SMALL_M if m <= SMALL_M else 64 if m <= 64 else 128 if m <= 128 else 256 if m <= 256 else 4096


class Scratch:
    """The split-K partials and tile counters of one CUDA stream. Sized once for the largest split
    output (``SPLIT_MAX_N`` columns at ``SMALL_M`` rows), so that calls never allocate. Counters start
    at zero and every call leaves them at zero. Kept per stream: two streams running split matmuls at
    the same time must not share counters."""

    PARTS = MAX_SPLIT_K * SMALL_M * (SPLIT_MAX_N + 128)  # float32
    COUNTS = SPLIT_MAX_N + 1  # int32: one row per tile at the least

    def __init__(self, device: torch.device):
        self.parts = torch.empty(self.PARTS, dtype=torch.float32, device=device)
        self.counts = torch.zeros(self.COUNTS, dtype=torch.int32, device=device)
        self.ptrs = (self.parts.data_ptr(), self.counts.data_ptr())


def scratch_bytes(index: int | None = None) -> int:
    """What ``reserve_scratch`` allocates on a device: on GPU ``index``, from now (none where it made its
    scratch already)."""
    made = SPARE_SCRATCH if index is None else SPARE_SCRATCH - len(SPARE.get(index, ()))
    return made * 4 * (Scratch.PARTS + Scratch.COUNTS)


SCRATCH: dict[tuple, Scratch] = {}
SPARE: dict[int | None, list[Scratch]] = {}  # per device: made ahead, for streams not seen yet


def reserve_scratch(device: torch.device) -> None:
    """Make scratch ahead for the streams a device's matmuls will meet (the caller's, the one CUDA-graph
    capture and ``torch.compile``'s CUDA graphs use): made during a capture, or while the compiler's
    graphs route allocations into their private pool, it would belong to that pool. The loader calls this."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda": the current device, as tensors made there get
        device = torch.device("cuda", torch.cuda.current_device())
    spare = SPARE.setdefault(device.index, [])
    while len(spare) < SPARE_SCRATCH and not torch.cuda.is_current_stream_capturing():
        spare.append(Scratch(device))


def scratch_at(index: int | None, stream: int, device: torch.device) -> Scratch:
    s = SCRATCH.get((index, stream))
    if s is None:
        spare = SPARE.get(index)
        if not spare and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # made here, its zeroed counters would exist only inside the graph
            raise DeviceError("codecllm: a CUDA graph is being captured on a stream no int8/int4 matmul has run on: run one "
                              "forward on that stream before capturing, or call codecllm.kernels.launch.reserve_scratch(device)")
        s = SCRATCH[(index, stream)] = spare.pop() if spare else Scratch(device)
    return s


def scratch_for(device: torch.device) -> Scratch:
    if device.type != "cuda":
        return scratch_at(None, 0, device)
    return scratch_at(device.index, torch._C._cuda_getCurrentRawStream(device.index), device)


# Launching through the autotuner and the JIT's argument binder costs tens of microseconds of host time
# per call, more than an fp16 matmul's whole launch. After the first call for a given layout, the compiled
# kernel chosen by the autotuner is launched directly through its launcher, with every pointer passed as
# an integer (a tensor would cost the launcher a driver query per pointer). The key holds everything the
# kernel was specialized on (dtypes, N, K, strides, 16-byte alignment of each pointer); M is not.
LAUNCHERS: dict[tuple, "Launcher"] = {}


class Launcher:
    def __init__(self, jit, compiled, config: triton.Config, names: tuple[str, ...], n: int, label: str):
        self.label = label  # kernel and shape, for records
        self.jit, self.consts = jit, tuple(config.kwargs[c] for c in names)
        self.meta_kwargs = {c: config.kwargs[c] for c in names}
        compiled._init_handles()
        self.run, self.function, self.meta = compiled.run, compiled.function, compiled.packed_metadata
        self.num_warps, self.num_stages = config.num_warps, config.num_stages
        self.split = config.kwargs["SPLIT_K"]
        self.bm, self.bn = config.kwargs.get("BLOCK_M", 1), config.kwargs["BLOCK_N"]
        self.row_grid = cdiv(n, self.bn)  # programs per K split at M = 1
        self.direct = True

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        """``launch_grid``'s, computed here: this is on every eager call's path."""
        return (-(-m // self.bm) * -(-n // self.bn), self.split, 1)

    def __call__(self, grid: tuple[int, int, int], stream: int, args: tuple, tensors) -> None:
        """Launch with ``args`` (pointers as integers); ``tensors()`` gives the same arguments with
        tensors, for the public path a Triton with another launcher signature takes."""
        if self.direct:
            try:
                self.run(grid[0], grid[1], grid[2], stream, self.function, self.meta, None, None, None, *args, *self.consts)
                return
            except TypeError:  # another Triton's launcher signature: take the public path from now on
                self.direct = False
        self.jit[grid](*tensors(), **self.meta_kwargs, num_warps=self.num_warps, num_stages=self.num_stages)


def tuned_configs() -> list[str]:
    """What the autotuner chose so far, one line per kernel and shape (for benchmark records)."""
    return sorted({f"{l.label}: " + " ".join(f"{c}={v}" for c, v in l.meta_kwargs.items()) + f" warps={l.num_warps} stages={l.num_stages}"
                   for l in LAUNCHERS.values()})


def launch_grid(meta: dict):
    """The launch grid of a configuration, as a function of M and N: (output tiles, K splits)."""
    bm = meta.get("BLOCK_M", 1)
    return lambda m, n: (cdiv(m, bm) * cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])


def tuned_launcher(kernel, tuned, names: tuple[str, ...], key: tuple, args: list, flags: dict, m: int, n: int, label: str) -> "Launcher":
    """The launcher of ``kernel``'s best configuration for ``key``; the first call for a key tunes it
    (running the kernel on ``args``, whose results it leaves in place)."""
    launch = LAUNCHERS.get(key)
    if launch is None:
        tuned[lambda meta: launch_grid(meta)(m, n)](*args, **flags)
        cfg = tuned.best_config
        compiled = kernel.warmup(*args, **flags, grid=launch_grid(cfg.kwargs)(m, n), **cfg.all_kwargs())
        launch = LAUNCHERS[key] = Launcher(kernel, compiled, cfg, names, n, label)
    return launch


# Large M (prefill): the Triton GEMM or the weight dequantized, a block of rows at a time, into a workspace
# that cuBLAS multiplies; whichever is faster for the shape, measured at its first call outside a CUDA-graph
# capture (``choose_path``), is kept for the process. The two round differently (cuBLAS multiplies a weight
# rounded to the activation dtype), so large-M outputs are reproducible within a process, not across.
LARGE_M = 65  # from this M on, both paths are timed
DEQUANT_BLOCK_BYTES = 128 << 20  # dequantized rows per cuBLAS call (a Llama-3-8B MLP weight is one block)
PATHS: dict[tuple, str] = {}  # (M bucket, N, K, dtypes, bias) -> "triton" or "cublas"


def cublas_linear(x2: torch.Tensor, n: int, k: int, dequantize_rows: Callable[[int, int, torch.Tensor], torch.Tensor],
                  bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """``y = x2 @ W.T + bias`` through cuBLAS, ``W`` (``[n, k]``) dequantized a block of rows at a time
    into one workspace by ``dequantize_rows(n0, n1, out)``, which fills ``out`` with rows ``n0:n1`` and
    returns it."""
    rows = max(16, min(n, DEQUANT_BLOCK_BYTES // (k * x2.element_size())) // 16 * 16)
    w = torch.empty((min(rows, n), k), dtype=x2.dtype, device=x2.device)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        wb = dequantize_rows(n0, n1, w[:n1 - n0])
        out = y if n1 - n0 == n else y[:, n0:n1]
        if bias is None:
            torch.mm(x2, wb.t(), out=out)
        else:
            torch.addmm(bias[n0:n1].to(x2.dtype), x2, wb.t(), out=out)


def choose_path(key: tuple, triton_call, cublas_call, device: torch.device, reps: int = 5) -> str:
    """Time both large-M paths on the call's own arguments (each overwrites the call's output) and keep
    the faster for ``key`` from now on in this process."""
    with torch.cuda.device(device):
        times = {"triton": events_ms(triton_call, reps, warmup=1), "cublas": events_ms(cublas_call, reps, warmup=1)}
    PATHS[key] = min(times, key=times.get)
    return PATHS[key]
