"""The fused int8 matmul's logic, checked on the CPU under Triton's interpreter (its speed is measured
on a GPU only, by scripts/bench_gpu.py). bfloat16 is checked on the GPU only: the interpreter's bf16
emulation gives wrong values for int8 -> bf16 casts."""

import pytest
import torch

pytest.importorskip("triton")

import codecllm  # noqa: E402
from codecllm.kernels import int8_triton as int8_matmul  # noqa: E402
from codecllm.kernels import launch  # noqa: E402
from codecllm.kernels.int8_triton import Int8Matmul, int8_linear  # noqa: E402
from codecllm.schemes import get_scheme  # noqa: E402
from codecllm.schemes.int8 import Int8Linear  # noqa: E402
from codecllm.schemes.int8.cuda import Int8CudaLinear  # noqa: E402

# tests/conftest.py sets TRITON_INTERPRET=1 where torch sees no CUDA device; with one, tests/test_gpu.py
# checks the compiled kernels instead
interpreted = pytest.mark.skipif(not launch.INTERPRET, reason="runs under Triton's interpreter (no CUDA device)")

CPU = torch.device("cpu")


def case_id(case) -> str:
    m, n, k, dtype, bias, split = case
    bm, split = split if isinstance(split, tuple) else (16, split)
    return f"{m}x{n}x{k}-{str(dtype).removeprefix('torch.')}-{'bias' if bias else 'nobias'}-split{split}" + (f"-rows{bm}" if bm != 16 else "")


MATMUL_CASES = [
    (1, 40, 70, torch.float32, True, 1), (5, 64, 256, torch.float16, False, 1), (33, 20, 130, torch.float16, True, 1),
    (16, 16, 32, torch.float32, False, 1),
    # K split over programs whose partials the last one adds: uneven and empty splits
    (1, 40, 70, torch.float32, True, 2), (7, 50, 300, torch.float16, False, 3), (16, 33, 64, torch.float32, True, 4),
    (1, 50, 300, torch.float16, False, 3), (1, 9, 64, torch.float32, False, 4),
    # one row whose blocks divide N and K: the loop without bounds checks, whole and split
    (1, 16, 96, torch.float16, True, 1), (1, 8, 128, torch.float32, False, 2),
    # medium M (batches of 17-64) on 32-row tiles, K split in two: two row tiles, each with its partials
    (40, 45, 300, torch.float16, True, (32, 2)),
]


def reference(x, q, s, b):
    return x.double() @ (q.double() * s.double()[:, None]).T + (b.double() if b is not None else 0)


@interpreted
@pytest.mark.parametrize("case", MATMUL_CASES, ids=case_id)
def test_int8_matmul(case, monkeypatch):
    """M x N x K in float32 or float16, with or without a bias, K split over 1 to 4 programs; called twice
    in a row, with the same bits."""
    m, n, k, dtype, bias, split = case
    bm, split = split if isinstance(split, tuple) else (16, split)
    monkeypatch.setitem(int8_matmul._INTERPRET_CONFIG, "SPLIT_K", split)
    monkeypatch.setitem(int8_matmul._INTERPRET_CONFIG, "BLOCK_M", bm)
    torch.manual_seed(m * 1000 + n + k + split)
    x = torch.randn(m, k).to(dtype)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n) * 0.01
    b = torch.randn(n).to(dtype) if bias else None
    y = int8_linear(x.reshape(1, m, k), q, s, b)
    assert y.shape == (1, m, n) and y.dtype == dtype
    ref = reference(x, q, s, b)
    err = ((y[0].double() - ref).norm() / ref.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 2e-3), err
    assert torch.equal(int8_linear(x.reshape(1, m, k), q, s, b), y)
    assert not launch.scratch_for(CPU).counts.any()  # every call leaves its split counters at zero


