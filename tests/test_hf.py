"""transformers integration: a directory from ``write_hf_dir`` loads through ``AutoModel*.from_pretrained``."""

import json
import logging

import pytest
import torch
from click.testing import CliRunner

import codecllm
from codecllm.cli import convert_cmd
from codecllm.errors import CodecLLMError, OutputExistsError
from codecllm.errors import DeviceMapError
from codecllm.hf import NotSerializableError, write_hf_dir

IDS = torch.tensor([[1, 5, 9, 33, 100, 7]])


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def cllm(request, tmp_path):
    from conftest import llama_config, save_tiny

    src = save_tiny(tmp_path / "src", llama_config(tie_word_embeddings=request.param))
    out = tmp_path / "model.cllm"
    codecllm.convert(src, out)
    return out


@pytest.fixture
def hf_dir(cllm, tmp_path):
    return write_hf_dir(cllm, tmp_path / "hf")


def _loading_log(caplog, load):
    """What transformers logs while ``load()`` runs (at INFO level)."""
    import transformers

    transformers.logging.set_verbosity_info()
    logger = transformers.logging.get_logger("transformers")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            return load(), caplog.text
    finally:
        logger.removeHandler(caplog.handler)
        transformers.logging.set_verbosity_warning()


def test_directory_layout(hf_dir, cllm):
    names = sorted(p.name for p in hf_dir.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    assert (hf_dir / "model.safetensors").read_bytes() == cllm.read_bytes()
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "codecllm", "mode": "resident", "file": "model.safetensors"}
    assert config["dtype"] == "float16"


@pytest.mark.parametrize("mode", ["resident", "stream"])
def test_from_pretrained_equals_load(cllm, tmp_path, caplog, mode):
    from transformers import AutoModelForCausalLM

    d = write_hf_dir(cllm, tmp_path / "hf", mode=mode)
    model, log = _loading_log(caplog, lambda: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32))
    ref = codecllm.load(cllm, mode=mode, dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.q_proj) is type(ref.model.layers[0].self_attn.q_proj)
    assert torch.equal(model(IDS).logits, ref(IDS).logits)
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert "loading weights file" in log  # the log was captured
    for word in ("MISSING", "UNEXPECTED", "newly initialized", "not initialized"):
        assert word not in log
    assert not any(p.device.type == "meta" for p in [*model.parameters(), *model.buffers()])
    assert model.config.quantization_config.mode == mode
    # generate() with a static cache compiles resident models (one graph), not stream ones (slower compiled)
    assert model.hf_quantizer.is_compileable == (mode == "resident")


def test_default_dtype_is_the_config_dtype(hf_dir, cllm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.dtype == torch.float16
    assert torch.equal(model(IDS).logits, codecllm.load(cllm, dtype=torch.float16)(IDS).logits)


def test_generate_and_tie_weights(hf_dir, cllm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ref = codecllm.load(cllm, dtype=torch.float32)
    model.tie_weights()  # the loader tied what the file ties: nothing left to do, nothing to break
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(IDS, **kw), ref.generate(IDS, **kw))


def test_auto_model_gives_the_base_model(hf_dir, cllm):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(hf_dir, dtype=torch.float32)
    assert type(model).__name__ == "LlamaModel"
    ref = codecllm.load(cllm, dtype=torch.float32)
    assert torch.equal(model(IDS).last_hidden_state, ref.model(IDS).last_hidden_state)


def test_head_the_file_does_not_hold_is_refused(hf_dir):
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(CodecLLMError, match="score.weight"):
        AutoModelForSequenceClassification.from_pretrained(hf_dir)


def test_device_map_on_one_device(hf_dir, cllm):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, device_map="cpu")
    assert torch.equal(model(IDS).logits, codecllm.load(cllm, dtype=torch.float32)(IDS).logits)
    with pytest.raises(DeviceMapError, match="'disk' is not supported"):
        AutoModelForCausalLM.from_pretrained(hf_dir, device_map={"model": "cpu", "lm_head": "disk"})


def test_save_pretrained_of_a_from_pretrained_model_is_refused(hf_dir, tmp_path):
    """Its config names the codecllm quantizer, so a dense checkpoint written with it would not reload."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    with pytest.raises(NotSerializableError, match="save_pretrained cannot write a codecllm model"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_save_pretrained_of_a_loaded_model_reloads_as_is(cllm, tmp_path):
    """``codecllm.load`` models write their weights dequantized under the original names: transformers
    reloads them as an ordinary model holding exactly the codecllm model's weights (its logits then differ
    only by the int8 CPU kernel's bf16 activations)."""
    from transformers import AutoModelForCausalLM

    model = codecllm.load(cllm)
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    mine, theirs = model.state_dict(), again.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        a, b = again(IDS).logits, model(IDS).logits
    assert (a - b).norm() / a.norm() < 1e-2


def test_write_hf_dir_keeps_an_existing_directory(hf_dir, cllm):
    with pytest.raises(OutputExistsError):
        write_hf_dir(cllm, hf_dir)
    write_hf_dir(cllm, hf_dir, mode="stream", force=True)
    assert json.loads((hf_dir / "config.json").read_text())["quantization_config"]["mode"] == "stream"


def test_cli_hf_dir(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out, d = tmp_path / "m.cllm", tmp_path / "hf"
    result = CliRunner().invoke(convert_cmd, [str(tiny_llama), "-o", str(out), "--hf-dir", str(d)])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert torch.equal(model(IDS).logits, codecllm.load(out, dtype=torch.float32)(IDS).logits)
