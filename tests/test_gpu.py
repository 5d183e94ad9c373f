"""GPU tests (marker ``gpu``): skipped without CUDA; run on the H100 whenever GPU code changes."""

import pytest
import torch

import codecllm
from codecllm.errors import DecodeError, DeviceError
from codecllm.format import CllmFile
from codecllm.quality import compare, greedy, sqnr_db
from conftest import PROMPT

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 100, 200, 2048])  # one M per bucket (launch.bucket_of)
def test_fused_int8_matmul(dtype, m):
    from codecllm.kernels.int8_triton import int8_linear

    n, k = 768, 1536
    x = torch.randn(m, k, device=DEV).to(dtype)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    s = torch.rand(n, device=DEV) * 0.01
    b = torch.randn(n, device=DEV).to(dtype)
    y = int8_linear(x, q, s, b)
    ref = x.double() @ (q.double() * s.double()[:, None]).T + b.double()
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert sqnr_db(ref, y) > (60 if dtype == torch.float32 else 40)


def test_row_matmul_input_layouts():
    """The prepared one-row matmul takes any input of K elements: strided or not 16-byte aligned."""
    from codecllm.kernels.int8_triton import Int8Matmul

    n, k = 768, 1536
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    s = torch.rand(n, device=DEV) * 0.01
    b = torch.randn(n, device=DEV).half()
    row = Int8Matmul(q, s, b)
    base = torch.randn(3, 2 * k + 8, device=DEV).half()
    for x in (base[0, :k].view(1, 1, k), base[1, 1:k + 1], base[2, ::2][:k]):
        ref = x.double() @ (q.double() * s.double()[:, None]).T + b.double()
        for _ in range(2):  # tuned on the first call, launched directly on the second
            y = row(x)
            assert y.shape == (*x.shape[:-1], n) and sqnr_db(ref, y) > 40


def test_public_launch_path_matches_direct():
    """Where Triton's launcher takes other arguments, launches fall back to the JIT's public path with
    the tuned configuration: same bits."""
    from codecllm.kernels import launch
    from codecllm.kernels.int8_triton import Int8Matmul, int8_linear

    n, k = 640, 1024
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    s = torch.rand(n, device=DEV) * 0.01
    row = Int8Matmul(q, s)
    xs = [torch.randn(m, k, device=DEV).half() for m in (1, 16)]
    direct = [row(xs[0]), int8_linear(xs[1], q, s)]
    direct = [row(xs[0]), int8_linear(xs[1], q, s)]  # the first calls tuned; these launched directly
    launchers = list(launch.LAUNCHERS.values())
    assert all(l.direct for l in launchers)
    try:
        for l in launchers:
            l.direct = False
        assert torch.equal(row(xs[0]), direct[0]) and torch.equal(int8_linear(xs[1], q, s), direct[1])
    finally:
        for l in launchers:
            l.direct = True


@pytest.mark.parametrize("m", [1, 16])
def test_split_k_matmul_is_deterministic(m):
    """On shapes with few output tiles the autotuner may split K; the partial sums are added in a fixed
    order, so repeated calls give identical bits."""
    from codecllm.kernels.int8_triton import int8_linear

    n, k = 2048, 5632
    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    s = torch.rand(n, device=DEV) * 1e-3
    first = int8_linear(x, q, s)
    for _ in range(50):
        assert torch.equal(int8_linear(x, q, s), first)
    ref = x.double() @ (q.double() * s.double()[:, None]).T
    assert sqnr_db(ref, first) > 40


def test_ans_reencode_round_trip():
    from codecllm.gpu import nvcomp

    data = torch.randint(-30, 30, (300_000,), dtype=torch.int8, device=DEV)
    comp, offsets, sizes = nvcomp.ans_encode(data, 65536)
    out = torch.empty_like(data)
    n = len(sizes)
    out_sizes = [min(65536, data.numel() - i * 65536) for i in range(n)]
    st = torch.empty(n, dtype=torch.int32, device=DEV)
    act = torch.empty(n, dtype=torch.int64, device=DEV)
    t = nvcomp.ChunkTable(nvcomp.ANS, comp, offsets, sizes, out.data_ptr(), out_sizes, 65536, st, act)
    t.decode(torch.empty(max(t.temp_bytes, 1), dtype=torch.uint8, device=DEV))
    assert torch.equal(out, data) and (st == 0).all() and act.tolist() == out_sizes
    assert sum(sizes) < data.numel()


