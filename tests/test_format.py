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


def check_golden_values(path):
    with CllmFile(path) as f:
        doc = f.doc
        assert doc.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
        emb = doc.tensors["model.embed_tokens.weight"]
        assert (emb.scheme.id, emb.main.codec, emb.main.chunk_size, emb.shape) == ("int8", "zstd", 4096, (64, 8))
        # row (c - 4) / 8: absmax 0.5, scale 0.5 / 127, q = round((c - 4) * 127 / 4), halves to even
        parts = f.read_parts(emb)
        q = parts["qweight"]
        assert q[0].tolist() == [-127, -95, -64, -32, 0, 32, 64, 95]
        assert torch.equal(q, q[0].expand(64, 8))
        assert parts["scale"].tolist() == [np.float32(0.5) / np.float32(127)] * 64
        w = f.read_tensor(emb)
        assert w.dtype == torch.float16 and w[0, 0] == -0.5 and w[0, 4] == 0
        down = doc.tensors["model.layers.0.mlp.down_proj.weight"]  # the edge MLP output stays unquantized
        assert down.scheme.id == "none" and f.read_tensor(down).dtype == torch.float16
        assert f.config()["hidden_size"] == 8
        return doc.version


def test_golden_values_by_hand():
    assert check_golden_values(DATA / "golden.cllm") == 2


def test_version_1_files_are_still_read():
    """golden_v1.cllm is the same model written by format version 1 (one payload plus F32 sides)."""
    assert check_golden_values(DATA / "golden_v1.cllm") == 1
    with CllmFile(DATA / "golden.cllm") as new, CllmFile(DATA / "golden_v1.cllm") as old:
        assert set(new.doc.tensors) == set(old.doc.tensors)
        for name, rec in new.doc.tensors.items():
            assert torch.equal(new.read_tensor(rec).view(torch.uint8), old.read_tensor(old.doc.tensors[name]).view(torch.uint8)), name


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
                f.read_tensor(rec)


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


@pytest.mark.parametrize("version", [3, 0, "2", None, True])
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
    doc["tensors"]["model.embed_tokens.weight"]["parts"]["qweight"]["codec"]["id"] = "brotli"
    expect(write(tmp_path, with_doc(header, doc), data), errors.UnknownCodecError, "brotli")


def test_chunk_sizes_disagree_with_payload(tmp_path):
    header, doc, data = golden_parts()
    doc["tensors"]["model.embed_tokens.weight"]["parts"]["qweight"]["codec"]["chunks"][0] += 1
    expect(write(tmp_path, with_doc(header, doc), data), errors.ChunkTableError, "add up")


def test_chunk_count_disagrees_with_decoded_size(tmp_path):
    header, doc, data = golden_parts()
    codec = doc["tensors"]["model.embed_tokens.weight"]["parts"]["qweight"]["codec"]
    n = codec["chunks"][0]
    codec["chunks"] = [n - 1, 1]
    expect(write(tmp_path, with_doc(header, doc), data), errors.ChunkTableError, "cannot hold")


def test_chunk_size_out_of_range(tmp_path):
    header, doc, data = golden_parts()
    doc["tensors"]["model.embed_tokens.weight"]["parts"]["qweight"]["codec"]["chunk_size"] = 0
    expect(write(tmp_path, with_doc(header, doc), data), errors.ChunkTableError, "chunk_size")


def test_payload_tensor_missing(tmp_path):
    header, doc, data = golden_parts()
    doc["tensors"]["model.embed_tokens.weight"]["parts"]["qweight"]["tensor"] = "nope"
    expect(write(tmp_path, with_doc(header, doc), data), errors.HeaderDecodeError, "nope")


def test_checksum_mismatch_is_caught_before_any_decoder(tmp_path, monkeypatch):
    """The reader checks a payload's sha256 before the codec's decoder sees a byte of it. The spy is the
    very function ``read_part`` calls (it counts calls on a good file), so the test fails if the order
    inside the reader is ever swapped."""
    import codecllm.codecs as codecs

    calls = []
    real = codecs._DECODERS[("zstd", "cpu")]
    monkeypatch.setitem(codecs._DECODERS, ("zstd", "cpu"), lambda *a: (calls.append(1), real(*a)))
    with CllmFile(DATA / "golden.cllm") as f:
        f.read_tensor(f.doc.tensors["model.embed_tokens.weight"])
    assert calls, "the spy is not the decoder the reader uses"
    header, doc, data = golden_parts()
    b, e = header["model.embed_tokens.weight"]["data_offsets"]
    data = bytearray(data)
    data[b + 10] ^= 0x55
    calls.clear()
    with CllmFile(write(tmp_path, header, bytes(data))) as f, pytest.raises(errors.ChecksumError, match="embed_tokens"):
        f.read_tensor(f.doc.tensors["model.embed_tokens.weight"])
    assert not calls, "a corrupt payload reached the decoder"


