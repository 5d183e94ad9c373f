"""What the CPU int8 kernel's bfloat16 activations cost: SmolLM2 int8 against the original (float32) over
the evaluation text, computed two ways on the CPU: whole windows at once (many rows per matmul: the exact
float32 path of ``codecllm.kernels.cpu``) and one token at a time with a KV cache, as ``generate()`` runs
(one row per matmul: ``_weight_int8pack_mm`` on bf16 activations), resident and in stream mode (whose
one-row path is two int4 kernel calls on the codes' 4-bit planes). The original model stepped one token
at a time is the control (its KL to itself windowed is the noise of the two orders of summation).

    python scripts/decode_quality_cpu.py --tokens 512 --out benchmarks/results/decode_quality_cpu.json
    python scripts/decode_quality_cpu.py --quant int4:g64 --out benchmarks/results/decode_quality_cpu_int4.json

(``--quant int4:gN``: the same for int4, whose one-row path is ``_weight_int4pack_mm_for_cpu``.)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

import codecllm
from codecllm.examples import smollm2_checkpoint
from codecllm.quality import compare, reference_logits
from codecllm.schemes import parse_scheme

ROOT = Path(__file__).resolve().parent.parent


class OneTokenAtATime(torch.nn.Module):
    """``model``, fed one token at a time with a cache: every matmul sees a single row."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = [self.model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(ids.shape[1])]
        return SimpleNamespace(logits=torch.cat(out, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant", default="int8", help="the scheme, as codecllm-convert spells it (int8, int4:g64)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/decode_quality_cpu.json"))
    args = ap.parse_args()
    scheme = parse_scheme(args.quant)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_checkpoint()
    text = " ".join((ROOT / "tests/data/eval_text.txt").read_text().split())
    ids = AutoTokenizer.from_pretrained(src)(text, return_tensors="pt").input_ids[0][: args.tokens + 1]
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        codecllm.convert(src, Path(tmp, "m.cllm"), quant=scheme.id, group_size=scheme.params.get("group_size"))
        quantized = codecllm.load(Path(tmp, "m.cllm"))
        streamed = codecllm.load(Path(tmp, "m.cllm"), mode="stream")
        ref = reference_logits(original, ids, window=args.tokens)
        rows = {
            "original, one token at a time (control)": compare(OneTokenAtATime(original), ref),
            f"{args.quant}, whole window (fp32 path)": compare(quantized, ref),
            f"{args.quant}, one token at a time (bf16 path)": compare(OneTokenAtATime(quantized), ref),
            f"{args.quant} stream mode, one token at a time": compare(OneTokenAtATime(streamed), ref),
        }
    print(f"SmolLM2-135M-Instruct, {args.tokens} tokens of tests/data/eval_text.txt, against the original in float32")
    for name, c in rows.items():
        print(f"{name:<48} mean KL {c.mean_kl:.6f}  p99 KL {c.p99_kl:.5f}  top-1 {100 * c.top1_agreement:6.2f}%  ppl {c.perplexity:.4f}")
    Path(args.out).write_text(json.dumps({"machine": f"{platform.machine()} CPU, {args.threads} threads", "tokens": args.tokens, "quant": args.quant,
                                          "rows": {k: v.to_json() for k, v in rows.items()}}, indent=2) + "\n")
    print("wrote", args.out, file=sys.stderr)


if __name__ == "__main__":
    main()
