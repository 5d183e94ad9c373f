"""The reader against mutated files: a fixed budget of ``scripts/fuzz.py`` cases, and one test for each
kind of foreign exception that fuzzing found (each must now be a ``CodecLLMError``).

A longer run: ``python scripts/fuzz.py --cases 100000 --jobs 2``.
"""

import json
import struct
import sys
from pathlib import Path

import pytest

from codecllm import errors
from codecllm.format import CllmFile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fuzz  # noqa: E402
from conftest import DATA, read_header, save_tiny  # noqa: E402

CASES = 12000  # 16 s (wall and CPU) on the 2-core CI machine
SEED = 20240


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("fuzz-seeds")
    out = {"golden": (DATA / "golden.cllm").read_bytes()}
    out.update(fuzz.convert_seeds(save_tiny(tmp / "src", fuzz.tiny_config()), tmp))
    return out


def test_mutated_files_raise_only_package_errors(seeds, tmp_path):
    report = fuzz.fuzz(seeds, range(CASES), SEED, load_every=5, time_limit=10.0, workdir=str(tmp_path))
    assert report.failures == 0, "\n" + report.table(SEED)
    # the mutations reach every layer: some files still open and load, the rest fail in many ways
    assert report.ok > 0.03 * CASES and report.loads > 0
    for name in ("HeaderDecodeError", "ShapeError", "OffsetError", "ChunkTableError", "ChecksumError", "DecodeError"):
        assert report.package[name] > 0, name


def test_mutations_are_reproducible(seeds):
    assert fuzz.mutate(seeds, 5, 17) == fuzz.mutate(seeds, 5, 17)
    assert fuzz.mutate(seeds, 5, 17) != fuzz.mutate(seeds, 5, 18)


# --- what the fuzzer found against the reader before its type checks -------------------------------------


def _golden_with(tmp_path, header_change=None, doc_change=None, raw_doc=None) -> Path:
    raw = (DATA / "golden.cllm").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, doc = read_header(DATA / "golden.cllm")
    if doc_change:
        doc_change(doc)
    header["__metadata__"] = {"codecllm": raw_doc if raw_doc is not None else json.dumps(doc)}
    if header_change:
        header_change(header)
    h = json.dumps(header).encode()
    p = tmp_path / "case.cllm"
    p.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    return p


def _set(path: tuple, value):
    def change(obj):
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return change


EMB = "model.embed_tokens.weight"
FOUND = {
    # TypeError: unhashable type: 'list' (parse_safetensors_header)
    "header-dtype-list": dict(header_change=_set(("model.norm.weight", "dtype"), ["F16"])),
    # TypeError: unhashable type: 'dict' (_parse_record)
    "record-dtype-dict": dict(doc_change=_set(("tensors", EMB, "dtype"), {"a": 1})),
    "part-dtype-list": dict(doc_change=_set(("tensors", EMB, "parts", "qweight", "dtype"), [])),
    # TypeError: unhashable type: 'list' (parse_document, aliases)
    "alias-target-list": dict(doc_change=_set(("aliases", "lm_head.weight"), [EMB])),
    # TypeError: unhashable type: 'list' (loader: DTYPES.get(model dtype)); ValueError from transformers for I8
    "model-dtype-list": dict(doc_change=_set(("model", "dtype"), ["F16"])),
    "model-dtype-int": dict(doc_change=_set(("model", "dtype"), "I8")),
    # RecursionError in json.loads (document nested 100,000 deep)
    "document-deep-nesting": dict(raw_doc='{"a":' + "[" * 100_000 + "]" * 100_000 + "}"),
    # ValueError: Exceeds the limit (4300 digits) for integer string conversion
    "document-5000-digit-int": dict(raw_doc='{"format_version":' + "9" * 5000 + "}"),
    # MemoryError / a 20 s hang: chunk_bounds() built a list of 2^36 chunks for a claimed 2^48-byte tensor
    "huge-claimed-shape": dict(doc_change=_set(("tensors", "model.layers.0.mlp.down_proj.weight", "shape"), [2**24, 2**24])),
    # RuntimeError in int8 dequantize (broadcasting): an int8 record of a 3-D shape
    "int8-3d-shape": dict(doc_change=_set(("tensors", EMB, "shape"), [64, 8, 1])),
}


@pytest.mark.parametrize("case", list(FOUND), ids=list(FOUND))
def test_found_by_fuzzing(tmp_path, case):
    path = _golden_with(tmp_path, **FOUND[case])
    with pytest.raises(errors.FormatError):
        with CllmFile(path) as f:
            for rec in [*f.doc.tensors.values(), *f.doc.files.values()]:
                fuzz.read_record(f, rec)


def test_header_deep_nesting_and_long_int(tmp_path):
    for text in ['{"a":' + "[" * 100_000 + "]" * 100_000 + "}", '{"a":' + "1" * 5000 + "}"]:
        raw = text.encode()
        p = tmp_path / "case.cllm"
        p.write_bytes(struct.pack("<Q", len(raw)) + raw)
        with pytest.raises(errors.HeaderDecodeError):
            CllmFile(p)


def test_record_shape_must_match_the_model(tmp_path):
    import codecllm

    # scheme none, zstd in the golden file: its dims swapped, the chunk table still fits (was a RuntimeError
    # from load_state_dict)
    def swap(doc):
        rec = doc["tensors"]["model.layers.0.mlp.down_proj.weight"]
        rec["shape"] = rec["parts"]["data"]["shape"] = [16, 8]

    path = _golden_with(tmp_path, doc_change=swap)
    with pytest.raises(errors.FormatError, match="in the model"):
        codecllm.load(path)


def test_zstd_frame_declaring_a_huge_size(tmp_path):
    """A frame header that declares 2^40 bytes: python-zstandard allocated that much before decoding
    (MemoryError, found with checksums recomputed); the declared size is now checked first."""
    from codecllm.codecs import decode_cpu

    frame = b"\x28\xb5\x2f\xfd" + b"\xe0" + struct.pack("<Q", 2**40) + b"\x01\x00\x00"  # 8-byte size, one empty raw block
    with pytest.raises(errors.DecodeError, match="holds 1099511627776 bytes"):
        decode_cpu("zstd", frame, [len(frame)], 4096, 256)
