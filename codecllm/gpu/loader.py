"""Loading onto CUDA: compressed chunks go to GPU memory as they are and nvCOMP decodes them there.

``resident``: each Linear's zstd chunks are decoded once, at load, into its int8 weight.
``stream``: each Linear keeps its weight compressed in GPU memory (as the file's zstd frames, or
re-encoded to nvCOMP's ANS at load, which decodes about ten times faster) and decodes it just before use,
on a side stream, while the layers before it compute (``codecllm.gpu.stream``).

Compressed bytes are checked against their sha256 on the host before any of them reaches nvCOMP (its
behaviour on corrupt input is undefined). nvCOMP's per-chunk statuses and decoded sizes are checked at
load for every decode it does then, and in stream mode after every ``generate()`` call (one sync).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from ..codecs import chunk_bounds
from ..errors import DecodeError, DeviceError
from ..format import DTYPES, CllmFile, Record
from . import nvcomp
from .stream import CudaStreamLinear, StreamSchedule, _aligned

STREAM_CODECS = ("ans", "zstd")


def _padded(data: np.ndarray, sizes: list[int], align: int) -> tuple[np.ndarray, list[int]]:
    """``data`` (chunks back to back) with each chunk moved to an ``align``-byte boundary."""
    offsets, total = nvcomp.aligned_layout(sizes, align)
    if align <= 1:
        return data, offsets
    src_starts = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]) if sizes else np.zeros(0, np.int64)
    shift = np.repeat(np.asarray(offsets, dtype=np.int64) - src_starts, sizes)
    out = np.zeros(total, dtype=np.uint8)
    out[np.arange(len(data), dtype=np.int64) + shift] = data
    return out, offsets


class GpuDecoder:
    """Decodes the records of one open ``.cllm`` file onto a CUDA device with nvCOMP."""

    def __init__(self, f: CllmFile, device: torch.device, stream_codec: str = "ans"):
        if stream_codec not in STREAM_CODECS:
            raise DeviceError(f"stream codec {stream_codec!r} is not one of {', '.join(STREAM_CODECS)}")
        nvcomp.library()  # a clear error now if nvCOMP is missing
        self.f, self.dev, self.stream_codec = f, device, stream_codec
        self.zstd = nvcomp.algo(nvcomp.ZSTD)
        self._temp = torch.empty(0, dtype=torch.uint8, device=device)
        self._arena = torch.empty(0, dtype=torch.uint8, device=device)
        self._arena_pos = 0
        self.schedule = StreamSchedule()

    def reserve(self, sizes: list[int]) -> None:
        """One allocation for the tensors about to be decoded: the caching allocator rounds every large
        allocation up, and many separate weights would waste tens of MB."""
        self._arena = torch.empty(sum(_aligned(n) for n in sizes), dtype=torch.uint8, device=self.dev)
        self._arena_pos = 0

    def _take(self, nbytes: int) -> torch.Tensor:
        if self._arena_pos + nbytes > self._arena.numel():
            return torch.empty(nbytes, dtype=torch.uint8, device=self.dev)
        out = self._arena[self._arena_pos:self._arena_pos + nbytes]
        self._arena_pos += _aligned(nbytes)
        return out

    def _temp_for(self, nbytes: int) -> torch.Tensor:
        if self._temp.numel() < nbytes:
            self._temp = torch.empty(nbytes, dtype=torch.uint8, device=self.dev)
        return self._temp

    def _upload(self, rec: Record, align: int) -> tuple[torch.Tensor, list[int]]:
        data, offsets = _padded(self.f.read_stored(rec), rec.chunks, align)  # sha256 checked here
        return torch.from_numpy(data).to(self.dev), offsets

    def _out_sizes(self, rec: Record) -> list[int]:
        return [e - s for s, e in chunk_bounds(rec.encoded_nbytes, rec.chunk_size)]

    def _zstd_decode_into(self, rec: Record, out: torch.Tensor) -> None:
        """Decode ``rec``'s zstd chunks into the uint8 device buffer ``out`` and check every chunk's
        status and size (one synchronization: load time only)."""
        comp, offsets = self._upload(rec, self.zstd.input_align)
        n = len(rec.chunks)
        statuses = torch.empty(n, dtype=torch.int32, device=self.dev)
        actual = torch.empty(n, dtype=torch.int64, device=self.dev)
        table = nvcomp.ChunkTable(nvcomp.ZSTD, comp, offsets, rec.chunks, out.data_ptr(), self._out_sizes(rec), rec.chunk_size, statuses, actual)
        table.decode(self._temp_for(table.temp_bytes))
        if bool(((statuses != 0).any() | (actual != table.out_sizes).any()).item()):
            raise DecodeError(f"{self.f.path}: nvCOMP could not decode {rec.name!r} (statuses {sorted(set(statuses.tolist()))})")

    def decode(self, rec: Record) -> torch.Tensor:
        """The encoded tensor of ``rec`` on the device (int8 for int8, the weight for none)."""
        out = self._take(rec.encoded_nbytes)
        if rec.codec == "raw":
            out.copy_(torch.from_numpy(self.f.read_stored(rec)))
        elif rec.codec == "zstd":
            self._zstd_decode_into(rec, out)
        else:
            raise DeviceError(f"codec {rec.codec!r} has no GPU decoder")
        return out.view(DTYPES[rec.encoded_dtype][0]).reshape(rec.shape)

    def stream_linear(self, rec: Record, scale: torch.Tensor | None, bias) -> CudaStreamLinear:
        """A stream-mode Linear for ``rec``: its weight kept compressed in GPU memory."""
        if rec.codec != "zstd":
            raise DeviceError(f"codec {rec.codec!r} is not streamed")
        if self.stream_codec == "zstd":
            comp, offsets = self._upload(rec, self.zstd.input_align)
            sizes, algo = rec.chunks, nvcomp.ZSTD
        else:  # decode once, re-encode to ANS in GPU memory
            decoded = torch.empty(rec.encoded_nbytes, dtype=torch.uint8, device=self.dev)
            self._zstd_decode_into(rec, decoded)
            comp, offsets, sizes = nvcomp.ans_encode(decoded, rec.chunk_size)
            del decoded
            algo = nvcomp.ANS
        out_sizes = self._out_sizes(rec)
        statuses = torch.empty(len(out_sizes), dtype=torch.int32, device=self.dev)
        actual = torch.empty(len(out_sizes), dtype=torch.int64, device=self.dev)
        table = nvcomp.ChunkTable(algo, comp, offsets, sizes, 0, out_sizes, rec.chunk_size, statuses, actual)
        return CudaStreamLinear(table, rec, scale, bias, self.schedule)

    def finish(self, model: nn.Module) -> None:
        """Give the stream layers their shared workspaces, temp buffer and status arrays, check every
        stream layer decodes correctly once, hook the model's forward (prefetches stay inside one forward)
        and make ``generate()`` check the statuses after each call."""
        from . import fusion

        fusion.install(model)
        layers = self.schedule.layers
        self._temp = None
        self._arena = None
        if not layers:
            return
        # the compressed payloads, moved into one allocation (see ``reserve``)
        packed = torch.empty(sum(_aligned(l.table.comp.numel()) for l in layers), dtype=torch.uint8, device=self.dev)
        pos = 0
        for l in layers:
            n = l.table.comp.numel()
            l.table.rebase(packed[pos:pos + n])
            l.payload = l.table.comp
            pos += _aligned(n)
        sh = self.schedule
        sh.setup(self.dev)
        for l in layers:  # every streamed weight decodes once here, so that a bad one fails the load
            l.table.decode(sh.temp, out_ptrs=l.alone[0])
        sh.check()
        model.register_forward_pre_hook(sh.begin_forward)
        model.register_forward_hook(sh.end_forward)
        original = model.generate

        @functools.wraps(original)
        def generate(*args, **kwargs):
            out = original(*args, **kwargs)
            sh.check()
            return out

        model.generate = generate
        model.check_decodes = sh.check
