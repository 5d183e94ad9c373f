"""The data-free input importance (``codecllm.importance``): which Linear reads what, found by tracing
the model on the meta device, and what the converter does where that cannot be found."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import codecllm
from codecllm.importance import trace
from conftest import llama_config, save_tiny


def _config(**kw) -> dict:
    return llama_config(**kw).to_dict()


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["grouped-heads", "equal-heads"])
def test_llama_inputs(kv_heads):
    """q/k/v and gate/up read their block's norms, the head the final norm; down_proj's input is the product
    of gate's and up's outputs; o_proj (after three producers as wide as it, with equal heads) gets nothing."""
    m = trace(_config(num_key_value_heads=kv_heads))
    assert m.failure is None and m.embedding == "model.embed_tokens.weight"
    for i in range(3):
        p = f"model.layers.{i}"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            assert m.normed[f"{p}.{name}.weight"] == f"{p}.input_layernorm"
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            assert m.normed[f"{p}.{name}.weight"] == f"{p}.post_attention_layernorm"
        assert m.products[f"{p}.mlp.down_proj.weight"] == (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight")
        assert f"{p}.self_attn.o_proj.weight" not in m.products and f"{p}.self_attn.o_proj.weight" not in m.normed
    assert m.normed["lm_head.weight"] == "model.norm"


def test_gpt2_inputs():
    import transformers

    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=320, architectures=["GPT2LMHeadModel"])
    m = trace(cfg.to_dict())
    assert m.normed["transformer.h.0.attn.c_attn.weight"] == "transformer.h.0.ln_1"
    assert m.products["transformer.h.0.mlp.c_proj.weight"] == ("transformer.h.0.mlp.c_fc.weight",)
    assert "transformer.h.0.attn.c_proj.weight" not in m.products  # its producer is three times as wide
    assert "transformer.h.0.mlp.c_fc.weight" in m.transposed


def test_tied_head_stored_under_its_own_name(tmp_path):
    """A tied checkpoint that stores the embedding as ``lm_head.weight`` only converts to int4 (the
    importance reads the table under the name the checkpoint has)."""
    src = save_tiny(tmp_path / "tied", llama_config(tie_word_embeddings=True))
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    summary = codecllm.convert(src, tmp_path / "m.cllm", quant="int4", group_size=32)
    assert not [w for w in summary.warnings if "traced" in w]
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(codecllm.load(tmp_path / "m.cllm")(ids).logits).all()


def test_untraceable_model_says_so(tmp_path):
    """A model whose forward cannot run on the meta device with token ids alone (an encoder-decoder
    without decoder inputs) still converts, weighing every channel alike, and the summary says why."""
    import transformers

    from conftest import save_tiny as save

    cfg = transformers.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=320,
                                architectures=["T5ForConditionalGeneration"])
    assert trace(cfg.to_dict()).failure
    src = save(tmp_path / "t5", cfg, dtype=torch.float32)
    summary = codecllm.convert(src, tmp_path / "t5.cllm", quant="int8", group_size=32)
    assert any("could not be traced" in w for w in summary.warnings), summary.warnings
    json.dumps(summary.to_json())  # the warning is part of the summary's JSON
