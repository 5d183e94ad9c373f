"""CPU stream mode: int8 codes as 4-bit planes (``codecllm.kernels.cpu``) and the pipeline that decodes
the next layers on a thread of its own (``codecllm.qmodules.CpuPipeline``)."""

import threading
import time

import pytest
import torch

import codecllm
from codecllm.errors import DecodeError
from codecllm.kernels import cpu as ck
from codecllm.qmodules import CpuPipeline, CpuStreamed
from codecllm.schemes.int8 import Int8PlanesStreamLinear
from conftest import llama_config, save_tiny

IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 250]])


@pytest.mark.parametrize("shape", [(64, 32), (128, 96), (192, 576), (576, 1536)])
def test_planes_round_trip_and_linear(shape):
    n, k = shape
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    q[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
    high, low = ck.int8_planes(q)
    assert high.numel() == low.numel() == n * k // 2
    assert torch.equal(ck.int8_from_planes(high, low, n, k), q)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g)
    x = torch.randn(3, k, generator=g)
    ref = (x.double() @ (q.double() * scale.double()[:, None]).t() + bias.double()).float()
    got, kernel = ck.planes_linear(x, high, low, scale, bias), ck.int8_linear(x, q, scale, bias)
    err, kernel_err = (got - ref).norm() / ref.norm(), (kernel - ref).norm() / ref.norm()
    assert err < 5e-3 and err < 1.5 * kernel_err + 1e-4, (err, kernel_err)  # bf16 activations, as the int8 kernel


def test_layout_is_checked_against_torch():
    assert ck._layout_known()  # this torch packs as pack_nibbles does
    assert not ck.planes_fit(32, 64) and not ck.planes_fit(64, 48) and ck.planes_fit(64, 64)


def load_stream(tmp_path):
    """A tiny int8 model (its down projections kept in float) in CPU stream mode: the file, the model, its
    stream layers and their pipeline."""
    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=2, hidden_size=128, intermediate_size=256))
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="int8", skip=["*.mlp.down_proj"])
    with pytest.warns(UserWarning, match="stream mode holds"):
        model = codecllm.load(out, mode="stream")
    layers = [m for m in model.modules() if isinstance(m, CpuStreamed)]
    assert layers and all(isinstance(m, Int8PlanesStreamLinear) for m in layers)
    return out, model, layers, layers[0].pipeline


@pytest.fixture
def stream_model(tmp_path):
    return load_stream(tmp_path)[1:]


def forward(model, ids=IDS):
    with torch.inference_mode():
        return model(ids).logits


class Decodes(list):
    """The thread names each layer's decode ran on (``layers``: the layers, in the same order)."""

    layers: list


def decoded_on(layers, monkeypatch) -> Decodes:
    """Records the decodes from now on."""
    names = Decodes()
    names.layers = []
    orig = Int8PlanesStreamLinear.decode_into

    def record(self, out):
        names.append(threading.current_thread().name)
        names.layers.append(self)
        orig(self, out)

    monkeypatch.setattr(Int8PlanesStreamLinear, "decode_into", record)
    return names


def test_pipeline_learns_the_order_then_decodes_ahead(stream_model, monkeypatch):
    model, layers, pipeline = stream_model
    if CpuPipeline.cores() < 2:
        pytest.skip("one core: the pipeline decodes each layer when called")
    threads = torch.get_num_threads()
    assert pipeline.order is None
    threads_seen = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: threads_seen.append(torch.get_num_threads()))
    names = decoded_on(layers, monkeypatch)
    first = forward(model)
    assert names == ["MainThread"] * len(layers)  # learning: each layer decoded when called
    assert pipeline.order == layers  # (this model calls its layers in registration order)
    names.clear()
    second = forward(model)
    assert torch.equal(first, second)
    assert names.count("codecllm-decoder") >= len(layers) and "MainThread" not in names
    assert threads_seen == [threads, max(1, min(threads, CpuPipeline.cores() - 1))]
    assert torch.get_num_threads() == threads  # restored after the forward
    names.clear()
    assert torch.equal(forward(model), first)
    assert "MainThread" not in names
    # while the head computes (made slow here), the decoder goes on with the next forward's first layers
    slow = model.lm_head.register_forward_pre_hook(lambda *_: time.sleep(0.2))
    forward(model)
    slow.remove()
    # the other buffers (the head's own joins them if it is released before the forward's end stops the
    # decoder: a matter of timing)
    carried = len(pipeline.ready)
    assert carried in (CpuPipeline.SLOTS - 1, CpuPipeline.SLOTS) and sorted(pipeline.ready) == list(range(carried))
    names.clear()
    names.layers.clear()
    assert torch.equal(forward(model), first)
    assert names.layers[0] is layers[carried]  # its first layers were decoded already


