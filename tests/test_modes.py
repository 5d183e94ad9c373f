"""What each load mode holds (``codecllm.loader.footprint``), the notice where stream mode does not pay,
``mode="auto"``, and ``codecllm-dump``'s per-mode GPU bytes: the accounting, on the CPU (the GPU side is
in tests/test_gpu.py)."""

import json
import warnings

import pytest
import torch
from click.testing import CliRunner

import codecllm
from codecllm.cli import dump_cmd
from codecllm.format import CllmFile
from codecllm.loader import footprint
from conftest import llama_config, save_tiny


def linear_names(f: CllmFile) -> list[str]:
    return [n for n in f.doc.tensors if n.endswith("_proj.weight") or n == "lm_head.weight"]


def test_lossless_bf16_on_cuda_by_hand(tmp_path):
    """A bfloat16 lossless file on CUDA: resident holds every tensor in bfloat16; stream holds each Linear
    weight (the untied head included) in 12 bits per weight plus a row table, the rest as resident, and
    one block of rows to decode for cuBLAS (here the largest weight); it is estimated faster."""
    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=2), dtype=torch.bfloat16)
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="lossless")
    with CllmFile(out) as f:
        recs = f.doc.tensors.values()
        linear = [f.doc.tensors[n] for n in linear_names(f)]
        total = sum(r.numel * 2 for r in recs)
        streamed = sum(r.numel * 3 // 2 + 4 * (r.shape[0] + 1) for r in linear)
        stream = total - sum(r.numel * 2 for r in linear) + streamed + max(r.numel * 2 for r in linear)
    plan = footprint(out, "cuda")
    assert plan["resident"] == {"bytes": total, "speed": 1.0}
    assert plan["stream"]["bytes"] == stream
    assert plan["stream"]["speed"] > 1.0
    # float32 computing: the same weights resident take twice the bytes, stream's layout the same
    assert footprint(out, "cuda", dtype=torch.float32)["resident"]["bytes"] == 2 * total
    # the codes ANS-coded too (gpu_stream_codec="ans"): estimated by the file's own coded exponent planes,
    # plus one block of codes to decode into (here the largest weight's, under SMALL_BLOCK_BYTES)
    with CllmFile(out) as f:
        coded = sum(sum(p.chunks) or p.nbytes for r in linear for n, p in f.doc.tensors[r.name].parts.items() if n.startswith("exponent"))
    small = footprint(out, "cuda", gpu_stream_codec="ans")
    assert small["resident"] == plan["resident"]
    assert small["stream"]["bytes"] == (total - sum(r.numel * 2 for r in linear) + sum(r.numel + 4 * (r.shape[0] + 1) for r in linear)
                                        + coded + max(r.numel // 2 for r in linear) + max(r.numel * 2 for r in linear))
    assert small["stream"]["bytes"] < stream and 0.5 < small["stream"]["speed"] < 1.0


def test_int8_on_cpu_by_hand_notice_and_auto(tmp_path):
    """int8 on the CPU: resident holds codes and scales. Stream holds, per Linear weight, about the stored
    codes' bytes: the q and o projections and the head (rows a multiple of 64) as 4-bit planes, the
    others (32 or 160 rows) as the file's payload where it is entropy-coded; plus the pipeline's
    buffers (``CpuPipeline.slots()``), each as large as the largest decode (half the codes for planes), estimated slower.
    Loading in stream mode says so in one line where it saves under 5%; ``auto`` loads resident, and the
    model says which mode it took."""
    from codecllm.qmodules import CpuPipeline

    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=2))
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="int8")
    plan = footprint(out, "cpu")
    with CllmFile(out) as f:
        quantized = [r for r in f.doc.tensors.values() if not r.scheme.lossless]
        planes = [r for r in quantized if r.name.endswith(("q_proj.weight", "o_proj.weight", "lm_head.weight"))]
        payload = [r for r in quantized if r.name in linear_names(f) and r not in planes and r.main.chunks]
        others = sum(r.numel * 4 for r in f.doc.tensors.values() if r.scheme.lossless)
        resident = others + sum(p.nbytes for r in quantized for p in r.parts.values())
        decoded = [r.main.nbytes // 2 for r in planes] + [r.main.nbytes for r in payload]
        stream = (resident + sum((sum(r.main.chunks) or r.main.nbytes) - r.main.nbytes for r in planes + payload)
                  + CpuPipeline.slots() * max(decoded))
    assert len(planes) == 5 and len(payload) >= 4
    assert plan["resident"] == {"bytes": resident, "speed": 1.0}
    assert plan["stream"]["bytes"] == stream and plan["stream"]["speed"] < 0.8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = codecllm.load(out, mode="stream")
    notices = [str(w.message) for w in caught if "stream mode holds" in str(w.message)]
    assert model.codecllm_mode == "stream"
    assert {type(model.get_submodule(r.name[:-len(".weight")])).__name__ for r in planes} == {"Int8PlanesStreamLinear"}
    assert {type(model.get_submodule(r.name[:-len(".weight")])).__name__ for r in payload} == {"Int8StreamLinear"}
    assert stream > 0.95 * resident  # (this tiny model's buffers outweigh what zstd saves)
    assert len(notices) == 1 and "\n" not in notices[0] and f"{resident / 1e6:.1f} MB" in notices[0], notices
    assert codecllm.load(out, mode="auto").codecllm_mode == "resident"


def test_stream_layers_of_two_schemes_share_one_pipeline(tmp_path):
    """int8 with the q projections in int4: both schemes' CPU stream layers (int8 as 4-bit planes, int4 in
    the int4 kernel's layout, with its (scale, offset) pairs) decode into the model's one pipeline, whose buffers the estimate counts once
    (``CpuPipeline.slots()`` of the largest decode)."""
    from codecllm.qmodules import CpuPipeline

    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=2, hidden_size=128, intermediate_size=256))
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="int8", overrides=[("*.q_proj", "int4:g32")])
    with CllmFile(out) as f:
        recs = f.doc.tensors.values()
        assert {r.scheme.id for r in recs} >= {"int8", "int4"}
        quantized = [r for r in recs if not r.scheme.lossless]
        planes = [r for r in quantized if r.name in linear_names(f) and r.scheme.id == "int8"]
        payload = [r for r in quantized if r.name in linear_names(f) and r.scheme.id == "int4" and r.main.chunks]
        resident = sum(r.numel * 4 for r in recs if r.scheme.lossless) + sum(p.nbytes for r in quantized for p in r.parts.values())
        decoded = [r.main.nbytes // 2 for r in planes] + [r.main.nbytes for r in payload]
        pairs = sum(4 * r.parts["scale"].shape[0] * r.parts["scale"].shape[1] for r in payload)  # the int4 kernel's (scale, offset) pairs
        stream = (resident + sum((sum(r.main.chunks) or r.main.nbytes) - r.main.nbytes for r in planes + payload)
                  + pairs + CpuPipeline.slots() * max(decoded))
    assert len(payload) == 2 and len(planes) >= 10
    assert footprint(out, "cpu")["stream"]["bytes"] == stream
    model = codecllm.load(out, mode="stream")
    pipelines = {id(m.pipeline) for m in model.modules() if hasattr(m, "decode_into")}
    assert len(pipelines) == 1 and isinstance(model.model.layers[0].self_attn.q_proj.pipeline, CpuPipeline)


def test_stream_that_holds_as_much_warns_once(tmp_path):
    """A lossless file on the CPU has no stream stand-ins: stream mode holds what resident does, which the
    loader says in one line (and still loads in stream mode, as asked); ``auto`` takes resident."""
    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=1), dtype=torch.bfloat16)
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="lossless")
    plan = footprint(out, "cpu")
    assert plan["stream"]["bytes"] == plan["resident"]["bytes"]
    with pytest.warns(UserWarning, match=r"stream mode holds .* only 0\.0% less than resident mode's") as caught:
        model = codecllm.load(out, mode="stream")
    assert len([w for w in caught if "stream mode holds" in str(w.message)]) == 1
    assert model.codecllm_mode == "stream"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice for resident or auto
        assert codecllm.load(out, mode="auto").codecllm_mode == "resident"
        assert codecllm.load(out).codecllm_mode == "resident"


