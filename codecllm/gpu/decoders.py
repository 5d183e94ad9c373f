"""The codecs' CUDA decoders, registered by codec id for the ``cuda`` backend: each decodes one part's
stored bytes (already checked against their sha256 on the host) into a uint8 device buffer and checks
nvCOMP's per-chunk statuses and sizes (one synchronization: load time only)."""

from __future__ import annotations

import numpy as np
import torch

from ..codecs import chunk_bounds, register_decoder
from ..errors import DecodeError
from . import nvcomp

_temp: dict[torch.device, torch.Tensor] = {}


def temp_for(device: torch.device, nbytes: int) -> torch.Tensor:
    """nvCOMP's scratch buffer for load-time decodes, grown as needed (``release`` frees it)."""
    t = _temp.get(device)
    if t is None or t.numel() < nbytes:
        t = _temp[device] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    return t


def release(device: torch.device) -> None:
    _temp.pop(device, None)


def padded(data: np.ndarray, sizes: list[int], align: int) -> tuple[np.ndarray, list[int]]:
    """``data`` (chunks back to back) with each chunk moved to an ``align``-byte boundary."""
    offsets, total = nvcomp.aligned_layout(sizes, align)
    if align <= 1:
        return data, offsets
    src_starts = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]) if sizes else np.zeros(0, np.int64)
    shift = np.repeat(np.asarray(offsets, dtype=np.int64) - src_starts, sizes)
    out = np.zeros(total, dtype=np.uint8)
    out[np.arange(len(data), dtype=np.int64) + shift] = data
    return out, offsets


def upload(stored: np.ndarray, part, device: torch.device, algo: str) -> tuple[torch.Tensor, list[int]]:
    data, offsets = padded(stored, part.chunks, nvcomp.algo(algo).input_align)
    return torch.from_numpy(data).to(device), offsets


def out_sizes(part) -> list[int]:
    return [e - s for s, e in chunk_bounds(part.nbytes, part.chunk_size)]


@register_decoder("raw", "cuda")
def _raw(stored: np.ndarray, part, out: torch.Tensor, name: str) -> None:
    out.copy_(torch.from_numpy(stored))


@register_decoder("zstd", "cuda")
def _zstd(stored: np.ndarray, part, out: torch.Tensor, name: str) -> None:
    dev = out.device
    comp, offsets = upload(stored, part, dev, nvcomp.ZSTD)
    n = len(part.chunks)
    statuses = torch.empty(n, dtype=torch.int32, device=dev)
    actual = torch.empty(n, dtype=torch.int64, device=dev)
    table = nvcomp.ChunkTable(nvcomp.ZSTD, comp, offsets, part.chunks, out.data_ptr(), out_sizes(part), part.chunk_size, statuses, actual)
    table.decode(temp_for(dev, table.temp_bytes))
    if bool(((statuses != 0).any() | (actual != table.out_sizes).any()).item()):
        raise DecodeError(f"nvCOMP could not decode {name!r} (statuses {sorted(set(statuses.tolist()))})")
