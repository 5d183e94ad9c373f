"""format_spec.md's rules, one test each, on the golden file and hostile variants of it."""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from codecllm import errors
from codecllm.format import HEADER_CAP, CllmFile

sys.path.insert(0, str(Path(__file__).parent))
import golden  # noqa: E402
from conftest import DATA, read_header  # noqa: E402


def test_golden_file_is_pinned_byte_for_byte(tmp_path, golden_bytes):
    rebuilt = golden.build(tmp_path / "src", tmp_path / "golden.cllm").read_bytes()
    assert rebuilt == golden_bytes, "converter output changed: if on purpose, run scripts/make_golden.py"


def test_golden_file_is_a_safetensors_file():
    from safetensors import safe_open

    with safe_open(str(DATA / "golden.cllm"), framework="pt") as f:
        names = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.weight" in names
        assert f.get_tensor("model.norm.weight").tolist() == [2.0] * 8  # non-Linear tensors stay readable
        assert "codecllm" in f.metadata()


def test_golden_values_by_hand():
    with CllmFile(DATA / "golden.cllm") as f:
        doc = f.doc
        assert doc.version == 1 and doc.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
        emb = doc.tensors["model.embed_tokens.weight"]
        assert (emb.scheme, emb.codec, emb.chunk_size, emb.shape) == ("int8", "zstd", 4096, (64, 8))
        # row (c - 4) / 8: absmax 0.5, scale 0.5 / 127, q = round((c - 4) * 127 / 4), halves to even
        q = f.decode(emb)
        assert q[0].tolist() == [-127, -95, -64, -32, 0, 32, 64, 95]
        assert torch.equal(q, q[0].expand(64, 8))
        assert f.read_side(emb, "scale").tolist() == [np.float32(0.5) / np.float32(127)] * 64
        down = doc.tensors["model.layers.0.mlp.down_proj.weight"]  # the edge MLP output stays unquantized
        assert down.scheme == "none" and f.decode(down).dtype == torch.float16
        assert json.loads(f.read_file("config.json"))["hidden_size"] == 8


def test_header_is_padded_to_eight_bytes(golden_bytes):
    n = struct.unpack("<Q", golden_bytes[:8])[0]
    assert n % 8 == 0 and golden_bytes[8:9] == b"{"


# --- hostile files ---------------------------------------------------------------------------------------


def write(tmp_path: Path, header: dict, data: bytes, raw_header: bytes | None = None) -> Path:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    p = tmp_path / "bad.cllm"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return p


def golden_parts() -> tuple[dict, dict, bytes]:
    raw = (DATA / "golden.cllm").read_bytes()
    header, doc = read_header(DATA / "golden.cllm")
    n = struct.unpack("<Q", raw[:8])[0]
    return header, doc, raw[8 + n:]


def with_doc(header: dict, doc: dict) -> dict:
    header = dict(header)
    header["__metadata__"] = {"codecllm": json.dumps(doc)}
    return header


def expect(path: Path, error: type, match: str | None = None) -> None:
    with pytest.raises(error, match=match):
        with CllmFile(path) as f:
            for rec in f.doc.tensors.values():
                f.decode(rec)


def test_empty_file(tmp_path):
    (tmp_path / "bad.cllm").write_bytes(b"")
    expect(tmp_path / "bad.cllm", errors.TruncatedFileError)


def test_truncated_data(tmp_path, golden_bytes):
    (tmp_path / "bad.cllm").write_bytes(golden_bytes[:-10])
    expect(tmp_path / "bad.cllm", errors.TruncatedFileError, "truncated")


def test_header_length_past_end(tmp_path, golden_bytes):
    (tmp_path / "bad.cllm").write_bytes(golden_bytes[:100])
    expect(tmp_path / "bad.cllm", errors.TruncatedFileError, "runs past the end")


def test_header_length_above_cap(tmp_path):
    (tmp_path / "bad.cllm").write_bytes(struct.pack("<Q", HEADER_CAP + 1) + b"{}")
    expect(tmp_path / "bad.cllm", errors.HeaderTooLargeError)


def test_header_not_utf8(tmp_path):
    expect(write(tmp_path, {}, b"", raw_header=b'{"\xff\xfe": 1}'), errors.HeaderDecodeError, "UTF-8")


def test_header_not_json(tmp_path):
    expect(write(tmp_path, {}, b"", raw_header=b"{not json"), errors.HeaderDecodeError, "JSON")


def test_header_not_object(tmp_path):
    expect(write(tmp_path, {}, b"", raw_header=b"[1, 2]"), errors.HeaderDecodeError, "begin with")


def test_plain_safetensors_is_not_cllm(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "bad.cllm"))
    expect(tmp_path / "bad.cllm", errors.NotCllmError)


def test_overlapping_offsets(tmp_path):
    header, doc, data = golden_parts()
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[names[0]], header[names[1]]
    header[names[1]] = dict(b, data_offsets=[a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]])
    expect(write(tmp_path, header, data), errors.OffsetError, "overlaps")


def test_hole_between_tensors(tmp_path):
    header, doc, data = golden_parts()
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    b, e = header[first]["data_offsets"]
    header[first] = dict(header[first], data_offsets=[b + 1, e + 1])
    expect(write(tmp_path, header, data + b"\0"), errors.OffsetError, "hole")


def test_reversed_offsets(tmp_path):
    header, doc, data = golden_parts()
    header["model.norm.weight"] = dict(header["model.norm.weight"], data_offsets=[10, 2])
    expect(write(tmp_path, header, data), errors.OffsetError)


