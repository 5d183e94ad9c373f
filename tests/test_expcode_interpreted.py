"""The exponent-coded bfloat16 layout that lossless stream mode computes from on CUDA
(``codecllm.kernels.expcode_triton``): its encoding, and its kernels' logic under Triton's interpreter
(tests/test_gpu.py checks them compiled, and measures nothing: scripts/bench_gpu.py does)."""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import codecllm  # noqa: E402
from codecllm.kernels import expcode_triton as expcode  # noqa: E402
from codecllm.kernels import launch  # noqa: E402
from codecllm.schemes import get_scheme  # noqa: E402
from codecllm.schemes.lossless import exponents  # noqa: E402
from codecllm.schemes.lossless.cuda import LosslessCudaLinear  # noqa: E402
from conftest import llama_config, save_tiny  # noqa: E402

interpreted = pytest.mark.skipif(not launch.INTERPRET, reason="runs under Triton's interpreter (no CUDA device)")


def layout_of(w: torch.Tensor) -> dict:
    parts = get_scheme("lossless").quantize(w)
    return expcode.encode(parts["data"], exponents(parts))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def every_pattern() -> torch.Tensor:
    """Every bfloat16 bit pattern (NaNs, infinities, zeros, subnormals), shuffled, as a [256, 256] weight."""
    p = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    return p[torch.randperm(p.numel(), generator=torch.Generator().manual_seed(0))].view(torch.bfloat16).reshape(256, 256)


