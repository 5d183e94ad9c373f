"""CPU offload's speed (``device_map`` with "cpu", ``codecllm.placement``): a TinyLlama-shaped random model
in int8, all on the GPU against 10 of its 22 layers offloaded to the CPU, and transformers + accelerate's
own offload of the fp16 checkpoint with the same map as the peer (eager figures only: its offload copies
from unpinned memory, which a CUDA graph cannot capture). Prints each variant; writes JSON.

    python scripts/bench_offload.py benchmarks/results/offload_tinyllama_h100.json    (ONLY=<variant> runs one)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import measure, wall_ms  # noqa: E402
from synthetic import TINYLLAMA, write_checkpoint  # noqa: E402

import codecllm  # noqa: E402
from codecllm.gpu.graphs import events_ms  # noqa: E402

VOCAB = TINYLLAMA["vocab_size"]


@torch.no_grad()
def eager_only(model) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(3, VOCAB, (1, 16), device="cuda", generator=gen)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw)
    ms = statistics.median(wall_ms(lambda: model.generate(prompt, max_new_tokens=16, min_new_tokens=16, **kw)) for _ in range(3))
    long = torch.randint(3, VOCAB, (1, 2048), device="cuda", generator=gen)
    return {"a_generate_ms_per_token": ms / 16, "c_prefill2048_ms": events_ms(lambda: model(long, use_cache=False, logits_to_keep=1), reps=5)}


def main() -> None:
    d = Path(tempfile.mkdtemp())
    src = write_checkpoint(d / "src")
    out = d / "m.cllm"
    codecllm.convert(src, out)
    mapping = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    mapping.update({f"model.layers.{i}": ("cpu" if 6 <= i < 16 else 0) for i in range(TINYLLAMA["num_hidden_layers"])})
    variants = {
        "int8_gpu": lambda: codecllm.load(out, device="cuda"),
        "int8_offload10": lambda: codecllm.load(out, device_map=mapping),
        "fp16_accelerate_offload10": lambda: __import__("transformers").AutoModelForCausalLM.from_pretrained(
            src, dtype=torch.float16, device_map=mapping),
    }
    only = os.environ.get("ONLY")
    res = {}
    for name, load in variants.items():
        if only and name != only:
            continue
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        model = load().eval()
        held = torch.cuda.memory_allocated() - base
        r = eager_only(model) if name.startswith("fp16") else measure(model, VOCAB, new_tokens=16, batch_tokens=8, reps=10, batches=())
        r["gpu_bytes_after_load"] = held
        res[name] = r
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        del model
    Path(sys.argv[1] if len(sys.argv) > 1 else "offload_speed.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
