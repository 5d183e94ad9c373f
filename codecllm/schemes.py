"""Quantization schemes: a registry of symmetric ``quantize`` / ``dequantize`` pairs with stable string ids.

A scheme turns a weight into an *encoded* tensor (what the codec compresses) plus named side tensors
(scales), and back. The id is what the file header stores; never change one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UnknownSchemeError

# Rows quantized at a time, so that converting a large tensor needs one float32 block, not a float32 copy.
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Scheme:
    """``quantize(w) -> (encoded, {side name: tensor})``; ``dequantize(encoded, sides, dtype) -> w``."""

    id: str
    lossless: bool
    encoded_dtype: Callable[[torch.dtype], torch.dtype]
    side_tensors: tuple[str, ...]
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    dequantize: Callable[[torch.Tensor, dict[str, torch.Tensor], torch.dtype], torch.Tensor]


_REGISTRY: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    if scheme.id in _REGISTRY:
        raise ValueError(f"scheme id {scheme.id!r} registered twice")
    _REGISTRY[scheme.id] = scheme
    return scheme


def get_scheme(scheme_id: str) -> Scheme:
    try:
        return _REGISTRY[scheme_id]
    except (KeyError, TypeError):
        raise UnknownSchemeError(f"unknown quantization scheme id {scheme_id!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def scheme_ids() -> list[str]:
    return sorted(_REGISTRY)


# --- none: the weight bit for bit ----------------------------------------------------------------------

register(
    Scheme(
        "none",
        lossless=True,
        encoded_dtype=lambda dtype: dtype,
        side_tensors=(),
        quantize=lambda w: (w.contiguous(), {}),
        dequantize=lambda enc, sides, dtype: enc.to(dtype),
    )
)


# --- int8: symmetric, one float32 scale per output channel (row), q in [-127, 127] ----------------------

INT8_QMAX = 127


def _int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if w.dim() != 2:
        raise ValueError(f"int8 quantizes 2-D weights, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    q = torch.empty((rows, cols), dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
    for r in range(0, rows, step):
        block = w[r:r + step].to(torch.float32)
        s = block.abs().amax(dim=1) / INT8_QMAX
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row quantizes to zeros with any scale
        q[r:r + step] = torch.round(block / s[:, None]).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
        scale[r:r + step] = s
    return q, {"scale": scale}


def _int8_dequantize(q: torch.Tensor, sides: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * sides["scale"].to(q.device, torch.float32)[:, None]).to(dtype)


register(
    Scheme(
        "int8",
        lossless=False,
        encoded_dtype=lambda dtype: torch.int8,
        side_tensors=("scale",),
        quantize=_int8_quantize,
        dequantize=_int8_dequantize,
    )
)
