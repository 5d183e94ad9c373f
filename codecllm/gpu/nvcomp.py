"""nvCOMP's batched C API through ctypes: decode (and, for ANS, encode) many chunks in one asynchronous
call, with every pointer and size table in device memory, prepared once.

The Python API of nvCOMP costs milliseconds per call; the C batched API costs one ctypes call (a few
microseconds of host time), never synchronizes, and can be captured in a CUDA graph.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import DeviceError

SONAME = "libnvcomp.so.6"


def extra_hint() -> str:
    """Which extra brings nvCOMP for the CUDA major version this torch was built with."""
    major = (torch.version.cuda or "13").split(".")[0]
    extra = "gpu" if major == "13" else f"gpu-cu{major}"
    return f"install the GPU extra for CUDA {major}: pip install 'codecllm[{extra}]' (nvidia-libnvcomp-cu{major})"


STATUS_NAMES = {
    0: "success", 10: "invalid value", 11: "not supported", 12: "cannot decompress", 13: "bad checksum",
    15: "output buffer too small", 16: "wrong header length", 17: "alignment", 18: "chunk size too large",
    20: "wrong input length", 1000: "CUDA error", 10000: "internal error",
}


class _Opts(ctypes.Structure):
    """Every nvCOMP options struct is 64 bytes; the fields we set come first."""

    _fields_ = [("a", ctypes.c_int), ("b", ctypes.c_int), ("c", ctypes.c_uint8 * 3), ("reserved", ctypes.c_char * 53)]


class _Align(ctypes.Structure):
    _fields_ = [("input", ctypes.c_size_t), ("output", ctypes.c_size_t), ("temp", ctypes.c_size_t)]


class _Props(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("cudart_version", ctypes.c_uint32)]


def _find_library() -> str:
    """The wheel's library (nvidia-libnvcomp-cu13), wherever on sys.path it was installed; else the
    system's, if any."""
    bases = []
    try:
        spec = importlib.util.find_spec("nvidia.libnvcomp")
        if spec is not None and spec.submodule_search_locations:
            bases += list(spec.submodule_search_locations)
    except (ImportError, ValueError):
        pass
    bases += [str(Path(p) / "nvidia" / "libnvcomp") for p in sys.path if p]
    for base in bases:
        for sub in ("lib64", "lib", "bin"):
            p = Path(base) / sub / SONAME
            if p.is_file():
                return str(p)
    return SONAME


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(_find_library(), mode=ctypes.RTLD_LOCAL)
    except OSError:
        raise DeviceError(f"nvCOMP ({SONAME}) was not found: {extra_hint()}") from None
    vp, sz, i, st = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p
    for algo in ("Zstd", "ANS"):
        f = getattr(lib, f"nvcompBatched{algo}DecompressGetTempSize")
        f.argtypes, f.restype = [sz, sz, _Opts, ctypes.POINTER(sz), sz, st], i
        f = getattr(lib, f"nvcompBatched{algo}DecompressGetRequiredAlignments")
        f.argtypes, f.restype = [_Opts, ctypes.POINTER(_Align)], i
        f = getattr(lib, f"nvcompBatched{algo}DecompressAsync")
        f.argtypes, f.restype = [vp, vp, vp, vp, sz, vp, sz, vp, _Opts, vp, st], i
    f = lib.nvcompBatchedANSCompressGetTempSize
    f.argtypes, f.restype = [sz, sz, _Opts, ctypes.POINTER(sz), sz, st], i
    f = lib.nvcompBatchedANSCompressGetMaxOutputChunkSize
    f.argtypes, f.restype = [sz, _Opts, ctypes.POINTER(sz)], i
    f = lib.nvcompBatchedANSCompressGetRequiredAlignments
    f.argtypes, f.restype = [_Opts, ctypes.POINTER(_Align)], i
    f = lib.nvcompBatchedANSCompressAsync
    f.argtypes, f.restype = [vp, vp, sz, sz, vp, sz, vp, vp, _Opts, vp, st], i
    lib.nvcompGetProperties.argtypes, lib.nvcompGetProperties.restype = [ctypes.POINTER(_Props)], i
    return lib


def version() -> str:
    p = _Props()
    _check(library().nvcompGetProperties(ctypes.byref(p)), "nvcompGetProperties")
    v = p.version  # major * 1000 + minor * 100 + patch
    return f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def _check(status: int, what: str) -> None:
    if status != 0:
        raise DeviceError(f"nvCOMP {what} failed: {STATUS_NAMES.get(status, status)}")


