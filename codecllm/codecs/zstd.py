"""``zstd``: one standard Zstandard frame per chunk (content size in the frame header, no checksum, no
dictionary), so that every chunk decodes alone: on the CPU with ``zstandard`` in a thread pool, on the GPU
with nvCOMP's batched Zstd (``codecllm.gpu.decoders``)."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import wait

import numpy as np

from ..errors import CodecLLMError, DecodeError
from . import Codec, chunk_bounds, cores, register, register_decoder, shared_pool

MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MIN_LEVEL, MAX_LEVEL = 1, 22

_local = threading.local()


@register
class Zstd(Codec):
    id = "zstd"
    chunked = True
    default = True
    nvcomp_algo = "Zstd"  # nvCOMP's batched Zstd decodes these frames on CUDA (codecllm.gpu.decoders)
    default_options = {"level": 3}

    def check_options(self, **options):
        opts = super().check_options(**options)
        level = opts["level"]
        if not isinstance(level, int) or isinstance(level, bool) or not MIN_LEVEL <= level <= MAX_LEVEL:
            raise CodecLLMError(f"zstd level {level!r} outside [{MIN_LEVEL}, {MAX_LEVEL}]")
        return opts

    def check_chunk_size(self, chunk_size):
        """The chunk size a file or a user gives, or ``CodecLLMError`` (``ChunkTableError`` from the reader)."""
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise CodecLLMError(f"chunk size {chunk_size!r} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}] bytes")
        return chunk_size

    def encode(self, data: memoryview, chunk_size: int, chunks: list[int] | None = None, level: int = 3) -> list[bytes]:
        bounds = chunk_bounds(len(data), chunk_size)
        if chunks is not None:
            bounds = [bounds[i] for i in chunks]
        # runs of consecutive chunks, a few per core, taken in turn by this thread and by helpers on the shared
        # pool (a future per 64 KiB chunk cost the calling thread about 0.2 s of a 1.8 s lossless conversion of
        # 438 MB; this thread only waiting left a core idle where the pool was busy hashing)
        threads = cores()
        per = max(1, len(bounds) // (4 * threads))
        runs = [bounds[i:i + per] for i in range(0, len(bounds), per)]
        frames: list[list[bytes]] = [[] for _ in runs]
        order = itertools.count()  # next() on it is atomic: each run is coded once
        stop = threading.Event()  # set where a thread fails: the others take no further run

        def work() -> None:
            try:
                compress = _compressor(level).compress
                while not stop.is_set() and (i := next(order)) < len(runs):
                    frames[i] = [compress(data[b0:b1]) for b0, b1 in runs[i]]
            except BaseException:
                stop.set()
                raise

        # this thread and cores - 1 helpers: one coding thread per core
        helpers = [shared_pool().submit(work) for _ in range(min(threads - 1, len(runs) - 1))]
        try:
            work()
        finally:
            # one not yet started would find no run left: dropped, and not waited on (a cancelled future is
            # done only once a worker takes it, and this thread may be the pool's only worker)
            running = [h for h in helpers if not h.cancel()]
            wait(running)
        for h in running:
            h.result()  # a helper's error
        return [frame for run in frames for frame in run]


def _compressor(level: int):
    import zstandard

    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
    return cache[level]


def _decompressor():
    d = getattr(_local, "dctx", None)
    if d is None:
        import zstandard

        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _decode_frame(frame: memoryview, out: memoryview, i: int) -> None:
    """One chunk into ``out``: exactly one frame, whose header declares exactly ``len(out)`` bytes (checked
    first: python-zstandard would otherwise allocate what a hostile frame declares), that decodes to them
    and ends where the chunk ends (no second frame, no trailing bytes)."""
    import zstandard

    try:
        declared = zstandard.get_frame_parameters(frame).content_size
        if declared != len(out):
            raise DecodeError(f"chunk {i}: its frame holds {declared} bytes, expected {len(out)}")
        obj = _decompressor().decompressobj()
        data = obj.decompress(frame)
    except zstandard.ZstdError as e:
        raise DecodeError(f"chunk {i}: zstd frame does not decode: {e}") from None
    if len(data) != len(out) or not obj.eof:
        raise DecodeError(f"chunk {i} decoded to {len(data)} bytes, expected {len(out)}")
    if obj.unused_data:
        raise DecodeError(f"chunk {i}: {len(obj.unused_data)} bytes follow its frame")
    out[:] = data


@register_decoder("zstd", "cpu-checked-chunk")
def _decode_checked_frame(frame: memoryview, out: memoryview, i: int) -> None:
    """Chunk ``i``, already checked by ``_decode_frame`` (the same bytes, decoded before): straight into
    ``out``, with no intermediate buffer."""
    with _decompressor().stream_reader(frame) as reader:
        n = reader.readinto(out)
    if n != len(out):
        raise DecodeError(f"chunk {i} decoded to {n} bytes, expected {len(out)}")


@register_decoder("zstd", "cpu")
def _decode(payload: memoryview, chunk_sizes: list[int], chunk_size: int, out: np.ndarray, checked: bool = False) -> None:
    """Decode every chunk into its place in ``out``. ``checked``: these very bytes decoded with every check
    before (stream mode decodes its payloads once at load), so each frame goes straight into ``out``.

    The chunks are cut into one contiguous run per free core; this thread decodes the first run and the
    shared pool the others (zstandard releases the GIL). One future per run, not per chunk: on 2 cores a
    future per 64 KiB chunk cost as much as the threads gained. Only cores that torch's own threads leave
    free take a run: in a forward on 2 cores with 2 torch threads the OpenMP workers spin between
    matmuls, and a second decode thread made SmolLM2's stream mode slower (121 against 108 ms/token)."""
    import torch

    bounds = chunk_bounds(len(out), chunk_size)
    if len(bounds) != len(chunk_sizes):
        raise DecodeError(f"{len(chunk_sizes)} chunks for {len(bounds)} chunk bounds")
    starts = np.concatenate([[0], np.cumsum(chunk_sizes, dtype=np.int64)]).tolist()
    dst = memoryview(out).cast("B")

    decode_frame = _decode_checked_frame if checked else _decode_frame

    def run(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            decode_frame(payload[starts[i]:starts[i + 1]], dst[bounds[i][0]:bounds[i][1]], i)

    parts = min(cores() - torch.get_num_threads() + 1, len(bounds) // 2)
    if parts <= 1:
        run(0, len(bounds))
        return
    cuts = [len(bounds) * j // parts for j in range(parts + 1)]
    futures = [shared_pool().submit(run, cuts[j], cuts[j + 1]) for j in range(1, parts)]
    run(cuts[0], cuts[1])
    for f in futures:
        f.result()