def with_outliers(n: int, k: int, seed: int = 0, every: int = 50) -> torch.Tensor:
    """Random-normal weights (std 0.02) with about one in ``every`` far outside the 15 exponents of the
    bulk: escapes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    idx = torch.randint(0, n * k, (max(3, n * k // every),), generator=g)
    w.view(-1)[idx] = torch.tensor([3.0, -1e-30, 0.0, 1e-39, -250.0])[torch.arange(idx.numel()) % 5]
    return w.to(torch.bfloat16)


def test_encoding_by_hand():
    # exponents 127 (1.0), 128 (2.0), 127 and 0 (a zero): the window starts at the lowest start that holds
    # the most of them, 114 (114..128 hold three); the zero escapes
    w = torch.tensor([[1.0, -2.0], [1.5, 0.0]], dtype=torch.bfloat16)
    t = layout_of(w)
    assert t["base"] == 114
    assert t["sm"].tolist() == [[0x00, 0x80], [0x40, 0x00]]
    assert t["code"].tolist() == [[13 | 14 << 4], [13 | 15 << 4]]  # (n, j) low nibble, (n, j + K/2) high
    assert t["row_ptr"].tolist() == [0, 0, 1] and t["esc_row"].tolist() == [1] and t["esc_col"].tolist() == [1]
    assert t["esc_bits"].tolist() == [0]
    assert expcode.nbytes(t) == 4 + 2 + 12 + 4 + 4 + 2


def test_every_bit_pattern_round_trips():
    w = every_pattern()
    t = layout_of(w)
    assert torch.equal(bits(expcode.decode_reference(t)), bits(w))
    assert 0 < t["esc_row"].numel() < w.numel()
    with pytest.raises(ValueError, match="even number of columns"):
        layout_of(torch.zeros(2, 3, dtype=torch.bfloat16))


def test_random_normal_escapes_are_rare():
    """15 exponent values hold nearly all of a random-normal weight: 12 bits per weight and a little."""
    w = (torch.randn(128, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    t = layout_of(w)
    assert t["esc_row"].numel() < 5e-4 * w.numel()
    assert expcode.nbytes(t) < 0.752 * w.numel() * 2


@interpreted
def test_decode_kernel_is_bit_exact():
    w = every_pattern()
    t = layout_of(w)
    out = torch.full_like(w, 7.0)
    assert torch.equal(bits(expcode.decode_into(t, 0, 256, out)), bits(w))
    rows = torch.empty(37, 256, dtype=torch.float32)  # a block of rows, rounded to another dtype
    expcode.decode_into(t, 100, 137, rows)
    want = w[100:137].float()
    assert torch.equal(rows.isnan(), want.isnan()) and torch.equal(rows.nan_to_num(), want.nan_to_num())


@interpreted
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_the_weight(split, dtype, bias, monkeypatch):
    n, k = 37, 260
    w = with_outliers(n, k)
    t = layout_of(w)
    assert t["esc_row"].numel() > 0
    b = torch.randn(n).to(dtype) if bias else None
    x = torch.randn(1, k).to(dtype)
    monkeypatch.setitem(expcode.INTERPRET_GEMV, "SPLIT_K", split)
    y = expcode.ExpCodeMatmul(t, b)(x)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert y.dtype == dtype and y.shape == (1, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    # more rows: cuBLAS (here torch) on the weight decoded a block at a time
    x3 = torch.randn(2, 3, k).to(dtype)
    y3 = expcode.ExpCodeMatmul(t, b)(x3)
    assert torch.equal(y3, torch.nn.functional.linear(x3, w.to(dtype), b))
    with pytest.raises(ValueError, match="input has 5 features, the weight 260"):
        expcode.ExpCodeMatmul(t, b)(torch.randn(1, 5))


@interpreted
def test_stand_in_computes_and_decodes_its_weight():
    lin = nn.Linear(64, 24, bias=True, dtype=torch.bfloat16).requires_grad_(False)
    w = with_outliers(24, 64, seed=2, every=200)  # under the share at which the stand-in falls back
    parts = get_scheme("lossless").quantize(w)
    m = LosslessCudaLinear.from_float(lin, get_scheme("lossless"), parts, torch.float32, torch.device("cpu"))
    assert isinstance(m, LosslessCudaLinear) and m.esc_row.numel() > 0
    assert isinstance(m, nn.Linear) and m.weight.shape == (24, 64) and m.weight.dtype == torch.float32
    assert torch.equal(bits(m.dequantized().to(torch.bfloat16)), bits(w))
    x = torch.randn(1, 1, 64)
    ref = torch.nn.functional.linear(x, w.float(), lin.bias.float())
    assert torch.allclose(m(x), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(m(x.expand(1, 4, 64)), ref.expand(1, 4, 24), rtol=1e-5, atol=1e-5)
    assert "exponent-coded" in repr(m)


def test_stand_in_falls_back_to_a_dense_linear_where_escapes_abound():
    """A 2:4-sparse weight's zeros all escape: the layout would hold more than the bfloat16 bytes, so the
    layer gets its decoded weight as a plain Linear (bias kept), bit for bit."""
    lin = nn.Linear(64, 24, bias=True, dtype=torch.bfloat16).requires_grad_(False)
    w = (torch.randn(24, 64, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    w.view(-1, 4)[:, :2] = 0
    m = LosslessCudaLinear.from_float(lin, get_scheme("lossless"), get_scheme("lossless").quantize(w), torch.bfloat16, torch.device("cpu"))
    assert type(m) is nn.Linear and m.bias is lin.bias
    assert torch.equal(bits(m.weight), bits(w))


@interpreted
def test_gemv_escape_loop_runs_several_rounds():
    """Rows with more escapes than one round of the escape loop handles (one in eight weights escapes)."""
    n, k = 9, 256
    g = torch.Generator().manual_seed(4)
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 0.125] = 1e-30
    w = w.to(torch.bfloat16)
    t = layout_of(w)
    per_block = t["row_ptr"][4::4] - t["row_ptr"][:-4:4]
    assert int(per_block.max()) > 2 * expcode._ESC_BLOCK  # the rows of one program (4 under the interpreter)
    x = torch.randn(1, k)
    ref = x.double() @ w.double().T
    assert torch.allclose(expcode.ExpCodeMatmul(t)(x).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype,compact", [(torch.bfloat16, True), (torch.float16, False)], ids=["bf16", "fp16"])
def test_cuda_stream_mode_keeps_bf16_linear_weights_exponent_coded(tmp_path, dtype, compact):
    """Which records a CUDA stream load would re-encode: every bf16 Linear weight (the untied head too),
    nothing else, with either stream codec (``gpu_stream_codec="ans"``: the small stand-in); a float16
    file has no such stand-in (its weights load decoded)."""
    from codecllm.format import CllmFile
    from codecllm.loader import _parent, _stand_in, _streamed
    from codecllm.schemes.lossless.cuda import LosslessCudaLinear, LosslessSmallLinear

    from codecllm.architecture import empty_model

    src = save_tiny(tmp_path / "m", llama_config(), dtype=dtype)
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="lossless")
    with CllmFile(out) as f:
        model = empty_model(f.config(), dtype)
        targets = {n: [(n, *_parent(model, n))] for n in f.doc.tensors if n.endswith("weight")}
        streamed = _streamed(f.doc, targets, ("cuda-stream",))
        assert _streamed(f.doc, targets, ("cuda-stream-ans", "cuda-stream")) == streamed
        rec, module = f.doc.tensors["lm_head.weight"], model.lm_head
        kinds = [_stand_in(rec, module, keys) for keys in (("cuda-stream",), ("cuda-stream-ans", "cuda-stream"))]
    linears = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert streamed == (linears if compact else set())
    assert "lm_head.weight" in linears
    assert kinds == ([LosslessCudaLinear, LosslessSmallLinear] if compact else [None, None])


def test_small_layers_group_without_growing_the_workspace():
    """Lossless small stream mode decodes neighbouring single-block layers in one nvCOMP call: runs of them
    up to the largest single-block layer's codes (L8x4: q, k, v and o together; gate, up, down alone), a
    layer of several blocks (the head) alone, so the workspace is what the largest block needs anyway."""
    from codecllm.schemes.lossless.cuda import SMALL_BLOCK_BYTES, _groups, _workspace_bytes

    mib = 1 << 20
    layer = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
    sizes = [n * k // 2 for n, k in layer]
    assert _groups(sizes * 2 + [None]) == [[0, 1, 2, 3], [4], [5], [6], [7, 8, 9, 10], [11], [12], [13]]
    assert _workspace_bytes(layer * 4) == 28 * mib  # a gate projection's codes
    assert _workspace_bytes(layer * 4 + [(128256, 4096)]) == SMALL_BLOCK_BYTES  # the head's blocks
    assert _groups([100, None, 300, 50]) == [[0], [2], [3]] and _groups([]) == [] and _groups([None]) == []
