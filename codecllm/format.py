"""The ``.cllm`` container, shared by the converter and the loader. format_spec.md is normative; this
module implements it: the safetensors layer (8-byte length, JSON header, one data buffer) and the CodecLLM
document in the header's ``__metadata__``, with every check a reader makes, in the order the spec gives.
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

from .codecs import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, get_codec
from .errors import (
    ChecksumError,
    ChunkTableError,
    FormatError,
    HeaderDecodeError,
    HeaderTooLargeError,
    NotCllmError,
    OffsetError,
    ShapeError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from .schemes import get_scheme

FORMAT_VERSION = 1
METADATA_KEY = "codecllm"
HEADER_CAP = 100 * 1024 * 1024  # bytes of JSON header, as in safetensors
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 48
FILE_PREFIX = "__file__/"

# safetensors dtype strings <-> torch dtypes and element sizes
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
DTYPE_NAMES = {dt: name for name, (dt, _) in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored") from None


def sha256(data) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


# --- the CodecLLM document ------------------------------------------------------------------------------


@dataclass
class Record:
    """How one tensor (or embedded file) is stored: see format_spec.md, "Records"."""

    name: str
    dtype: str  # original dtype
    shape: tuple[int, ...]  # original shape
    scheme: str
    codec: str
    data: str  # name of the safetensors tensor holding the stored bytes
    encoded_dtype: str
    sha256_stored: str
    sha256_decoded: str
    chunk_size: int | None = None
    chunks: list[int] = field(default_factory=list)
    sides: dict[str, dict[str, str]] = field(default_factory=dict)  # side name -> {"tensor", "sha256"}

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def encoded_nbytes(self) -> int:
        return self.numel * DTYPES[self.encoded_dtype][1]

    def to_json(self) -> dict[str, Any]:
        codec: dict[str, Any] = {"id": self.codec}
        if get_codec(self.codec).chunked:
            codec.update(chunk_size=self.chunk_size, chunks=self.chunks)
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "scheme": {"id": self.scheme, **({"sides": self.sides} if self.sides else {})},
            "codec": codec,
            "data": self.data,
            "encoded_dtype": self.encoded_dtype,
            "sha256": {"stored": self.sha256_stored, "decoded": self.sha256_decoded},
        }


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


def _check_shape(what: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ShapeError(f"{what}: shape must be a list of at most {MAX_DIMS} dimensions, got {shape!r}")
    n = 1
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise ShapeError(f"{what}: shape {shape!r} has a dimension that is not a non-negative integer")
        n *= d
        if n > MAX_ELEMENTS:
            raise ShapeError(f"{what}: shape {shape!r} is absurdly large")
    return tuple(shape)


def parse_safetensors_header(raw: bytes, data_len: int) -> tuple[dict[str, Entry], dict[str, str]]:
    """Check the JSON header of a safetensors file against a data buffer of ``data_len`` bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderDecodeError("header is not valid UTF-8") from None
    if not text.startswith("{"):
        raise HeaderDecodeError("header does not begin with '{'")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise HeaderDecodeError(f"header is not valid JSON: {e.msg} at byte {e.pos}") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting deeper than the stack
        raise HeaderDecodeError(f"header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise HeaderDecodeError("header is not a JSON object")
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderDecodeError("__metadata__ must map strings to strings")
    entries: dict[str, Entry] = {}
    for name, e in obj.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise HeaderDecodeError(f"tensor {name!r}: entry must hold exactly dtype, shape and data_offsets")
        if not isinstance(e["dtype"], str) or e["dtype"] not in DTYPES:
            raise HeaderDecodeError(f"tensor {name!r}: unknown dtype {e['dtype']!r}")
        shape = _check_shape(f"tensor {name!r}", e["shape"])
        offs = e["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise OffsetError(f"tensor {name!r}: data_offsets must be two integers")
        begin, end = offs
        if not 0 <= begin <= end:
            raise OffsetError(f"tensor {name!r}: data_offsets [{begin}, {end}] are not an ordered pair of offsets")
        if math.prod(shape) * DTYPES[e["dtype"]][1] != end - begin:
            raise ShapeError(f"tensor {name!r}: shape {list(shape)} of {e['dtype']} does not fill {end - begin} bytes")
        entries[name] = Entry(e["dtype"], shape, begin, end)
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


def _json_obj(where: str, value: Any, keys: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise HeaderDecodeError(f"{where}: expected a JSON object")
    missing = keys - set(value)
    extra = set(value) - keys - optional
    if missing or extra:
        raise HeaderDecodeError(f"{where}: missing {sorted(missing)} / unexpected {sorted(extra)} fields")
    return value


def _is_hex256(s: Any) -> bool:
    return isinstance(s, str) and len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def _parse_record(name: str, obj: Any, entries: dict[str, Entry]) -> Record:
    where = f"record {name!r}"
    obj = _json_obj(where, obj, {"dtype", "shape", "scheme", "codec", "data", "encoded_dtype", "sha256"})
    if not all(isinstance(obj[k], str) and obj[k] in DTYPES for k in ("dtype", "encoded_dtype")):
        raise HeaderDecodeError(f"{where}: unknown dtype {obj['dtype']!r} / {obj['encoded_dtype']!r}")
    shape = _check_shape(where, obj["shape"])
    scheme = _json_obj(f"{where} scheme", obj["scheme"], {"id"}, {"sides"})
    codec = _json_obj(f"{where} codec", obj["codec"], {"id"}, {"chunk_size", "chunks"})
    sums = _json_obj(f"{where} sha256", obj["sha256"], {"stored", "decoded"})
    if not (_is_hex256(sums["stored"]) and _is_hex256(sums["decoded"])):
        raise HeaderDecodeError(f"{where}: sha256 values must be 64 lowercase hex digits")
    s = get_scheme(scheme["id"])
    c = get_codec(codec["id"])
    expected_dtype = dtype_name(s.encoded_dtype(DTYPES[obj["dtype"]][0]))
    if obj["encoded_dtype"] != expected_dtype:
        raise HeaderDecodeError(f"{where}: scheme {s.id!r} encodes {obj['dtype']} as {expected_dtype}, not {obj['encoded_dtype']}")
    sides = scheme.get("sides", {})
    if not isinstance(sides, dict) or set(sides) != set(s.side_tensors):
        raise HeaderDecodeError(f"{where}: scheme {s.id!r} needs side tensors {list(s.side_tensors)}")
    if s.side_tensors and len(shape) != 2:  # int8's one scale per row: 2-D weights only (spec 3.1)
        raise ShapeError(f"{where}: scheme {s.id!r} needs a 2-D shape, got {list(shape)}")
    rows = shape[0] if shape else 1
    for side, ref in sides.items():
        ref = _json_obj(f"{where} side {side!r}", ref, {"tensor", "sha256"})
        ent = entries.get(ref["tensor"]) if isinstance(ref["tensor"], str) else None
        if ent is None or not _is_hex256(ref["sha256"]):
            raise HeaderDecodeError(f"{where}: side tensor {ref['tensor']!r} is missing or has no valid sha256")
        if ent.dtype != "F32" or ent.shape != (rows,):
            raise ShapeError(f"{where}: side tensor {ref['tensor']!r} must be F32 of shape [{rows}]")
    data = obj["data"]
    ent = entries.get(data) if isinstance(data, str) else None
    if ent is None:
        raise HeaderDecodeError(f"{where}: data tensor {data!r} is not in the file")
    rec = Record(name, obj["dtype"], shape, s.id, c.id, data, obj["encoded_dtype"], sums["stored"], sums["decoded"], sides=sides)
    if c.chunked:
        chunk_size, chunks = codec.get("chunk_size"), codec.get("chunks")
        if not isinstance(chunk_size, int) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ChunkTableError(f"{where}: chunk_size {chunk_size!r} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
        if ent.dtype != "U8" or len(ent.shape) != 1:
            raise ChunkTableError(f"{where}: a {c.id} payload must be a 1-D U8 tensor")
        if not isinstance(chunks, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in chunks):
            raise ChunkTableError(f"{where}: chunks must be a list of positive integers")
        if len(chunks) != -(-rec.encoded_nbytes // chunk_size):
            raise ChunkTableError(f"{where}: {len(chunks)} chunks cannot hold {rec.encoded_nbytes} bytes in chunks of {chunk_size}")
        if sum(chunks) != ent.nbytes:
            raise ChunkTableError(f"{where}: chunk sizes add up to {sum(chunks)} bytes, the payload holds {ent.nbytes}")
        rec.chunk_size, rec.chunks = chunk_size, chunks
    else:
        if "chunk_size" in codec or "chunks" in codec:
            raise ChunkTableError(f"{where}: codec {c.id!r} takes no chunk table")
        if ent.dtype != obj["encoded_dtype"] or ent.shape != shape:
            raise ShapeError(f"{where}: a raw payload must be {obj['encoded_dtype']} of shape {list(shape)}")
    return rec


def parse_document(text: str, entries: dict[str, Entry]) -> Document:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise HeaderDecodeError(f"CodecLLM document is not valid JSON: {e.msg} at byte {e.pos}") from None
    except (ValueError, RecursionError) as e:
        raise HeaderDecodeError(f"CodecLLM document is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise HeaderDecodeError("CodecLLM document is not a JSON object")
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(f"format version {version!r} is not supported (this reader knows {FORMAT_VERSION})")
    obj = _json_obj("CodecLLM document", obj, {"format_version", "model", "converter", "files", "tensors", "aliases"})
    for key in ("model", "converter", "files", "tensors", "aliases"):
        if not isinstance(obj[key], dict):
            raise HeaderDecodeError(f"CodecLLM document: {key!r} must be a JSON object")
    model_dtype = obj["model"].get("dtype", "F32")
    if not isinstance(model_dtype, str) or model_dtype not in ("F64", "F32", "F16", "BF16"):
        raise HeaderDecodeError(f"CodecLLM document: model dtype {model_dtype!r} is not a floating-point dtype string")
    tensors = {n: _parse_record(n, r, entries) for n, r in obj["tensors"].items()}
    files = {n: _parse_record(n, r, entries) for n, r in obj["files"].items()}
    for n, r in files.items():
        if r.dtype != "U8" or len(r.shape) != 1 or r.scheme != "none":
            raise HeaderDecodeError(f"embedded file {n!r} must be a 1-D U8 record with scheme 'none'")
    for alias, target in obj["aliases"].items():
        if not isinstance(target, str) or target not in tensors or alias in tensors:
            raise HeaderDecodeError(f"alias {alias!r} -> {target!r} must name a stored tensor and not shadow one")
    used: dict[str, str] = {}
    for r in [*tensors.values(), *files.values()]:
        for t in [r.data, *(s["tensor"] for s in r.sides.values())]:
            if t in used:
                raise HeaderDecodeError(f"safetensors tensor {t!r} is claimed by both {used[t]!r} and {r.name!r}")
            used[t] = r.name
    unclaimed = set(entries) - set(used)
    if unclaimed:
        raise HeaderDecodeError(f"safetensors tensor {sorted(unclaimed)[0]!r} belongs to no record")
    return Document(tensors, files, obj["aliases"], obj["model"], obj["converter"], version)


class CllmFile:
    """A ``.cllm`` file opened for reading. Opening checks the whole header; payloads are read on demand
    and checked against their sha256 before any decoder sees them."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._f: BinaryIO = open(self.path, "rb")
        try:
            self._parse()
        except BaseException:
            self._f.close()
            raise

    def _parse(self) -> None:
        size = os.fstat(self._f.fileno()).st_size
        if size < 8:
            raise TruncatedFileError(f"{self.path}: {size} bytes is too short for a header length")
        (n,) = struct.unpack("<Q", self._read(0, 8))
        if n > HEADER_CAP:
            raise HeaderTooLargeError(f"{self.path}: header length {n} is above the cap of {HEADER_CAP} bytes")
        if 8 + n > size:
            raise TruncatedFileError(f"{self.path}: header of {n} bytes runs past the end of the {size}-byte file")
        self.header_size = n
        self.data_start = 8 + n
        self.file_size = size
        self.entries, metadata = parse_safetensors_header(self._read(8, n), size - self.data_start)
        if METADATA_KEY not in metadata:
            raise NotCllmError(f"{self.path}: a safetensors file without a CodecLLM document (not a .cllm file)")
        self.doc = parse_document(metadata[METADATA_KEY], self.entries)

    def _read(self, offset: int, n: int) -> bytes:
        data = os.pread(self._f.fileno(), n, offset)
        if len(data) != n:
            raise TruncatedFileError(f"{self.path}: short read at offset {offset}")
        return data

    def read_entry(self, name: str) -> np.ndarray:
        """The raw bytes of safetensors tensor ``name`` as a new uint8 array."""
        e = self.entries[name]
        out = np.empty(e.nbytes, dtype=np.uint8)
        got = os.preadv(self._f.fileno(), [memoryview(out)], self.data_start + e.begin) if e.nbytes else 0
        if got != e.nbytes:
            raise TruncatedFileError(f"{self.path}: short read of tensor {name!r}")
        return out

    def read_stored(self, rec: Record) -> np.ndarray:
        """The stored (compressed) bytes of a record, checked against their sha256."""
        data = self.read_entry(rec.data)
        if sha256(data) != rec.sha256_stored:
            raise ChecksumError(f"{self.path}: stored bytes of {rec.name!r} do not match their sha256")
        return data

    def read_side(self, rec: Record, side: str) -> torch.Tensor:
        ref = rec.sides[side]
        data = self.read_entry(ref["tensor"])
        if sha256(data) != ref["sha256"]:
            raise ChecksumError(f"{self.path}: side tensor {ref['tensor']!r} of {rec.name!r} does not match its sha256")
        return torch.from_numpy(data).view(torch.float32)

    def decode(self, rec: Record, verify: bool = True) -> torch.Tensor:
        """The encoded tensor of a record (int8 for int8, the weight itself for none), on the CPU."""
        from .codecs import decode

        raw = decode(get_codec(rec.codec), self.read_stored(rec), rec.chunks, rec.chunk_size or 0, rec.encoded_nbytes)
        if verify and sha256(raw) != rec.sha256_decoded:
            raise ChecksumError(f"{self.path}: decoded bytes of {rec.name!r} do not match their sha256")
        return torch.from_numpy(raw).view(DTYPES[rec.encoded_dtype][0]).reshape(rec.shape)

    def read_file(self, name: str) -> bytes:
        return self.decode(self.doc.files[name]).numpy().tobytes()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "CllmFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- writing ------------------------------------------------------------------------------------------


def build_header(entries: dict[str, Entry], doc: Document) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces so the data buffer starts 8-aligned."""
    obj: dict[str, Any] = {"__metadata__": {METADATA_KEY: json.dumps(doc.to_json(), separators=(",", ":"), ensure_ascii=False)}}
    for name, e in entries.items():
        obj[name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > HEADER_CAP:
        raise HeaderTooLargeError(f"header of {len(raw)} bytes is above the cap of {HEADER_CAP}; use a larger --chunk-size")
    return struct.pack("<Q", len(raw)) + raw
