import os
import stat

import pytest
import torch
from torch import nn

import codecllm
from codecllm.errors import CodecLLMError, DeviceError, OutputExistsError, SourceError
from codecllm.format import CllmFile
from codecllm.schemes.int8 import Int8Embedding, Int8Linear, Int8StreamLinear
from conftest import llama_config, save_tiny


def reference(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 250]])


def test_none_reloads_bit_exact_weights(tiny_llama, tmp_path):
    out = tmp_path / "m.cllm"
    codecllm.convert(tiny_llama, out, quant="none")
    ref = reference(tiny_llama, torch.float16)
    model = codecllm.load(out, dtype=torch.float16)
    ref_sd, sd = ref.state_dict(), model.state_dict()
    for name, t in ref_sd.items():
        assert torch.equal(sd[name].view(torch.uint8), t.view(torch.uint8)), name
    assert torch.equal(logits(model, IDS), logits(ref, IDS))


def test_int8_model_matches_original(tiny_llama, tmp_path):
    out = tmp_path / "m.cllm"
    summary = codecllm.convert(tiny_llama, out)
    model = codecllm.load(out)
    assert model.dtype == torch.float32  # fp16 weights compute in float32 on the CPU by default
    q = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(q) == 3 * 7 + 1 - 2  # every Linear, lm_head too, less the two edge MLP outputs
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert not any(isinstance(p, torch.Tensor) and p.dtype == torch.float16 for p in model.parameters())
    ref, got = logits(reference(tiny_llama), IDS), logits(model, IDS)
    assert (got - ref).norm() / ref.norm() < 0.02
    assert summary.to_json()["totals"]["tensors"] == len(CllmFile(out).doc.tensors)


def test_quantize_all_and_skip(tiny_llama, tmp_path):
    codecllm.convert(tiny_llama, tmp_path / "all.cllm", quantize_all=True, skip=["lm_head", "*.self_attn.q_proj"])
    doc = CllmFile(tmp_path / "all.cllm").doc
    assert doc.tensors["model.layers.0.mlp.down_proj.weight"].scheme.id == "int8"
    assert doc.tensors["lm_head.weight"].scheme.id == "none"
    assert {doc.tensors[f"model.layers.{i}.self_attn.q_proj.weight"].scheme.id for i in range(3)} == {"none"}
    assert doc.tensors["model.layers.1.self_attn.k_proj.weight"].scheme.id == "int8"


def test_stream_mode_equals_resident(tiny_llama, tmp_path):
    """Stream mode holds the same weights: bit for bit, and so are its logits where more than
    ``SMALL_M`` rows take the exact float32 path in both modes; with fewer rows, its 4-bit planes go
    through the int4 kernel where resident mode's codes take the int8 one (both bf16 activations), and
    the logits agree within that rounding."""
    from codecllm.kernels.cpu import SMALL_M
    from codecllm.schemes.int8 import Int8PlanesStreamLinear

    out = tmp_path / "m.cllm"
    codecllm.convert(tiny_llama, out, chunk_size=4096)
    resident, stream = codecllm.load(out), codecllm.load(out, mode="stream")
    s = stream.model.layers[1].mlp.up_proj  # 160 rows: the file's payload
    assert isinstance(s, Int8StreamLinear) and (s.in_features, s.out_features, s.bias) == (64, 160, None)
    assert s.payload.dtype == torch.uint8 and s.payload.numel() < 64 * 160
    assert isinstance(stream.model.layers[1].self_attn.q_proj, Int8PlanesStreamLinear)  # 64 rows: planes
    for name, m in resident.named_modules():
        if isinstance(m, Int8Linear):
            assert torch.equal(m.weight.dequantize(), stream.get_submodule(name).weight.dequantize()), name
    long_ids = torch.arange(SMALL_M + 8).unsqueeze(0) * 7 % 256
    assert torch.equal(logits(resident, long_ids), logits(stream, long_ids))
    a, b = logits(resident, IDS), logits(stream, IDS)
    assert (a - b).norm() / a.norm() < 0.01
    g1 = resident.generate(IDS, max_new_tokens=5, do_sample=False)
    g2 = stream.generate(IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(g1, g2)


def test_tied_weights_are_stored_once(tiny_llama_tied, tmp_path):
    out = tmp_path / "m.cllm"
    codecllm.convert(tiny_llama_tied, out)
    f = CllmFile(out)
    assert "lm_head.weight" not in f.doc.tensors and f.doc.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    model = codecllm.load(out)
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.model.embed_tokens, Int8Embedding)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied as transformers ties them
    ref, got = logits(reference(tiny_llama_tied), IDS), logits(model, IDS)
    assert (got - ref).norm() / ref.norm() < 0.02