def _decompress_opts() -> _Opts:
    return _Opts()  # backend DEFAULT (0); ANS data type 0 is read from the stream


@dataclass
class Algo:
    """One nvCOMP batched algorithm ('Zstd' or 'ANS') and its alignment needs for decoding."""

    name: str

    def __post_init__(self):
        a = _Align()
        _check(getattr(library(), f"nvcompBatched{self.name}DecompressGetRequiredAlignments")(_decompress_opts(), ctypes.byref(a)), "alignments")
        self.input_align, self.output_align, self.temp_align = a.input, a.output, a.temp

    def decompress_temp_bytes(self, num_chunks: int, max_chunk: int, total: int) -> int:
        n = ctypes.c_size_t()
        f = getattr(library(), f"nvcompBatched{self.name}DecompressGetTempSize")
        _check(f(num_chunks, max_chunk, _decompress_opts(), ctypes.byref(n), total, None), "temp size")
        return n.value


ZSTD = "Zstd"
ANS = "ANS"


@lru_cache(maxsize=None)
def algo(name: str) -> Algo:
    return Algo(name)


class ChunkTable:
    """Device-resident tables for one batched decode: where each compressed chunk is, how long, where its
    output goes, and where nvCOMP writes each chunk's status and decoded length. Built once; ``decode``
    then costs one ctypes call and no synchronization."""

    def __init__(self, algo_name: str, comp: torch.Tensor, comp_offsets: list[int], comp_sizes: list[int],
                 out_ptr_base: int, out_sizes: list[int], out_stride: int, statuses: torch.Tensor, actual: torch.Tensor):
        dev = comp.device
        self.algo = algo(algo_name)
        self.num_chunks = len(comp_sizes)
        base = comp.data_ptr()
        self.comp = comp  # keeps the compressed bytes alive
        self.comp_ptrs = torch.tensor([base + o for o in comp_offsets], dtype=torch.int64, device=dev)
        self.comp_sizes = torch.tensor(comp_sizes, dtype=torch.int64, device=dev)
        self.out_sizes = torch.tensor(out_sizes, dtype=torch.int64, device=dev)
        self.out_ptrs = torch.tensor([out_ptr_base + i * out_stride for i in range(self.num_chunks)], dtype=torch.int64, device=dev)
        self.statuses, self.actual = statuses, actual  # views into arrays shared by many tables
        self.max_chunk = max(out_sizes) if out_sizes else 0
        self.total = sum(out_sizes)
        self.temp_bytes = self.algo.decompress_temp_bytes(self.num_chunks, self.max_chunk, self.total) if self.num_chunks else 0
        self._fn = getattr(library(), f"nvcompBatched{algo_name}DecompressAsync")
        self._opts = _decompress_opts()

    @classmethod
    def concat(cls, tables: list["ChunkTable"], statuses: torch.Tensor, actual: torch.Tensor) -> "ChunkTable":
        """One table decoding the chunks of all ``tables`` (same algorithm) in one call; pass it output
        pointers from their ``out_table``s, concatenated."""
        t = cls.__new__(cls)
        t.algo = tables[0].algo
        t.num_chunks = sum(x.num_chunks for x in tables)
        t.comp = tables[0].comp
        t.comp_ptrs = torch.cat([x.comp_ptrs for x in tables])
        t.comp_sizes = torch.cat([x.comp_sizes for x in tables])
        t.out_sizes = torch.cat([x.out_sizes for x in tables])
        t.out_ptrs = torch.cat([x.out_ptrs for x in tables])
        t.statuses, t.actual = statuses, actual
        t.max_chunk = max(x.max_chunk for x in tables)
        t.total = sum(x.total for x in tables)
        t.temp_bytes = t.algo.decompress_temp_bytes(t.num_chunks, t.max_chunk, t.total) if t.num_chunks else 0
        t._fn, t._opts = tables[0]._fn, tables[0]._opts
        return t

    def rebase(self, comp: torch.Tensor) -> None:
        """Move the compressed bytes to ``comp`` (same length) and point the table there."""
        comp.copy_(self.comp)
        self.comp_ptrs += comp.data_ptr() - self.comp.data_ptr()
        self.comp = comp

    def out_table(self, out_ptr_base: int, out_stride: int) -> torch.Tensor:
        """A device table of output pointers for chunk ``i`` at ``out_ptr_base + i * out_stride``, to pass to
        ``decode`` (a table decodes into any number of buffers)."""
        return torch.arange(self.num_chunks, dtype=torch.int64, device=self.out_ptrs.device) * out_stride + out_ptr_base

    def decode(self, temp: torch.Tensor | None, stream: torch.cuda.Stream | None = None, out_ptrs: torch.Tensor | None = None) -> None:
        """Enqueue the decode on ``stream`` (default: the current one), into the table's own outputs or
        those of ``out_ptrs`` (see ``out_table``). Asynchronous."""
        if not self.num_chunks:
            return
        s = stream or torch.cuda.current_stream(self.comp.device)
        status = self._fn(
            self.comp_ptrs.data_ptr(), self.comp_sizes.data_ptr(), self.out_sizes.data_ptr(), self.actual.data_ptr(),
            self.num_chunks, temp.data_ptr() if temp is not None and self.temp_bytes else None, self.temp_bytes,
            (out_ptrs if out_ptrs is not None else self.out_ptrs).data_ptr(), self._opts, self.statuses.data_ptr(), s.cuda_stream,
        )
        _check(status, f"batched {self.algo.name} decompress")


