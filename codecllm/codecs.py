"""Entropy codecs: a registry of symmetric ``encode`` / ``decode`` pairs with stable string ids.

A chunked codec cuts the encoded byte stream into fixed-size chunks (the last one may be shorter) and
compresses each into an independent unit, so that decoders can work on all chunks at once (CPU threads
here, nvCOMP's batched API on the GPU). The id is what the file header stores; never change one.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import DecodeError, UnknownCodecError

DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_LEVEL = 3
MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class Codec:
    """A codec: ``encode`` turns one chunk into bytes, ``decode`` turns them back into ``size`` bytes."""

    id: str
    chunked: bool
    encode_chunk: Callable[[memoryview, int], bytes]
    decode_chunk: Callable[[memoryview, int], bytes]


_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    if codec.id in _REGISTRY:
        raise ValueError(f"codec id {codec.id!r} registered twice")
    _REGISTRY[codec.id] = codec
    return codec


def get_codec(codec_id: str) -> Codec:
    try:
        return _REGISTRY[codec_id]
    except (KeyError, TypeError):
        raise UnknownCodecError(f"unknown codec id {codec_id!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def codec_ids() -> list[str]:
    return sorted(_REGISTRY)


# --- raw: the bytes as they are, stored as an ordinary typed safetensors tensor --------------------------

register(Codec("raw", chunked=False, encode_chunk=lambda data, level: bytes(data), decode_chunk=lambda data, size: bytes(data)))


# --- zstd: one standard zstd frame (content size in the frame header, no frame checksum) per chunk -------

_local = threading.local()


def _zstd_compressor(level: int):
    import zstandard

    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
    return cache[level]


def _zstd_encode(data: memoryview, level: int) -> bytes:
    return _zstd_compressor(level).compress(data)


def _zstd_decode(data: memoryview, size: int) -> bytes:
    import zstandard

    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    try:
        # python-zstandard allocates the size a frame header declares: check it before decompressing
        declared = zstandard.frame_content_size(data)
        if declared != size:
            raise DecodeError(f"zstd frame declares {declared} bytes (-1: none), its chunk holds {size}")
        out = dctx.decompress(data, max_output_size=size)
    except zstandard.ZstdError as e:
        raise DecodeError(f"zstd frame does not decode: {e}") from None
    return out


register(Codec("zstd", chunked=True, encode_chunk=_zstd_encode, decode_chunk=_zstd_decode))


# --- the chunking both halves share ---------------------------------------------------------------------

def chunk_bounds(nbytes: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the decoded chunks of an ``nbytes`` stream."""
    return [(s, min(s + chunk_size, nbytes)) for s in range(0, nbytes, chunk_size)]


def _pool(threads: int | None) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1)


_shared_pool: ThreadPoolExecutor | None = None


def shared_pool() -> ThreadPoolExecutor:
    """A process-wide pool for chunk work (zstandard releases the GIL while it works)."""
    global _shared_pool
    if _shared_pool is None:
        _shared_pool = _pool(None)
    return _shared_pool


def encode(codec: Codec, data: memoryview, chunk_size: int, level: int = DEFAULT_LEVEL) -> tuple[list[bytes], list[int]]:
    """Encode ``data``; returns the stored pieces (one per chunk) and their sizes."""
    data = memoryview(data).cast("B")
    if not codec.chunked:
        return [bytes(data)], [len(data)]
    bounds = chunk_bounds(len(data), chunk_size)
    pieces = list(shared_pool().map(lambda b: codec.encode_chunk(data[b[0]:b[1]], level), bounds))
    return pieces, [len(p) for p in pieces]


def decode(codec: Codec, payload: memoryview, chunk_sizes: list[int], chunk_size: int, nbytes: int) -> np.ndarray:
    """Decode a payload into a new ``uint8`` array of exactly ``nbytes`` bytes."""
    payload = memoryview(payload).cast("B")
    out = np.empty(nbytes, dtype=np.uint8)
    if not codec.chunked:
        if len(payload) != nbytes:
            raise DecodeError(f"raw payload holds {len(payload)} bytes, expected {nbytes}")
        out[:] = np.frombuffer(payload, dtype=np.uint8)
        return out
    bounds = chunk_bounds(nbytes, chunk_size)
    starts = np.concatenate([[0], np.cumsum(chunk_sizes, dtype=np.int64)]).tolist()

    def one(i: int) -> None:
        lo, hi = bounds[i]
        piece = codec.decode_chunk(payload[starts[i]:starts[i + 1]], hi - lo)
        if len(piece) != hi - lo:
            raise DecodeError(f"chunk {i} decoded to {len(piece)} bytes, expected {hi - lo}")
        out[lo:hi] = np.frombuffer(piece, dtype=np.uint8)

    for _ in shared_pool().map(one, range(len(bounds))):
        pass
    return out