def test_side_part_checksum(tmp_path):
    header, doc, data = golden_parts()
    b, e = header["model.layers.0.self_attn.q_proj.weight#scale"]["data_offsets"]
    data = bytearray(data)
    data[b] ^= 1
    with CllmFile(write(tmp_path, header, bytes(data))) as f, pytest.raises(errors.ChecksumError, match="scale"):
        f.read_tensor(f.doc.tensors["model.layers.0.self_attn.q_proj.weight"])


def test_decoded_checksum(tmp_path):
    header, doc, data = golden_parts()
    doc["tensors"]["model.embed_tokens.weight"]["parts"]["qweight"]["sha256"]["decoded"] = "0" * 64
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


# --- rules of version 2: records, parts, the document --------------------------------------------------


def mutated(tmp_path, change) -> Path:
    header, doc, data = golden_parts()
    change(header, doc)
    return write(tmp_path, with_doc(header, doc), data)


def emb(doc):
    return doc["tensors"]["model.embed_tokens.weight"]


def test_duplicate_keys_in_header(tmp_path):
    raw = (DATA / "golden.cllm").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    text = raw[8:8 + n].decode().rstrip()
    entry = text[text.index('"model.norm.weight":'):]
    entry = entry[:entry.index("}") + 1]
    bad = text[:-1] + "," + entry + "}"  # the same tensor named twice
    expect(write(tmp_path, {}, raw[8 + n:], raw_header=bad.encode()), errors.HeaderDecodeError, "duplicate key")


def test_duplicate_keys_in_document(tmp_path):
    header, doc, data = golden_parts()
    text = json.dumps(doc)
    text = text[:-1] + ', "aliases": {}}'
    header["__metadata__"] = {"codecllm": text}
    expect(write(tmp_path, header, data), errors.HeaderDecodeError, "duplicate key 'aliases'")


@pytest.mark.parametrize("field, value", [("dtype", ["F16"]), ("dtype", {"a": 1}), ("shape", "8"), ("data_offsets", [0, "8"]),
                                          ("data_offsets", [0, True])], ids=["dtype-list", "dtype-object", "shape-string", "offset-string",
                                                                             "offset-bool"])
def test_entry_fields_are_type_checked(tmp_path, field, value):
    header, doc, data = golden_parts()
    header["model.norm.weight"] = dict(header["model.norm.weight"], **{field: value})
    expect(write(tmp_path, header, data), errors.FormatError)


@pytest.mark.parametrize("value", [["F16"], {"x": 1}, 7, None], ids=["list", "object", "int", "null"])
def test_record_dtype_is_type_checked(tmp_path, value):
    def change(h, d):
        emb(d)["dtype"] = value
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "dtype")


@pytest.mark.parametrize("value", [["I8"], {"x": 1}, "I16"], ids=["list", "object", "other"])
def test_part_dtype_must_be_the_layouts(tmp_path, value):
    def change(h, d):
        emb(d)["parts"]["qweight"]["dtype"] = value
    expect(mutated(tmp_path, change), errors.FormatError)


def test_part_shape_must_be_the_layouts(tmp_path):
    def change(h, d):
        emb(d)["parts"]["scale"]["shape"] = [63]
    expect(mutated(tmp_path, change), errors.ShapeError, "scheme stores it as F32 \\[64\\]")


def test_a_part_the_scheme_needs_is_missing(tmp_path):
    def change(h, d):
        emb(d)["parts"].pop("scale")
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "stores parts")


def test_a_part_the_scheme_does_not_know(tmp_path):
    def change(h, d):
        emb(d)["parts"]["zero"] = emb(d)["parts"].pop("scale")
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "stores parts")


def test_scheme_params_are_validated_by_the_scheme(tmp_path):
    def change(h, d):
        emb(d)["scheme"]["params"] = {"transpose": "yes"}
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "transpose")


def test_raw_part_must_hold_its_dtype_and_shape(tmp_path):
    header, doc, data = golden_parts()
    header["model.norm.weight"] = dict(header["model.norm.weight"], dtype="I16")
    expect(write(tmp_path, header, data), errors.ShapeError, "raw payload")


def test_raw_part_checksums_must_agree(tmp_path):
    def change(h, d):
        d["tensors"]["model.norm.weight"]["parts"]["data"]["sha256"]["decoded"] = "1" * 64
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "must be equal")


def test_raw_part_takes_no_chunk_table(tmp_path):
    def change(h, d):
        d["tensors"]["model.norm.weight"]["parts"]["data"]["codec"]["chunks"] = [16]
    expect(mutated(tmp_path, change), errors.ChunkTableError, "no chunk table")


def test_chunked_part_needs_its_chunk_table(tmp_path):
    def change(h, d):
        emb(d)["parts"]["qweight"]["codec"].pop("chunks")
    expect(mutated(tmp_path, change), errors.ChunkTableError, "chunk table")


def test_chunked_payload_must_be_1d_u8(tmp_path):
    header, doc, data = golden_parts()
    e = header["model.embed_tokens.weight"]
    n = e["data_offsets"][1] - e["data_offsets"][0]
    header["model.embed_tokens.weight"] = dict(e, dtype="I8", shape=[n])
    expect(write(tmp_path, header, data), errors.ChunkTableError, "1-D U8")


