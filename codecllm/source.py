"""Reading a local Hugging Face checkpoint directory, one tensor at a time.

Only safetensors weights are read (single file or sharded with an index); pickle checkpoints are refused,
never unpickled. Tensors are read with ``pread`` into fresh buffers rather than through a memory map, so
the converter's resident memory follows the tensor at hand, not the files it has touched.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FormatError, SourceError
from .dtypes import DTYPES
from .format import HEADER_CAP, Entry, parse_safetensors_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".msgpack", ".h5", ".onnx", ".npz") + PICKLE_SUFFIXES
EMBED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
EMBED_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class SourceTensor:
    name: str
    path: Path
    entry: Entry
    data_start: int

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.entry.dtype][0]

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes


def _read_safetensors_header(path: Path) -> tuple[dict[str, Entry], int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise SourceError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > HEADER_CAP or 8 + n > size:
                raise SourceError(f"{path}: not a safetensors file (bad header length {n})")
            entries, _ = parse_safetensors_header(f.read(n), size - 8 - n)
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror}") from None
    except FormatError as e:
        raise SourceError(f"{path}: not a valid safetensors file: {e}") from None
    return entries, 8 + n


class Checkpoint:
    """A Hugging Face model directory: its config, its tensors by name, and the small files to embed."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise SourceError(f"{self.dir}: not a directory (expected a local Hugging Face model directory)")
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            raise SourceError(f"{self.dir}: no config.json (expected a local Hugging Face model directory)")
        try:
            self.config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(f"{config_path}: not valid JSON: {e}") from None
        if not isinstance(self.config, dict):
            raise SourceError(f"{config_path}: not a JSON object")
        self.tensors: dict[str, SourceTensor] = {}
        for shard in self._shards():
            entries, data_start = _read_safetensors_header(shard)
            for name, entry in entries.items():
                if name in self.tensors:
                    raise SourceError(f"{shard}: tensor {name!r} also appears in {self.tensors[name].path.name}")
                self.tensors[name] = SourceTensor(name, shard, entry, data_start)
        if not self.tensors:
            raise SourceError(f"{self.dir}: the safetensors files hold no tensors")

    def _shards(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise SourceError(f"{index}: not a valid safetensors index (needs a weight_map)") from None
            shards = [self.dir / n for n in names]
            for s in shards:
                if not s.is_file() or s.parent != self.dir:
                    raise SourceError(f"{index}: shard {s.name!r} is missing")
            return shards
        shards = sorted(p for p in self.dir.glob("*.safetensors") if p.is_file())
        if shards:
            return shards
        if any(p.suffix in PICKLE_SUFFIXES for p in self.dir.iterdir()):
            raise SourceError(
                f"{self.dir}: only pickle checkpoints (.bin/.pt) found; they are never unpickled. "
                "Re-save the model with safetensors (model.save_pretrained(dir, safe_serialization=True))"
            )
        raise SourceError(f"{self.dir}: no .safetensors weights found")

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype, in a fresh buffer of its own."""
        t = self.tensors[name]
        buf = torch.empty(t.nbytes, dtype=torch.uint8)  # not zero-filled, as a bytearray would be
        with open(t.path, "rb") as f:
            f.seek(t.data_start + t.entry.begin)
            got = f.readinto(memoryview(buf.numpy()))
        if got != t.nbytes:
            raise SourceError(f"{t.path}: short read of tensor {name!r}")
        return buf.view(t.dtype).reshape(t.entry.shape) if t.nbytes else torch.empty(t.entry.shape, dtype=t.dtype)

    def embedded_files(self) -> dict[str, Path]:
        """The small files a model needs besides its weights: config, generation config, tokenizer."""
        out = {}
        for p in sorted(self.dir.iterdir()):
            if not p.is_file() or p.name.endswith(".index.json") or p.suffix in WEIGHT_SUFFIXES:
                continue
            if p.suffix in EMBED_SUFFIXES and p.stat().st_size <= EMBED_MAX_BYTES:
                out[p.name] = p
        return out