def test_auto_takes_stream_where_it_holds_less_and_is_not_slower(tmp_path, monkeypatch):
    """``auto``'s rule, on the estimate: stream where it holds less and is at most 10% slower."""
    from codecllm import loader

    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=1))
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="int8")
    for speed, mode in ((0.95, "stream"), (0.85, "resident")):
        monkeypatch.setattr(loader, "_footprint", lambda *a, s=speed: {"resident": {"bytes": 100, "speed": 1.0},
                                                                       "stream": {"bytes": 50, "speed": s}})
        assert codecllm.load(out, mode="auto").codecllm_mode == mode


def test_mode_and_device_errors(tmp_path, tiny_llama):
    out = tmp_path / "m.cllm"
    codecllm.convert(tiny_llama, out)
    with pytest.raises(codecllm.CodecLLMError, match="mode 'fast' is not one of resident, stream, auto"):
        codecllm.load(out, mode="fast")
    with pytest.raises(codecllm.CodecLLMError, match="device 'mps' is not supported"):
        footprint(out, "mps")
    with pytest.raises(codecllm.CodecLLMError, match="'gpu' is not a torch device"):
        footprint(out, "gpu")
    with pytest.raises(codecllm.CodecLLMError, match="stream codec 'lz4' is not one of None, 'ans', 'zstd'"):
        footprint(out, "cuda", gpu_stream_codec="lz4")
    with pytest.raises(codecllm.CodecLLMError, match="stream codec 'lz4' is not one of None, 'ans', 'zstd'"):
        footprint(out, "cpu", gpu_stream_codec="lz4")
    with pytest.raises(codecllm.CodecLLMError, match="stream codec 'lz4' is not one of None, 'ans', 'zstd'"):
        codecllm.load(out, mode="stream", gpu_stream_codec="lz4")  # on the CPU too, where it would do nothing


