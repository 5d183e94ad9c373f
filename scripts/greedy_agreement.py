"""How often a quantized SmolLM2 repeats the original's greedy continuation exactly, over 20 prompts
(24 new tokens each, float32 compute on the CPU). For scale: the same original checkpoint computed in
fp16 instead of float32. ``--groups 128,64,32`` adds fake-quantized variants with one int8 scale per
run of that many consecutive weights (rounded as such a scheme would; nothing written to a file), to see
whether finer scales would change the picture. Prints a table; writes JSON.

    python scripts/greedy_agreement.py --out benchmarks/results/greedy_agreement_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import codecllm
from codecllm.architecture import plan
from codecllm.examples import smollm2_checkpoint
from codecllm.quality import greedy
from codecllm.schemes import get_scheme

PROMPTS = ["The capital of France is", "Once upon a time", "The best way to learn Python is", "Water boils at",
           "In 1492, Columbus", "The theory of relativity states that", "My favorite food is", "To make a cake, you need",
           "The largest planet in the solar system is", "Machine learning is", "The stock market", "A healthy breakfast includes",
           "The first president of the United States was", "Photosynthesis is the process", "The Great Wall of China",
           "Shakespeare wrote", "The speed of light is", "Dogs are", "The internet was invented", "Climate change is"]
NEW_TOKENS = 24


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def group_quantized(model, group: int):
    """``model`` with every weight the converter quantizes by default rounded to int8 with one scale per
    ``group`` consecutive weights (row-major) instead of one per row."""
    model = copy.deepcopy(model)
    p, params, done = plan(model), dict(model.named_parameters()), set()
    int8 = get_scheme("int8")
    for name in [*p.linear_weights, *p.embedding_weights]:
        if name in done or name not in params or not p.quantizable(name, ()):
            continue
        w = params[name].data.half().float()
        rows, cols = w.shape
        parts = int8.quantize(w.reshape(rows * cols // group, group))
        params[name].data.copy_(int8.dequantize(parts, torch.float32).reshape(rows, cols))
        done.update(p.tied.get(name, (name,)))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/greedy_agreement_cpu.json")
    ap.add_argument("--groups", default="", help="comma-separated group sizes of fake-quantized variants")
    args = ap.parse_args()
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    reference = [greedy(original, tok, p, NEW_TOKENS) for p in PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        codecllm.convert(src, Path(tmp) / "m.cllm")
        variants = {"original in fp16": lambda: AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).eval(),
                    "int8 .cllm (per row)": lambda: codecllm.load(Path(tmp) / "m.cllm")}
        for g in [int(x) for x in args.groups.split(",") if x]:
            variants[f"int8, one scale per {g} weights (fake)"] = lambda g=g: group_quantized(original, g)
        result = {"model": "SmolLM2-135M-Instruct", "new_tokens": NEW_TOKENS, "prompts": PROMPTS, "variants": {}}
        for name, make in variants.items():
            model = make()
            diverge = [first_difference(r, greedy(model, tok, p, NEW_TOKENS)) for r, p in zip(reference, PROMPTS)]
            exact = sum(d == NEW_TOKENS for d in diverge)
            result["variants"][name] = {"exact": exact, "first_difference": diverge}
            print(f"{name:40s} {exact:2d}/{len(PROMPTS)} identical; first differing token per prompt: {diverge}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
