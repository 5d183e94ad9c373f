"""Entropy codecs: a registry of codecs with stable string ids, each owning its parameters, its encoder and
its decoders per backend.

A chunked codec cuts a part's bytes into fixed-size chunks (the last one may be shorter) and codes each as
an independent unit, so that decoders work on all chunks at once (CPU threads here, nvCOMP's batched API
on the GPU). The id is what the file header stores; never change one. Decoders register per backend by
codec id (``register_decoder``): the CPU decoders live beside their codec, the CUDA ones in
``codecllm.gpu.decoders``, imported only by the CUDA backend.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from ..errors import CodecLLMError, DecodeError, DeviceError, UnknownCodecError

DEFAULT_CHUNK_SIZE = 64 * 1024


class Codec:
    """A codec: ``encode`` turns bytes into stored pieces (one per chunk for a chunked codec);
    ``check_layout`` validates what a file says about a payload before anything is read."""

    id: str = ""
    chunked: bool = False
    default: bool = False  # the converter's default codec (exactly one registered codec says so)
    nvcomp_algo: str | None = None  # the nvCOMP batched algorithm that decodes this codec's chunks, if any
    default_options: dict[str, Any] = {}

    def check_options(self, **options: Any) -> dict[str, Any]:
        """The encoder's options, validated (``CodecLLMError`` naming the bad one), with defaults filled."""
        extra = set(options) - set(self.default_options)
        if extra:
            raise CodecLLMError(f"codec {self.id!r} takes no option {sorted(extra)[0]!r}")
        return {**self.default_options, **options}

    def check_chunk_size(self, chunk_size: Any) -> int:
        raise NotImplementedError

    def encode(self, data: memoryview, chunk_size: int, chunks: list[int] | None = None, **options: Any) -> list[bytes]:
        """The stored pieces of ``data``; for a chunked codec, those of the chunks ``chunks`` (indexes into
        ``data``'s chunks of ``chunk_size`` bytes, in that order; every chunk if None), one per chunk."""
        raise NotImplementedError


_REGISTRY: dict[str, Codec] = {}
_DECODERS: dict[tuple[str, str], Any] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: register one instance of ``cls`` under ``cls.id``."""
    if cls.id in _REGISTRY:
        raise ValueError(f"codec id {cls.id!r} registered twice")
    _REGISTRY[cls.id] = cls()
    return cls


def register_decoder(codec_id: str, backend: str) -> Callable:
    """Decorator: ``fn`` decodes ``codec_id`` payloads on ``backend`` ("cpu", "cuda"). A CPU decoder is
    ``fn(payload, chunk_sizes, chunk_size, out, checked)``: ``checked`` says the same bytes decoded
    before with every check. A chunked codec may also register ``"cpu-checked-chunk"``, ``fn(chunk, out, i)``
    for one such chunk (``i``: its index, for messages), with as little work around it as can be (stream mode's hot path)."""

    def deco(fn):
        _DECODERS[(codec_id, backend)] = fn
        return fn

    return deco


def get_codec(codec_id: Any) -> Codec:
    if isinstance(codec_id, str) and codec_id in _REGISTRY:
        return _REGISTRY[codec_id]
    raise UnknownCodecError(f"unknown codec id {codec_id!r} (known: {', '.join(sorted(_REGISTRY))})")


def decoder(codec_id: str, backend: str):
    try:
        return _DECODERS[(codec_id, backend)]
    except KeyError:
        raise DeviceError(f"codec {codec_id!r} has no decoder on {backend}") from None


def checked_chunk_decoder(codec_id: str):
    """The codec's ``"cpu-checked-chunk"`` decoder, or None."""
    return _DECODERS.get((codec_id, "cpu-checked-chunk"))


def codec_ids() -> list[str]:
    return sorted(_REGISTRY)


def default_codec_id() -> str:
    return next(k for k, c in _REGISTRY.items() if c.default)


# --- the chunking every chunked codec shares --------------------------------------------------------------

def chunk_bounds(nbytes: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the decoded chunks of an ``nbytes`` stream."""
    return [(s, min(s + chunk_size, nbytes)) for s in range(0, nbytes, chunk_size)]


def num_chunks(nbytes: int, chunk_size: int) -> int:
    return -(-nbytes // chunk_size)


_shared_pool: ThreadPoolExecutor | None = None


@functools.cache
def cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one, as under taskset or a
    container's cpuset), counted once."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def shared_pool() -> ThreadPoolExecutor:
    """A process-wide pool for chunk work (zstandard releases the GIL while it works)."""
    global _shared_pool
    if _shared_pool is None:
        _shared_pool = ThreadPoolExecutor(max_workers=cores())
    return _shared_pool


def decode_cpu(codec_id: str, payload, chunk_sizes: list[int], chunk_size: int, nbytes: int, out: np.ndarray | None = None,
               checked: bool = False) -> np.ndarray:
    """Decode a payload on the CPU into ``out`` (a new ``uint8`` array of exactly ``nbytes`` bytes by default).
    ``checked=True`` only for bytes that decoded before with every check (a codec may then skip them)."""
    if out is None:
        out = np.empty(nbytes, dtype=np.uint8)
    decoder(codec_id, "cpu")(memoryview(payload).cast("B"), chunk_sizes, chunk_size, out, checked)
    return out


# the codecs this package ships
from . import raw, zstd  # noqa: E402,F401

__all__ = ["Codec", "register", "register_decoder", "get_codec", "decoder", "checked_chunk_decoder", "codec_ids", "default_codec_id",
           "chunk_bounds", "num_chunks", "shared_pool", "decode_cpu", "DEFAULT_CHUNK_SIZE", "DecodeError"]