def test_sharded_checkpoint(tmp_path):
    src = save_tiny(tmp_path / "sharded", llama_config(), shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists()
    codecllm.convert(src, tmp_path / "m.cllm", quant="none")
    ref, got = logits(reference(src), IDS), logits(codecllm.load(tmp_path / "m.cllm"), IDS)
    assert torch.equal(got, ref)


def test_bert_encoder_loads(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, architectures=["BertModel"])
    src = save_tiny(tmp_path / "bert", cfg, dtype=torch.float32)
    codecllm.convert(src, tmp_path / "bert.cllm")
    model = codecllm.load(tmp_path / "bert.cllm")
    assert type(model).__name__ == "BertModel"
    assert any(isinstance(m, Int8Linear) and m.bias is not None for m in model.modules())
    ids = torch.tensor([[2, 7, 9, 11]])
    ref = BertModel.from_pretrained(src).eval()
    with torch.no_grad():
        a, b = ref(ids).last_hidden_state, model(ids).last_hidden_state
    assert (a - b).norm() / a.norm() < 0.02


def test_tokenizer_and_files_are_embedded(tmp_path):
    import json

    from safetensors import safe_open

    src = save_tiny(tmp_path / "src", llama_config())
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    codecllm.convert(src, tmp_path / "m.cllm")
    f = CllmFile(tmp_path / "m.cllm")
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= set(f.doc.files)
    with safe_open(str(tmp_path / "m.cllm"), framework="pt") as st:
        assert "model.layers.0.mlp.up_proj.weight" in st.keys()


# --- the converter's promises about files a user owns ------------------------------------------------


def test_existing_output_is_never_touched_without_force(tiny_llama, tmp_path):
    out = tmp_path / "m.cllm"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="--force"):
        codecllm.convert(tiny_llama, out)
    assert out.read_bytes() == b"precious"
    codecllm.convert(tiny_llama, out, force=True)
    assert out.read_bytes()[8:9] == b"{"
    assert stat.S_IMODE(os.stat(out).st_mode) & 0o044  # readable like any other file, not mkstemp's 0600


def test_header_is_written_into_the_space_left_before_the_data(tiny_llama, tmp_path, monkeypatch):
    """The converter leaves room for the header before the data and pads the header to fill it exactly;
    where the header turns out larger than that room, the data is copied behind it instead: the same
    document and tensors either way."""
    import struct

    from codecllm import converter

    bounds = []
    real = converter._header_bound
    monkeypatch.setattr(converter, "_header_bound", lambda *a: bounds.append(real(*a)) or bounds[-1])
    codecllm.convert(tiny_llama, tmp_path / "a.cllm", quant="int8")
    raw = (tmp_path / "a.cllm").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert 8 + n == bounds[0] and n % 8 == 0 and raw[8 + n - 1:8 + n] == b" "
    monkeypatch.setattr(converter, "_header_bound", lambda *a: 16)  # far too small
    codecllm.convert(tiny_llama, tmp_path / "b.cllm", quant="int8")
    m = struct.unpack("<Q", (tmp_path / "b.cllm").read_bytes()[:8])[0]
    assert m < n and (tmp_path / "b.cllm").stat().st_size == len(raw) - (n - m)
    with CllmFile(tmp_path / "a.cllm") as a, CllmFile(tmp_path / "b.cllm") as b:
        assert a.doc.to_json() == b.doc.to_json()
        for name, rec in a.doc.tensors.items():
            for pname, part in rec.parts.items():
                assert torch.equal(a.read_part(rec, part), b.read_part(b.doc.tensors[name], b.doc.tensors[name].parts[pname])), (name, pname)
    assert sorted(os.listdir(tmp_path)) == ["a.cllm", "b.cllm", "tiny-llama"]


