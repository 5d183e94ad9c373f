"""The ``.cllm`` container, shared by the converter and the loader. format_spec.md is normative; this
module implements it: the safetensors layer (8-byte length, JSON header, one data buffer) and the CodecLLM
document in the header's ``__metadata__``, with every check a reader makes, in the order the spec gives.
Every field is type-checked before it is used; every rejection is a ``FormatError`` with a one-line message.

Version 2 describes each tensor as a *record*: its original dtype and shape, a scheme (id and parameters)
and the scheme's *parts* (codes, scales, ...), each with its own dtype, shape, codec, chunk table and
checksums. Version 1 files (one payload plus F32 "sides") are still read: their records are mapped onto
version 2's at parse time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch

from .codecs import decode_cpu, get_codec, num_chunks
from .dtypes import DTYPES, FLOAT_DTYPES, itemsize, torch_dtype
from .errors import (
    ChecksumError,
    ChunkTableError,
    CodecLLMError,
    FormatError,
    HeaderDecodeError,
    HeaderTooLargeError,
    InputError,
    NotCllmError,
    OffsetError,
    ShapeError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from .schemes import Scheme, get_scheme

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "codecllm"
HEADER_CAP = 100 * 1024 * 1024  # bytes of JSON header, as in safetensors
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 48
FILE_PREFIX = "__file__/"
REQUIRED_FILE = "config.json"


def sha256(data) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


# --- typed access to JSON values ------------------------------------------------------------------------


def _loads(text: str, what: str) -> Any:
    """JSON with duplicate keys rejected (two entries for one name would make the file ambiguous)."""

    def pairs(items):
        obj = {}
        for k, v in items:
            if k in obj:
                raise HeaderDecodeError(f"{what}: duplicate key {k!r}")
            obj[k] = v
        return obj

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise HeaderDecodeError(f"{what} is not valid JSON: {e.msg} at byte {e.pos}") from None
    except RecursionError:
        raise HeaderDecodeError(f"{what} is nested too deeply") from None
    except ValueError as e:  # an integer of thousands of digits, and the like
        raise HeaderDecodeError(f"{what} is not valid JSON: {e}") from None


def _obj(where: str, value: Any, keys: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise HeaderDecodeError(f"{where}: expected a JSON object")
    missing = keys - set(value)
    extra = set(value) - keys - optional
    if missing or extra:
        raise HeaderDecodeError(f"{where}: missing {sorted(missing)} / unexpected {sorted(extra)} fields")
    return value


def _int(where: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise HeaderDecodeError(f"{where}: expected an integer, got {type(value).__name__}")
    return value


def _str(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise HeaderDecodeError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _dtype(where: str, value: Any) -> str:
    if not isinstance(value, str) or value not in DTYPES:
        raise HeaderDecodeError(f"{where}: unknown dtype {value!r}")
    return value


def _hex256(where: str, value: Any) -> str:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise HeaderDecodeError(f"{where}: sha256 values must be 64 lowercase hex digits")
    return value


def _shape(where: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ShapeError(f"{where}: shape must be a list of at most {MAX_DIMS} dimensions, got {shape!r}")
    n = 1
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise ShapeError(f"{where}: shape {shape!r} has a dimension that is not a non-negative integer")
        n *= d
        if n > MAX_ELEMENTS:
            raise ShapeError(f"{where}: shape {shape!r} is absurdly large")
    return tuple(shape)


# --- the CodecLLM document ------------------------------------------------------------------------------


@dataclass
class Part:
    """One encoded part of a record (format_spec.md, "Parts"): decoded by its codec into ``dtype`` and ``shape``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    tensor: str  # the safetensors tensor holding the stored bytes
    codec: str
    sha256_stored: str
    sha256_decoded: str
    chunk_size: int | None = None
    chunks: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    def to_json(self) -> dict[str, Any]:
        codec: dict[str, Any] = {"id": self.codec}
        if get_codec(self.codec).chunked:
            codec.update(chunk_size=self.chunk_size, chunks=self.chunks)
        return {"dtype": self.dtype, "shape": list(self.shape), "tensor": self.tensor, "codec": codec,
                "sha256": {"stored": self.sha256_stored, "decoded": self.sha256_decoded}}


