"""The ``lossless`` scheme: every tensor bit for bit in entropy-coded byte planes (format_spec.md 3.1)."""

import json
import os
from pathlib import Path

import pytest
import torch

import codecllm
from codecllm.dtypes import dtype_name
from codecllm.format import CllmFile
from codecllm.schemes import PartSpec, get_scheme
from codecllm.schemes.lossless import BLOCK
from codecllm.source import Checkpoint
from conftest import llama_config, save_tiny

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(*(t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)))


def special(dtype) -> torch.Tensor:
    """Every 16-bit pattern (float32: each as the high half, over random low halves), and signed zeros,
    infinities, NaN, subnormals and extremes."""
    every = torch.arange(-2**15, 2**15, dtype=torch.int32)
    values = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-45, 6e-8, -3e38, 1.0])
    if dtype == torch.float32:
        low = torch.randint(0, 2**16, every.shape, generator=torch.Generator().manual_seed(1), dtype=torch.int32)
        return torch.cat([((every << 16) | low).view(torch.float32), values])
    return torch.cat([every.to(torch.int16).view(dtype), values.to(dtype)])


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5), (64, 33), (2, 3, 4), (3, 2 * BLOCK // 3 + 1)], ids=str)  # the last: two blocks and an odd tail
def test_round_trip_is_bit_exact(dtype, shape):
    s = get_scheme("lossless")
    torch.manual_seed(0)
    for w in ((torch.randn(shape) * 0.02).to(dtype), (torch.randn(shape) * 300).to(dtype)):
        parts = s.quantize(w)
        layout = s.layout(dtype_name(dtype), shape)
        assert {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in parts.items()} == {n: (p.dtype, p.shape) for n, p in layout.items()}
        assert same_bits(s.dequantize(parts, None), w)


@pytest.mark.parametrize("n", [1, 7, 70001])
def test_one_block_as_on_a_gpu(monkeypatch, n):
    """On a GPU the planes are split and joined in one block (each step a kernel launch): that path, here."""
    import codecllm.schemes.lossless as lossless

    monkeypatch.setattr(lossless, "_block", lambda t: max(t.numel() + t.numel() % 2, 2))
    s = get_scheme("lossless")
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        w = torch.cat([torch.randn(n) * 0.02, torch.randn(n) * 1e30])[torch.randperm(2 * n)][:n].to(dtype)
        assert same_bits(s.dequantize(s.quantize(w), None), w)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
def test_special_values_and_every_bit_pattern(dtype):
    s = get_scheme("lossless")
    w = special(dtype)
    assert same_bits(s.dequantize(s.quantize(w), None), w)
    assert same_bits(s.dequantize(s.quantize(w[1::3]), None), w[1::3])  # a strided view


def test_planes_by_hand():
    """The bytes the spec (format_spec.md 3.1) gives for three bfloat16 weights and one float32 weight."""
    s = get_scheme("lossless")
    w = torch.tensor([0x3C01, 0xBC7F, 0x0080], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    # exponents 0x78, 0x78, 0x01: base 0x69, the lowest start of 16 values holding two of them; offsets
    # 0x0F, 0x0F and (0x01 - 0x69) mod 256 = 0x98
    p = s.quantize(w)
    assert p["data"].tolist() == [0x01, 0xFF, 0x00] and p["base"].tolist() == [0x69]
    assert p["exponent"].tolist() == [0xFF, 0x08] and p["exponent_high"].tolist() == [0x00, 0x09]
    f = torch.tensor([0x3F80_1234], dtype=torch.int32).view(torch.float32)  # 1.0000...: exponent 0x7F
    p = s.quantize(f)
    assert p["data"].tolist() == [[0x34, 0x12]] and p["signmant"].tolist() == [0x00] and p["base"].tolist() == [0x70]
    assert p["exponent"].tolist() == [0x0F] and p["exponent_high"].tolist() == [0x00]


def test_other_dtypes_are_stored_as_they_are():
    s = get_scheme("lossless")
    for w in (torch.arange(10), torch.tensor([True, False]), torch.randn(4, 3, dtype=torch.float64), torch.arange(5, dtype=torch.uint8)):
        parts = s.quantize(w)
        assert list(parts) == ["data"] and s.layout(dtype_name(w.dtype), tuple(w.shape)) == {"data": PartSpec(dtype_name(w.dtype), tuple(w.shape))}
        assert torch.equal(s.dequantize(parts, None), w)


def test_exponents_outside_the_window_round_trip():
    """The exponent window (16 values from ``base``) covers most weights; the others, here half of them, far
    above and below it, come back through the high nibbles."""
    s = get_scheme("lossless")
    w = torch.cat([torch.randn(1000) * 0.01, torch.randn(500) * 1e30, torch.randn(500) * 1e-30]).to(torch.bfloat16)
    parts = s.quantize(w)
    assert parts["exponent_high"].any()
    assert same_bits(s.dequantize(parts, None), w)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", ["resident", "stream"])
def test_model_bit_exact(tmp_path, dtype, mode):
    """Every tensor of a converted model comes back bit for bit, norms and embedding included, and the
    loaded model computes exactly what transformers' own load of the checkpoint computes (both in fp32).
    Stream mode has no lossless stand-ins yet: the weights load decoded, as ordinary parameters."""
    from transformers import AutoModelForCausalLM

    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=2), dtype=dtype)
    out = tmp_path / "m.cllm"
    summary = codecllm.convert(src, out, quant="lossless")
    assert {t["scheme"] for t in summary.to_json()["tensors"]} == {"lossless"}
    ck = Checkpoint(src)
    with CllmFile(out) as f:
        for rec in f.doc.tensors.values():
            assert same_bits(rec.scheme.dequantize({n: f.read_part(rec, p) for n, p in rec.parts.items()}, None), ck.read(rec.name))
    model = codecllm.load(out, mode=mode)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_random_bf16_ratio(tmp_path):
    """Random-normal bf16 weights (std 0.02; the order-0 bound of their byte planes is 1.52x): at least
    1.48x smaller than their safetensors file (measured: 1.507x)."""
    cfg = llama_config(num_hidden_layers=2, hidden_size=512, intermediate_size=1536, vocab_size=4096, num_attention_heads=8,
                       num_key_value_heads=4)
    src = save_tiny(tmp_path / "bf16", cfg, dtype=torch.bfloat16)  # transformers' initialization: std 0.02, norms 1
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="lossless")
    ratio = (src / "model.safetensors").stat().st_size / out.stat().st_size
    assert ratio >= 1.48, ratio
    ck = Checkpoint(src)
    with CllmFile(out) as f:
        assert max(len(p.chunks) for r in f.doc.tensors.values() for p in r.parts.values()) > 1
        for rec in f.doc.tensors.values():
            assert same_bits(rec.scheme.dequantize({n: f.read_part(rec, p) for n, p in rec.parts.items()}, None), ck.read(rec.name))


