"""Hugging Face checkpoint -> ``.cllm``, one tensor at a time.

Each tensor is read, quantized by its scheme (the chosen one for Linear, Conv1D and Embedding weights unless skipped), cut into
chunks, entropy-coded in parallel threads and appended to a temporary data file; the header goes in
front at the end and the finished file is moved into place atomically. Peak memory follows the largest
tensor, not the model.
"""

from __future__ import annotations

import contextlib
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
from .codecs import DEFAULT_CHUNK_SIZE, chunk_bounds, default_codec_id, get_codec, shared_pool
from .dtypes import dtype_name, itemsize
from .errors import CodecLLMError, HeaderTooLargeError, OutputExistsError, SourceError
from .format import FILE_PREFIX, HEADER_CAP, Document, Entry, Part, Record, build_header, sha256
from .importance import estimate, trace
from .output import AtomicOutput
from .schemes import Scheme, default_scheme_id, get_scheme, parse_scheme
from .source import Checkpoint


@dataclass
class TensorSummary:
    name: str
    shape: list[int]
    dtype: str
    scheme: str
    codec: str  # the main part's
    chunks: int
    bytes_in: int  # the original tensor
    bytes_encoded: int  # every part, after quantization, before the codec
    bytes_out: int  # every part as stored
    entropy_bytes: float  # order-0 entropy bound of the encoded bytes of the main part, plus the other parts
    lossless: bool = True

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_out / max(math.prod(self.shape), 1)


@dataclass
class Summary:
    """What a conversion did; ``to_json()`` is what ``codecllm-convert --json`` prints."""

    source: str
    output: str
    quant: str
    codec: str
    chunk_size: int
    options: dict
    seconds: float = 0.0
    file_bytes: int = 0
    tensors: list[TensorSummary] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # checkpoint tensors the model does not have
    warnings: list[str] = field(default_factory=list)

    def totals(self, lossy_only: bool = False) -> dict[str, float]:
        ts = [t for t in self.tensors if not lossy_only or not t.lossless]
        out = {k: sum(getattr(t, k) for t in ts) for k in ("bytes_in", "bytes_encoded", "bytes_out", "entropy_bytes")}
        out["tensors"] = len(ts)
        return out

    def to_json(self) -> dict:
        quantized = self.totals(lossy_only=True)
        if not quantized["tensors"]:
            quantized = self.totals()
        weights = sum(math.prod(t.shape) for t in self.tensors)
        return {
            "source": self.source,
            "output": self.output,
            "quant": self.quant,
            "codec": self.codec,
            "chunk_size": self.chunk_size,
            **self.options,
            "seconds": round(self.seconds, 3),
            "file_bytes": self.file_bytes,
            "bits_per_weight": 8 * sum(t.bytes_out for t in self.tensors) / max(weights, 1),
            "totals": self.totals(),
            "quantized_weights": {
                **quantized,
                "codec_ratio": quantized["bytes_encoded"] / max(quantized["bytes_out"], 1),
                "entropy_bound_ratio": quantized["bytes_encoded"] / max(quantized["entropy_bytes"], 1),
                "ratio": quantized["bytes_in"] / max(quantized["bytes_out"], 1),
                "bound_ratio": quantized["bytes_in"] / max(quantized["entropy_bytes"], 1),
            },
            "aliases": self.aliases,
            "ignored": self.ignored,
            "warnings": self.warnings,
            "tensors": [{**asdict(t), "bits_per_weight": round(t.bits_per_weight, 4)} for t in self.tensors],
        }


ENTROPY_SAMPLE = 64, 1 << 12  # blocks, bytes each
PROBE_CHUNKS = 8  # at most this many chunks, evenly spaced, are coded first to judge a part


