"""What ``codecllm-dump`` shows: a file's header per tensor and in total, and an optional full verify."""

from __future__ import annotations

import os

from .format import CllmFile, Record


def _row(f: CllmFile, rec: Record) -> dict:
    stored = sum(f.entries[p.tensor].nbytes for p in rec.parts.values())
    return {
        "name": rec.name,
        "shape": list(rec.shape),
        "dtype": rec.dtype,
        "scheme": repr(rec.scheme),
        "codec": rec.main.codec,
        "chunks": len(rec.main.chunks),
        "parts": {n: {"dtype": p.dtype, "shape": list(p.shape), "codec": p.codec, "bytes_stored": f.entries[p.tensor].nbytes}
                  for n, p in rec.parts.items()},
        "bytes_original": rec.nbytes,
        "bytes_encoded": rec.encoded_nbytes,
        "bytes_stored": stored,
        "ratio": rec.nbytes / max(stored, 1),
        "bits_per_weight": 8 * stored / max(rec.numel, 1),
    }


def _gpu_bytes(path) -> dict:
    """What each load mode would hold on a CUDA device (``codecllm.loader.footprint``), or why that is not
    known here (a config transformers cannot build, kernels that cannot be imported): the header itself is
    shown either way."""
    from .loader import footprint

    try:
        return footprint(path, "cuda")
    except Exception as e:  # noqa: BLE001 (an estimate beside the header, never a reason to fail)
        return {"error": (str(e).splitlines() or [type(e).__name__])[0]}


def describe(path: str | os.PathLike, verify: bool = False, tensors: bool = True) -> dict:
    """The header as a JSON-ready dict. ``totals.bytes_stored`` plus ``totals.bytes_files`` plus
    ``header_bytes`` equals the file size. With ``verify``, every payload is decoded and both checksums
    are checked (a failure raises ``ChecksumError``/``DecodeError``)."""
    with CllmFile(path) as f:
        rows = [_row(f, r) for r in f.doc.tensors.values()]
        files = {n: {"bytes": r.numel, "bytes_stored": f.entries[r.main.tensor].nbytes, "codec": r.main.codec} for n, r in f.doc.files.items()}
        if verify:
            for r in [*f.doc.files.values(), *f.doc.tensors.values()]:
                f.read_tensor(r)
        totals = {
            "tensors": len(rows),
            "bytes_original": sum(r["bytes_original"] for r in rows),
            "bytes_encoded": sum(r["bytes_encoded"] for r in rows),
            "bytes_stored": sum(r["bytes_stored"] for r in rows),
            "bytes_files": sum(v["bytes_stored"] for v in files.values()),
        }
        totals["ratio"] = totals["bytes_original"] / max(totals["bytes_stored"], 1)
        totals["bits_per_weight"] = 8 * totals["bytes_stored"] / max(sum(r.numel for r in f.doc.tensors.values()), 1)
        out = {
            "path": os.fspath(path),
            "format_version": f.doc.version,
            "file_bytes": f.file_size,
            "header_bytes": f.data_start,
            "model": f.doc.model,
            "converter": f.doc.converter,
            "files": files,
            "aliases": f.doc.aliases,
            "totals": totals,
        }
        out["gpu_bytes"] = _gpu_bytes(path)
        if verify:
            out["verified"] = True
        if tensors:
            out["tensors"] = rows
        return out
