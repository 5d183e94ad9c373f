"""The ``int4`` scheme on the CPU: its layout, its packing, its quantizer against round-to-nearest, and a
model through convert, load and dump (the real-model floor: test_smollm2.py)."""

import re

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import codecllm
import codecllm.schemes.int4 as int4
from codecllm.cli import convert_cmd, dump_cmd
from codecllm.errors import CodecLLMError, FormatError
from codecllm.quality import sqnr_db
from codecllm.schemes import get_scheme


def rtn(w: torch.Tensor, gs: int) -> torch.Tensor:
    """Plain asymmetric round-to-nearest over each group's min..max, dequantized (the reference point)."""
    n, k = w.shape
    g = w.float().reshape(n, k // gs, gs)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    return ((torch.clamp(torch.round(g / s) + z, 0, 15) - z) * s).reshape(n, k)


@pytest.mark.parametrize("k,gs", [(64, 64), (100, 64), (98, 32), (576, 128)], ids=lambda v: str(v))
def test_layout_and_packing(k, gs):
    """Parts have the layout's shapes and dtypes; two codes per byte, the even column low; a last group
    shorter than the others is quantized on its own weights; rows gather as the table dequantizes."""
    s = get_scheme("int4", {"group_size": gs})
    w = torch.randn(37, k, generator=torch.Generator().manual_seed(k)) * 0.02
    parts = s.quantize(w)
    layout = s.layout("F16", (37, k))
    dtypes = {"U8": torch.uint8, "F16": torch.float16}
    assert {n: (p.dtype, tuple(p.shape)) for n, p in parts.items()} == {n: (dtypes[p.dtype], p.shape) for n, p in layout.items()}
    q = torch.stack([parts["qweight"] & 15, parts["qweight"] >> 4], -1).reshape(37, k).float()
    g = torch.arange(k) // gs
    expect = (q - parts["zero"].float()[:, g]) * parts["scale"].float()[:, g]
    d = s.dequantize(parts, torch.float32)
    assert torch.equal(d, expect)
    assert sqnr_db(w, d) > 17  # 4 bits: about 6 dB per bit, less the range's spread
    ids = torch.tensor([[3, 5], [0, 36]])
    assert torch.equal(s.embedding(parts, ids, torch.float32), d[ids])


def test_quantizer_beats_round_to_nearest():
    """Less squared error than plain RTN on every weight mix tried: normal weights, a heavy tail, and
    outliers; deterministic. Measured: 0.86x, 0.88x and 0.90x of RTN's error."""
    torch.manual_seed(0)
    normal = torch.randn(64, 512) * 0.02
    tail = torch.distributions.StudentT(3.0).sample((64, 512)) * 0.02
    outliers = normal.clone()
    outliers[:, ::97] *= 12
    s = get_scheme("int4", {"group_size": 64})
    for w in (normal, tail, outliers):
        ours = ((s.dequantize(s.quantize(w), torch.float32) - w) ** 2).sum()
        plain = ((rtn(w, 64) - w) ** 2).sum()
        assert ours < 0.93 * plain, (float(ours), float(plain))
    assert all(torch.equal(a, b) for a, b in zip(s.quantize(tail).values(), s.quantize(tail).values()))


def test_constant_zero_and_tiny_groups_decode_finite():
    """A group whose weights are all equal (or all zero, or within a range fp16 cannot resolve as a scale)
    decodes to finite values close to its own: the scale has a floor."""
    w = torch.full((4, 128), 0.02)
    w[0, :64] = 0.5
    w[1, :64] = 0.0
    w[2, :64] = -0.3
    w[2, 64:] = 1e-7 * torch.arange(64)
    w[3, :64] = 0.02
    w[3, 5] = 0.0201
    s = get_scheme("int4")
    d = s.dequantize(s.quantize(w), torch.float32)
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d, w, rtol=2e-3, atol=1e-6)


def test_parameters_and_odd_widths():
    assert get_scheme("int4").params == {"group_size": 64}
    for bad in (48, 0, True, "64", 64.0):
        with pytest.raises(CodecLLMError, match="group_size must be one of 32, 64, 128"):
            get_scheme("int4", {"group_size": bad})
    s = get_scheme("int4")
    assert not s.applies_to(nn.Linear(7, 4), "weight", (4, 7), True)  # odd K: left to another scheme
    assert s.applies_to(nn.Linear(8, 4), "weight", (4, 8), True)
    with pytest.raises(FormatError, match="even number of input features"):
        s.layout("F16", (4, 7))


