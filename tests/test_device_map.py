"""A model over several devices (``device_map``, ``codecllm.placement``): the placement arithmetic on the CPU
(fake GPU sizes, ``codecllm.loader.plan``), the errors, and (marker ``gpu``) loads over one GPU and the CPU
(offload) and over two GPUs, against the single-GPU load of the same file."""

import gc

import pytest
import torch

import codecllm
from codecllm.errors import DeviceError, DeviceMapError
from codecllm.kernels.launch import scratch_bytes
from codecllm.loader import plan
from conftest import llama_config, save_tiny

pytest.importorskip("accelerate")
MB = 10**6


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    """int8 (every Linear), 4 layers of hidden 256: about 0.7 MB per layer."""
    d = tmp_path_factory.mktemp("m")
    src = save_tiny(d / "src", llama_config(num_hidden_layers=4, hidden_size=256, intermediate_size=640, vocab_size=512))
    out = d / "m.cllm"
    codecllm.convert(src, out, quantize_all=True)
    return out


def test_plan_places_what_each_module_holds(llama4):
    """accelerate's placement over the bytes each tensor holds in the chosen mode (not fp16 sizes): with
    room for two layers of int8 codes on the first GPU beyond what it reserves, the four layers split two
    and two; fp16 sizes would fit one. The prediction per device is the sum of its tensors' bytes, plus the
    kernels' scratch."""
    reserve = scratch_bytes()
    with codecllm.format.CllmFile(llama4) as f:
        recs = f.doc.tensors
        held = {n: sum(p.nbytes for p in r.parts.values()) for n, r in recs.items()}
        layer = sum(b for n, b in held.items() if n.startswith("model.layers.0."))
        dense_layer = sum(r.numel * 2 for n, r in recs.items() if n.startswith("model.layers.0."))
    assert dense_layer > 1.8 * layer
    # (accelerate keeps the first GPU room for its largest layer, where an offloaded module would compute)
    room = reserve + held["model.embed_tokens.weight"] + int(3.2 * layer)
    p = plan(llama4, "sequential", max_memory={0: room, 1: room + 10 * MB})
    on = {i: p.device_of(f"model.layers.{i}") for i in range(4)}
    assert on[0] == on[1] == "cuda:0" and on[2] == on[3] == "cuda:1", p.map
    assert "cpu" not in p.map.values()
    for d in ("cuda:0", "cuda:1"):
        mine = [n for n, w in p.where.items() if w == d]
        scratch = scratch_bytes(int(d[-1]))  # (made once per process and GPU)
        assert p.predicted[d] - scratch == sum(held[n] for n in mine)  # (the norms, float16, hold as stored)
        assert p.predicted[d] <= (room if d == "cuda:0" else room + 10 * MB)