def ans_encode(src: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """Re-encode the bytes of device tensor ``src`` into nvCOMP ANS chunks of ``chunk_size`` decoded
    bytes. Returns (a tight device buffer with each chunk at an aligned offset, offsets, sizes). Load-time
    only: it synchronizes once to learn the sizes."""
    lib = library()
    dev = src.device
    raw = src.reshape(-1).view(torch.uint8)
    n = raw.numel()
    bounds = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    opts = _Opts()  # rANS, data type CHAR, defaults
    a = _Align()
    _check(lib.nvcompBatchedANSCompressGetRequiredAlignments(opts, ctypes.byref(a)), "ANS alignments")
    max_out = ctypes.c_size_t()
    _check(lib.nvcompBatchedANSCompressGetMaxOutputChunkSize(chunk_size, opts, ctypes.byref(max_out)), "ANS max output")
    stride = -(-max_out.value // 256) * 256
    temp_n = ctypes.c_size_t()
    _check(lib.nvcompBatchedANSCompressGetTempSize(len(bounds), chunk_size, opts, ctypes.byref(temp_n), n, None), "ANS temp size")
    out = torch.empty(len(bounds) * stride, dtype=torch.uint8, device=dev)
    temp = torch.empty(max(temp_n.value, 1), dtype=torch.uint8, device=dev)
    base = raw.data_ptr()
    in_ptrs = torch.tensor([base + s for s, _ in bounds], dtype=torch.int64, device=dev)
    in_sizes = torch.tensor([e - s for s, e in bounds], dtype=torch.int64, device=dev)
    out_ptrs = torch.tensor([out.data_ptr() + i * stride for i in range(len(bounds))], dtype=torch.int64, device=dev)
    out_sizes = torch.empty(len(bounds), dtype=torch.int64, device=dev)
    statuses = torch.empty(len(bounds), dtype=torch.int32, device=dev)
    s = torch.cuda.current_stream(dev)
    _check(lib.nvcompBatchedANSCompressAsync(
        in_ptrs.data_ptr(), in_sizes.data_ptr(), chunk_size, len(bounds), temp.data_ptr(), temp_n.value,
        out_ptrs.data_ptr(), out_sizes.data_ptr(), opts, statuses.data_ptr(), s.cuda_stream), "ANS compress")
    if bool((statuses != 0).any()):
        raise DeviceError(f"nvCOMP ANS compress failed: status {STATUS_NAMES.get(int(statuses.max()), int(statuses.max()))}")
    sizes = out_sizes.tolist()
    offsets, pos = aligned_layout(sizes, max(algo(ANS).input_align, 16))
    idx_src = torch.cat([torch.arange(sz, device=dev) + i * stride for i, sz in enumerate(sizes)])
    idx_dst = torch.cat([torch.arange(sz, device=dev) + o for o, sz in zip(offsets, sizes)])
    tight = torch.zeros(max(pos, 1), dtype=torch.uint8, device=dev)
    tight[idx_dst] = out[idx_src]
    return tight, offsets, sizes


def aligned_layout(sizes: list[int], align: int) -> tuple[list[int], int]:
    """Offsets that start every chunk on an ``align``-byte boundary, and the total length."""
    offsets, pos = [], 0
    for sz in sizes:
        offsets.append(pos)
        pos += -(-sz // align) * align
    return offsets, pos

