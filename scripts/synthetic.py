"""A TinyLlama-shaped Llama checkpoint with random weights (normal, std 0.02, in the config's dtype: fp16
by default), written shard by shard (never whole in memory), for the benchmarks. Random weights compress like real int8 weights do (about 1.1x after int8)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINYLLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=5632,
    num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
    max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="float16",
    bos_token_id=1, eos_token_id=2,
)

# Llama-3-8B's shapes (its Linear layers are what users run) with 4 decoder layers and the untied head
L8X4 = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, dtype="float16",
    bos_token_id=1, eos_token_id=2,
)
MODELS = {"tinyllama": TINYLLAMA, "l8x4": L8X4}


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return out


def write_checkpoint(directory: Path, cfg: dict = TINYLLAMA, shard_bytes: int = 400 << 20, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, cfg.get("dtype", "float16"))
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    size, index = 0, 0

    def flush():
        nonlocal shard, size, index
        if shard:
            index += 1
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in shapes(cfg).items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        if size + t.nbytes > shard_bytes:
            flush()
        shard[name] = t
        size += t.nbytes
    flush()
    total = sum(t.stat().st_size for t in directory.glob("*.safetensors"))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return directory
