"""The fused int4 kernels' logic, checked on the CPU under Triton's interpreter (tests/test_gpu_int4.py
checks the compiled kernels and scripts/bench_kernel.py --int4 times them)."""

import pytest
import torch

pytest.importorskip("triton")

from codecllm.kernels import int4_triton  # noqa: E402
from codecllm.kernels import launch  # noqa: E402
from codecllm.kernels.int4_triton import Int4Matmul, int4_linear  # noqa: E402
from codecllm.schemes.int4 import Int4  # noqa: E402

interpreted = pytest.mark.skipif(not launch.INTERPRET, reason="runs under Triton's interpreter (no CUDA device)")


def parts_and_reference(n, k, gs, seed):
    torch.manual_seed(seed)
    scheme = Int4(gs)
    parts = scheme.quantize(torch.randn(n, k))
    return parts, scheme.dequantize(parts, torch.float64)


CASES = [  # M, N, K, group size, dtype, bias, K split
    (1, 12, 256, 64, torch.float32, True, 1), (1, 10, 100, 32, torch.float32, False, 1), (1, 7, 384, 128, torch.float16, False, 1),
    (1, 9, 640, 64, torch.float32, True, 3),  # split over programs, one of them empty
    (1, 6, 320, 32, torch.float32, True, 1), (1, 5, 576, 64, torch.float16, False, 2),
    (3, 20, 192, 64, torch.float16, True, 1), (5, 33, 130, 32, torch.float32, False, 1), (17, 18, 160, 32, torch.float32, True, 1),
    (16, 24, 512, 64, torch.float32, False, 4),
    # fp16 on 2-128 rows: the GEMM that dequantizes in registers (steps of two groups here), K not a
    # multiple of a step or a group, K split, several row tiles (grouped in pairs, the last group short);
    # from 129 rows the exact-code GEMM. (bf16 takes the same kernel; the interpreter's bf16 tl.dot is
    # wrong, so tests/test_gpu_int4.py checks it.)
    (16, 24, 512, 64, torch.float16, False, 4), (5, 33, 130, 32, torch.float16, False, 2), (40, 18, 320, 128, torch.float16, True, 1),
    (2, 7, 96, 32, torch.float16, True, 3), (70, 40, 256, 64, torch.float16, True, 1), (300, 10, 192, 64, torch.float16, True, 1),
    # fp16 at one row: the packed-fp16 GEMV, its blocks dividing N and K (no bounds checks) or not, K split;
    # K not a multiple of 8 falls back to the byte GEMV
    (1, 12, 512, 64, torch.float16, True, 1), (1, 9, 648, 32, torch.float16, True, 3), (1, 6, 100, 32, torch.float16, True, 1),
]


@interpreted
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-g{c[3]}-{str(c[4])[6:]}-{'bias' if c[5] else 'nobias'}-split{c[6]}")
def test_int4_matmul(case, monkeypatch):
    """The GEMV (one row) and the GEMM (more) against the scheme's own dequantization, K not
    a multiple of the group size among them; the split-K counters are left at zero."""
    m, n, k, gs, dtype, bias, split = case
    monkeypatch.setitem(int4_triton.INTERPRET_GEMV, "SPLIT_K", split)
    monkeypatch.setitem(int4_triton.INTERPRET_CONFIG, "SPLIT_K", split)
    monkeypatch.setitem(int4_triton.INTERPRET_DEQ, "SPLIT_K", split)
    parts, w = parts_and_reference(n, k, gs, m + n + k)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    ran = []
    for name in ("_int4_gemv_half2_kernel", "_int4_mm_deq_kernel"):
        kernel = getattr(int4_triton, name)
        monkeypatch.setattr(int4_triton, name, type("Spy", (), {"__getitem__": lambda _, g, name=name, kernel=kernel: ran.append(name) or kernel[g]})())
    y = int4_linear(x.reshape(1, m, k), parts["qweight"], parts["scale"], parts["zero"], gs, b)
    half2 = m == 1 and dtype == torch.float16 and k % 8 == 0  # which one-row kernel ran
    deq = 1 < m <= 128 and dtype != torch.float32  # which GEMM
    assert ran == ["_int4_gemv_half2_kernel"] * half2 + ["_int4_mm_deq_kernel"] * deq
    assert y.shape == (1, m, n) and y.dtype == dtype
    ref = x.double() @ w.T + (b.double() if bias else 0)
    err = ((y[0].double() - ref).norm() / ref.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 2e-3), err
    assert not launch.scratch_for(torch.device("cpu")).counts.any()


@interpreted
def test_int4_matmul_checks_its_parts():
    parts, _ = parts_and_reference(8, 64, 32, 0)
    q, s, z = parts["qweight"], parts["scale"], parts["zero"]
    with pytest.raises(ValueError, match="input has 60 features, the weight 64"):
        int4_linear(torch.randn(1, 60), q, s, z, 32)
    with pytest.raises(ValueError, match="int4 parts disagree"):
        Int4Matmul(q, s, z, 64)
    with pytest.raises(ValueError, match="contiguous"):
        Int4Matmul(q, s.t().contiguous().t(), z, 32)