def test_pipeline_out_of_order_and_alone(stream_model):
    model, layers, pipeline = stream_model
    first = forward(model)
    pipeline.order = pipeline.order[::-1]  # as if another code path had been learned
    assert torch.equal(forward(model), first)  # decoded when called, from the first mismatch on
    assert pipeline.order == layers  # learned again
    assert torch.equal(forward(model), first)
    x = torch.randn(2, layers[0].in_features)
    with torch.inference_mode():
        alone = layers[0](x)  # no forward begun: decoded for this call
    assert torch.equal(alone, ck.planes_linear(x, *ck.int8_planes(layers[0].parts()["qweight"]), layers[0].scale))


def test_pipeline_raises_a_decoder_error_in_the_forward(stream_model, monkeypatch):
    model, layers, pipeline = stream_model
    if CpuPipeline.cores() < 2:
        pytest.skip("one core: no decoder thread")
    first = forward(model)
    threads = torch.get_num_threads()
    orig = Int8PlanesStreamLinear.decode_into
    bad = layers[3]

    def broken(self, out):
        if self is bad and threading.current_thread().name == "codecllm-decoder":
            raise DecodeError("chunk 0: broken on purpose")
        orig(self, out)

    monkeypatch.setattr(Int8PlanesStreamLinear, "decode_into", broken)
    with pytest.raises(DecodeError, match="broken on purpose"):
        forward(model)
    assert torch.get_num_threads() == threads and pipeline.owner is None and pipeline.decoder is None
    assert len(pipeline.free) + len(pipeline.ready) == CpuPipeline.slots()  # no buffer lost
    monkeypatch.setattr(Int8PlanesStreamLinear, "decode_into", orig)
    assert torch.equal(forward(model), first)


def test_pipeline_on_one_core_decodes_when_called(tmp_path, monkeypatch):
    """On one core: no decoder thread, one buffer (and one counted by ``footprint``), torch's threads left
    alone."""
    from codecllm.loader import footprint

    monkeypatch.setattr(CpuPipeline, "cores", staticmethod(lambda: 1))
    out, model, layers, pipeline = load_stream(tmp_path)
    assert len(pipeline.free) == 1 == CpuPipeline.slots()
    one = footprint(out, "cpu")["stream"]["bytes"]
    monkeypatch.setattr(CpuPipeline, "cores", staticmethod(lambda: 2))
    assert footprint(out, "cpu")["stream"]["bytes"] - one == (CpuPipeline.SLOTS - 1) * pipeline.nbytes
    monkeypatch.setattr(CpuPipeline, "cores", staticmethod(lambda: 1))
    threads = torch.get_num_threads()
    names = decoded_on(layers, monkeypatch)
    first, second = forward(model), forward(model)
    assert torch.equal(first, second) and set(names) == {"MainThread"} and torch.get_num_threads() == threads


def test_pipeline_with_forwards_from_two_threads(stream_model):
    model, layers, pipeline = stream_model
    expected = forward(model)
    results, errors = [], []

    def run():
        try:
            for _ in range(4):
                results.append(forward(model))
        except BaseException as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=run) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors and len(results) == 8
    assert all(torch.equal(r, expected) for r in results)
    assert pipeline.owner is None and len(pipeline.free) + len(pipeline.ready) == CpuPipeline.slots()


def test_pipeline_with_a_nested_forward(stream_model, monkeypatch):
    """A forward of the model inside its own forward (a wrapper's) decodes its layers itself and leaves the
    outer one's pipeline and learned order alone."""
    model, layers, pipeline = stream_model
    if CpuPipeline.cores() < 2:
        pytest.skip("one core: no decoder thread")
    expected = forward(model)
    inner = []

    def nested(*_):
        if not inner:
            inner.append(None)
            inner[0] = forward(model)

    hook = model.model.layers[1].register_forward_pre_hook(nested)
    names = decoded_on(layers, monkeypatch)
    try:
        assert torch.equal(forward(model), expected)
    finally:
        hook.remove()
    assert torch.equal(inner[0], expected) and pipeline.owner is None and pipeline.depth == 0
    assert pipeline.order == layers
    assert names.count("MainThread") == len(layers)  # the nested forward's; the outer's came from the decoder
    assert torch.equal(forward(model), expected)