def test_gpu_decode_equals_cpu_decode_for_every_tensor(smollm2_cllm):
    check_gpu_decode(smollm2_cllm)


def check_gpu_decode(path):
    """Every part of every record, decoded by the CUDA backend (nvCOMP), equals the CPU decode."""
    from codecllm.gpu.backend import CudaBackend

    with CllmFile(path) as f:
        backend = CudaBackend(f, torch.device(DEV))
        assert "zstd" in {p.codec for r in f.doc.tensors.values() for p in r.parts.values()}
        for rec in [*f.doc.tensors.values(), *f.doc.files.values()]:
            for name, part in rec.parts.items():
                gpu = backend.read_part(rec, part).cpu()
                assert torch.equal(gpu.view(torch.uint8), f.read_part(rec, part).view(torch.uint8)), (rec.name, name)


# SmolLM2 int8 against the original fp16 checkpoint on the GPU, both computing in fp16. Measured on the H100
# (benchmarks/results/gpu_tests_h100.log), identical in both modes: perplexity 24.0592 -> 24.1306 (+0.30%),
# mean KL 0.004610, p99 KL 0.02351, top-1 agreement 95.68% (an earlier run: 24.1319, 0.004609, 0.02365, 95.75%). Floors as on the CPU: KL 1.5x the measured
# figures (rounded up), top-1 one point below.
GPU_MAX_MEAN_KL = 0.0070
GPU_MAX_P99_KL = 0.036
GPU_MIN_TOP1 = 0.947


@pytest.mark.parametrize("mode", ["resident", "stream"])
def test_smollm2_against_fp16_on_gpu(smollm2_cllm, smollm2_reference, mode):
    """Perplexity within +0.5%, mean and p99 KL, top-1 agreement over 4096 tokens. The greedy continuation
    is printed, not compared: its 20th token is a near tie in the original (' ' over '\\n\\n' by 0.22
    logits in float32) and a tie in the int8 model, so one rounding flips it (benchmarks/NOTES.md)."""
    ref, tokens0 = smollm2_reference
    model = codecllm.load(smollm2_cllm, device=DEV, mode=mode)
    assert model.dtype == torch.float16
    c = compare(model, ref)
    tok = codecllm.load_tokenizer(smollm2_cllm)
    print(f"\n{mode}: {c}\n  fp16: {PROMPT}{tok.decode(tokens0)!r}\n  int8: {PROMPT}{tok.decode(greedy(model, tok, PROMPT, 24))!r}")
    assert c.perplexity <= c.reference_perplexity * 1.005, c
    assert c.mean_kl <= GPU_MAX_MEAN_KL and c.p99_kl <= GPU_MAX_P99_KL, c
    assert c.top1_agreement >= GPU_MIN_TOP1, c


def check_graph_replay_matches_eager(model, vocab):
    from codecllm.gpu.graphs import capture

    ids = torch.randint(0, vocab, (1, 16), device=DEV)
    with torch.no_grad():
        first = model(ids, use_cache=False).logits.clone()
        graph, out = capture(lambda: model(ids, use_cache=False).logits, warmup=2)
        ids.copy_(torch.randint(0, vocab, (1, 16), device=DEV))
        graph.replay()
        eager = model(ids, use_cache=False).logits
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert not torch.equal(first, eager)


@pytest.mark.parametrize("mode", ["resident", "stream"])
def test_cuda_graph_replay_matches_eager(smollm2_cllm, mode):
    check_graph_replay_matches_eager(codecllm.load(smollm2_cllm, device=DEV, mode=mode), 49152)