@interpreted
@pytest.mark.parametrize("n,k", [(6, 200), (3, 4200)])  # one block along K; three (2048 columns each), the last short
def test_int4_dequantize_into(n, k):
    parts, w = parts_and_reference(n, k, 64, 1)
    out = torch.empty(n, k)
    int4_triton.dequantize_into(parts["qweight"], parts["scale"], parts["zero"], 64, out)
    assert torch.equal(out, w.float())


@interpreted
def test_int4_dequantize_into_any_even_group_size():
    """A group size that is not a power of two (the kernel API takes any even one; the scheme's are 32,
    64 and 128): scale and zero point gathered per weight, the same bits as float32 ``(q - zero) * scale``."""
    torch.manual_seed(0)
    n, k, gs = 5, 200, 48
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    s, z = torch.rand(n, -(-k // gs)).half() * 1e-2, (torch.rand(n, -(-k // gs)) * 15).half()
    codes = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(n, k).float()
    g = torch.arange(k) // gs
    ref = ((codes - z.float()[:, g]) * s.float()[:, g]).half()
    out = torch.empty(n, k, dtype=torch.float16)
    int4_triton.dequantize_into(q, s, z, gs, out)
    assert torch.equal(out, ref)


@interpreted
def test_int4_cuda_stand_ins_fuse_and_compile(tiny_llama, tmp_path):
    """The int4 CUDA stand-ins (their kernels run here under the interpreter): q/k/v and gate/up are
    learned as groups and run as one matmul each on a one-token input, matching the same file layer by
    layer; compiled, the model traces as one graph with one ``codecllm::int4_linear`` per group or layer."""
    import codecllm
    from codecllm.gpu.fusion import SiblingFusion
    from codecllm.schemes.int4 import Int4Linear
    from codecllm.schemes.int4.cuda import Int4CudaLinear

    codecllm.convert(tiny_llama, tmp_path / "m.cllm", quant="int4", group_size=64, quantize_all=True)  # one group size: q/k/v fuse
    model, plain = codecllm.load(tmp_path / "m.cllm"), codecllm.load(tmp_path / "m.cllm")
    for m in [*model.modules(), *plain.modules()]:
        if type(m) is Int4Linear:
            m.__class__ = Int4CudaLinear
    layers = [m for m in model.modules() if type(m) is Int4CudaLinear]
    fusion = SiblingFusion(layers)
    model.register_forward_hook(fusion.learn)
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    ids = torch.tensor([[5]])
    close = dict(rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, **close)  # learns the groups
        groups = {tuple(names[id(m)] for m in g.layers) for g in fusion.groups.values()}
        assert groups == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
        launches, matmuls = [], {g: g.matmul for g in fusion.groups.values()}
        for g, mm in matmuls.items():
            g.matmul = lambda x, run=mm: launches.append(1) or run(x)
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, **close)
        assert len(launches) == len(fusion.groups) == 2 * len(model.model.layers) and not fusion.kept
        for g, mm in matmuls.items():  # the compiled forward reads the group matmul's tensors
            g.matmul = mm
        explained = torch._dynamo.explain(model)(ids)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        op = torch.ops.codecllm.int4_linear
        calls = [n for g in explained.graphs for n in g.graph.nodes if n.op == "call_function" and n.target in (op, op.default)]
        assert len(calls) == len(layers) - sum(len(g.layers) - 1 for g in fusion.groups.values())
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
        torch.testing.assert_close(got, plain(ids).logits, **close)


@interpreted
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cublas_path_on_dequantized_blocks(scheme, monkeypatch):
    """The large-M alternative both schemes share (``launch.cublas_linear``): the weight dequantized a block
    of rows at a time into one workspace (here blocks of 16 rows of 40, the last one short), each block's
    product written to its columns of the output, with the bias."""
    from codecllm.kernels import int8_triton

    monkeypatch.setattr(launch, "DEQUANT_BLOCK_BYTES", 16 * 64 * 4)
    torch.manual_seed(3)
    x, b, y = torch.randn(5, 64), torch.randn(40), torch.empty(5, 40)
    if scheme == "int4":
        parts, w = parts_and_reference(40, 64, 32, 3)
        int4_triton._cublas_linear(x, parts["qweight"], parts["scale"], parts["zero"], 32, b, y)
    else:
        q, s = torch.randint(-127, 128, (40, 64), dtype=torch.int8), torch.rand(40) * 0.01
        w = q.double() * s.double()[:, None]
        int8_triton._cublas_linear(x, q, s, b, y)
    ref = x.double() @ w.T + b.double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6
