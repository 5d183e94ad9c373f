"""GPU tests of the int4 scheme (marker ``gpu``): its kernels against the CPU reference, a loaded model in
both modes, compiled, and SmolLM2's quality on the GPU against the CPU path's."""

import pytest
import torch

import codecllm
from codecllm.quality import compare, reference_logits, sqnr_db
from codecllm.schemes.int4 import Int4

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _parts(n, k, gs, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    scheme = Int4(gs)
    parts = scheme.quantize(w)
    return scheme, parts, scheme.dequantize(parts, torch.float64)


CASES = [(m, dtype, 64) for m in (1, 3, 16, 17, 64, 100, 200, 2048) for dtype in (torch.float16, torch.bfloat16, torch.float32)]
CASES += [(m, torch.float16, gs) for gs in (32, 128) for m in (1, 16, 100)]


@pytest.mark.parametrize("m,dtype,gs", CASES, ids=lambda v: str(v).removeprefix("torch.") if not isinstance(v, int) else str(v))
def test_int4_matmul_against_cpu_reference(m, dtype, gs):
    """Every M bucket (the GEMV at one row, the GEMM's small, medium and large tiles, cuBLAS on dequantized
    blocks where that is chosen), K not a multiple of the group size, with a bias; the second call (a
    prepared launcher) gives the same bits as the first."""
    from codecllm.kernels.int4_triton import Int4Matmul

    n, k = 776, 1568  # 1568 = 24.5 groups of 64, 12.25 of 128
    _, parts, w = _parts(n, k, gs, seed=m)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype)
    mm = Int4Matmul(*(parts[p].to(DEV) for p in ("qweight", "scale", "zero")), gs, b.to(DEV))
    y = mm(x.to(DEV))
    ref = x.double() @ w.T + b.double()
    assert y.dtype == dtype and y.shape == (m, n) and torch.isfinite(y).all()
    assert sqnr_db(ref, y.cpu()) > (60 if dtype == torch.float32 else 38)
    assert torch.equal(mm(x.to(DEV)), y)


