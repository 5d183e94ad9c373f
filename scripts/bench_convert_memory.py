"""Peak resident memory of the converter on a synthetic sharded fp16 checkpoint of about 2.2 GB.

    python scripts/bench_convert_memory.py [--workdir DIR]

Writes the checkpoint (TinyLlama-shaped, random weights), converts it in a child process, and prints
the child's peak RSS, time and sizes; the JSON goes to benchmarks/results/convert_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import write_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = write_checkpoint(Path(tmp) / "synthetic")
        src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        out = Path(tmp) / "synthetic.cllm"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "codecllm.cli", "convert", str(src), "-o", str(out), "--json"], check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (developer machine, no GPU)",
            "checkpoint_bytes": src_bytes,
            "shards": len(list(src.glob("*.safetensors"))),
            "cllm_bytes": out.stat().st_size,
            "seconds": round(seconds, 2),
            "peak_rss_bytes": peak,
        }
    print(f"{'checkpoint':<14}{'shards':>8}{'.cllm':>12}{'seconds':>10}{'peak RSS':>12}")
    print(f"{result['checkpoint_bytes'] / 1e9:>11.2f} GB{result['shards']:>8}{result['cllm_bytes'] / 1e9:>9.2f} GB"
          f"{result['seconds']:>10.1f}{peak / 1e9:>9.2f} GB")
    dest = ROOT / "benchmarks" / "results" / "convert_memory.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", dest.relative_to(ROOT))


if __name__ == "__main__":
    main()