@pytest.mark.parametrize("chunks", [[0], [-5], ["25"], [True]], ids=["zero", "negative", "string", "bool"])
def test_chunk_sizes_must_be_positive_integers(tmp_path, chunks):
    def change(h, d):
        emb(d)["parts"]["qweight"]["codec"]["chunks"] = chunks
    expect(mutated(tmp_path, change), errors.ChunkTableError, "positive integers")


def test_sha256_must_be_lowercase_hex(tmp_path):
    def change(h, d):
        emb(d)["parts"]["qweight"]["sha256"]["stored"] = "A" * 64
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "hex")


def test_document_needs_exactly_its_keys(tmp_path):
    def change(h, d):
        d["extra"] = 1
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "unexpected")


def test_config_json_must_be_embedded(tmp_path):
    header, doc, data = golden_parts()
    doc["files"]["config2.json"] = doc["files"].pop("config.json")
    expect(write(tmp_path, with_doc(header, doc), data), errors.HeaderDecodeError, "config.json")


@pytest.mark.parametrize("name", ["../evil.json", ".hidden", "a/b.json", ""], ids=["dotdot", "hidden", "slash", "empty"])
def test_embedded_file_names_are_plain(tmp_path, name):
    header, doc, data = golden_parts()
    doc["files"][name] = doc["files"].pop("config.json")
    expect(write(tmp_path, with_doc(header, doc), data), errors.HeaderDecodeError, "not a plain file name")


def test_embedded_file_must_be_lossless_bytes(tmp_path):
    """A file stored as a 2-D I8 tensor (consistent in itself) is still not an embedded file."""
    def change(h, d):
        rec = d["files"]["config.json"]
        rec["dtype"] = rec["parts"]["data"]["dtype"] = "I8"
        rec["shape"] = rec["parts"]["data"]["shape"] = [2, 177]
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "1-D U8 record")


def test_alias_must_name_a_stored_tensor(tmp_path):
    def change(h, d):
        d["aliases"]["lm_head.weight"] = "nope"
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "alias")


def test_alias_must_not_shadow_a_tensor(tmp_path):
    def change(h, d):
        d["aliases"]["model.norm.weight"] = "model.embed_tokens.weight"
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "shadow")


def test_a_stored_tensor_is_claimed_once(tmp_path):
    def change(h, d):
        d["tensors"]["model.layers.0.input_layernorm.weight"]["parts"]["data"]["tensor"] = "model.norm.weight"
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "claimed by both")


def test_model_fields_are_type_checked(tmp_path):
    def change(h, d):
        d["model"]["architectures"] = "LlamaForCausalLM"
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "architectures")


def test_not_a_cllm_file_says_so(tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"hello, this is plain text and not a model at all")
    with pytest.raises(errors.FormatError, match=r"notes.txt: not a .cllm file"):
        CllmFile(tmp_path / "notes.txt")


def test_truncated_file_names_the_file(tmp_path, golden_bytes):
    (tmp_path / "cut.cllm").write_bytes(golden_bytes[: len(golden_bytes) // 2])
    with pytest.raises(errors.TruncatedFileError, match=r"cut.cllm.*truncated"):
        CllmFile(tmp_path / "cut.cllm")


def test_missing_file_is_a_package_error(tmp_path):
    with pytest.raises(errors.CodecLLMError, match="No such file"):
        CllmFile(tmp_path / "nope.cllm")


def test_metadata_maps_strings_to_strings(tmp_path):
    header, doc, data = golden_parts()
    header["__metadata__"] = {"codecllm": json.dumps(doc), "other": 5}
    expect(write(tmp_path, header, data), errors.HeaderDecodeError, "__metadata__")


def test_record_needs_exactly_its_keys(tmp_path):
    def change(h, d):
        emb(d)["codec"] = {"id": "zstd"}  # a version 1 field in a version 2 record
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, r"unexpected \['codec'\]")


def test_part_needs_exactly_its_keys(tmp_path):
    def change(h, d):
        emb(d)["parts"]["scale"]["offset"] = 0
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, r"unexpected \['offset'\]")


@pytest.mark.parametrize("field, value", [("chunks", []), ("chunk_size", None)], ids=["empty-chunks", "null-chunk-size"])
def test_raw_part_has_no_chunk_fields_at_all(tmp_path, field, value):
    def change(h, d):
        d["tensors"]["model.norm.weight"]["parts"]["data"]["codec"][field] = value
    expect(mutated(tmp_path, change), errors.ChunkTableError, "no chunk table")


@pytest.mark.parametrize("model", [{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "F16", "extra": 1},
                                   {"architectures": [1], "model_type": "llama", "dtype": "F16"}, {}], ids=["extra-key", "not-strings", "empty"])
def test_model_object_has_exactly_its_keys(tmp_path, model):
    def change(h, d):
        d["model"] = model
    expect(mutated(tmp_path, change), errors.HeaderDecodeError, "model")


def test_int8_record_of_an_integer_tensor(tmp_path):
    def change(h, d):
        emb(d)["dtype"] = "I32"
    expect(mutated(tmp_path, change), errors.FormatError, "floating-point")