def test_dump_shows_gpu_bytes_per_mode(tmp_path, tiny_llama):
    out = tmp_path / "m.cllm"
    codecllm.convert(tiny_llama, out)
    plan = footprint(out, "cuda")
    r = CliRunner().invoke(dump_cmd, [str(out), "--json", "--no-tensors"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["gpu_bytes"] == json.loads(json.dumps(plan))
    r = CliRunner().invoke(dump_cmd, [str(out), "--no-tensors"])
    assert r.exit_code == 0 and f"on a GPU: resident {plan['resident']['bytes']} bytes; stream {plan['stream']['bytes']} bytes" in r.output


def test_dump_without_an_estimate_still_shows_the_header(tmp_path, tiny_llama, monkeypatch):
    """A config transformers cannot build: the header is shown, the estimate says why it is missing."""
    import codecllm.loader

    out = tmp_path / "m.cllm"
    codecllm.convert(tiny_llama, out)

    def broken(*a, **k):
        raise ValueError("no such architecture\nsecond line")

    monkeypatch.setattr(codecllm.loader, "empty_model", broken)
    r = CliRunner().invoke(dump_cmd, [str(out), "--no-tensors"])
    assert r.exit_code == 0 and "on a GPU: not estimated (no such architecture)" in r.output, r.output


def test_int4_resident_counts_the_cpu_kernel_layout_on_the_cpu_only(tmp_path):
    """int4 resident on the CPU keeps, beside the stored parts, the codes repacked for the int4 kernel and
    its (scale, offset) pairs (made at the first decode step); on CUDA the stored parts only."""
    src = save_tiny(tmp_path / "m", llama_config(num_hidden_layers=1, hidden_size=128, intermediate_size=256))
    out = tmp_path / "m.cllm"
    codecllm.convert(src, out, quant="int4", group_size=32)
    with CllmFile(out) as f:
        recs = list(f.doc.tensors.values())
        int4 = [r for r in recs if r.scheme.id == "int4" and r.name in linear_names(f)]
        parts = sum(p.nbytes for r in recs if not r.scheme.lossless for p in r.parts.values())
        floats = sum(r.numel for r in recs if r.scheme.lossless)
        repack = sum(r.numel // 2 + 4 * r.parts["scale"].shape[0] * r.parts["scale"].shape[1] for r in int4)
    assert int4 and all(r.shape[0] % 16 == 0 and r.shape[1] % 32 == 0 for r in int4)
    assert footprint(out, "cpu")["resident"]["bytes"] == parts + 4 * floats + repack
    assert footprint(out, "cuda")["resident"]["bytes"] == parts + 2 * floats
    model = codecllm.load(out)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))  # the first decode step repacks
    made = [m.__dict__["_int4pack"][1] for m in model.modules() if "_int4pack" in m.__dict__]
    assert len(made) == len(int4) and sum(p.nbytes + q.nbytes for p, q in made) == repack
