"""What ``codecllm-dump`` shows: a file's header per tensor and in total, and an optional full verify."""

from __future__ import annotations

import os

from .format import DTYPES, CllmFile, Record


def _row(f: CllmFile, rec: Record) -> dict:
    stored = f.entries[rec.data].nbytes
    sides = sum(f.entries[s["tensor"]].nbytes for s in rec.sides.values())
    original = rec.numel * DTYPES[rec.dtype][1]
    return {
        "name": rec.name,
        "shape": list(rec.shape),
        "dtype": rec.dtype,
        "scheme": rec.scheme,
        "codec": rec.codec,
        "chunks": len(rec.chunks),
        "bytes_original": original,
        "bytes_encoded": rec.encoded_nbytes,
        "bytes_stored": stored + sides,
        "ratio": original / max(stored + sides, 1),
    }


def describe(path: str | os.PathLike, verify: bool = False, tensors: bool = True) -> dict:
    """The header as a JSON-ready dict. ``totals.bytes_stored`` plus ``totals.bytes_files`` plus
    ``header_bytes`` equals the file size. With ``verify``, every payload is decoded and both checksums
    are checked (a failure raises ``ChecksumError``/``DecodeError``)."""
    with CllmFile(path) as f:
        rows = [_row(f, r) for r in f.doc.tensors.values()]
        files = {n: {"bytes": r.numel, "bytes_stored": f.entries[r.data].nbytes, "codec": r.codec} for n, r in f.doc.files.items()}
        if verify:
            for r in [*f.doc.files.values(), *f.doc.tensors.values()]:
                f.decode(r, verify=True)
                for side in r.sides:
                    f.read_side(r, side)
        totals = {
            "tensors": len(rows),
            "bytes_original": sum(r["bytes_original"] for r in rows),
            "bytes_encoded": sum(r["bytes_encoded"] for r in rows),
            "bytes_stored": sum(r["bytes_stored"] for r in rows),
            "bytes_files": sum(v["bytes_stored"] for v in files.values()),
        }
        totals["ratio"] = totals["bytes_original"] / max(totals["bytes_stored"], 1)
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
        if verify:
            out["verified"] = True
        if tensors:
            out["tensors"] = rows
        return out