def test_trailing_bytes(tmp_path, golden_bytes):
    (tmp_path / "bad.cllm").write_bytes(golden_bytes + b"xx")
    expect(tmp_path / "bad.cllm", errors.OffsetError, "trailing")


@pytest.mark.parametrize("shape", [[2**40, 2**40], [-1, 4], [1] * 9, ["8"]], ids=["huge", "negative", "too-many-dims", "string"])
def test_absurd_shapes(tmp_path, shape):
    header, doc, data = golden_parts()
    header["model.norm.weight"] = dict(header["model.norm.weight"], shape=shape)
    expect(write(tmp_path, header, data), errors.ShapeError)


def test_absurd_record_shape(tmp_path):
    header, doc, data = golden_parts()
    doc["tensors"]["model.layers.0.mlp.up_proj.weight"]["shape"] = [2**30, 2**30]
    expect(write(tmp_path, with_doc(header, doc), data), errors.FormatError)


def test_shape_disagrees_with_bytes(tmp_path):
    header, doc, data = golden_parts()
    header["model.norm.weight"] = dict(header["model.norm.weight"], shape=[9])
    expect(write(tmp_path, header, data), errors.ShapeError, "does not fill")


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version(tmp_path, version):
    header, doc, data = golden_parts()
    doc["format_version"] = version
    expect(write(tmp_path, with_doc(header, doc), data), errors.UnsupportedVersionError)


def test_unknown_scheme(tmp_path):
    header, doc, data = golden_parts()
    doc["tensors"]["model.layers.0.mlp.up_proj.weight"]["scheme"]["id"] = "int3"
    expect(write(tmp_path, with_doc(header, doc), data), errors.UnknownSchemeError, "int3")


def test_unknown_codec(tmp_path):
    header, doc, data = golden_parts()
    doc["tensors"]["model.embed_tokens.weight"]["codec"]["id"] = "brotli"
    expect(write(tmp_path, with_doc(header, doc), data), errors.UnknownCodecError, "brotli")


def test_chunk_sizes_disagree_with_payload(tmp_path):
    header, doc, data = golden_parts()
    doc["tensors"]["model.embed_tokens.weight"]["codec"]["chunks"][0] += 1
    expect(write(tmp_path, with_doc(header, doc), data), errors.ChunkTableError, "add up")


def test_chunk_count_disagrees_with_decoded_size(tmp_path):
    header, doc, data = golden_parts()
    codec = doc["tensors"]["model.embed_tokens.weight"]["codec"]
    n = codec["chunks"][0]
    codec["chunks"] = [n - 1, 1]
    expect(write(tmp_path, with_doc(header, doc), data), errors.ChunkTableError, "cannot hold")


def test_chunk_size_out_of_range(tmp_path):
    header, doc, data = golden_parts()
    doc["tensors"]["model.embed_tokens.weight"]["codec"]["chunk_size"] = 0
    expect(write(tmp_path, with_doc(header, doc), data), errors.ChunkTableError, "chunk_size")


def test_payload_tensor_missing(tmp_path):
    header, doc, data = golden_parts()
    doc["tensors"]["model.embed_tokens.weight"]["data"] = "nope"
    expect(write(tmp_path, with_doc(header, doc), data), errors.HeaderDecodeError, "nope")


def test_checksum_mismatch_is_caught_before_any_decoder(tmp_path, monkeypatch):
    header, doc, data = golden_parts()
    b, e = header["model.embed_tokens.weight"]["data_offsets"]
    data = bytearray(data)
    data[b + 10] ^= 0x55
    path = write(tmp_path, header, bytes(data))
    import codecllm.codecs as codecs

    def no_decode(*a, **k):
        raise AssertionError("a corrupt payload reached the decoder")

    monkeypatch.setattr(codecs, "decode", no_decode)
    with CllmFile(path) as f, pytest.raises(errors.ChecksumError, match="embed_tokens"):
        f.read_stored(f.doc.tensors["model.embed_tokens.weight"])


def test_side_tensor_checksum(tmp_path):
    header, doc, data = golden_parts()
    b, e = header["model.embed_tokens.weight#scale"]["data_offsets"]
    data = bytearray(data)
    data[b] ^= 1
    with CllmFile(write(tmp_path, header, bytes(data))) as f, pytest.raises(errors.ChecksumError, match="scale"):
        f.read_side(f.doc.tensors["model.embed_tokens.weight"], "scale")


def test_decoded_checksum(tmp_path):
    header, doc, data = golden_parts()
    doc["tensors"]["model.embed_tokens.weight"]["sha256"]["decoded"] = "0" * 64
    expect(write(tmp_path, with_doc(header, doc), data), errors.ChecksumError, "decoded")


def test_unclaimed_tensor(tmp_path):
    header, doc, data = golden_parts()
    header["stray"] = {"dtype": "U8", "shape": [2], "data_offsets": [len(data), len(data) + 2]}
    expect(write(tmp_path, header, data + b"ab"), errors.HeaderDecodeError, "stray")


def test_all_errors_share_one_base():
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, errors.CodecLLMError)


def test_header_round_trip(tmp_path):
    """write -> read: the document parsed back from a file equals the one written."""
    from codecllm.format import parse_document

    with CllmFile(DATA / "golden.cllm") as f:
        doc = f.doc
        again = parse_document(json.dumps(doc.to_json()), f.entries)
    assert again == doc
    assert again.to_json() == read_header(DATA / "golden.cllm")[1]