def test_header_near_the_cap_is_not_padded_past_it(tiny_llama, tmp_path, monkeypatch):
    """Where the header's bound plus its slack would pass the cap, no space is left before the data: the
    header is written as it is (copied in front of the data), and the conversion succeeds as it did
    before headers were padded."""
    import struct

    from codecllm import converter, format

    bounds = []
    real = converter._header_bound
    monkeypatch.setattr(converter, "_header_bound", lambda *a: bounds.append(real(*a)) or bounds[-1])
    codecllm.convert(tiny_llama, tmp_path / "a.cllm", quant="int8")
    with CllmFile(tmp_path / "a.cllm") as f:
        need = len(format.build_header(f.entries, f.doc)) - 8  # the compact header
    cap = bounds[0] - 8 * 1024 - 8 + 64  # the bound itself fits under it; with its slack, it would not
    assert need <= cap
    for mod in (converter, format):
        monkeypatch.setattr(mod, "HEADER_CAP", cap)
    codecllm.convert(tiny_llama, tmp_path / "b.cllm", quant="int8")
    assert bounds[1] == 0
    n = struct.unpack("<Q", (tmp_path / "b.cllm").read_bytes()[:8])[0]
    assert n == need
    assert sorted(os.listdir(tmp_path)) == ["a.cllm", "b.cllm", "tiny-llama"]


def test_entropy_bound_of_a_large_part_from_its_sample():
    """Parts above 256 KiB: the order-0 entropy estimated from 64 blocks of 4 KiB is within 1e-3 of the
    full count, and of uniform bytes within 2e-5 (the sample's bias corrected: 9e-5 below without); smaller
    parts are counted whole."""
    import numpy as np

    from codecllm.converter import _entropy_bytes

    def full(d):
        c = np.bincount(d, minlength=256).astype(np.float64)
        p = c[c > 0] / len(d)
        return float(-(p * np.log2(p)).sum()) * len(d) / 8

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, 1 << 18, dtype=np.uint8)
    assert _entropy_bytes(small) == pytest.approx(full(small), rel=1e-12)
    assert _entropy_bytes(small[:0]) == 0
    big = (rng.standard_normal(12 << 20) * 6).astype(np.int64).clip(-128, 127).astype(np.uint8)  # a skewed distribution
    assert _entropy_bytes(big) == pytest.approx(full(big), rel=1e-3)
    big[6 << 20:] = rng.integers(0, 256, 6 << 20, dtype=np.uint8)  # its second half uniform: the blocks span the whole part
    assert _entropy_bytes(big) == pytest.approx(full(big), rel=1e-3)
    uniform = rng.integers(0, 256, 12 << 20, dtype=np.uint8)
    assert _entropy_bytes(uniform) == pytest.approx(full(uniform), rel=2e-5)