@interpreted
@pytest.mark.parametrize("split", [1, 3], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("n,bias", [(14, True), (9, False), (16, True)], ids=["14-bias", "9-nobias", "16-bias"])
def test_row_matmul_called_again_and_again(n, bias, split, monkeypatch):
    """A prepared one-row matmul (a decode step's), with and without a K split."""
    monkeypatch.setitem(int8_matmul._INTERPRET_CONFIG, "SPLIT_K", split)
    torch.manual_seed(n + split)
    x = torch.randn(1, 1, 96)
    q = torch.randint(-127, 128, (n, 96), dtype=torch.int8)
    s = torch.rand(n) * 0.01
    b = torch.randn(n) if bias else None
    row = Int8Matmul(q, s, b)
    y = row(x)
    assert y.shape == (1, 1, n)
    torch.testing.assert_close(y[0].double(), reference(x[0], q, s, b), rtol=1e-5, atol=1e-5)
    for _ in range(2):
        assert torch.equal(row(x), y)
    assert not launch.scratch_for(CPU).counts.any()


@interpreted
def test_sibling_fusion_matches_layer_by_layer(tiny_llama, tmp_path):
    """q/k/v and gate/up are found from the calls themselves and run as one launch per group for inputs
    of up to 64 rows (a one-token input, a prompt and the decode step after it, a batch), with the result
    of the same file loaded without fusion, where every layer computes on its own; longer inputs run
    layer by layer."""
    from codecllm.gpu.fusion import SiblingFusion

    codecllm.convert(tiny_llama, tmp_path / "m.cllm")
    model = codecllm.load(tmp_path / "m.cllm")
    plain = codecllm.load(tmp_path / "m.cllm")  # no fusion installed: layer by layer
    for m in [*model.modules(), *plain.modules()]:  # the CUDA stand-ins, whose kernels run here under the interpreter
        if type(m) is Int8Linear:
            m.__class__ = Int8CudaLinear
    names = {id(m): n for n, m in model.named_modules()}
    fusion = SiblingFusion([m for m in model.modules() if type(m) is Int8CudaLinear])
    model.register_forward_hook(fusion.learn)
    ids, prompt = torch.tensor([[5]]), torch.tensor([[5, 6, 7]])
    close = dict(rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, **close)  # learns which layers share an input
        groups = sorted(tuple(names[id(m)].rsplit(".", 2)[-1] for m in g.layers) for g in fusion.groups.values())
        assert set(groups) == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}, groups
        assert len(groups) == 2 * len(model.model.layers), groups  # one of each per block

        launches, alone = [], []  # group launches; grouped layers computing on their own
        for g in fusion.groups.values():
            g.matmul = lambda x, run=g.matmul: launches.append(1) or run(x)
            for m in g.layers:
                m.plain = lambda x, run=m.plain, name=names[id(m)]: alone.append(name) or run(x)
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, **close)  # now one launch per group
        assert len(launches) == len(groups) and alone == [] and not fusion.kept  # each output computed ahead was taken

        # generation: the prompt (three tokens) and the next step (one token, on the cache) fused
        launches.clear()
        kw = dict(max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
        fused, unfused = model.generate(prompt, **kw), plain.generate(prompt, **kw)
        assert len(launches) == 2 * len(groups) and alone == [] and not fusion.kept
        assert torch.equal(fused.sequences, unfused.sequences)
        torch.testing.assert_close(fused.logits[0], unfused.logits[0], **close)
        torch.testing.assert_close(fused.logits[1], unfused.logits[1], **close)

        # a batch of 4 one-token rows: fused; 65 rows: layer by layer
        launches.clear()
        batch = torch.tensor([[5], [9], [2], [7]])
        torch.testing.assert_close(model(batch).logits, plain(batch).logits, **close)
        assert len(launches) == len(groups) and alone == [] and not fusion.kept
        launches.clear()
        long = torch.arange(1, 66).reshape(1, 65) % 100
        torch.testing.assert_close(model(long).logits, plain(long).logits, **close)
        assert launches == [] and len(alone) == 5 * len(model.model.layers) and not fusion.kept


def test_fusion_joins_weights_without_copying_when_back_to_back():
    """A group's weight is a view of its members' weights where they lie back to back (as the GPU
    loader decodes them); members that own their weights are moved into one tensor; others are not fused."""
    join = Int8CudaLinear.join

    def layers(weights):
        return [Int8CudaLinear(get_scheme("int8"), {"qweight": w, "scale": torch.rand(w.shape[0])}, tuple(w.shape), torch.float32,
                               w.device, *w.shape, torch.nn.Parameter(torch.randn(w.shape[0]))) for w in weights]

    arena = torch.randint(-127, 128, (9 * 8 + 8,), dtype=torch.int8)
    run = layers([arena[0:16].view(2, 8), arena[16:40].view(3, 8), arena[40:72].view(4, 8)])
    before = [(m.qweight.clone(), m.scale.clone(), m.bias.detach().clone()) for m in run]
    matmul = join(run)
    assert matmul.qweight.data_ptr() == arena.data_ptr() and matmul.qweight.shape == (9, 8)
    for m, (q, s, b) in zip(run, before):  # same values, now views of the group's tensors
        assert torch.equal(m.qweight, q) and torch.equal(m.scale, s) and torch.equal(m.bias, b)
        assert m.qweight.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
        assert m.scale.untyped_storage().data_ptr() == matmul.scale.untyped_storage().data_ptr()

    own = layers([torch.randint(-127, 128, (n, 8), dtype=torch.int8) for n in (2, 3)])
    before = [m.qweight.clone() for m in own]
    matmul = join(own)
    assert matmul.qweight.shape == (5, 8) and all(torch.equal(m.qweight, q) for m, q in zip(own, before))

    gap = layers([arena[0:16].view(2, 8), arena[24:48].view(3, 8)])  # a hole between them, in a shared buffer
    assert join(gap) is None


def test_wrong_input_width_is_an_error():
    q, s = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(ValueError, match="4 features, the weight 8"):
        Int8Matmul(q, s)(torch.zeros(2, 4))  # 8 elements, but not rows of 8
    with pytest.raises(ValueError, match="6 features, the weight 8"):
        int8_linear(torch.zeros(3, 6), q, s)
    with pytest.raises(ValueError, match="contiguous"):
        Int8Matmul(q.t().contiguous().t(), s)


@interpreted
@pytest.mark.parametrize("m", [2, 5, 70], ids=lambda m: f"M{m}")
def test_prepared_matmul_takes_any_number_of_rows(m):
    """A layer's prepared matmul computes several rows (prefill, batches) as the generic function does."""
    torch.manual_seed(m)
    x = torch.randn(1, m, 48)
    q = torch.randint(-127, 128, (20, 48), dtype=torch.int8)
    s = torch.rand(20) * 0.01
    b = torch.randn(20)
    mm = Int8Matmul(q, s, b)
    y = mm(x)
    assert y.shape == (1, m, 20) and torch.equal(y, int8_linear(x, q, s, b))
    torch.testing.assert_close(y[0].double(), reference(x[0], q, s, b), rtol=1e-5, atol=1e-5)


@interpreted
def test_int8_linear_operator():
    """``codecllm::int8_linear`` passes torch.library's checks (schema, fake tensor, no aliasing)."""
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (12, 32), dtype=torch.int8)
    s = torch.rand(12) * 0.01
    for x, b in ((torch.randn(1, 32), torch.randn(12)), (torch.randn(2, 3, 32), None)):
        torch.library.opcheck(torch.ops.codecllm.int8_linear, (x, q, s, b))
        assert torch.equal(torch.ops.codecllm.int8_linear(x, q, s, b), int8_linear(x, q, s, b))


