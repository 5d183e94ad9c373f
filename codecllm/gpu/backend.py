"""Loading onto CUDA: compressed chunks go to GPU memory as they are and nvCOMP decodes them there.

Resident records are decoded once, at load, by the codecs' CUDA decoders (``codecllm.gpu.decoders``):
the main parts (int8 codes, float weights) into one arena, in the model's parameter order, so that the
weights of layers registered together lie back to back (``codecllm.gpu.fusion`` uses that); the small
parts (scales) into a second one. Stream layers keep their main part compressed in GPU memory (as the
file's zstd frames, or re-encoded to nvCOMP's ANS at load, which decodes about ten times faster) and
decode it just before use, on a side stream, while the layers before it compute (``codecllm.gpu.stream``).

Compressed bytes are checked against their sha256 on the host before any of them reaches nvCOMP (its
behaviour on corrupt input is undefined). nvCOMP's statuses and sizes are checked at load for every
decode it does then; in stream mode, each forward folds them into a flag that the next forward reads
(``StreamSchedule.check``), so a failed decode stops the next step of ``generate()``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..codecs import decoder, get_codec
from ..dtypes import torch_dtype
from ..errors import DeviceError
from ..format import CllmFile, Record
from . import decoders, nvcomp
from .stream import StreamSchedule, aligned

# None: each scheme's fastest form (quantized payloads as ANS); "ans": entropy-coded wherever a scheme can
# (stand-ins registered for "cuda-stream-ans"); "zstd": the file's chunks as they are (any codec nvCOMP decodes)
STREAM_CODECS = (None, "ans", "zstd")


def stream_keys(stream_codec: str | None) -> tuple[str, ...]:
    """The registry keys under which stream stand-ins are looked up, most specific first."""
    if stream_codec not in STREAM_CODECS:
        raise DeviceError(f"stream codec {stream_codec!r} is not one of {', '.join(map(repr, STREAM_CODECS))}")
    return (f"cuda-stream-{stream_codec}", "cuda-stream") if stream_codec else ("cuda-stream",)


class _Arena:
    """One allocation for many tensors decoded at load: the caching allocator rounds every large
    allocation up, and many separate weights would waste tens of MB."""

    def __init__(self, device: torch.device, nbytes: int):
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.pos = 0

    def take(self, nbytes: int) -> torch.Tensor:
        if self.pos + nbytes > self.buf.numel():
            return torch.empty(nbytes, dtype=torch.uint8, device=self.buf.device)
        out = self.buf[self.pos:self.pos + nbytes]
        self.pos += aligned(nbytes)
        return out


class CudaBackend:
    """Decodes the records of one open ``.cllm`` file onto a CUDA device with nvCOMP."""

    name = "cuda"

    def __init__(self, f: CllmFile, device: torch.device, stream_codec: str | None = None):
        self.stream_keys = stream_keys(stream_codec)
        nvcomp.library()  # a clear error now if nvCOMP is missing
        self.f, self.device, self.stream_codec = f, device, stream_codec
        self.main = self.sides = _Arena(device, 0)
        self.schedule = StreamSchedule()

    def reserve(self, records: list[Record], streamed: set[str]) -> None:
        """Arenas for what is decoded at load: the main parts of the records not streamed, and every other
        part (scales of streamed layers included)."""
        kept = [r for r in records if not r.scheme.parts_are_scratch]
        self.main = _Arena(self.device, sum(aligned(r.main.nbytes) for r in kept if r.name not in streamed))
        self.sides = _Arena(self.device, sum(aligned(p.nbytes) for r in kept for p in r.parts.values() if p is not r.main))

    def read_part(self, rec: Record, part) -> torch.Tensor:
        """One part decoded on the device, as its dtype and shape (in scratch memory where the weight is
        rebuilt from its parts: ``Scheme.parts_are_scratch``)."""
        if rec.scheme.parts_are_scratch:
            out = torch.empty(part.nbytes, dtype=torch.uint8, device=self.device)
        else:
            out = (self.main if part is rec.main else self.sides).take(part.nbytes)
        decoder(part.codec, "cuda")(self.f.read_stored(rec, part), part, out, rec.name)
        return out.view(torch_dtype(part.dtype)).reshape(part.shape)

    def read_parts(self, rec: Record, skip: str | None = None) -> dict[str, torch.Tensor]:
        return {n: self.read_part(rec, p) for n, p in rec.parts.items() if n != skip}

    def stream(self, layer: nn.Module, rec: Record) -> None:
        """Keep ``rec``'s main part compressed in GPU memory for stream layer ``layer``."""
        part = rec.main
        algo = get_codec(part.codec).nvcomp_algo
        if algo is None:
            raise DeviceError(f"codec {part.codec!r} has no nvCOMP decoder to stream with")
        if self.stream_codec == "zstd":  # the file's own chunks
            comp, offsets = decoders.upload(self.f.read_stored(rec, part), part, self.device, algo)
            sizes = part.chunks
        else:  # decode once, re-encode to ANS in GPU memory
            decoded = torch.empty(part.nbytes, dtype=torch.uint8, device=self.device)
            decoder(part.codec, "cuda")(self.f.read_stored(rec, part), part, decoded, rec.name)
            comp, offsets, sizes = nvcomp.ans_encode(decoded, part.chunk_size)
            del decoded
            algo = nvcomp.ANS
        outs = decoders.out_sizes(part)
        statuses = torch.empty(len(outs), dtype=torch.int32, device=self.device)
        actual = torch.empty(len(outs), dtype=torch.int64, device=self.device)
        table = nvcomp.ChunkTable(algo, comp, offsets, sizes, 0, outs, part.chunk_size, statuses, actual)
        layer.set_stream(table, part, self.schedule)

    def finish(self, model: nn.Module, fuse: bool = True) -> None:
        """Let sibling layers fuse (``fuse``: the model's, on every device, once); give the stream layers
        their workspaces, check that every streamed weight decodes once, and hook the model's forward
        (prefetches stay inside one forward)."""
        from ..kernels.launch import reserve_scratch
        from . import fusion

        with torch.cuda.device(self.device):
            reserve_scratch(self.device)
            if fuse:
                fusion.install(model)
            decoders.release(self.device)
            self.main = self.sides = None
            self.schedule.finish(model, self.device)