@pytest.mark.parametrize("kind", ["random", "random-then-zeros", "small-random", "small-zeros", "empty"])
def test_incompressible_parts_are_judged_on_a_sample(kind, monkeypatch):
    """A part is coded first on a few evenly spaced chunks (8 of a large part, 2 of a part of 5): random
    bytes are stored raw without coding the rest; where the sample compresses, the other chunks are coded
    and the sample's frames kept, so that no chunk is coded twice and the stored bytes are those of coding
    the part whole."""
    import io

    import numpy as np

    from codecllm.codecs import get_codec
    from codecllm.converter import _Coding, _DataWriter, _encode_part

    zstd = get_codec("zstd")
    size = 4096
    rng = np.random.default_rng(0)
    n = 5 * size if kind.startswith("small") else 0 if kind == "empty" else 100 * size + 7
    data = rng.integers(0, 256, n, dtype=np.uint8)
    if kind == "random-then-zeros":
        data[n // 2:] = 0
    if kind == "small-zeros":
        data[:] = 0
    whole = b"".join(zstd.encode(memoryview(data), size, level=3))
    coded = []  # the chunks each call codes
    real = type(zstd).encode
    monkeypatch.setattr(type(zstd), "encode", lambda self, d, cs, chunks=None, **k: coded.append(chunks) or real(self, d, cs, chunks, **k))
    buf = io.BytesIO()
    part, stored, _ = _encode_part("w", "data", "w", torch.from_numpy(data), _Coding("zstd", size, {"level": 3}), _DataWriter(buf))
    sample = [0, 14, 28, 42, 57, 71, 85, 100]  # 8 of 101 chunks, the first and the last among them
    if kind == "random":
        assert (part.codec, stored, coded) == ("raw", n, [sample])
    elif kind == "random-then-zeros":
        assert part.codec == "zstd" and stored < 0.6 * n
        assert coded == [sample, [i for i in range(101) if i not in sample]]
    elif kind == "small-random":
        assert (part.codec, stored, coded) == ("raw", n, [[0, 4]])
    elif kind == "empty":
        assert (part.codec, stored, coded) == ("raw", 0, [])
    else:
        assert part.codec == "zstd" and coded == [[0, 4], [1, 2, 3]]
    assert buf.getvalue() == (data.tobytes() if part.codec == "raw" else whole)


@pytest.mark.parametrize("quant, group_size, searches", [("lossless", None, False), ("int8", None, True), ("int8", 64, True),
                                                       ("int4", 64, True)])
def test_conversion_runs_on_one_torch_thread_but_a_search(quant, group_size, searches, tiny_llama, tmp_path, monkeypatch):
    """The converter's own passes and a one-pass scheme's quantize run on one torch thread (beside the
    codec's threads); a searching or arithmetic-heavy quantize (int4, int8) on the caller's; the caller's
    count is restored, also after a failure."""
    import codecllm.converter as conv
    from codecllm.schemes import get_scheme

    cls = type(get_scheme(quant))
    seen, parts = [], []
    real, real_part = cls.quantize, conv._encode_part
    monkeypatch.setattr(cls, "quantize", lambda self, *a, **k: seen.append(torch.get_num_threads()) or real(self, *a, **k))
    monkeypatch.setattr(conv, "_encode_part", lambda *a, **k: parts.append(torch.get_num_threads()) or real_part(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        codecllm.convert(tiny_llama, tmp_path / "m.cllm", quant=quant, group_size=group_size, quantize_all=True)
        assert seen and set(seen) == {2 if searches else 1}
        assert parts and set(parts) == {1}
        assert torch.get_num_threads() == 2
        for where in (cls, "quantize"), (conv, "_encode_part"):  # a failure on the caller's count, and on one thread
            monkeypatch.setattr(*where, lambda *a, **k: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                codecllm.convert(tiny_llama, tmp_path / "n.cllm", quant=quant, group_size=group_size, quantize_all=True)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_failed_conversion_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "out" / "m.cllm"
    out.parent.mkdir()
    import codecllm.converter as conv

    def boom(*a, **k):
        raise CodecLLMError("disk full (simulated)")

    monkeypatch.setattr(conv, "build_header", boom)
    with pytest.raises(CodecLLMError, match="simulated"):
        codecllm.convert(tiny_llama, out)
    assert list(out.parent.iterdir()) == []


def test_pickle_only_checkpoint_is_refused_unread(tmp_path):
    src = tmp_path / "pickle"
    src.mkdir()
    (src / "config.json").write_text(llama_config().to_json_string())
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(SourceError, match="never unpickled"):
        codecllm.convert(src, tmp_path / "m.cllm")


@pytest.mark.parametrize("problem", ["missing", "no-config", "bad-safetensors"])
def test_bad_sources(tmp_path, problem):
    src = tmp_path / "src"
    if problem != "missing":
        src.mkdir()
    if problem == "bad-safetensors":
        (src / "config.json").write_text(llama_config().to_json_string())
        (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(SourceError):
        codecllm.convert(src, tmp_path / "m.cllm")


def test_bad_options(tiny_llama, tmp_path):
    with pytest.raises(CodecLLMError, match="chunk size"):
        codecllm.convert(tiny_llama, tmp_path / "m.cllm", chunk_size=10)
    with pytest.raises(CodecLLMError, match="scheme"):
        codecllm.convert(tiny_llama, tmp_path / "m.cllm", quant="int3")
    codecllm.convert(tiny_llama, tmp_path / "m.cllm")
    with pytest.raises(CodecLLMError, match="mode"):
        codecllm.load(tmp_path / "m.cllm", mode="lazy")
    with pytest.raises(DeviceError):
        codecllm.load(tmp_path / "m.cllm", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA"):
            codecllm.load(tmp_path / "m.cllm", device="cuda")


def test_outsized_linear_stays_resident_in_stream_mode(tmp_path):
    """An untied vocabulary projection far larger than every other Linear is not streamed: the shared
    workspace would have to be as large as that one weight."""
    src = save_tiny(tmp_path / "big-vocab", llama_config(vocab_size=4096))
    codecllm.convert(src, tmp_path / "m.cllm")
    model = codecllm.load(tmp_path / "m.cllm", mode="stream")
    assert type(model.lm_head) is Int8Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, Int8StreamLinear)


def test_unquantized_linear_larger_than_quantized_ones_stays_resident_in_stream_mode(tiny_llama, tmp_path):
    """The fp16 MLP output projections of the edge blocks are twice the size of any int8 weight: streaming
    them would double the decode workspaces for almost no compression."""
    from codecllm.qmodules import CpuStreamed

    codecllm.convert(tiny_llama, tmp_path / "m.cllm")
    model = codecllm.load(tmp_path / "m.cllm", mode="stream")
    layers = model.model.layers
    assert type(layers[0].mlp.down_proj) is nn.Linear and type(layers[-1].mlp.down_proj) is nn.Linear
    assert isinstance(layers[1].mlp.down_proj, CpuStreamed)
    assert isinstance(model.model.embed_tokens, Int8Embedding)  # untied embeddings are int8 too


# --- a drop-in transformers model -----------------------------------------------------------------------


def test_weights_read_like_a_float_model(tiny_llama, tmp_path):
    """What model code reads of a quantized module agrees with how it computes, and costs no copy until
    an operation needs the values."""
    from codecllm.qmodules import QuantizedWeight

    codecllm.convert(tiny_llama, tmp_path / "m.cllm")
    model, ref = codecllm.load(tmp_path / "m.cllm"), reference(tiny_llama)
    w = model.lm_head.weight
    assert type(w) is QuantizedWeight and isinstance(w, nn.Parameter)
    assert (w.shape, w.dtype, w.device.type) == ((256, 64), torch.float32, "cpu")
    assert (w.float() - ref.lm_head.weight).abs().max() <= model.lm_head.scale.max() / 2 + 1e-6
    assert model.num_parameters() == ref.num_parameters()
    assert list(model.state_dict()) == list(ref.state_dict())
    assert model.state_dict()["lm_head.weight"].dtype == torch.float32  # dense, under the original name


def test_resize_token_embeddings(tiny_llama, tmp_path):
    codecllm.convert(tiny_llama, tmp_path / "m.cllm")
    model = codecllm.load(tmp_path / "m.cllm")
    before, rows = logits(model, IDS), model.lm_head.weight.float().clone()
    model.resize_token_embeddings(300)
    assert model.get_input_embeddings().weight.shape == (300, 64) and model.lm_head.weight.shape == (300, 64)
    assert torch.equal(model.lm_head.weight[:256], rows)  # the old rows, dequantized, now in a float Linear
    after = logits(model, IDS)
    # the old vocabulary's logits agree up to the int8 kernel's bf16 activations (~2e-3 relative)
    assert after.shape[-1] == 300 and (after[..., :256] - before).norm() / before.norm() < 1e-2


def test_old_checkpoint_keys_are_ignored(tmp_path):
    """Old checkpoints carry buffers transformers no longer has (``rotary_emb.inv_freq``): the converter
    leaves them out, says so, and the file loads."""
    from safetensors.torch import load_file, save_file

    src = save_tiny(tmp_path / "old", llama_config())
    sd = load_file(src / "model.safetensors")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    summary = codecllm.convert(src, tmp_path / "m.cllm", quant="none")
    assert summary.ignored == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert any("inv_freq" in w for w in summary.warnings)
    assert torch.equal(logits(codecllm.load(tmp_path / "m.cllm"), IDS), logits(reference(src), IDS))


def test_config_that_disagrees_with_the_weights_fails_at_conversion(tmp_path):
    import json

    src = save_tiny(tmp_path / "src", llama_config())
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match=r"model.layers.0.mlp.down_proj.weight: the checkpoint holds shape \[64, 160\], the config makes \[64, 96\]"):
        codecllm.convert(src, tmp_path / "m.cllm")
    assert not (tmp_path / "m.cllm").exists()


def test_skip_pattern_that_matches_nothing_warns(tiny_llama, tmp_path):
    summary = codecllm.convert(tiny_llama, tmp_path / "m.cllm", skip=["*.q_proj", "*.qproj"])
    assert summary.warnings == ["--skip '*.qproj' matches no module"]


def test_load_tokenizer_without_tokenizer_is_an_error(tiny_llama, tmp_path):
    codecllm.convert(tiny_llama, tmp_path / "m.cllm")
    with pytest.raises(CodecLLMError, match="embeds no tokenizer"):
        codecllm.load_tokenizer(tmp_path / "m.cllm")


def test_non_cllm_file_given_to_load(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x80\x04 pickled weights, or anything else")
    with pytest.raises(CodecLLMError, match="model.bin: not a .cllm file"):
        codecllm.load(tmp_path / "model.bin")


def test_toy_scheme_end_to_end(tiny_llama, tmp_path):
    """A new scheme is one module: int8 with a zero point, registered here, converts, loads in both modes,
    computes and dumps without any change to the package."""
    from codecllm import schemes
    from codecllm.cli import dump_cmd
    from codecllm.qmodules import CpuStream, QLinear
    from codecllm.schemes import PartSpec, Scheme, register_module

    class ToyZeroPoint(Scheme):
        id = "toy-int8-zp"
        main_part = "codes"

        def layout(self, dtype, shape):
            return {"codes": PartSpec("U8", tuple(shape)), "scale": PartSpec("F32", (shape[0],)), "zero": PartSpec("U8", (shape[0],))}

        def applies_to(self, module, param, shape, float_tensor):
            return isinstance(module, nn.Linear) and param == "weight" and len(shape) == 2

        def quantize(self, w, importance=None):
            w = w.float()
            lo, hi = w.amin(1), w.amax(1)
            scale = ((hi - lo) / 255).clamp_min(1e-8)
            zero = torch.round(-lo / scale).clamp(0, 255)
            codes = torch.round(w / scale[:, None] + zero[:, None]).clamp(0, 255)
            return {"codes": codes.to(torch.uint8), "scale": scale, "zero": zero.to(torch.uint8)}

        def dequantize(self, parts, dtype):
            return ((parts["codes"].float() - parts["zero"].float()[:, None]) * parts["scale"][:, None]).to(dtype)

    class ToyLinear(QLinear):
        def linear(self, x, parts):
            return torch.nn.functional.linear(x, self.scheme.dequantize(parts, x.dtype), self.bias)

    class ToyStreamLinear(CpuStream, ToyLinear):
        pass

    schemes.register(ToyZeroPoint)
    register_module(ToyZeroPoint, nn.Linear, "cpu", ToyLinear)
    register_module(ToyZeroPoint, nn.Linear, "cpu-stream", ToyStreamLinear)
    try:
        out = tmp_path / "toy.cllm"
        codecllm.convert(tiny_llama, out, quant="toy-int8-zp")
        assert CllmFile(out).doc.tensors["model.layers.1.mlp.up_proj.weight"].scheme.id == "toy-int8-zp"
        ref = logits(reference(tiny_llama), IDS)
        for mode in ("resident", "stream"):
            model = codecllm.load(out, mode=mode)
            assert isinstance(model.model.layers[1].mlp.up_proj, ToyLinear)
            got = logits(model, IDS)
            assert (got - ref).norm() / ref.norm() < 0.01
        r = __import__("click.testing", fromlist=["CliRunner"]).CliRunner().invoke(dump_cmd, [str(out), "--verify"])
        assert r.exit_code == 0 and "toy-int8-zp" in r.output, r.output
    finally:
        del schemes._REGISTRY["toy-int8-zp"]


@pytest.mark.parametrize("order", ["model", "peer-first"])
def test_tied_weights_stay_tied_through_dtype_changes(tiny_llama_tied, tmp_path, order):
    codecllm.convert(tiny_llama_tied, tmp_path / "m.cllm")
    model = codecllm.load(tmp_path / "m.cllm")
    if order == "peer-first":
        model.lm_head.to(torch.bfloat16)
    model.to(torch.bfloat16)
    head, emb = model.lm_head, model.model.embed_tokens
    assert head.weight is emb.weight and head.weight.dtype == torch.bfloat16 == head.compute_dtype == emb.compute_dtype
    assert logits(model, IDS).dtype == torch.float32 and model(IDS).logits.dtype == torch.bfloat16