@pytest.mark.parametrize("codec", ["ans", "zstd"])
def test_tiny_model_gpu_paths(tmp_path, codec):
    """Without the real model: a small random Llama, every tensor decoded on the GPU equal to the CPU
    decode, stream equal to resident layer by layer (stream layers run unfused; a fused sibling group
    sums in another order), and a CUDA-graph replay equal to eager."""
    from codecllm.gpu.stream import CudaStream
    from conftest import llama_config, save_tiny

    src = save_tiny(tmp_path / "tiny", llama_config(hidden_size=256, intermediate_size=704, vocab_size=1024))
    codecllm.convert(src, tmp_path / "tiny.cllm", chunk_size=4096)
    check_gpu_decode(tmp_path / "tiny.cllm")
    resident = codecllm.load(tmp_path / "tiny.cllm", device=DEV)
    for m in resident.modules():
        if getattr(m, "runner", None) is not None:
            m.runner = None
    stream = codecllm.load(tmp_path / "tiny.cllm", device=DEV, mode="stream", gpu_stream_codec=codec)
    assert any(isinstance(m, CudaStream) for m in stream.modules())
    ids = torch.randint(0, 1024, (2, 9), device=DEV)
    with torch.no_grad():
        ref = resident(ids).logits
        for _ in range(3):  # the first forward records the call order, the next ones decode by units
            assert torch.equal(ref, stream(ids).logits)
        sh = stream.model.layers[0].self_attn.q_proj.schedule
        assert 1 < len(sh.units) < len(sh.layers) and min(sh.unit_of) >= 0
        # out of the recorded order (one block's MLP alone): its layers decode their own units
        h = torch.randn(2, 9, 256, device=DEV, dtype=torch.float16)
        assert torch.equal(resident.model.layers[1].mlp(h), stream.model.layers[1].mlp(h))
        assert torch.equal(ref, stream(ids).logits)
    check_graph_replay_matches_eager(stream, 1024)


def test_sibling_fusion_matches_layer_by_layer(tmp_path):
    """On a one-token input and on 16 rows the q/k/v and gate/up groups run as one launch each; the logits
    match the layer-by-layer ones (different kernel configurations: equal up to float32 summation order)."""
    from conftest import llama_config, save_tiny

    src = save_tiny(tmp_path / "tiny", llama_config(hidden_size=256, intermediate_size=704, vocab_size=1024))
    codecllm.convert(src, tmp_path / "tiny.cllm")
    model = codecllm.load(tmp_path / "tiny.cllm", device=DEV)
    fusion = model.model.layers[0].self_attn.q_proj.runner.__self__
    ids = torch.randint(0, 1024, (1, 1), device=DEV)
    with torch.no_grad():
        ref = model(ids).logits.float()  # learns the groups
        assert len(fusion.groups) == 2 * len(model.model.layers)
        # each group's weight is a view of its members' weights, decoded back to back: no copy
        arena = model.model.layers[0].self_attn.q_proj.qweight.untyped_storage().data_ptr()
        assert {g.matmul.qweight.untyped_storage().data_ptr() for g in fusion.groups.values()} == {arena}
        fused = model(ids).logits.float()
        assert not fusion.kept
        assert sqnr_db(ref, fused) > 60
        rows = torch.randint(0, 1024, (16, 1), device=DEV)
        launches = []
        for g in fusion.groups.values():
            g.matmul = lambda x, run=g.matmul: launches.append(1) or run(x)
        fused16 = model(rows).logits.float()
        assert len(launches) == len(fusion.groups) and not fusion.kept
        for m in model.modules():  # now every layer on its own
            if getattr(m, "runner", None) is not None:
                m.runner = None
        assert sqnr_db(model(rows).logits.float(), fused16) > 60


def test_failed_stream_decode_fails_generate(smollm2_cllm):
    """A decode that nvCOMP reports as failed (here: an output buffer too small for its chunk, which
    nvCOMP must detect) makes generate() raise instead of returning text from a wrong model."""
    model = codecllm.load(smollm2_cllm, device=DEV, mode="stream")
    layer = model.model.layers[3].mlp.up_proj
    layer.table.out_sizes[0] = 1000
    tok = codecllm.load_tokenizer(smollm2_cllm)
    with pytest.raises(DecodeError, match="nvCOMP"):
        model.generate(**tok("Hello", return_tensors="pt").to(DEV), max_new_tokens=2)


def test_corrupt_file_is_caught_on_the_host(smollm2_cllm, tmp_path):
    """Corrupt compressed bytes never reach nvCOMP: the sha256 check on the host stops them."""
    from codecllm.errors import ChecksumError

    raw = bytearray(smollm2_cllm.read_bytes())
    with CllmFile(smollm2_cllm) as f:
        rec = f.doc.tensors["model.layers.3.mlp.up_proj.weight"]
        pos = f.data_start + f.entries[rec.main.tensor].begin + 100
    raw[pos] ^= 0xFF
    bad = tmp_path / "bad.cllm"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="up_proj"):
        codecllm.load(bad, device=DEV, mode="stream")


