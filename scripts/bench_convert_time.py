"""Conversion time per scheme on a Llama-3-8B-shaped layer stack (random fp16; 2 layers and a 32,000-token
vocabulary by default, 0.70 G parameters): the int4 issue asks int4 to convert in at most 3x int8's time.

    python scripts/bench_convert_time.py [--runs 3] --out benchmarks/results/convert_time_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import L8X4, write_checkpoint  # noqa: E402

import codecllm  # noqa: E402
from codecllm.schemes import parse_scheme  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--schemes", default="int8,int4:g64,int8:g64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="conversions per scheme, the schemes in turn; the fastest is reported")
    ap.add_argument("--out", default="benchmarks/results/convert_time_cpu.json")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    torch.set_num_threads(args.threads)
    cfg = dict(L8X4, num_hidden_layers=args.layers, vocab_size=args.vocab)
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="codecllm-bench-") as tmp:
        src = write_checkpoint(Path(tmp, "src"), cfg)
        runs = {spec: [] for spec in args.schemes.split(",")}  # (each scheme once)
        for _ in range(args.runs):  # the schemes in turn, so that a slow spell of the machine hits them alike
            for spec in runs:
                scheme = parse_scheme(spec)
                t = time.perf_counter()
                codecllm.convert(src, Path(tmp, "out.cllm"), quant=scheme.id, group_size=scheme.params.get("group_size"), force=True)
                runs[spec].append(time.perf_counter() - t)
                print(f"  {spec}: {runs[spec][-1]:.1f} s", file=sys.stderr, flush=True)
        first = next(iter(runs))
        for spec, ts in runs.items():
            seconds[spec] = min(ts)
            print(f"{spec:<10} {seconds[spec]:7.1f} s  ({seconds[spec] / min(runs[first]):.2f}x; runs {', '.join(f'{t:.1f}' for t in ts)})", flush=True)
    res = {"model": f"Llama-3-8B shapes, {args.layers} layers, vocabulary {args.vocab}, random fp16",
           "machine": f"{platform.machine()} CPU, {args.threads} threads", "torch": torch.__version__, "convert_s": seconds,
           "runs_s": runs}
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print("wrote", args.out, file=sys.stderr)


if __name__ == "__main__":
    main()
