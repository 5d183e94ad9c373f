"""``raw``: the bytes as they are, stored as an ordinary typed safetensors tensor (readable by any
safetensors reader)."""

from __future__ import annotations

import numpy as np

from ..errors import DecodeError
from . import Codec, register, register_decoder


@register
class Raw(Codec):
    id = "raw"
    chunked = False

    def encode(self, data: memoryview, chunk_size: int, chunks: list[int] | None = None, **options) -> list[bytes]:
        if chunks is not None:
            raise ValueError("the raw codec has no chunks")
        return [bytes(data)]


@register_decoder("raw", "cpu")
def _decode(payload: memoryview, chunk_sizes, chunk_size, out: np.ndarray, checked: bool = False) -> None:
    if len(payload) != len(out):
        raise DecodeError(f"raw payload holds {len(payload)} bytes, expected {len(out)}")
    out[:] = np.frombuffer(payload, dtype=np.uint8)