@interpreted
@pytest.mark.parametrize("fused", [False, True], ids=["first-call-compiled", "after-eager-calls"])
def test_compiled_cuda_stand_ins_trace_without_graph_breaks(tiny_llama, tmp_path, fused):
    """The CUDA stand-ins (run here under the interpreter) trace into one graph, whether the model is
    compiled before its first call or after eager calls taught it its sibling groups, and compute what
    the eager model computes."""
    from codecllm.gpu import fusion

    codecllm.convert(tiny_llama, tmp_path / "m.cllm")
    model = codecllm.load(tmp_path / "m.cllm")
    for m in model.modules():
        if type(m) is Int8Linear:
            m.__class__ = Int8CudaLinear
    installed = fusion.SiblingFusion([m for m in model.modules() if type(m) is Int8CudaLinear])
    model.register_forward_hook(installed.learn)
    ids = torch.tensor([[5]])
    with torch.no_grad():
        if fused:
            eager = model(ids).logits
            assert installed.groups
        explained = torch._dynamo.explain(model)(ids)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        op = torch.ops.codecllm.int8_linear
        calls = [n for g in explained.graphs for n in g.graph.nodes if n.op == "call_function" and n.target in (op, op.default)]
        grouped = sum(len(g.layers) - 1 for g in installed.groups.values())  # a group is one call
        assert len(calls) == sum(type(m) is Int8CudaLinear for m in model.modules()) - grouped >= 7
        assert grouped == (3 * len(model.model.layers) if fused else 0)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = compiled(ids).logits
        assert all(g.traced_outs is None for g in installed.groups.values())  # nothing outlives the trace
        if not fused:
            assert installed.learning  # a compiled forward learns nothing: eager calls still can
            eager = model(ids).logits
        torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)


@interpreted
def test_float_weight_assigned_after_load_is_used():
    """A float weight assigned to a loaded layer replaces its int8 one, also after the layer prepared its
    matmul (eager) and in a compiled forward."""
    torch.manual_seed(0)
    w = torch.randn(12, 32)
    layer = Int8CudaLinear(get_scheme("int8"), get_scheme("int8").quantize(w), (12, 32), torch.float32, CPU, 12, 32,
                           torch.nn.Parameter(torch.randn(12)))
    x = torch.randn(3, 32)
    for rows in (x[:1], x):
        layer(rows)  # prepares the matmul
    w2 = torch.randn(12, 32)
    layer.weight = torch.nn.Parameter(w2, requires_grad=False)
    for rows in (x[:1], x):
        torch.testing.assert_close(layer(rows), torch.nn.functional.linear(rows, w2, layer.bias))
        torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(rows),
                                   torch.nn.functional.linear(rows, w2, layer.bias))