def test_plan_offloads_what_does_not_fit(llama4):
    """GPUs too small for the model: the rest goes to "cpu" (offload, computed on the first GPU, which
    keeps room for one offloaded module: the staging buffer); nothing fits anywhere: a clear error."""
    reserve = scratch_bytes()
    p = plan(llama4, "sequential", max_memory={0: reserve + 2 * MB, "cpu": 10**9})
    assert "cpu" in p.map.values() and p.main == "cuda:0"
    assert all("layers." not in k or k.count(".") == 2 for k in p.map), "containers are split into the modules that run"
    with codecllm.format.CllmFile(llama4) as f:  # pinned CPU memory: each offloaded tensor's parts, 256-byte aligned
        cpu = sum(-(-sum(q.nbytes for q in f.doc.tensors[n].parts.values()) // 256) * 256 for n, w in p.where.items() if w == "cpu")
    assert p.staging > 0 and p.predicted["cpu"] == cpu
    assert p.predicted["cuda:0"] <= reserve + 2 * MB
    with pytest.raises(DeviceMapError, match="does not fit"):
        plan(llama4, "auto", max_memory={0: reserve, "cpu": 1000})


def test_plan_everything_offloaded(llama4):
    """A GPU share too small for any module: everything is offloaded, and computes on that GPU."""
    p = plan(llama4, "sequential", max_memory={0: scratch_bytes() + 1000, "cpu": 10**9})
    assert set(p.map.values()) == {"cpu"} and p.main == "cuda:0"
    assert p.predicted["cuda:0"] == scratch_bytes(0) + p.staging


def test_flatten_partitions_the_model(llama4):
    """Keys inside other keys, containers and tensor names become a partition into modules that run."""
    from codecllm.architecture import empty_model
    from codecllm.format import CllmFile
    from codecllm.placement import flatten

    with CllmFile(llama4) as f:
        model = empty_model(f.config(), torch.float16)
    flat = flatten(model, {"": "cpu", "model.layers.1": "cuda:0", "lm_head.weight": "cuda:1"})
    assert flat == {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cuda:0", "model.layers.2": "cpu",
                    "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cuda:1"}
    with pytest.raises(DeviceMapError, match="names no module or tensor"):
        flatten(model, {"": "cpu", "model.layer.3": "cuda:0"})
    with pytest.raises(DeviceMapError, match="parts of 'model.norm'"):
        flatten(model, {"": "cpu", "model.norm.weight": "cuda:0", "model.norm": "cuda:1"})


def test_tied_offload_is_one_unit(tmp_path):
    """A tied embedding and head offloaded: one unit holding the shared table once, staged for both."""
    src = save_tiny(tmp_path / "src", llama_config(tie_word_embeddings=True))
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out)
    p = plan(out, {"model.embed_tokens": "cpu", "lm_head": "cpu", "": 0})
    assert [sorted(keys) for keys, _ in p.units] == [["lm_head", "model.embed_tokens"]]
    assert p.units[0][1] == ["model.embed_tokens.weight"]


def test_plan_balanced(llama4):
    """"balanced" spreads the layers over both GPUs even where one would hold them all."""
    p = plan(llama4, "balanced", max_memory={0: 10**9, 1: 10**9, "cpu": 10**9})
    assert {"cuda:0", "cuda:1"} <= set(p.map.values())
    assert plan(llama4, "sequential", max_memory={0: 10**9, 1: 10**9, "cpu": 10**9}).map == {"": "cuda:0"}


def test_plan_stream_mode_counts_stream_bytes(tmp_path):
    """Stream mode: the prediction counts the compressed weights and the workspaces."""
    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=4, hidden_size=256, intermediate_size=640), dtype=torch.bfloat16)
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="lossless")
    mem = {0: 10**9, 1: 10**9, "cpu": 10**9}
    split = {"model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 0, "": 1}
    res = plan(out, split, mode="resident")
    st = plan(out, split, mode="stream")
    assert st.mode == "stream" and st.streamed and not res.streamed
    assert st.predicted["cuda:0"] < res.predicted["cuda:0"]
    assert plan(out, "balanced", max_memory=mem, mode="stream").streamed


def test_a_map_on_one_device_chooses_the_mode_for_it_once(llama4):
    """A policy whose memory leaves the whole model on one device (here the CPU: no GPU in max_memory)
    loads there with the mode chosen for that device, and says where stream mode does not pay once."""
    import warnings

    from codecllm import loader
    from codecllm.format import CllmFile

    with CllmFile(llama4) as f, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = loader._fill_mapped(None, f, "auto", {"cpu": 10**10}, "stream", None, None)
    notices = [str(w.message) for w in caught if "stream mode holds" in str(w.message)]
    assert len(notices) == 1 and " on cpu," in notices[0], notices
    assert model.codecllm_device_map == {"": "cpu"}


def test_device_map_errors(llama4):
    with pytest.raises(DeviceMapError, match="'disk' is not supported"):
        codecllm.load(llama4, device_map={"": "disk"})
    with pytest.raises(DeviceMapError, match="not both"):
        codecllm.load(llama4, device="cpu", device_map="auto")
    with pytest.raises(DeviceMapError, match="with device_map only"):
        codecllm.load(llama4, max_memory={"cpu": "1GB"})
    with pytest.raises(DeviceMapError, match="named device_map policy"):
        codecllm.load(llama4, device_map={"": "cpu"}, max_memory={"cpu": "1GB"})
    with pytest.raises(DeviceMapError, match="is not a device"):
        codecllm.load(llama4, device_map={"": "tpu:3"})
    with pytest.raises(DeviceMapError, match="nowhere"):
        plan(llama4, {"model": 0})
    with pytest.raises(DeviceMapError, match="shared by model.embed_tokens.weight, lm_head.weight"):
        plan(_tied(llama4), {"model.embed_tokens": 0, "": 1})


def _tied(llama4):
    out = llama4.parent / "tied.cllm"
    if not out.exists():
        src = save_tiny(llama4.parent / "tied-src", llama_config(tie_word_embeddings=True))
        codecllm.convert(src, out)
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="without CUDA only")
def test_policies_without_cuda_load_on_the_cpu(llama4):
    """No GPU: "auto" and the like load on the CPU, as transformers does; a map naming a GPU is refused."""
    ref = codecllm.load(llama4)
    model = codecllm.load(llama4, device_map="auto")
    ids = torch.tensor([[1, 5, 9, 200]])
    assert torch.equal(model(ids).logits, ref(ids).logits)
    with pytest.raises(DeviceError, match="no CUDA device"):
        codecllm.load(llama4, device_map={"model": 0, "lm_head": "cpu"})