@dataclass
class Record:
    """How one tensor (or embedded file) is stored: its original dtype and shape, its scheme and the
    scheme's parts."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    scheme: Scheme
    parts: dict[str, Part]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """The original tensor's size."""
        return self.numel * itemsize(self.dtype)

    @property
    def encoded_nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    @property
    def main(self) -> Part:
        """The part holding the bulk of the bytes (what stream mode keeps compressed)."""
        return self.parts[self.scheme.main_part]

    def to_json(self) -> dict[str, Any]:
        scheme: dict[str, Any] = {"id": self.scheme.id}
        if self.scheme.params:
            scheme["params"] = self.scheme.params
        return {"dtype": self.dtype, "shape": list(self.shape), "scheme": scheme,
                "parts": {n: p.to_json() for n, p in self.parts.items()}}


@dataclass
class Document:
    """The CodecLLM document: what the model is, its embedded files and how each tensor is stored."""

    tensors: dict[str, Record]
    files: dict[str, Record]
    aliases: dict[str, str]
    model: dict[str, Any]
    converter: dict[str, Any]
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.version,
            "model": self.model,
            "converter": self.converter,
            "files": {k: r.to_json() for k, r in self.files.items()},
            "tensors": {k: r.to_json() for k, r in self.tensors.items()},
            "aliases": self.aliases,
        }


# --- the safetensors layer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One safetensors tensor: dtype string, shape and byte range inside the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def parse_safetensors_header(raw: bytes, data_len: int) -> tuple[dict[str, Entry], dict[str, str]]:
    """Check the JSON header of a safetensors file against a data buffer of ``data_len`` bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderDecodeError("header is not valid UTF-8") from None
    if not text.startswith("{"):
        raise HeaderDecodeError("header does not begin with '{'")
    obj = _loads(text, "header")
    if not isinstance(obj, dict):
        raise HeaderDecodeError("header is not a JSON object")
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderDecodeError("__metadata__ must map strings to strings")
    entries: dict[str, Entry] = {}
    for name, e in obj.items():
        where = f"tensor {name!r}"
        e = _obj(where, e, {"dtype", "shape", "data_offsets"})
        dtype = _dtype(where, e["dtype"])
        shape = _shape(where, e["shape"])
        offs = e["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise OffsetError(f"{where}: data_offsets must be two integers")
        begin, end = offs
        if not 0 <= begin <= end:
            raise OffsetError(f"{where}: data_offsets [{begin}, {end}] are not an ordered pair of offsets")
        if math.prod(shape) * itemsize(dtype) != end - begin:
            raise ShapeError(f"{where}: shape {list(shape)} of {dtype} does not fill {end - begin} bytes")
        entries[name] = Entry(dtype, shape, begin, end)
    need = max((e.end for e in entries.values()), default=0)
    if need > data_len:
        raise TruncatedFileError(f"the tensors need {need} bytes of data, the file holds {data_len}: truncated?")
    pos = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != pos:
            kind = "overlaps the tensor before it" if e.begin < pos else "leaves a hole before it"
            raise OffsetError(f"tensor {name!r}: data_offsets [{e.begin}, {e.end}] {kind}")
        pos = e.end
    if pos != data_len:
        raise OffsetError(f"tensors cover {pos} bytes of a {data_len}-byte data buffer (trailing bytes)")
    return entries, metadata


def _check_part(where: str, part: Part, spec, entries: dict[str, Entry]) -> None:
    """A part against the scheme's layout and the safetensors entry holding it."""
    if (part.dtype, part.shape) != (spec.dtype, spec.shape):
        raise ShapeError(f"{where}: the scheme stores it as {spec.dtype} {list(spec.shape)}, not {part.dtype} {list(part.shape)}")
    ent = entries.get(part.tensor)
    if ent is None:
        raise HeaderDecodeError(f"{where}: stored tensor {part.tensor!r} is not in the file")
    codec = get_codec(part.codec)
    if codec.chunked:
        try:
            codec.check_chunk_size(part.chunk_size)
        except CodecLLMError as e:
            raise ChunkTableError(f"{where}: {e}") from None
        chunks = part.chunks
        if not isinstance(chunks, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in chunks):
            raise ChunkTableError(f"{where}: chunks must be a list of positive integers")
        if ent.dtype != "U8" or len(ent.shape) != 1:
            raise ChunkTableError(f"{where}: a {codec.id} payload must be a 1-D U8 tensor")
        if len(chunks) != num_chunks(part.nbytes, part.chunk_size):
            raise ChunkTableError(f"{where}: {len(chunks)} chunks cannot hold {part.nbytes} bytes in chunks of {part.chunk_size}")
        if sum(chunks) != ent.nbytes:
            raise ChunkTableError(f"{where}: chunk sizes add up to {sum(chunks)} bytes, the payload holds {ent.nbytes}")
    else:
        if part.chunk_size is not None or part.chunks:
            raise ChunkTableError(f"{where}: codec {codec.id!r} takes no chunk table")
        if (ent.dtype, ent.shape) != (part.dtype, part.shape):
            raise ShapeError(f"{where}: a raw payload must be {part.dtype} of shape {list(part.shape)}")
        if part.sha256_stored != part.sha256_decoded:
            raise HeaderDecodeError(f"{where}: a raw payload's stored and decoded sha256 must be equal")


