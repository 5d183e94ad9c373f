import json
import os

import pytest
from click.testing import CliRunner

from codecllm.cli import convert_cmd, dump_cmd
from conftest import DATA


@pytest.fixture
def runner():
    return CliRunner()


def test_convert_prints_summary_and_json(runner, tiny_llama, tmp_path):
    out = tmp_path / "m.cllm"
    r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "int8 weights" in r.output and "ratio" in r.output
    r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(out), "--force", "--json", "--chunk-size", "8k", "--level", "5"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["file_bytes"] == os.path.getsize(out) and data["chunk_size"] == 8192 and data["level"] == 5


def test_convert_refuses_existing_output(runner, tiny_llama, tmp_path):
    out = tmp_path / "m.cllm"
    out.write_text("mine")
    r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(out)])
    assert r.exit_code == 1 and "--force" in r.output and "Traceback" not in r.output
    assert out.read_text() == "mine"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quant", "int3"], "int3"),
        (["--chunk-size", "12"], "chunk size"),
        (["--chunk-size", "big"], "not a size"),
        (["--level", "99"], "level"),
    ],
)
def test_convert_bad_options(runner, tiny_llama, tmp_path, args, message):
    r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(tmp_path / "m.cllm"), *args])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m.cllm").exists()


def test_convert_bad_source_is_one_line(runner, tmp_path):
    r = runner.invoke(convert_cmd, [str(tmp_path), "-o", str(tmp_path / "m.cllm")])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and r.output.startswith("error:") and "config.json" in r.output


def test_dump_json_totals_equal_file_bytes(runner, tiny_llama, tmp_path):
    out = tmp_path / "m.cllm"
    runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(out)])
    r = runner.invoke(dump_cmd, [str(out), "--json", "--verify"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    t = info["totals"]
    assert info["header_bytes"] + t["bytes_stored"] + t["bytes_files"] == info["file_bytes"] == os.path.getsize(out)
    assert sum(row["bytes_stored"] for row in info["tensors"]) == t["bytes_stored"]
    assert info["verified"] is True and info["format_version"] == 2


def test_dump_table(runner):
    r = runner.invoke(dump_cmd, [str(DATA / "golden.cllm")])
    assert r.exit_code == 0, r.output
    assert "model.embed_tokens.weight" in r.output and "zstd" in r.output and "total: 11 tensors" in r.output
    r = runner.invoke(dump_cmd, [str(DATA / "golden.cllm"), "--no-tensors"])
    assert "q_proj" not in r.output and "total:" in r.output


def test_dump_verify_catches_corruption(runner, tmp_path, golden_bytes):
    bad = bytearray(golden_bytes)
    bad[-40] ^= 0xFF
    (tmp_path / "bad.cllm").write_bytes(bytes(bad))
    r = runner.invoke(dump_cmd, [str(tmp_path / "bad.cllm"), "--verify"])
    assert r.exit_code == 1 and "sha256" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("content", [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{", b"garbage garbage"])
def test_dump_bad_files(runner, tmp_path, content):
    (tmp_path / "bad.cllm").write_bytes(content)
    r = runner.invoke(dump_cmd, [str(tmp_path / "bad.cllm")])
    assert r.exit_code == 1 and r.output.startswith("error:") and r.output.count("\n") == 1


def test_dump_missing_file(runner, tmp_path):
    r = runner.invoke(dump_cmd, [str(tmp_path / "nope.cllm")])
    assert r.exit_code == 1 and "No such file" in r.output


def test_dump_escapes_control_characters(runner, tmp_path):
    import struct

    from conftest import read_header

    header, doc = read_header(DATA / "golden.cllm")
    raw = (DATA / "golden.cllm").read_bytes()
    data = raw[8 + struct.unpack("<Q", raw[:8])[0]:]
    evil = "model.norm.weight\x1b[31m\n"
    header[evil] = header.pop("model.norm.weight")
    doc["tensors"][evil] = doc["tensors"].pop("model.norm.weight")
    doc["tensors"][evil]["parts"]["data"]["tensor"] = evil
    header["__metadata__"] = {"codecllm": json.dumps(doc)}
    h = json.dumps(header).encode()
    (tmp_path / "evil.cllm").write_bytes(struct.pack("<Q", len(h)) + h + data)
    r = runner.invoke(dump_cmd, [str(tmp_path / "evil.cllm")])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\\x1b[31m\\n" in r.output


def test_skip_that_matches_nothing_warns(runner, tiny_llama, tmp_path):
    r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(tmp_path / "m.cllm"), "--skip", "*.nothing"])
    assert r.exit_code == 0 and "warning: --skip '*.nothing' matches no module" in r.stderr


def test_config_that_disagrees_is_one_line(runner, tmp_path):
    import json

    from conftest import llama_config, save_tiny

    src = save_tiny(tmp_path / "src", llama_config())
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_size"] = 32
    (src / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(convert_cmd, [str(src), "-o", str(tmp_path / "m.cllm")])
    assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert "the checkpoint holds shape" in r.output and "the config makes" in r.output