# -- GPU --


def _offload_map(n_layers: int, offloaded: range) -> dict:
    m = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    m.update({f"model.layers.{i}": ("cpu" if i in offloaded else 0) for i in range(n_layers)})
    return m


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["resident", "stream"])
def test_smollm2_offloaded_layers_equal_all_gpu(smollm2_cllm, eval_ids, mode):
    """SmolLM2 (int8) with a third of its layers offloaded to the CPU: logits bit for bit those of the
    all-GPU load (a 512-token forward and greedy decoding steps); the GPU holds what the placement predicts
    (within 5%), the offloaded layers' weights are in pinned CPU memory."""
    ids = eval_ids[:512].view(1, -1).to("cuda")
    ref = codecllm.load(smollm2_cllm, device="cuda", mode=mode)
    with torch.no_grad():
        want = ref(ids).logits
        want_gen = ref.generate(ids[:, :32], max_new_tokens=16, do_sample=False)
    del ref
    gc.collect()  # (a loaded model holds reference cycles: freed by the collector, which could run during the next load)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = codecllm.load(smollm2_cllm, device_map=_offload_map(30, range(10, 20)), mode=mode)
    held = torch.cuda.memory_allocated() - before
    predicted = model.codecllm_placement.predicted["cuda:0"]
    print(f"{mode}: GPU after load {held / 1e6:.2f} MB, predicted {predicted / 1e6:.2f} MB, CPU {model.codecllm_placement.predicted['cpu'] / 1e6:.2f} MB")
    assert abs(held - predicted) <= 0.05 * predicted
    staging = model.model.layers[12].self_attn.q_proj.qweight.untyped_storage().data_ptr()
    for i in range(10, 20):  # views of the one staging buffer
        assert all(t.untyped_storage().data_ptr() == staging for t in model.model.layers[i].buffers())
    with torch.no_grad():
        got = model(ids).logits
        got_gen = model.generate(ids[:, :32], max_new_tokens=16, do_sample=False)
        again = model(ids).logits
    assert torch.equal(got, want) and torch.equal(again, want)
    assert torch.equal(got_gen, want_gen)


@pytest.mark.gpu
@pytest.mark.parametrize("quant,dtype", [("int4", torch.float16), ("lossless", torch.bfloat16), ("none", torch.float16)])
@pytest.mark.parametrize("mode", ["resident", "stream"])
def test_offload_every_scheme_and_mode(tmp_path, quant, dtype, mode):
    """Every scheme in both modes: layers offloaded to the CPU compute as on the GPU, bit for bit, in
    eager calls and in a CUDA graph."""
    from codecllm.gpu.graphs import capture

    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=4, hidden_size=256, intermediate_size=640, vocab_size=512), dtype=dtype)
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant=quant)
    ids = torch.randint(3, 500, (1, 40), device="cuda")
    ref = codecllm.load(out, device="cuda", mode=mode)
    model = codecllm.load(out, device_map=_offload_map(4, range(1, 3)), mode=mode)
    with torch.no_grad():
        for n in (40, 1):
            assert torch.equal(model(ids[:, :n]).logits, ref(ids[:, :n]).logits), n
        one = ids[:, :1]
        model(one)
        g, y = capture(lambda: model(one).logits)
        g.replay()
        assert torch.equal(y, ref(one).logits)


