"""Greedy ``generate()`` speed on the CPU: transformers fp32 against codecllm resident and stream.

SmolLM2-135M-Instruct (the built-in example) is converted once to a temporary ``.cllm``; the three
models then generate the same tokens in interleaved rounds (the machine may be shared: interleaving
keeps a burst of load from landing on one variant only), and the table gives the median per variant.
ms/token is the whole ``generate()`` call (prefill of the short prompt included) over the new tokens.

    python scripts/bench_cpu.py --threads 2 --out benchmarks/results/cpu_smollm2.json
    python scripts/bench_cpu.py --quant int4:g64 --modes resident --out benchmarks/results/cpu_smollm2_int4.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import codecllm
from codecllm.examples import smollm2_checkpoint
from codecllm.schemes import parse_scheme

PROMPT = "The capital of France is"


def timed_generate(model, inputs, new_tokens: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - t0, out[0, inputs["input_ids"].shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["resident", "stream"])
    ap.add_argument("--quant", default="int8", help="the scheme, as codecllm-convert spells it (int8, int4:g64)")
    ap.add_argument("--out", default="benchmarks/results/cpu_smollm2.json")
    args = ap.parse_args()
    scheme = parse_scheme(args.quant)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    src = smollm2_checkpoint()
    with tempfile.TemporaryDirectory(prefix="codecllm-bench-") as tmp:
        path = Path(tmp, "smollm2.cllm")
        codecllm.convert(src, path, quant=scheme.id, group_size=scheme.params.get("group_size"))
        tokenizer = codecllm.load_tokenizer(path)
        models = {"transformers fp32": AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()}
        for mode in args.modes:
            models[f"codecllm {mode}"] = codecllm.load(path, device="cpu", mode=mode)
        inputs = tokenizer(PROMPT, return_tensors="pt")
        for model in models.values():  # warm-up: first-call allocations, OpenMP pool, caches
            timed_generate(model, inputs, 8)
        seconds = {name: [] for name in models}
        tokens = {}
        for _ in range(args.rounds):
            for name, model in models.items():
                dt, tokens[name] = timed_generate(model, inputs, args.new_tokens)
                seconds[name].append(dt)

    base_name = "transformers fp32"
    base = statistics.median(seconds[base_name]) / args.new_tokens * 1e3
    rows = []
    print(f"SmolLM2-135M-Instruct, greedy, {args.new_tokens} new tokens, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds ({platform.processor() or platform.machine()})")
    print(f"{'variant':<20} {'ms/token':>9} {'min':>7} {'max':>7} {'speed vs transformers':>22} {'same tokens':>12}")
    for name in models:
        ms = [s / args.new_tokens * 1e3 for s in seconds[name]]
        med = statistics.median(ms)
        same = sum(a == b for a, b in zip(tokens[name], tokens[base_name]))
        rows.append(dict(variant=name, ms_per_token=med, ms_per_token_all=ms, speed_vs_transformers=base / med,
                         tokens_same_as_transformers=same))
        print(f"{name:<20} {med:>9.1f} {min(ms):>7.1f} {max(ms):>7.1f} {base / med:>21.2f}x {same:>6}/{args.new_tokens}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(model="SmolLM2-135M-Instruct", prompt=PROMPT, new_tokens=args.new_tokens,
                                   quant=args.quant, threads=args.threads, rounds=args.rounds, torch=torch.__version__,
                                   codecllm=codecllm.__version__, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