def test_model_end_to_end(tiny_llama, tmp_path):
    """CLI convert with --group-size, load in both modes (equal), close to the original; dump verifies and
    shows the scheme with its group size; none takes no group size."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m.cllm"
    r = CliRunner().invoke(convert_cmd, [str(tiny_llama), "-o", str(out), "--quant", "int4", "--group-size", "32"])
    assert r.exit_code == 0, r.output
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        resident = codecllm.load(out)(ids).logits
        stream = codecllm.load(out, mode="stream")(ids).logits
        assert torch.equal(resident, stream)
        assert sqnr_db(ref(ids).logits, resident) > 10
    # bits per weight by scheme (fp16 norms and edge projections: 16 bits before zstd)
    assert re.search(r"bits per weight over all tensors: int4\(group_size=32\) 4\.\d\d \(21 tensors\); none 1\d\.\d\d \(9 tensors\)", r.output), r.output
    r = CliRunner().invoke(dump_cmd, [str(out), "--verify"])
    assert r.exit_code == 0 and "int4(group_size=32)" in r.output, r.output
    r = CliRunner().invoke(convert_cmd, [str(tiny_llama), "-o", str(tmp_path / "x.cllm"), "--quant", "none", "--group-size", "32"])
    assert r.exit_code == 1 and "scheme 'none' takes no parameter 'group_size'" in r.output
    assert not (tmp_path / "x.cllm").exists()


def test_constants_are_what_the_docstring_says():
    assert (int4.CLIP_GRID, int4.CLIP_MIN, int4.REFITS, int4.GROUP_SIZES) == (8, 0.7, 2, (32, 64, 128))


def test_quant_overrides(tiny_llama, tmp_path):
    """--quant-override PATTERN=SCHEME: the last matching pattern wins, over the default and the edge rule
    (the first and last blocks' down_proj); ``none`` keeps a module exact; a pattern matching nothing is a
    warning; a malformed one a one-line error, and no file is written."""
    from codecllm.format import CllmFile

    out = tmp_path / "m.cllm"
    summary = codecllm.convert(tiny_llama, out, quant="int4", overrides=[
        ("model.embed_tokens", "int8"), ("*.down_proj", "int4:g32"), ("*.0.mlp.up_proj", "int8"),
        ("*.0.mlp.up_proj", "none"), ("nothing.here", "int8")])
    with CllmFile(out) as f:
        schemes = {n: repr(r.scheme) for n, r in f.doc.tensors.items()}
    assert schemes["model.embed_tokens.weight"] == "int8"
    assert {schemes[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(3)} == {"int4(group_size=32)"}
    assert schemes["model.layers.0.mlp.up_proj.weight"] == "none"
    assert schemes["model.layers.1.mlp.up_proj.weight"] == "int4(group_size=64)"
    assert summary.warnings == ["--quant-override 'nothing.here' matches no module"]
    # an override naming the --quant scheme alone takes --group-size
    codecllm.convert(tiny_llama, tmp_path / "g.cllm", quant="int4", group_size=32, overrides=[("*.up_proj", "int4")])
    with CllmFile(tmp_path / "g.cllm") as f:
        assert repr(f.doc.tensors["model.layers.1.mlp.up_proj.weight"].scheme) == "int4(group_size=32)"
    codecllm.load(out)(torch.tensor([[1, 2, 3]]))
    for bad, message in (("x", "'x' is not PATTERN=SCHEME"), ("a=int4:q3", "'q3' is not a parameter"), ("a=int4:g\u00b2", "is not a parameter"),
                         ("a=int4:g32,g64", "'g64' is not a parameter"),
                         ("a=int4:g48", "group_size must be one of"), ("a=int9", "unknown quantization scheme id 'int9'")):
        r = CliRunner().invoke(convert_cmd, [str(tiny_llama), "-o", str(tmp_path / "z.cllm"), "--quant-override", bad])
        assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "z.cllm").exists()


@pytest.mark.parametrize("k", [128, 100], ids=["K128", "K100"])
def test_int8_groups(k):
    """``int8`` with a group size: one fp16 scale per group along K (the last one shorter where K is not a
    multiple), no farther in any group than max|w| / 127 rounded to fp16 (the first clipping factor);
    closer than per-row scales on weights whose rows mix scales; no CUDA stand-in (the CUDA kernels take
    one scale per row: the loader keeps such weights dense)."""
    torch.manual_seed(k)
    w = torch.randn(6, k) * 0.02
    w[:, :32] *= 10  # one loud group per row
    s = get_scheme("int8", {"group_size": 32})
    assert s.params == {"group_size": 32} and get_scheme("int8").params == {}
    parts = s.quantize(w)
    assert parts["scale"].dtype == torch.float16 and tuple(parts["scale"].shape) == (6, -(-k // 32))
    assert {n: tuple(p.shape) for n, p in parts.items()} == {n: p.shape for n, p in s.layout("F16", (6, k)).items()}
    g = torch.arange(k) // 32
    absmax = (torch.stack([w[:, g == i].abs().amax(1) for i in range(g.max() + 1)], 1) / 127).half().float()[:, g]
    plain = torch.round(w / absmax).clamp(-127, 127) * absmax
    d = s.dequantize(parts, torch.float32)
    assert torch.equal(d, parts["qweight"].float() * parts["scale"].float()[:, g])
    per_group = lambda x: torch.zeros(6, g.max() + 1).index_add_(1, g, (x - w) ** 2)  # noqa: E731
    assert (per_group(d) <= per_group(plain)).all() and per_group(d).sum() < per_group(plain).sum()
    per_row = get_scheme("int8")
    assert ((d - w) ** 2).sum() < 0.5 * ((per_row.dequantize(per_row.quantize(w), torch.float32) - w) ** 2).sum()
    ids = torch.tensor([[1, 4], [5, 0]])
    assert torch.equal(s.embedding(parts, ids, torch.float32), d[ids])
    assert s.stand_in(nn.Linear(k, 6), "cuda") is None and s.stand_in(nn.Linear(k, 6), "cpu") is not None
    assert per_row.stand_in(nn.Linear(k, 6), "cuda") is not None
    with pytest.raises(CodecLLMError, match="int8 group_size must be one of 32, 64, 128"):
        get_scheme("int8", {"group_size": 16})


@pytest.mark.parametrize("spec", ["int4", "int8:g64"])
def test_importance_weighs_the_error(spec):
    """With a per-column importance, the error weighted by it is smaller than without (a few loud columns,
    as transformer inputs have), the plain error a little larger; None is plain squared error."""
    from codecllm.schemes import parse_scheme

    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02
    imp = torch.ones(256)
    imp[::37] = 100.0
    s = parse_scheme(spec)
    assert s.weighs_inputs and not get_scheme("int8").weighs_inputs

    def errors(importance):
        d = s.dequantize(s.quantize(w, importance), torch.float32)
        return float((imp * (d - w) ** 2).sum()), float(((d - w) ** 2).sum())

    weighted, plain = errors(imp), errors(None)
    assert weighted[0] < 0.9 * plain[0] and weighted[1] > plain[1], (weighted, plain)
    # equal importance everywhere is plain squared error
    assert all(torch.equal(a, b) for a, b in zip(s.quantize(w).values(), s.quantize(w, torch.ones(256)).values()))


def test_int8_groups_end_to_end(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "g.cllm"
    codecllm.convert(tiny_llama, out, quant="int8", group_size=32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = codecllm.load(out)(ids).logits, codecllm.load(out, mode="stream")(ids).logits
        assert torch.equal(a, b) and sqnr_db(ref(ids).logits, a) > 35


def test_cpu_kernel_path(tmp_path):
    """Up to 32 rows, a weight the int4 kernel takes (N a multiple of 16, K of 32 and the group size) runs
    there on codes packed once (bf16 activations: within 1% of the dequantized weight's product); more
    rows, or a weight it does not take, compute with the dequantized weight exactly."""
    from codecllm.schemes.int4 import Int4Linear

    torch.manual_seed(0)
    for (n, k, gs, fits) in [(48, 192, 64, True), (40, 192, 64, False), (48, 200, 32, False)]:
        scheme = get_scheme("int4", {"group_size": gs})
        parts = scheme.quantize(torch.randn(n, k))
        layer = Int4Linear(scheme, parts, (n, k), torch.float32, torch.device("cpu"), n, k, nn.Parameter(torch.randn(n)))
        w = scheme.dequantize(parts, torch.float64)
        for m in (1, 32, 33):
            x = torch.randn(m, k)
            ref = x.double() @ w.T + layer.bias.double()
            y = layer(x)
            assert y.dtype == torch.float32 and y.shape == (m, n)
            if fits and m <= 32:
                assert "_int4pack" in layer.__dict__
                assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
            else:
                assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6
        assert ("_int4pack" in layer.__dict__) == fits


def test_default_recipe_gives_embedding_and_values_finer_groups(tiny_llama, tmp_path):
    """By default the input embedding and the attention value projections take half the group size, the
    other int4 weights the scheme's; ``quantize_all`` quantizes every weight with the scheme as given."""
    from codecllm.format import CllmFile

    def group_sizes(**kw):
        out = tmp_path / f"r{len(kw)}.cllm"
        codecllm.convert(tiny_llama, out, quant="int4", group_size=64, **kw)
        with CllmFile(out) as f:
            return {n: r.scheme.params.get("group_size") for n, r in f.doc.tensors.items() if r.scheme.id == "int4"}

    finer = {n for n, g in group_sizes().items() if g == 32}
    assert finer == {"model.embed_tokens.weight"} | {f"model.layers.{i}.self_attn.v_proj.weight" for i in range(3)}
    assert set(group_sizes(quantize_all=True).values()) == {64}
