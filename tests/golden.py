"""The golden file: a one-block Llama with hand-checkable weights, converted with fixed options.

``scripts/make_golden.py`` writes it to tests/data/golden.cllm; test_golden.py rebuilds it and compares
byte for byte. Change it only on purpose (a format or converter change), by running that script.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "max_position_embeddings": 32,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "dtype": "float16",
}


def weights() -> dict[str, torch.Tensor]:
    """Small integers times powers of two: every int8 scale and value can be worked out by hand.
    Row r of a Linear weight is ``(c - k/2) / 8`` for columns ``c``, so its absmax is known exactly."""

    def ramp(rows: int, cols: int, k: int) -> torch.Tensor:
        r = torch.arange(rows, dtype=torch.float32)[:, None]
        c = torch.arange(cols, dtype=torch.float32)[None, :]
        return ((c - k / 2 + r) / 8).to(torch.float16)

    p = "model.layers.0."
    return {
        "model.embed_tokens.weight": ramp(1, 8, 8).repeat(64, 1),  # repetitive: stored zstd-compressed
        p + "self_attn.q_proj.weight": ramp(8, 8, 4),
        p + "self_attn.k_proj.weight": ramp(4, 8, 6),
        p + "self_attn.v_proj.weight": ramp(4, 8, 2),
        p + "self_attn.o_proj.weight": ramp(8, 8, 8),
        p + "mlp.gate_proj.weight": ramp(16, 8, 3),
        p + "mlp.up_proj.weight": ramp(16, 8, 5),
        p + "mlp.down_proj.weight": ramp(8, 16, 16),
        p + "input_layernorm.weight": torch.ones(8, dtype=torch.float16),
        p + "post_attention_layernorm.weight": torch.full((8,), 0.5, dtype=torch.float16),
        "model.norm.weight": torch.full((8,), 2.0, dtype=torch.float16),
    }


def write_source(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2, sort_keys=True) + "\n")
    save_file(weights(), str(directory / "model.safetensors"))
    return directory


def build(directory: Path, out: Path) -> Path:
    from codecllm import convert

    convert(write_source(directory), out, quant="int8", chunk_size=4096, level=3, force=True)
    return out
