"""Hugging Face checkpoint -> ``.cllm``, one tensor at a time.

Each tensor is read, quantized (int8 per output channel for Linear and Embedding weights unless skipped), cut into
chunks, entropy-coded in parallel threads and appended to a temporary data file; the header goes in
front at the end and the finished file is moved into place atomically. Peak memory follows the largest
tensor, not the model.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .architecture import empty_model, plan
from .codecs import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, encode, get_codec
from .errors import CodecLLMError, OutputExistsError, SourceError
from .format import FILE_PREFIX, Document, Entry, Record, build_header, dtype_name, sha256
from .output import AtomicOutput
from .schemes import get_scheme
from .source import Checkpoint

SCALE_SUFFIX = "#scale"


@dataclass
class TensorSummary:
    name: str
    shape: list[int]
    dtype: str
    scheme: str
    codec: str
    chunks: int
    bytes_in: int  # the original tensor
    bytes_encoded: int  # after quantization, before the codec
    bytes_out: int  # stored payload plus side tensors
    entropy_bytes: float  # order-0 entropy bound of the encoded bytes


@dataclass
class Summary:
    """What a conversion did; ``to_json()`` is what ``codecllm-convert --json`` prints."""

    source: str
    output: str
    quant: str
    codec: str
    chunk_size: int
    level: int
    seconds: float = 0.0
    file_bytes: int = 0
    tensors: list[TensorSummary] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)

    def totals(self, only_scheme: str | None = None) -> dict[str, float]:
        ts = [t for t in self.tensors if only_scheme is None or t.scheme == only_scheme]
        out = {k: sum(getattr(t, k) for t in ts) for k in ("bytes_in", "bytes_encoded", "bytes_out", "entropy_bytes")}
        out["tensors"] = len(ts)
        return out

    def to_json(self) -> dict:
        quantized = self.totals(self.quant) if self.quant != "none" else self.totals()
        return {
            "source": self.source,
            "output": self.output,
            "quant": self.quant,
            "codec": self.codec,
            "chunk_size": self.chunk_size,
            "level": self.level,
            "seconds": round(self.seconds, 3),
            "file_bytes": self.file_bytes,
            "totals": self.totals(),
            "quantized_weights": {
                **quantized,
                "codec_ratio": quantized["bytes_encoded"] / max(quantized["bytes_out"], 1),
                "entropy_bound_ratio": quantized["bytes_encoded"] / max(quantized["entropy_bytes"], 1),
                "ratio": quantized["bytes_in"] / max(quantized["bytes_out"], 1),
                "bound_ratio": quantized["bytes_in"] / max(quantized["entropy_bytes"], 1),
            },
            "aliases": self.aliases,
            "tensors": [asdict(t) for t in self.tensors],
        }


def _entropy_bytes(data: np.ndarray) -> float:
    counts = np.zeros(256, dtype=np.float64)
    for start in range(0, len(data), 1 << 22):  # bincount widens to int64: keep that copy small
        counts += np.bincount(data[start:start + (1 << 22)], minlength=256)
    p = counts[counts > 0] / max(len(data), 1)
    return float(-(p * np.log2(p)).sum() * len(data) / 8)


class _DataWriter:
    """Appends payloads to a temporary data file and remembers each tensor's entry."""

    def __init__(self, f):
        self.f = f
        self.pos = 0
        self.entries: dict[str, Entry] = {}

    def add(self, name: str, dtype: str, shape: tuple[int, ...], pieces: list[bytes]) -> int:
        begin = self.pos
        for p in pieces:
            self.f.write(p)
            self.pos += len(p)
        self.entries[name] = Entry(dtype, tuple(shape), begin, self.pos)
        return self.pos - begin


def _encode_record(
    w: torch.Tensor, name: str, data_name: str, scheme_id: str, codec_id: str, chunk_size: int, level: int, writer: _DataWriter
) -> tuple[Record, TensorSummary]:
    scheme = get_scheme(scheme_id)
    encoded, sides = scheme.quantize(w)
    raw = encoded.contiguous().view(torch.uint8).reshape(-1).numpy()
    codec = get_codec(codec_id)
    pieces, sizes = encode(codec, memoryview(raw), chunk_size, level)
    if codec.chunked and sum(sizes) >= raw.nbytes:  # incompressible: keep it as an ordinary tensor
        codec = get_codec("raw")
        pieces, sizes = [raw.tobytes()], [raw.nbytes]
    stored_hash = hashlib.sha256()
    for p in pieces:
        stored_hash.update(p)
    enc_dtype = dtype_name(encoded.dtype)
    if codec.chunked:
        stored_bytes = writer.add(data_name, "U8", (sum(sizes),), pieces)
    else:
        stored_bytes = writer.add(data_name, enc_dtype, tuple(w.shape), pieces)
    del pieces
    rec = Record(
        name=name,
        dtype=dtype_name(w.dtype),
        shape=tuple(w.shape),
        scheme=scheme.id,
        codec=codec.id,
        data=data_name,
        encoded_dtype=enc_dtype,
        sha256_stored=stored_hash.hexdigest(),
        sha256_decoded=sha256(raw),
        chunk_size=chunk_size if codec.chunked else None,
        chunks=sizes if codec.chunked else [],
    )
    side_bytes = 0
    for side, t in sides.items():
        side_raw = t.contiguous().numpy().tobytes()
        tname = f"{data_name}{SCALE_SUFFIX}" if side == "scale" else f"{data_name}#{side}"
        side_bytes += writer.add(tname, dtype_name(t.dtype), tuple(t.shape), [side_raw])
        rec.sides[side] = {"tensor": tname, "sha256": sha256(side_raw)}
    summary = TensorSummary(
        name=name,
        shape=list(w.shape),
        dtype=rec.dtype,
        scheme=scheme.id,
        codec=codec.id,
        chunks=len(sizes) if codec.chunked else 0,
        bytes_in=w.numel() * w.element_size(),
        bytes_encoded=raw.nbytes,
        bytes_out=stored_bytes + side_bytes,
        entropy_bytes=_entropy_bytes(raw),
    )
    return rec, summary