def _parse_part(where: str, name: str, obj: Any) -> Part:
    obj = _obj(where, obj, {"dtype", "shape", "tensor", "codec", "sha256"})
    codec = _obj(f"{where} codec", obj["codec"], {"id"}, {"chunk_size", "chunks"})
    sums = _obj(f"{where} sha256", obj["sha256"], {"stored", "decoded"})
    c = get_codec(codec["id"])
    chunk_size = codec.get("chunk_size")
    if c.chunked and ("chunks" not in codec or "chunk_size" not in codec):
        raise ChunkTableError(f"{where}: a {c.id} part needs a chunk table")
    if not c.chunked and ("chunks" in codec or "chunk_size" in codec):
        raise ChunkTableError(f"{where}: codec {c.id!r} takes no chunk table")
    return Part(name, _dtype(where, obj["dtype"]), _shape(where, obj["shape"]), _str(f"{where} tensor", obj["tensor"]), c.id,
                _hex256(where, sums["stored"]), _hex256(where, sums["decoded"]), chunk_size, codec.get("chunks", []))


def _scheme(where: str, obj: Any) -> Scheme:
    obj = _obj(f"{where} scheme", obj, {"id"}, {"params"})
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise HeaderDecodeError(f"{where}: scheme params must be a JSON object")
    try:
        return get_scheme(obj["id"], params)
    except FormatError:
        raise
    except CodecLLMError as e:
        raise HeaderDecodeError(f"{where}: {e}") from None


def _parse_record(name: str, obj: Any, entries: dict[str, Entry]) -> Record:
    where = f"record {name!r}"
    obj = _obj(where, obj, {"dtype", "shape", "scheme", "parts"})
    dtype, shape = _dtype(where, obj["dtype"]), _shape(where, obj["shape"])
    scheme = _scheme(where, obj["scheme"])
    parts_obj = obj["parts"]
    if not isinstance(parts_obj, dict):
        raise HeaderDecodeError(f"{where}: parts must be a JSON object")
    parts = {p: _parse_part(f"{where} part {p!r}", p, v) for p, v in parts_obj.items()}
    return _checked(where, Record(name, dtype, shape, scheme, parts), entries)


def _checked(where: str, rec: Record, entries: dict[str, Entry]) -> Record:
    layout = rec.scheme.layout(rec.dtype, rec.shape)
    if set(rec.parts) != set(layout):
        raise HeaderDecodeError(f"{where}: scheme {rec.scheme.id!r} stores parts {sorted(layout)}, the record has {sorted(rec.parts)}")
    for p, part in rec.parts.items():
        _check_part(f"{where} part {p!r}", part, layout[p], entries)
    return rec


def _parse_record_v1(name: str, obj: Any, entries: dict[str, Entry]) -> Record:
    """A version 1 record: one payload (``data``, ``encoded_dtype``) plus raw F32 side tensors."""
    where = f"record {name!r}"
    obj = _obj(where, obj, {"dtype", "shape", "scheme", "codec", "data", "encoded_dtype", "sha256"})
    dtype, shape = _dtype(where, obj["dtype"]), _shape(where, obj["shape"])
    scheme_obj = _obj(f"{where} scheme", obj["scheme"], {"id"}, {"sides"})
    scheme = _scheme(where, {"id": scheme_obj["id"]})
    sides = scheme_obj.get("sides", {})
    if not isinstance(sides, dict):
        raise HeaderDecodeError(f"{where}: sides must be a JSON object")
    main = _parse_part(where, scheme.main_part, {"dtype": obj["encoded_dtype"], "shape": obj["shape"], "tensor": obj["data"],
                                                 "codec": obj["codec"], "sha256": obj["sha256"]})
    parts = {scheme.main_part: main}
    layout = scheme.layout(dtype, shape)
    for side, ref in sides.items():
        ref = _obj(f"{where} side {side!r}", ref, {"tensor", "sha256"})
        spec = layout.get(side)
        if spec is None:
            raise HeaderDecodeError(f"{where}: scheme {scheme.id!r} has no side tensor {side!r}")
        digest = _hex256(where, ref["sha256"])
        parts[side] = Part(side, spec.dtype, spec.shape, _str(f"{where} side tensor", ref["tensor"]), "raw", digest, digest)
    return _checked(where, Record(name, dtype, shape, scheme, parts), entries)