def test_pipeline_after_an_interrupted_forward(stream_model, monkeypatch):
    """A forward ended by ``KeyboardInterrupt`` (which forward hooks do not see) or by an error still ends
    the pipeline: torch's threads restored, no forward left open, no order learned from a part."""
    model, layers, pipeline = stream_model
    threads = torch.get_num_threads()

    def interrupt(*_):
        raise KeyboardInterrupt

    hook = model.model.layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        forward(model)  # while learning the order
    assert pipeline.order is None and pipeline.owner is None
    hook.remove()
    expected = forward(model)
    assert pipeline.order == layers
    hook = model.model.layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        forward(model)  # with the decoder thread running
    hook.remove()
    assert torch.get_num_threads() == threads and pipeline.owner is None and pipeline.decoder is None
    assert len(pipeline.free) + len(pipeline.ready) == CpuPipeline.slots()
    assert pipeline.order == layers and torch.equal(forward(model), expected)
    join, calls = threading.Thread.join, []

    def interrupted_join(self, *args):  # Ctrl-C while the forward's end waits for the decoder
        calls.append(self)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return join(self, *args)

    monkeypatch.setattr(threading.Thread, "join", interrupted_join)
    with pytest.raises(KeyboardInterrupt):
        forward(model)
    monkeypatch.setattr(threading.Thread, "join", join)
    assert torch.get_num_threads() == threads and pipeline.owner is None and pipeline.decoder is None
    assert len(pipeline.free) + len(pipeline.ready) == CpuPipeline.slots()
    assert torch.equal(forward(model), expected)


def test_stream_layer_with_autograd_decodes_its_own_copy(tmp_path):
    """With gradients on, a stream layer decodes into a buffer of its own, which autograd keeps for the
    backward pass: the pipeline's buffers are reused by the next layers."""
    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=1), dtype=torch.float32)
    codecllm.convert(src, tmp_path / "m.cllm", quant="none")  # (float32 weights: the decoded bytes are the weight)
    with pytest.warns(UserWarning, match="stream mode holds"):
        stream = codecllm.load(tmp_path / "m.cllm", mode="stream")
    resident = codecllm.load(tmp_path / "m.cllm")
    q, k = stream.model.layers[0].self_attn.q_proj, stream.model.layers[0].self_attn.k_proj
    assert isinstance(q, CpuStreamed) and isinstance(k, CpuStreamed) and q.pipeline is k.pipeline is not None
    x = torch.randn(2, q.in_features, requires_grad=True)
    y = q(x)
    k(torch.randn(2, k.in_features, requires_grad=True))  # another weight, decoded since
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    resident.model.layers[0].self_attn.q_proj(x_ref).square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


def test_int4_stream_keeps_the_kernel_layout_and_equals_resident(tmp_path):
    """int4 in CPU stream mode keeps its codes zstd-coded in the int4 kernel's layout: nothing is repacked
    per call, and the logits equal resident mode's (the same kernel on the same codes), bit for bit."""
    from codecllm.schemes.int4 import Int4PackedStreamLinear, Int4StreamLinear

    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=2, hidden_size=128, intermediate_size=256))
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="int4", group_size=32)
    stream, resident = codecllm.load(out, mode="stream"), codecllm.load(out)
    kinds = {type(m) for m in stream.modules() if isinstance(m, CpuStreamed)}
    assert Int4PackedStreamLinear in kinds and Int4StreamLinear not in kinds
    for name, m in stream.named_modules():
        if isinstance(m, Int4PackedStreamLinear):
            assert torch.equal(m.parts()["qweight"], resident.get_submodule(name).qweight), name
    long_ids = torch.arange(ck.SMALL_M + 8).unsqueeze(0) * 7 % 256
    for ids in (IDS, long_ids, IDS):  # (the first forward learns the order; the others run the decoder thread)
        assert torch.equal(forward(stream, ids), forward(resident, ids))