def check_options(quant: str, codec: str, chunk_size: int, level: int) -> None:
    get_scheme(quant)
    if not get_codec(codec).chunked:
        raise CodecLLMError(f"codec {codec!r} is not an entropy codec")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise CodecLLMError(f"chunk size {chunk_size} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}] bytes")
    if not 1 <= level <= 22:
        raise CodecLLMError(f"zstd level {level} outside [1, 22]")


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    quant: str = "int8",
    codec: str = "zstd",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = DEFAULT_LEVEL,
    skip: tuple[str, ...] | list[str] = (),
    quantize_all: bool = False,
    force: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> Summary:
    """Convert the Hugging Face model directory ``source`` into the ``.cllm`` file ``output``.

    >>> summary = convert("path/to/model", "model.cllm", quant="int8")   # doctest: +SKIP
    >>> summary.to_json()["totals"]["bytes_out"]                          # doctest: +SKIP

    By default the MLP output projections of the first and last blocks stay unquantized (see
    ``architecture._edge_outputs``); ``quantize_all=True`` quantizes them too. ``skip`` holds glob
    patterns of module names to keep unquantized. ``progress(name, nbytes)`` is called after each tensor. ``output`` is written atomically: it either
    appears complete or not at all, and an existing one is replaced only with ``force=True``.
    """
    start = time.perf_counter()
    skip = tuple(skip)
    check_options(quant, codec, chunk_size, level)
    out = Path(output)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory")
    if not out.parent.is_dir():
        raise CodecLLMError(f"{out.parent}: output directory does not exist")
    ckpt = Checkpoint(source)
    model_plan = plan(empty_model(ckpt.config))
    summary = Summary(str(source), str(out), quant, codec, chunk_size, level)
    tensors: dict[str, Record] = {}
    files: dict[str, Record] = {}
    aliases: dict[str, str] = {}

    with AtomicOutput(out, force) as output:
        with output.temp("data") as data_file:
            writer = _DataWriter(data_file)
            for fname, fpath in ckpt.embedded_files().items():
                blob = torch.from_numpy(np.frombuffer(fpath.read_bytes(), dtype=np.uint8).copy())
                rec, _ = _encode_record(blob, fname, FILE_PREFIX + fname, "none", codec, chunk_size, level, writer)
                files[fname] = rec
            if "config.json" not in files:
                raise SourceError(f"{ckpt.dir}: config.json could not be embedded")
            for name in sorted(ckpt.tensors):
                group = model_plan.tied.get(name, (name,))
                stored_peer = next((n for n in group if n in tensors), None)
                if stored_peer is not None:
                    aliases[name] = stored_peer
                    continue
                w = ckpt.read(name)
                scheme_id = "none"
                if quant != "none" and w.is_floating_point() and w.dim() == 2 and model_plan.quantizable(name, skip, quantize_all):
                    scheme_id = quant
                rec, ts = _encode_record(w, name, name, scheme_id, codec, chunk_size, level, writer)
                tensors[name] = rec
                summary.tensors.append(ts)
                del w
                if progress:
                    progress(name, ckpt.tensors[name].nbytes)
            # tied parameters the checkpoint stores under one name only
            for name, group in model_plan.tied.items():
                if name not in tensors and name not in aliases:
                    peer = next((n for n in group if n in tensors), None)
                    if peer is not None:
                        aliases[name] = peer
        doc = Document(
            tensors=tensors,
            files=files,
            aliases=dict(sorted(aliases.items())),
            model={
                "architectures": list(ckpt.config.get("architectures") or []),
                "model_type": ckpt.config.get("model_type"),
                "dtype": _model_dtype(tensors),
            },
            converter={"codecllm": __version__, "quant": quant, "codec": codec, "chunk_size": chunk_size, "level": level, "skip": list(skip), "quantize_all": quantize_all},
        )
        header = build_header(writer.entries, doc)
        output.publish(header, data_file)
    summary.aliases = aliases
    summary.file_bytes = out.stat().st_size
    summary.seconds = time.perf_counter() - start
    return summary


def _model_dtype(tensors: dict[str, Record]) -> str:
    """The dtype most of the floating-point weights had (what a loaded model computes in by default)."""
    counts: dict[str, int] = {}
    for r in tensors.values():
        if r.dtype in ("F16", "BF16", "F32", "F64"):
            counts[r.dtype] = counts.get(r.dtype, 0) + math.prod(r.shape)
    return max(counts, key=counts.get) if counts else "F32"
