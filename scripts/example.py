"""The main job on the built-in example: SmolLM2-135M-Instruct -> .cllm -> load -> generate.

    python scripts/example.py [--out smollm2.cllm] [--device cpu|cuda] [--mode resident|stream]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import codecllm
from codecllm.examples import smollm2_checkpoint

PROMPT = "The capital of France is"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="where to write the .cllm (default: a temporary directory)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default="resident", choices=["resident", "stream"])
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()

    src = smollm2_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "smollm2.cllm")
        print(f"$ codecllm-convert {src} -o {out} --force", flush=True)
        subprocess.run([sys.executable, "-m", "codecllm.cli", "convert", str(src), "-o", str(out), "--force"], check=True)
        t = time.perf_counter()
        model = codecllm.load(out, device=args.device, mode=args.mode)
        tokenizer = codecllm.load_tokenizer(out)
        print(f"loaded {out.name} on {args.device} ({args.mode}) in {time.perf_counter() - t:.1f} s")
        enc = tokenizer(PROMPT, return_tensors="pt").to(args.device)
        ids = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False)
        print(f"{PROMPT!r} -> {tokenizer.decode(ids[0, enc['input_ids'].shape[1]:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