@pytest.mark.parametrize("path", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_int4_medium_m_paths(path, dtype, monkeypatch):
    """65-128 rows: both paths the timing may pick, forced in turn (the GEMM that dequantizes in
    registers, with grouped row tiles; cuBLAS on weights the dequantize kernel wrote), against the CPU
    reference, each the same bits on a second call."""
    from codecllm.kernels import launch
    from codecllm.kernels.int4_triton import Int4Matmul

    n, k, m = 776, 1568, 120
    _, parts, w = _parts(n, k, 64, seed=11)
    x = torch.randn(m, k).to(dtype)
    mm = Int4Matmul(*(parts[p].to(DEV) for p in ("qweight", "scale", "zero")), 64)
    monkeypatch.setitem(launch.PATHS, ("int4", 128, n, k, 64, dtype, mm.index), path)
    assert mm._deq(x)
    y = mm(x.to(DEV))
    (launch,) = mm.launchers.values()
    assert launch == "cublas" if path == "cublas" else "mm-deq M<=128" in launch.label
    assert sqnr_db(x.double() @ w.T, y.cpu()) > 38
    assert torch.equal(mm(x.to(DEV)), y)


def test_int4_gemv_outlier_activations():
    """Activations with outlier channels of a few thousand (as down_proj's input has in large models):
    the packed-fp16 one-row kernel stays finite and accurate (without dividing the activations by 16
    before its fp16 products, a lane of four codes of 15 overflows above about 1,090)."""
    from codecllm.kernels.int4_triton import Int4Matmul

    n, k = 512, 4096
    _, parts, w = _parts(n, k, 64, seed=7)
    parts["qweight"].fill_(0xFF)  # every code 15, the worst case for the sums
    w = Int4(64).dequantize(parts, torch.float64)
    x = torch.randn(1, k) * 0.5
    x[0, ::97] = 3000.0
    x[0, 64:72] = 3000.0  # a whole word's activations: four products of 15 * 3000 in each fp16 lane
    x = x.half()
    mm = Int4Matmul(*(parts[p].to(DEV) for p in ("qweight", "scale", "zero")), 64)
    x = x.to(DEV)
    assert mm._half2(x)  # the packed-fp16 kernel is the one under test
    y = mm(x)
    ref = x.cpu().double() @ w.T
    assert torch.isfinite(y).all()
    assert sqnr_db(ref, y.cpu()) > 38


def test_int4_split_k_is_deterministic():
    from codecllm.kernels.int4_triton import int4_linear

    _, parts, _ = _parts(1024, 4096, 64)
    p = {k: v.to(DEV) for k, v in parts.items()}
    x = torch.randn(1, 4096, device=DEV).half()
    first = int4_linear(x, p["qweight"], p["scale"], p["zero"], 64)
    for _ in range(20):
        assert torch.equal(int4_linear(x, p["qweight"], p["scale"], p["zero"], 64), first)


def _tiny_int4(tmp_path, **kw):
    from conftest import llama_config, save_tiny

    src = save_tiny(tmp_path / "tiny", llama_config(hidden_size=256, intermediate_size=704, vocab_size=1024, **kw))
    path = tmp_path / "tiny.cllm"
    codecllm.convert(src, path, quant="int4", group_size=64, chunk_size=4096)
    return path


def test_int4_model_resident_stream_and_cpu(tmp_path):
    """A small Llama in int4: every Linear a CUDA int4 stand-in; resident and stream agree bit for bit on
    a prompt; the logits match the CPU path's (float32) within fp16 rounding; graph replay equals eager."""
    from codecllm.gpu.stream import CudaStream
    from codecllm.schemes.int4.cuda import Int4CudaLinear
    from test_gpu import check_graph_replay_matches_eager

    path = _tiny_int4(tmp_path)
    cpu = codecllm.load(path)
    resident = codecllm.load(path, device=DEV)
    stream = codecllm.load(path, device=DEV, mode="stream")
    # 7 Linear layers in each of 3 blocks and the head, but the first and last blocks' down_proj (fp16)
    assert sum(isinstance(m, Int4CudaLinear) for m in resident.modules()) == 7 * 3 + 1 - 2
    assert any(isinstance(m, CudaStream) for m in stream.modules())
    ids = torch.randint(0, 1024, (2, 9))
    with torch.no_grad():
        ref = cpu(ids).logits
        got = resident(ids.to(DEV)).logits
        assert sqnr_db(ref, got.float().cpu()) > 35
        for _ in range(3):
            assert torch.equal(stream(ids.to(DEV)).logits, got)
        one = torch.randint(0, 1024, (1, 1))
        ref1 = cpu(one).logits
        for _ in range(2):  # the first forward learns the sibling groups, the second runs them fused
            assert sqnr_db(ref1, resident(one.to(DEV)).logits.float().cpu()) > 35
    check_graph_replay_matches_eager(resident, 1024)
    check_graph_replay_matches_eager(stream, 1024)


def test_int4_compiled_has_no_graph_break(tmp_path):
    """Compiled (fullgraph), an int4 model traces as one graph of ``codecllm::int4_linear`` calls and
    computes what it computes eagerly, within the compiled-model tolerance of tests/test_gpu.py."""
    from test_gpu import COMPILED_MIN_SQNR_DB

    model = codecllm.load(_tiny_int4(tmp_path), device=DEV)
    op = torch.ops.codecllm.int4_linear
    with torch.no_grad():
        for m in (1, 16):
            ids = torch.randint(0, 1024, (1, m), device=DEV)
            model(ids)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model)(ids)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
            calls = [n for g in explained.graphs for n in g.graph.nodes if n.op == "call_function" and n.target in (op, op.default)]
            assert calls
            eager = model(ids).logits.float()
            for mode in ("default", "reduce-overhead"):
                torch._dynamo.reset()
                compiled = torch.compile(model, fullgraph=True, mode=mode)
                got = [compiled(ids).logits.float().clone() for _ in range(3)][-1]
                assert sqnr_db(eager, got) > COMPILED_MIN_SQNR_DB
                assert torch.equal(got.argmax(-1), eager.argmax(-1))


# SmolLM2 int4 (groups of 64, the converter's default recipe): on the GPU in fp16 against the original in
# fp16, the mean KL stays within 5% of the CPU path's (float32 against float32): fp16 rounding on both
# sides moves KL by well under that, while a wrong group, nibble or zero point would move it by far more.
GPU_CPU_KL_TOLERANCE = 0.05


def test_smollm2_int4_gpu_matches_cpu(smollm2_src, smollm2_reference, eval_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "int4.cllm"
    codecllm.convert(smollm2_src, out, quant="int4", group_size=64)
    original = AutoModelForCausalLM.from_pretrained(smollm2_src, dtype=torch.float32).eval()
    cpu = compare(codecllm.load(out), reference_logits(original, eval_ids))
    del original
    gpu = {mode: compare(codecllm.load(out, device=DEV, mode=mode), smollm2_reference[0]) for mode in ("resident", "stream")}
    print(f"\nint4 g64 CPU float32: {cpu}\nGPU fp16 resident: {gpu['resident']}\nGPU fp16 stream: {gpu['stream']}")
    for c in gpu.values():
        assert abs(c.mean_kl - cpu.mean_kl) <= GPU_CPU_KL_TOLERANCE * cpu.mean_kl, (c, cpu)