def parse_document(text: str, entries: dict[str, Entry]) -> Document:
    obj = _loads(text, "CodecLLM document")
    if not isinstance(obj, dict):
        raise HeaderDecodeError("CodecLLM document is not a JSON object")
    version = obj.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise UnsupportedVersionError(f"format version {version!r} is not supported (this reader knows {', '.join(map(str, READABLE_VERSIONS))})")
    obj = _obj("CodecLLM document", obj, {"format_version", "model", "converter", "files", "tensors", "aliases"})
    for key in ("model", "converter", "files", "tensors", "aliases"):
        if not isinstance(obj[key], dict):
            raise HeaderDecodeError(f"CodecLLM document: {key!r} must be a JSON object")
    parse = _parse_record if version >= 2 else _parse_record_v1
    tensors = {n: parse(n, r, entries) for n, r in obj["tensors"].items()}
    files = {n: parse(n, r, entries) for n, r in obj["files"].items()}
    for n, r in files.items():
        if not n or "/" in n or "\\" in n or n.startswith(".") or "\0" in n:
            raise HeaderDecodeError(f"embedded file name {n!r} is not a plain file name")
        if r.dtype != "U8" or len(r.shape) != 1 or not r.scheme.lossless or len(r.parts) != 1:
            raise HeaderDecodeError(f"embedded file {n!r} must be a 1-D U8 record with a lossless scheme")
    if REQUIRED_FILE not in files:
        raise HeaderDecodeError(f"no embedded {REQUIRED_FILE} (every .cllm file carries its model's config)")
    for alias, target in obj["aliases"].items():
        if not isinstance(target, str) or target not in tensors or alias in tensors:
            raise HeaderDecodeError(f"alias {alias!r} -> {target!r} must name a stored tensor and not shadow one")
    model = _obj("CodecLLM document model", obj["model"], {"architectures", "model_type", "dtype"})
    if not isinstance(model["architectures"], list) or not all(isinstance(a, str) for a in model["architectures"]):
        raise HeaderDecodeError("CodecLLM document: model.architectures must be a list of strings")
    if not isinstance(model["model_type"], (str, type(None))):
        raise HeaderDecodeError("CodecLLM document: model.model_type must be a string or null")
    if model["dtype"] not in FLOAT_DTYPES:
        raise HeaderDecodeError(f"CodecLLM document: model.dtype {model['dtype']!r} is not a floating-point dtype")
    used: dict[str, str] = {}
    for r in [*tensors.values(), *files.values()]:
        for p in r.parts.values():
            if p.tensor in used:
                raise HeaderDecodeError(f"safetensors tensor {p.tensor!r} is claimed by both {used[p.tensor]!r} and {r.name!r}")
            used[p.tensor] = r.name
    unclaimed = set(entries) - set(used)
    if unclaimed:
        raise HeaderDecodeError(f"safetensors tensor {sorted(unclaimed)[0]!r} belongs to no record")
    return Document(tensors, files, dict(obj["aliases"]), model, obj["converter"], version)