@pytest.mark.parametrize("quant, override, stored", [("int8", "lossless", "lossless"), ("lossless", "none", "none")])
def test_overrides_to_bit_exact_schemes(tmp_path, quant, override, stored):
    """``--quant-override`` to ``lossless`` or ``none`` stores those modules with that scheme, whatever ``--quant``."""
    src = save_tiny(tmp_path / "m", llama_config(), dtype=torch.bfloat16)
    summary = codecllm.convert(src, tmp_path / "m.cllm", quant=quant, overrides=[("*.mlp.*", override)])
    schemes = {t["name"]: t["scheme"] for t in summary.to_json()["tensors"]}
    assert {schemes[n] for n in schemes if ".mlp." in n} == {stored}


@pytest.mark.slow
def test_smollm2_fp16_ratio(smollm2_src, tmp_path):
    """SmolLM2's fp16 weights (the order-0 bound of their byte planes is 1.206x): at least 1.18x smaller
    (measured: 1.193x), every tensor bit for bit."""
    out = tmp_path / "s.cllm"
    codecllm.convert(smollm2_src, out, quant="lossless")
    assert os.path.getsize(Path(smollm2_src) / "model.safetensors") / os.path.getsize(out) >= 1.18
    ck = Checkpoint(smollm2_src)
    with CllmFile(out) as f:
        for rec in f.doc.tensors.values():
            assert same_bits(rec.scheme.dequantize({n: f.read_part(rec, p) for n, p in rec.parts.items()}, None), ck.read(rec.name))


def test_cli_and_dump(tmp_path):
    """``--quant lossless`` on the command line; the dump names the scheme and its parts' codecs."""
    from click.testing import CliRunner

    from codecllm.cli import convert_cmd, dump_cmd

    src = save_tiny(tmp_path / "m", llama_config(), dtype=torch.bfloat16)
    out = tmp_path / "m.cllm"
    r = CliRunner().invoke(convert_cmd, [str(src), "-o", str(out), "--quant", "lossless"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(dump_cmd, [str(out), "--verify"])
    assert r.exit_code == 0, r.output
    assert "lossless" in r.output


def test_record_dtype_decides_the_layout(tmp_path):
    """A BF16 record's planes relabelled as F16 do not make F16's layout: the reader refuses the file."""
    from codecllm.errors import FormatError
    from conftest import read_header

    src = save_tiny(tmp_path / "m", llama_config(), dtype=torch.bfloat16)
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="lossless")
    header, doc = read_header(out)
    name = next(iter(doc["tensors"]))
    doc["tensors"][name]["dtype"] = "F16"
    header["__metadata__"] = {"codecllm": json.dumps(doc)}
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    bad = tmp_path / "bad.cllm"
    bad.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    with pytest.raises(FormatError, match=name):
        CllmFile(bad).close()
