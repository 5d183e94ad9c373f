"""``zstd``: one standard Zstandard frame per chunk (content size in the frame header, no checksum, no
dictionary), so that every chunk decodes alone: on the CPU with ``zstandard`` in a thread pool, on the GPU
with nvCOMP's batched Zstd (``codecllm.gpu.decoders``)."""

from __future__ import annotations

import threading

import numpy as np

from ..errors import CodecLLMError, DecodeError
from . import Codec, chunk_bounds, register, register_decoder, shared_pool

MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MIN_LEVEL, MAX_LEVEL = 1, 22

_local = threading.local()


@register
class Zstd(Codec):
    id = "zstd"
    chunked = True
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

    def encode(self, data: memoryview, chunk_size: int, level: int = 3) -> list[bytes]:
        bounds = chunk_bounds(len(data), chunk_size)
        return list(shared_pool().map(lambda b: _compressor(level).compress(data[b[0]:b[1]]), bounds))


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


@register_decoder("zstd", "cpu")
def _decode(payload: memoryview, chunk_sizes: list[int], chunk_size: int, out: np.ndarray) -> None:
    """Decode every chunk into its place in ``out``; each must decode to exactly its chunk's length."""
    import zstandard

    bounds = chunk_bounds(len(out), chunk_size)
    if len(bounds) != len(chunk_sizes):
        raise DecodeError(f"{len(chunk_sizes)} chunks for {len(bounds)} chunk bounds")
    starts = np.concatenate([[0], np.cumsum(chunk_sizes, dtype=np.int64)]).tolist()

    def one(i: int) -> None:
        lo, hi = bounds[i]
        frame = payload[starts[i]:starts[i + 1]]
        try:
            params = zstandard.get_frame_parameters(frame)
            if params.content_size != hi - lo:
                raise DecodeError(f"chunk {i}: its frame holds {params.content_size} bytes, expected {hi - lo}")
            piece = _decompressor().decompress(frame, max_output_size=hi - lo)
        except zstandard.ZstdError as e:
            raise DecodeError(f"chunk {i}: zstd frame does not decode: {e}") from None
        if len(piece) != hi - lo:
            raise DecodeError(f"chunk {i} decoded to {len(piece)} bytes, expected {hi - lo}")
        out[lo:hi] = np.frombuffer(piece, dtype=np.uint8)

    if len(bounds) == 1:
        one(0)
        return
    for _ in shared_pool().map(one, range(len(bounds))):
        pass