def _encode_sampled(raw: np.ndarray, codec, coding: "_Coding") -> list | None:
    """``raw`` coded chunk by chunk, or None where a sample shows that coding saves nothing. The sample:
    ``min(PROBE_CHUNKS, max(2, chunks // 4))`` evenly spaced chunks, the first and the last among them
    (every chunk of a part of one or two; two of 3-11; eight from 32), coded first; where they come out no smaller the part is taken
    as incompressible and stored raw without coding the rest (the sign and mantissa bytes of bfloat16
    weights and the low bytes of float16 ones, which zstd stores raw anyway: on SmolLM2 they cost more
    zstd time than the bytes that compress). Otherwise the other chunks are coded and the sample's frames
    kept: no chunk is coded twice. A part whose compressible bytes all lie between the sampled chunks is
    stored raw too."""
    bounds = chunk_bounds(len(raw), coding.chunk_size)
    n = len(bounds)
    if not n:  # an empty part: nothing to code
        return None
    k = min(n, PROBE_CHUNKS, max(2, n // 4))
    picked = [j * (n - 1) // (k - 1) for j in range(k)] if k > 1 else [0]  # (increasing: k <= n)
    data = memoryview(raw)
    frames = codec.encode(data, coding.chunk_size, chunks=picked, **coding.options)
    if sum(len(f) for f in frames) >= sum(bounds[i][1] - bounds[i][0] for i in picked):
        return None
    if len(picked) == n:
        return frames
    chosen = dict(zip(picked, frames))
    rest = iter(codec.encode(data, coding.chunk_size, chunks=[i for i in range(n) if i not in chosen], **coding.options))
    return [chosen[i] if i in chosen else next(rest) for i in range(n)]


def _entropy_bytes(data: np.ndarray) -> float:
    """The order-0 entropy bound of the bytes ``data``, in bytes: counted over all of them up to
    ``ENTROPY_SAMPLE``'s size, beyond that estimated from that many evenly spaced blocks of contiguous
    bytes (SmolLM2's lossless planes: 3e-5 below the full count in all, 2.4e-3 at most for one part)."""
    blocks, size = ENTROPY_SAMPLE
    t = torch.from_numpy(data)
    if len(data) > blocks * size:
        t = t.as_strided((blocks, size), ((len(data) - size) // (blocks - 1), 1)).reshape(-1)
    if not len(t):
        return 0.0
    counts = torch.bincount(t, minlength=256).numpy()  # (uint8: no widened copy)
    c = counts[counts > 0].astype(np.float64)
    bits = len(t) * np.log2(len(t)) - float((c * np.log2(c)).sum())  # -sum(c log2(c / n))
    if len(t) < len(data):  # a sample's count underestimates: Miller and Madow's first-order correction
        bits += (len(c) - 1) / (2 * np.log(2))  # (SmolLM2's planes: 1.0e-4 below the full count without it)
    return bits * len(data) / len(t) / 8


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


@dataclass
class _Coding:
    """The codec, chunk size and codec options of one conversion."""

    codec: str
    chunk_size: int
    options: dict


def _encode_part(rec_name: str, part_name: str, tensor_name: str, t: torch.Tensor, coding: _Coding, writer: _DataWriter,
                 entropy: bool = False) -> tuple[Part, int, float | None]:
    """Store one part: through the codec where that saves bytes (where a sample of its chunks shows it
    may: ``_encode_sampled``), else raw. Returns the part, its stored
    size and, with ``entropy``, the order-0 entropy bound of its bytes."""
    raw = t.contiguous().view(torch.uint8).reshape(-1).numpy()
    codec = get_codec(coding.codec)
    # the hashes run on the codec's thread pool beside the compression and the writing (hashlib releases
    # the GIL): on two cores a lossless conversion took 1.4x less time than with them in line
    decoded = shared_pool().submit(sha256, raw)
    pieces = _encode_sampled(raw, codec, coding) if codec.chunked else None
    if pieces is None or sum(len(p) for p in pieces) >= raw.nbytes:  # incompressible: an ordinary tensor
        codec, pieces = get_codec("raw"), [memoryview(raw)]
    dtype = dtype_name(t.dtype)
    stored_digest = shared_pool().submit(_digest, pieces) if codec.chunked else decoded  # raw: the stored bytes are the part's
    if codec.chunked:
        stored = writer.add(tensor_name, "U8", (sum(len(p) for p in pieces),), pieces)
    else:
        stored = writer.add(tensor_name, dtype, tuple(t.shape), pieces)
    decoded, stored_digest = decoded.result(), stored_digest.result()
    part = Part(part_name, dtype, tuple(t.shape), tensor_name, codec.id, stored_digest, decoded,
                coding.chunk_size if codec.chunked else None, [len(p) for p in pieces] if codec.chunked else [])
    return part, stored, _entropy_bytes(raw) if entropy else None


def _digest(pieces) -> str:
    digest = hashlib.sha256()
    for p in pieces:
        digest.update(p)
    return digest.hexdigest()


def _encode_record(w: torch.Tensor, name: str, stored_name: str, scheme: Scheme, coding: _Coding, writer: _DataWriter,
                   importance: torch.Tensor | None = None, threads: int = 1) -> tuple[Record, TensorSummary]:
    """One tensor's record: ``scheme``'s parts, each stored (``_encode_part``). ``threads``: torch's thread
    count for a ``parallel_quantize`` scheme's quantize (the rest of a conversion runs on one)."""
    with _torch_threads(threads if scheme.parallel_quantize else 1):
        parts = scheme.quantize(w, importance)
    layout = scheme.layout(dtype_name(w.dtype), tuple(w.shape))
    rec = Record(name, dtype_name(w.dtype), tuple(w.shape), scheme, {})
    out = entropy = 0.0
    for pname, spec in layout.items():
        t = parts[pname]
        if (dtype_name(t.dtype), tuple(t.shape)) != (spec.dtype, spec.shape):
            raise CodecLLMError(f"scheme {scheme!r} produced {pname} as {t.dtype} {list(t.shape)}, its layout says {spec}")
        tname = stored_name if pname == scheme.main_part else f"{stored_name}#{pname}"
        # the order-0 bound: of the main part (the others count as stored), or of every plane of a lossless scheme
        bound = scheme.lossless or pname == scheme.main_part
        rec.parts[pname], stored, ent = _encode_part(name, pname, tname, t, coding, writer, entropy=bound)
        out += stored
        entropy += ent if bound else stored
    main = rec.main
    summary = TensorSummary(name, list(w.shape), rec.dtype, repr(scheme), main.codec, len(main.chunks), w.numel() * w.element_size(),
                            rec.encoded_nbytes, int(out), entropy, scheme.lossless)
    return rec, summary


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch on ``n`` intra-op threads inside the block; the count before it restored after."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def check_options(quant: str, codec: str, chunk_size: int, level: int | None, group_size: int | None = None) -> tuple[Scheme, _Coding]:
    """The scheme and the coding asked for; each validates its own parameters."""
    scheme = get_scheme(quant, None if group_size is None else {"group_size": group_size})
    c = get_codec(codec or default_codec_id())
    options = c.check_options(**({} if level is None else {"level": level}))
    if c.chunked:
        c.check_chunk_size(chunk_size)
    return scheme, _Coding(c.id, chunk_size, options)


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    quant: str | None = None,
    codec: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int | None = None,
    skip: tuple[str, ...] | list[str] = (),
    quantize_all: bool = False,
    force: bool = False,
    progress: Callable[[str, int], None] | None = None,
    group_size: int | None = None,
    overrides: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
) -> Summary:
    """Convert the Hugging Face model directory ``source`` into the ``.cllm`` file ``output``.

    >>> summary = convert("path/to/model", "model.cllm")                  # doctest: +SKIP
    >>> summary.to_json()["totals"]["bytes_out"]                          # doctest: +SKIP

    ``quant`` (the default scheme if None) is the scheme for the weights of the modules some scheme stands in for (Linear, Conv1D,
    Embedding); every other tensor is stored bit-exact (in ``lossless``'s byte planes when ``quant`` is
    ``lossless``, else as its bytes: ``none``). By default the MLP output projections of the
    first and last blocks stay unquantized (see ``architecture._edge_outputs``) and a grouped scheme gives
    the input embedding and the attention value projections half its group size (``Scheme.finer``);
    ``quantize_all=True`` quantizes every weight with the scheme as given. ``skip`` holds glob patterns of module names to keep unquantized (a pattern that
    matches nothing is reported in ``Summary.warnings``). ``group_size`` is the group size of a scheme
    that takes one (``int4``: 32, 64 or 128; 64 if None). ``overrides`` holds (module glob, scheme spec)
    pairs, such as ``("model.embed_tokens", "int8")`` or ``("*.down_proj", "int4:g32")``: the last one
    matching a module picks its scheme, over the default and the edge rule (``none`` keeps it exact). ``codec`` entropy-codes every part that it
    shrinks, in chunks of ``chunk_size`` bytes; ``level`` is its level (the codec's default if None).
    Checkpoint tensors the model does not have (old ``rotary_emb.inv_freq`` buffers) are left out and
    listed in ``Summary.ignored``; a tensor whose shape disagrees with the config is an error.
    ``progress(name, nbytes)`` is called after each tensor. ``output`` is written atomically: it either
    appears complete or not at all, and an existing one is replaced only with ``force=True``.
    """
    start = time.perf_counter()
    skip = tuple(skip)
    quant = quant or default_scheme_id()
    scheme, coding = check_options(quant, codec, chunk_size, level, group_size)
    # an override naming the --quant scheme alone is that scheme, with --group-size
    override_schemes = tuple((pat, scheme if spec == quant else parse_scheme(spec)) for pat, spec in overrides)
    out = Path(output)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory")
    if not out.parent.is_dir():
        raise CodecLLMError(f"{out.parent}: output directory does not exist")
    ckpt = Checkpoint(source)
    model_plan = plan(empty_model(ckpt.config))
    summary = Summary(str(source), str(out), repr(scheme), coding.codec, chunk_size, coding.options)
    tensors: dict[str, Record] = {}
    files: dict[str, Record] = {}
    aliases: dict[str, str] = {}
    plain = get_scheme("none")  # embedded files
    exact = scheme if scheme.lossless else plain  # the tensors no lossy scheme stores
    for name, t in ckpt.tensors.items():
        want = model_plan.shapes.get(name)
        if want is not None and tuple(t.entry.shape) != want:
            raise SourceError(f"{name}: the checkpoint holds shape {list(t.entry.shape)}, the config makes {list(want)}")
    summary.ignored = sorted(n for n in ckpt.tensors if n not in model_plan.shapes)
    summary.warnings = [f"--skip {pat!r} matches no module" for pat in skip if not model_plan.matches(pat)]
    summary.warnings += [f"--quant-override {pat!r} matches no module" for pat, _ in overrides if not model_plan.matches(pat)]
    summary.warnings += [f"ignored checkpoint tensor {n!r}: the model has no such parameter or buffer" for n in summary.ignored]
    # per input channel, how much each weight's error costs (codecllm.importance): only where a scheme uses it
    weighs = scheme.weighs_inputs or any(s.weighs_inputs for _, s in override_schemes)
    importance = {}
    if weighs:
        def read_stored(name: str) -> torch.Tensor:  # a tied parameter under whichever name the checkpoint has
            stored = next((n for n in model_plan.tied.get(name, (name,)) if n in ckpt.tensors), None)
            if stored is None:
                raise KeyError(name)
            return ckpt.read(stored)

        inputs = trace(ckpt.config)
        if inputs.failure:
            summary.warnings.append(f"the quantizer weighs every input channel alike: the model could not be traced ({inputs.failure})")
        importance = estimate(inputs, read_stored)

    # what is stored, and how: a tied group is stored once, under its first name
    stores: dict[str, Scheme] = {}
    for name in sorted(n for n in ckpt.tensors if n in model_plan.shapes):
        group = model_plan.tied.get(name, (name,))
        stored_peer = next((n for n in group if n in stores), None)
        if stored_peer is not None:
            aliases[name] = stored_peer
            continue
        src = ckpt.tensors[name]
        meta = torch.empty(src.entry.shape, dtype=src.dtype, device="meta")
        stores[name] = model_plan.scheme_for(name, meta, scheme, skip, quantize_all, override_schemes) or exact
    embedded = ckpt.embedded_files()
    model = {"architectures": list(ckpt.config.get("architectures") or []), "model_type": ckpt.config.get("model_type")}
    converter = {"codecllm": __version__, "quant": quant, "codec": coding.codec, "chunk_size": chunk_size, **coding.options,
                 "skip": list(skip), "quantize_all": quantize_all,
                 **({"overrides": [f"{pat}={spec}" for pat, spec in overrides]} if overrides else {})}
    reserve = _header_bound(stores, {f: p.stat().st_size for f, p in embedded.items()}, ckpt, plain, coding, aliases, model, converter)

    # torch's threads on the passes over each tensor (splits, histograms) gain nothing and, waiting for work,
    # take the cores the codec's threads code on (SmolLM2 lossless: 1.7 against 1.2 CPU-seconds, and slower):
    # one torch thread, but for a scheme's quantize that searches (``parallel_quantize``); restored after
    threads = torch.get_num_threads()
    with AtomicOutput(out, force) as output, _torch_threads(1):
        with output.temp("data", reserve) as data_file:
            writer = _DataWriter(data_file)
            for fname, fpath in embedded.items():
                blob = torch.from_numpy(np.frombuffer(fpath.read_bytes(), dtype=np.uint8).copy())
                rec, _ = _encode_record(blob, fname, FILE_PREFIX + fname, plain, coding, writer)
                files[fname] = rec
            if "config.json" not in files:
                raise SourceError(f"{ckpt.dir}: config.json could not be embedded")
            for name, chosen in stores.items():
                group = model_plan.tied.get(name, (name,))
                w = ckpt.read(name)
                imp = next((importance[n] for n in group if n in importance), None)
                rec, ts = _encode_record(w, name, name, chosen, coding, writer, imp, threads)
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
            missing = [n for n in model_plan.parameters if n not in tensors and n not in aliases]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise SourceError(f"{ckpt.dir}: the checkpoint has no tensor for parameter {missing[0]!r}{more}")
        doc = Document(
            tensors=tensors,
            files=files,
            aliases=dict(sorted(aliases.items())),
            model={**model, "dtype": _model_dtype(tensors)},
            converter=converter,
        )
        header = build_header(writer.entries, doc, size=reserve)
        output.publish(header, data_file)
    summary.aliases = aliases
    summary.file_bytes = out.stat().st_size
    summary.seconds = time.perf_counter() - start
    return summary


def _header_bound(stores: dict[str, Scheme], files: dict[str, int], ckpt: Checkpoint, plain: Scheme, coding: _Coding,
                  aliases: dict[str, str], model: dict, converter: dict) -> int:
    """Bytes to leave before the data for the header (a multiple of 8): the header of these records with
    every number at its largest (each part entropy-coded, every chunk's size at twice the chunk size, byte
    offsets of 16 digits). Where the real header is larger after all, ``AtomicOutput.publish`` copies the
    data behind it instead; 0 where even the bound is above the header cap."""
    far = 10 ** 15
    codec = max((coding.codec, "raw"), key=len)

    def record(name: str, stored: str, dtype: str, shape: tuple[int, ...], sch: Scheme) -> Record:
        rec = Record(name, dtype, shape, sch, {})
        for pname, spec in sch.layout(dtype, shape).items():
            tname = stored if pname == sch.main_part else f"{stored}#{pname}"
            chunks = [2 * coding.chunk_size] * max(1, -(-math.prod(spec.shape) * itemsize(spec.dtype) // coding.chunk_size))
            rec.parts[pname] = Part(pname, spec.dtype, spec.shape, tname, codec, "0" * 64, "0" * 64, coding.chunk_size, chunks)
            entries[tname] = Entry("U8", (far,), far, far)
        return rec

    entries: dict[str, Entry] = {}
    files_ = {f: record(f, FILE_PREFIX + f, "U8", (n,), plain) for f, n in files.items()}
    tensors = {n: record(n, n, dtype_name(ckpt.tensors[n].dtype), tuple(ckpt.tensors[n].entry.shape), sch) for n, sch in stores.items()}
    doc = Document(tensors, files_, aliases, {**model, "dtype": "x" * 16}, converter)
    try:
        bound = len(build_header(entries, doc)) + 8 * 1024
    except HeaderTooLargeError:
        return 0
    return bound if bound - 8 <= HEADER_CAP else 0  # padded to that, the header would pass the cap


def _model_dtype(tensors: dict[str, Record]) -> str:
    """The dtype most of the floating-point weights had (what a loaded model computes in by default)."""
    counts: dict[str, int] = {}
    for r in tensors.values():
        if r.dtype in ("F16", "BF16", "F32", "F64"):
            counts[r.dtype] = counts.get(r.dtype, 0) + math.prod(r.shape)
    return max(counts, key=counts.get) if counts else "F32"