class CllmFile:
    """A ``.cllm`` file opened for reading. Opening checks the whole header; parts are read on demand and
    checked against their sha256 before any decoder sees them."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._f: BinaryIO = open(self.path, "rb")
        except OSError as e:
            raise InputError(f"{self.path}: cannot open: {e.strerror or e}") from None
        try:
            self._parse()
        except OSError as e:
            self._f.close()
            raise InputError(f"{self.path}: cannot read: {e.strerror or e}") from None
        except FormatError as e:
            self._f.close()
            msg = str(e)
            raise type(e)(msg if msg.startswith(self.path) else f"{self.path}: {msg}") from None
        except BaseException:
            self._f.close()
            raise

    def _parse(self) -> None:
        size = os.fstat(self._f.fileno()).st_size
        if size < 8:
            raise TruncatedFileError(f"{self.path}: {size} bytes is too short for a header length (truncated, or not a .cllm file)")
        (n,) = struct.unpack("<Q", self._read(0, 8))
        if (n > HEADER_CAP or 8 + n > size) and size > 8 and self._read(8, 1) != b"{":
            raise NotCllmError(f"{self.path}: not a .cllm file (no safetensors header: its first 8 bytes give a length of {n} bytes)")
        if n > HEADER_CAP:
            raise HeaderTooLargeError(f"{self.path}: not a .cllm file (header length {n} is above the cap of {HEADER_CAP} bytes)")
        if self._read(8, min(n, 1, size - 8)) not in (b"{", b""):
            raise HeaderDecodeError(f"{self.path}: not a .cllm file (its header does not begin with '{{')")
        if 8 + n > size:
            raise TruncatedFileError(f"{self.path}: header of {n} bytes runs past the end of the {size}-byte file (truncated?)")
        self.header_size = n
        self.data_start = 8 + n
        self.file_size = size
        self.entries, metadata = parse_safetensors_header(self._read(8, n), size - self.data_start)
        if METADATA_KEY not in metadata:
            raise NotCllmError("a safetensors file without a CodecLLM document (not a .cllm file)")
        self.doc = parse_document(metadata[METADATA_KEY], self.entries)

    def _read(self, offset: int, n: int) -> bytes:
        data = os.pread(self._f.fileno(), n, offset)
        if len(data) != n:
            raise TruncatedFileError(f"{self.path}: short read at offset {offset} (truncated?)")
        return data

    def read_entry(self, name: str) -> np.ndarray:
        """The raw bytes of safetensors tensor ``name`` as a new uint8 array."""
        e = self.entries[name]
        out = np.empty(e.nbytes, dtype=np.uint8)
        got = os.preadv(self._f.fileno(), [memoryview(out)], self.data_start + e.begin) if e.nbytes else 0
        if got != e.nbytes:
            raise TruncatedFileError(f"{self.path}: short read of tensor {name!r} (truncated?)")
        return out

    def read_stored(self, rec: Record, part: Part) -> np.ndarray:
        """The stored (compressed) bytes of one part, checked against their sha256."""
        data = self.read_entry(part.tensor)
        if sha256(data) != part.sha256_stored:
            raise ChecksumError(f"{self.path}: stored bytes of {rec.name!r} (part {part.name!r}) do not match their sha256")
        return data

    def read_part(self, rec: Record, part: Part, verify: bool = True) -> torch.Tensor:
        """One part decoded on the CPU: checksum of the stored bytes first, then the codec, then the
        checksum of the decoded bytes."""
        stored = self.read_stored(rec, part)
        raw = decode_cpu(part.codec, stored, part.chunks, part.chunk_size or 0, part.nbytes)
        if verify and not self._decoded_ok(part, stored, raw):
            raise ChecksumError(f"{self.path}: decoded bytes of {rec.name!r} (part {part.name!r}) do not match their sha256")
        return torch.from_numpy(raw).view(torch_dtype(part.dtype)).reshape(part.shape)

    @staticmethod
    def _decoded_ok(part: Part, stored: np.ndarray, raw: np.ndarray) -> bool:
        if part.sha256_decoded == part.sha256_stored:  # (raw) a copy of the very bytes just checked
            return len(raw) == len(stored)
        return sha256(raw) == part.sha256_decoded

    def read_parts(self, rec: Record, verify: bool = True) -> dict[str, torch.Tensor]:
        return {n: self.read_part(rec, p, verify) for n, p in rec.parts.items()}

    def read_tensor(self, rec: Record) -> torch.Tensor:
        """The record's tensor in its original dtype and shape (dequantized where the scheme is lossy)."""
        return rec.scheme.dequantize(self.read_parts(rec), torch_dtype(rec.dtype))

    def read_file(self, name: str) -> bytes:
        rec = self.doc.files[name]
        return self.read_part(rec, rec.main).numpy().tobytes()

    def config(self) -> dict[str, Any]:
        """The embedded config.json, checked to be a JSON object."""
        try:
            config = json.loads(self.read_file(REQUIRED_FILE))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise HeaderDecodeError(f"{self.path}: embedded {REQUIRED_FILE} is not valid JSON") from None
        if not isinstance(config, dict):
            raise HeaderDecodeError(f"{self.path}: embedded {REQUIRED_FILE} is not a JSON object")
        return config

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "CllmFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- writing ------------------------------------------------------------------------------------------


def build_header(entries: dict[str, Entry], doc: Document, size: int | None = None) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces so the data buffer starts 8-aligned; with
    ``size`` (a multiple of 8), padded to exactly ``size`` bytes in all where it fits in that many (for a
    writer that put the data buffer there before the header was known)."""
    obj: dict[str, Any] = {"__metadata__": {METADATA_KEY: json.dumps(doc.to_json(), separators=(",", ":"), ensure_ascii=False)}}
    for name, e in entries.items():
        obj[name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if size is not None and 8 + len(raw) <= size <= 8 + HEADER_CAP:
        raw += b" " * (size - 8 - len(raw))
    if len(raw) > HEADER_CAP:
        raise HeaderTooLargeError(f"header of {len(raw)} bytes is above the cap of {HEADER_CAP}; use a larger --chunk-size")
    return struct.pack("<Q", len(raw)) + raw