def test_missing_nvcomp_names_the_extra(monkeypatch):
    from codecllm.gpu import nvcomp

    nvcomp.library.cache_clear()
    monkeypatch.setattr(nvcomp, "_find_library", lambda: "/nonexistent/libnvcomp.so.6")
    try:
        with pytest.raises(DeviceError, match=r"codecllm\[gpu\]"):
            nvcomp.library()
    finally:
        nvcomp.library.cache_clear()


@pytest.mark.parametrize("mode", ["resident", "stream"])
@pytest.mark.parametrize("name", ["gpt2", "t5", "qwen2", "gemma2", "llama-tied-bf16"])
def test_architectures_on_gpu(tmp_path, name, mode):
    """Conv1D (GPT-2), an encoder-decoder that reads ``weight.dtype`` (T5), biases (Qwen2), a scaled
    embedding subclass (Gemma2) and tied bf16 weights on CUDA: close to the same file computed on the CPU."""
    import transformers

    from conftest import save_tiny
    from test_architectures import ARCHS, CONFIGS, IDS

    cls, kw, dtype = CONFIGS[name]
    src = save_tiny(tmp_path / "src", cls(**kw, architectures=[ARCHS[name]]), seed=1, dtype=dtype)
    codecllm.convert(src, tmp_path / "m.cllm", chunk_size=4096)

    def run(model, dev):
        kwargs = {"decoder_input_ids": IDS[:, :5].to(dev)} if model.config.is_encoder_decoder else {}
        with torch.no_grad():
            return model(input_ids=IDS.to(dev), **kwargs).logits.float().cpu()

    cpu = run(codecllm.load(tmp_path / "m.cllm"), "cpu")
    gpu_model = codecllm.load(tmp_path / "m.cllm", device=DEV, mode=mode, dtype=torch.float32)
    assert sqnr_db(cpu, run(gpu_model, DEV)) > 40
    assert getattr(transformers, ARCHS[name]) is type(gpu_model)


# -- torch.compile ---------------------------------------------------------------------------------------

# Compiled against eager logits: our operator computes the same bits in both (the same kernel on the same
# input); what differs is Inductor's fusion of the norms, RoPE and softmax, which rounds fp16 intermediates
# differently. The floor is the one a dense fp16 model meets against itself compiled (measured here
# alongside; see test output), less a margin: SQNR of 40 dB is 1% of the logits' RMS.
COMPILED_MIN_SQNR_DB = 40


def _compile_model(tmp_path, **kw):
    from conftest import llama_config, save_tiny

    src = save_tiny(tmp_path / "tiny", llama_config(hidden_size=512, intermediate_size=1408, vocab_size=2048, **kw))
    codecllm.convert(src, tmp_path / "tiny.cllm")
    return src, tmp_path / "tiny.cllm"


@pytest.mark.parametrize("first", ["compiled-first", "eager-first"])
def test_compiled_resident_model_has_no_graph_break(tmp_path, first):
    """A resident model traces as one graph with one ``codecllm::int8_linear`` per Linear, also when it is
    compiled before its first call; compiled (fullgraph, and "reduce-overhead" CUDA graphs) it computes
    what the eager model computes, within the stated tolerance, at one token and at 16."""
    from transformers import AutoModelForCausalLM

    src, path = _compile_model(tmp_path)
    model = codecllm.load(path, device=DEV)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).to(DEV).eval()
    op = torch.ops.codecllm.int8_linear
    with torch.no_grad():
        for m in (1, 16):
            ids = torch.randint(0, 2048, (1, m), device=DEV)
            if first == "eager-first":
                model(ids)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model)(ids)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
            calls = [n for g in explained.graphs for n in g.graph.nodes if n.op == "call_function" and n.target in (op, op.default)]
            fusion = model.model.layers[0].self_attn.q_proj.runner.__self__
            grouped = sum(len(g.layers) - 1 for g in fusion.groups.values())  # a group: one call (up to 64 rows)
            assert len(calls) == sum(type(x).__name__ == "Int8CudaLinear" for x in model.modules()) - grouped
            eager = model(ids).logits.float()
            dense_eager = dense(ids).logits.float()
            for mode in ("default", "reduce-overhead"):
                torch._dynamo.reset()
                compiled = torch.compile(model, fullgraph=True, mode=mode)
                got = [compiled(ids).logits.float().clone() for _ in range(3)][-1]  # reduce-overhead records, then replays
                dense_got = torch.compile(dense, mode=mode)(ids).logits.float()
                print(f"\nM={m} {mode}: SQNR compiled vs eager, int8 {sqnr_db(eager, got):.1f} dB, "
                      f"dense fp16 {sqnr_db(dense_eager, dense_got):.1f} dB")
                assert sqnr_db(eager, got) > COMPILED_MIN_SQNR_DB
                assert torch.equal(got.argmax(-1), eager.argmax(-1))