@pytest.mark.gpu
def test_offloaded_weights_read_outside_forward(tmp_path):
    """Reading an offloaded weight outside its module's forward (``state_dict()``, a stand-in's
    ``weight.dequantize()``, a norm through ``state_dict``) gives its own values, not those of the module
    staged last; a tied, offloaded embedding and head are staged as one."""
    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=4, tie_word_embeddings=True))
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out)
    ref = codecllm.load(out, device="cuda")
    mapping = _offload_map(4, range(1, 4))
    mapping.update({"model.embed_tokens": "cpu", "lm_head": "cpu"})
    model = codecllm.load(out, device_map=mapping)
    ids = torch.randint(3, 200, (1, 12), device="cuda")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        for i in (1, 2):
            assert torch.equal(model.model.layers[i].self_attn.q_proj.weight.dequantize(), ref.model.layers[i].self_attn.q_proj.weight.dequantize())
        want, got = ref.state_dict(), model.state_dict()
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(got[k].cpu(), want[k].cpu()), k
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.hf_device_map["lm_head"] == "cpu"


@pytest.mark.gpu
def test_from_pretrained_device_map_offload(tmp_path):
    from transformers import AutoModelForCausalLM

    from codecllm.hf import write_hf_dir

    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=4))
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out)
    hf = write_hf_dir(out, tmp_path / "hf")
    ids = torch.randint(3, 200, (1, 12), device="cuda")
    ref = codecllm.load(out, device="cuda")
    model = AutoModelForCausalLM.from_pretrained(hf, device_map=_offload_map(4, range(2, 4)))
    assert model.codecllm_device_map["model.layers.3"] == "cpu"
    assert torch.equal(model(ids).logits, ref(ids).logits)


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def _l8_shaped(tmp_path, layers=4):
    """Llama-3-8B's shapes at a narrower width (hidden 2048, intermediate 7168, 32k vocabulary)."""
    cfg = llama_config(num_hidden_layers=layers, hidden_size=2048, intermediate_size=7168, num_attention_heads=16, num_key_value_heads=4,
                       vocab_size=32000, max_position_embeddings=4096)
    src = save_tiny(tmp_path / "m", cfg)
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out)
    return out


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("mode", ["resident", "stream"])
def test_two_gpus_equal_one(tmp_path, mode):
    """Split over two GPUs: each GPU holds its layers (within 5% of the prediction); the decode step's
    logits bit for bit those of the one-GPU load, prefill's within fp16 rounding, and generate() the
    same tokens."""
    out = _l8_shaped(tmp_path)
    ids = torch.randint(3, 32000, (1, 64), device="cuda:0")
    ref = codecllm.load(out, device="cuda:0", mode=mode)
    with torch.no_grad():
        cache = ref(ids).past_key_values
        want_step = ref(ids[:, -1:], past_key_values=cache).logits
        want_pre = ref(ids).logits
        want_gen = ref.generate(ids[:, :8], max_new_tokens=12, do_sample=False)
    del ref, cache
    gc.collect()
    torch.cuda.empty_cache()
    before = [torch.cuda.memory_allocated(i) for i in range(2)]
    model = codecllm.load(out, device_map={"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.rotary_emb": 0,
                                           "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}, mode=mode)
    for i in range(2):
        held, predicted = torch.cuda.memory_allocated(i) - before[i], model.codecllm_placement.predicted[f"cuda:{i}"]
        assert abs(held - predicted) <= 0.05 * predicted, (i, held, predicted)
    with torch.no_grad():
        cache = model(ids).past_key_values
        step = model(ids[:, -1:], past_key_values=cache).logits
        pre = model(ids).logits
        gen = model.generate(ids[:, :8], max_new_tokens=12, do_sample=False)
    assert step.device == ids.device and torch.equal(step, want_step)
    assert torch.allclose(pre, want_pre, atol=2e-2, rtol=0)
    assert torch.equal(gen, want_gen)


@pytest.mark.gpu
@two_gpus
def test_model_larger_than_one_gpus_max_memory(tmp_path):
    """A max_memory that one GPU's share cannot hold the model in: "auto" spreads it, and it generates."""
    out = _l8_shaped(tmp_path)
    p = plan(out, "sequential", max_memory={0: "10GiB"})
    total = p.predicted["cuda:0"]
    share = scratch_bytes() + int(0.6 * total)
    model = codecllm.load(out, device_map="auto", max_memory={0: share, 1: share})
    assert set(model.codecllm_device_map.values()) == {"cuda:0", "cuda:1"}
    ids = torch.randint(3, 32000, (1, 8), device="cuda:0")
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert gen.shape == (1, 16)