def test_compiled_generate_with_static_cache(tmp_path):
    """transformers' own compiled generation (a static cache compiles the forward) on a loaded model: its
    logits within the tolerance of the same generation uncompiled."""
    _, path = _compile_model(tmp_path)
    model = codecllm.load(path, device=DEV)
    prompt = torch.randint(0, 2048, (2, 12), device=DEV)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
              cache_implementation="static", pad_token_id=0)
    torch._dynamo.reset()
    eager = model.generate(prompt, disable_compile=True, **kw)
    compiled = model.generate(prompt, **kw)
    compiled = model.generate(prompt, **kw)  # replays what the first call recorded
    assert torch.equal(compiled.sequences, eager.sequences)
    for e, c in zip(eager.logits, compiled.logits):
        assert sqnr_db(e.float(), c.float()) > COMPILED_MIN_SQNR_DB


def test_compiled_stream_model(tmp_path):
    """Stream layers run between compiled graphs and compute what they compute eagerly; ``fullgraph=True``
    is refused with the package's reason, never a crash."""
    from codecllm.qmodules import STREAM_EAGER

    _, path = _compile_model(tmp_path)
    model = codecllm.load(path, device=DEV, mode="stream")
    ids = torch.randint(0, 2048, (1, 7), device=DEV)
    with torch.no_grad():
        eager = model(ids).logits.float()
        torch._dynamo.reset()
        got = torch.compile(model)(ids).logits.float()
        assert sqnr_db(eager, got) > COMPILED_MIN_SQNR_DB
        got = torch.compile(model, mode="reduce-overhead")(ids).logits.float()
        assert sqnr_db(eager, got) > COMPILED_MIN_SQNR_DB
        torch._dynamo.reset()
        with pytest.raises(Exception, match=STREAM_EAGER[:40]):
            torch.compile(model, fullgraph=True)(ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("mode", ["resident", "stream"])
def test_lossless_model_on_gpu_is_bit_exact(tmp_path, dtype, mode):
    """A ``lossless`` file's planes decode on the GPU (nvCOMP, then the scheme's recombination in torch) into
    every weight of the original, bit for bit, and the model computes what transformers' own CUDA model
    of the checkpoint computes (bfloat16 Linear weights in stream mode: the exponent-coded layout, whose
    own kernels ``test_lossless_stream_on_gpu`` checks)."""
    from transformers import AutoModelForCausalLM

    from conftest import llama_config, save_tiny

    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=2), dtype=dtype)
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="lossless")
    model = codecllm.load(out, device="cuda", mode=mode, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to("cuda").eval()
    coded = [m for m in model.modules() if type(m).__name__ == "LosslessCudaLinear"]
    assert len(coded) == (15 if (dtype, mode) == (torch.bfloat16, "stream") else 0)  # 7 per layer and the head
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert got[name].dtype == dtype and torch.equal(got[name].view(torch.uint8 if dtype != torch.float32 else torch.int32),
                                                         p.view(torch.uint8 if dtype != torch.float32 else torch.int32)), name
    ids = torch.randint(0, 256, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        if not coded:
            assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("m", [1, 5, 300])
def test_expcode_kernels_on_gpu(m):
    """The exponent-coded layout's kernels compiled: every bfloat16 bit pattern decodes exactly, and the
    matmul at one row (the GEMV, each split) and more (cuBLAS on decoded blocks) computes the weight's
    product within float32 rounding."""
    from codecllm.kernels import expcode_triton as expcode
    from codecllm.schemes import get_scheme
    from codecllm.schemes.lossless import exponents

    def layout(w):
        parts = {n: t.to(DEV) for n, t in get_scheme("lossless").quantize(w.cpu()).items()}
        return expcode.encode(parts["data"], exponents(parts))

    p = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    every = p[torch.randperm(p.numel(), generator=torch.Generator().manual_seed(0))].view(torch.bfloat16).reshape(128, 512)
    t = layout(every)
    assert torch.equal(expcode.decode_into(t, 0, 128, torch.empty(128, 512, dtype=torch.bfloat16, device=DEV)).view(torch.int16).cpu(),
                       every.view(torch.int16))
    g = torch.Generator().manual_seed(1)
    for n, k in ((4096, 4096), (1024, 4096), (4096, 14336), (333, 1000)):
        w = torch.randn(n, k, generator=g) * 0.02
        w.view(-1)[torch.randint(0, n * k, (n * k // 1000,), generator=g)] = 1e-30  # escapes
        w = w.to(torch.bfloat16)
        t = layout(w)
        b = torch.randn(n, device=DEV, dtype=torch.bfloat16)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = torch.randn(m, k, device=DEV).to(dtype)
            y = expcode.ExpCodeMatmul(t, b)(x)
            y = expcode.ExpCodeMatmul(t, b)(x)  # the prepared launcher
            ref = x.double() @ w.to(DEV).double().T + b.double()
            tol = 1e-4 if dtype == torch.float32 else 1e-2
            assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().max())), (n, k, dtype)
            if m == 1:  # deterministic: split-K partials are added in a fixed order
                assert all(torch.equal(expcode.ExpCodeMatmul(t, b)(x), y) for _ in range(3))


@pytest.mark.parametrize("codec", [None, "ans"], ids=["fast", "small"])
def test_lossless_stream_on_gpu(tmp_path, codec, monkeypatch):
    """A bfloat16 ``lossless`` file in stream mode: every Linear weight exponent-coded in GPU memory (fast:
    under 0.76x of its bfloat16 bytes; small, ``gpu_stream_codec="ans"``, the codes ANS-coded too and
    decoded per block before use: under 0.70x), decoding bit for bit, and logits as close to the exact
    computation (the same bfloat16 weights computed in float32) as the bfloat16 model's own cuBLAS
    computation is: at most 2x its largest deviation, over one-token decode steps. Also replayed in a CUDA
    graph, and compiled (fast: with no graph break). Small blocks here are 256 KiB of codes, so that the
    larger weights take several."""
    from transformers import AutoModelForCausalLM

    from codecllm.schemes.lossless import cuda as lossless_cuda
    from conftest import llama_config, save_tiny

    monkeypatch.setattr(lossless_cuda, "SMALL_BLOCK_BYTES", 256 << 10)
    cfg = llama_config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                       vocab_size=4096, initializer_range=0.02)
    src = save_tiny(tmp_path / "m", cfg, dtype=torch.bfloat16)
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="lossless")
    model = codecllm.load(out, device="cuda", mode="stream", gpu_stream_codec=codec)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).to("cuda").eval()
    exact = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to("cuda").eval()
    kind = lossless_cuda.LosslessSmallLinear if codec == "ans" else lossless_cuda.LosslessCudaLinear
    coded = {n: m for n, m in model.named_modules() if type(m) is kind}
    dense = dict(ref.named_modules())
    assert len(coded) == 15
    held = sum(b.numel() * b.element_size() for m in coded.values() for b in m.buffers())
    assert held < (0.70 if codec == "ans" else 0.76) * sum(dense[n].weight.numel() * 2 for n in coded)
    if codec == "ans":
        assert max(len(m.blocks) for m in coded.values()) == 8  # the head: 4096 rows of 512 code bytes
    for n, m in coded.items():
        assert torch.equal(m.dequantized().view(torch.int16), dense[n].weight.view(torch.int16)), n

    ids = torch.randint(0, 4096, (1, 16), device=DEV, generator=torch.Generator(DEV).manual_seed(0))

    def steps(mdl):
        with torch.no_grad():
            o = mdl(ids[:, :8], use_cache=True)
            cache, logits = o.past_key_values, [o.logits[:, -1]]
            for i in range(8, 15):
                o = mdl(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
                cache = o.past_key_values
                logits.append(o.logits[:, -1])
            return torch.cat(logits).float()

    want, bf16, got = steps(exact), steps(ref), steps(model)
    spread, err = (bf16 - want).abs().max().item(), (got - want).abs().max().item()
    print(f"\nlossless stream, decode-step logits against the float32 computation: max |diff| {err:.4g}; the bfloat16 model's "
          f"{spread:.4g}; against the bfloat16 model {(got - bf16).abs().max().item():.4g}; weights held {held / 1e6:.2f} MB of "
          f"{sum(dense[n].weight.numel() * 2 for n in coded) / 1e6:.2f} MB")
    assert err <= 2 * spread and spread > 0
    assert (got.argmax(-1) == bf16.argmax(-1)).sum() >= 7
    if codec == "ans":  # layers called alone, in any order, decode their own blocks into the shared workspace
        h, g = torch.randn(1, 1024, device=DEV, dtype=torch.bfloat16), torch.randn(1, 2816, device=DEV, dtype=torch.bfloat16)
        with torch.no_grad():
            a, b = model.lm_head(h), model.model.layers[1].mlp.down_proj(g)
            assert torch.equal(model.lm_head(h), a)
        for got_, x_, w_ in ((a, h, ref.lm_head.weight), (b, g, ref.model.layers[1].mlp.down_proj.weight)):
            assert torch.allclose(got_.float(), x_.float() @ w_.float().T, atol=1e-2, rtol=1e-2)
    check_graph_replay_matches_eager(model, 4096)
    with torch.no_grad():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(ids[:, :1])
        if codec is None:
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        eager = model(ids[:, :1]).logits.float()
        got = torch.compile(model, fullgraph=codec is None)(ids[:, :1]).logits.float()
        assert sqnr_db(eager, got) > COMPILED_MIN_SQNR_DB


@pytest.mark.parametrize("quant, dtype, codec", [("lossless", torch.bfloat16, None), ("lossless", torch.bfloat16, "ans"),
                                                 ("int8", torch.float16, None)], ids=["lossless-bf16", "lossless-bf16-ans", "int8-f16"])
def test_footprint_against_what_each_mode_allocates(tmp_path, quant, dtype, codec):
    """The loader's per-mode estimate (``footprint``, from the header alone) against the GPU memory each
    mode allocates at load: within 10%, beyond the block of rows that lossless stream mode decodes for
    cuBLAS (counted by the estimate, allocated at the first call with more than one row). ``auto`` takes
    stream for the bfloat16 lossless file (less memory, estimated faster), and resident for the same file
    with its codes ANS-coded and for int8 (stream estimated at about 0.62x and 0.66x of the speed);
    stream mode says so in one line where it saves under 5%."""
    import gc
    import warnings

    from codecllm.kernels.launch import reserve_scratch
    from codecllm.loader import footprint
    from conftest import llama_config, save_tiny

    cfg = llama_config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                       vocab_size=4096, initializer_range=0.02)
    src = save_tiny(tmp_path / "m", cfg, dtype=dtype)
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant=quant)
    plan = footprint(out, "cuda", gpu_stream_codec=codec)
    reserve_scratch(torch.device(DEV))  # the kernels' fixed scratch, made before the baseline
    for mode in ("resident", "stream"):
        gc.collect()  # the model before (stand-ins and their weights hold cycles): freed now, not during this load
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = codecllm.load(out, device=DEV, mode=mode, gpu_stream_codec=codec)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base
        est = plan[mode]["bytes"]
        block = 4096 * 1024 * 2 if (quant, mode) == ("lossless", "stream") else 0  # the head's rows: the largest weight
        print(f"\n{quant} {mode}: estimated {est / 1e6:.2f} MB (speed {plan[mode]['speed']:.2f}x), allocated {held / 1e6:.2f} MB")
        assert abs(est - block - held) <= 0.10 * held, (est, held)
        notices = [w for w in caught if "stream mode holds" in str(w.message)]
        assert len(notices) == (mode == "stream" and quant == "int8")  # (lossless saves 8-12% here, int8 holds more)
        del model
    auto = codecllm.load(out, device=DEV, mode="auto", gpu_stream_codec=codec).codecllm_mode
    assert auto == ("stream" if (quant, codec) == ("lossless", None) else "resident")
