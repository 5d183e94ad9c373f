"""CPU int8 weight-only linear: which stock-PyTorch route is fastest and correct, per SmolLM2 layer shape.

Every variant runs on the same (x, int8 weight, float32 scale); the variants are interleaved within each
round and the per-call time is the median over rounds (the machine is shared, so single runs are noisy).
Error is ``||y - ref|| / ||ref||`` against a float64 reference of the same int8 weight.

    python scripts/bench_cpu_kernels.py --threads 2 --out benchmarks/results/cpu_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # N x K of SmolLM2-135M


def make_variants(q: torch.Tensor, s: torch.Tensor):
    """name -> (prepared state, call(x))."""
    w32 = (q.float() * s[:, None]).contiguous()
    wbf = w32.bfloat16()
    sbf = s.bfloat16()
    shf = s.half()
    ones_bf = torch.ones_like(sbf)
    qt = q.t().contiguous()  # [K, N] for _int_mm
    int8pack = torch.ops.aten._weight_int8pack_mm

    def dequant(x):
        return F.linear(x, (q.to(torch.float32) * s[:, None]).to(x.dtype))

    def int_mm_dyn(x):  # activations quantized per row to int8 too (w8a8): not weight-only numerics
        amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        xs = amax / 127.0
        xq = torch.round(x / xs).to(torch.int8)
        return torch._int_mm(xq, qt).to(torch.float32) * xs * s

    return {
        "fp32 F.linear (fp32 weight)": lambda x: F.linear(x, w32),
        "bf16 F.linear (bf16 weight)": lambda x: F.linear(x.bfloat16(), wbf).float(),
        "dequant + F.linear": dequant,
        "_weight_int8pack_mm fp32": lambda x: int8pack(x, q, s),
        "_weight_int8pack_mm bf16": lambda x: int8pack(x.bfloat16(), q, sbf).float(),
        "_weight_int8pack_mm bf16, fp32 scale after": lambda x: int8pack(x.bfloat16(), q, ones_bf).float() * s,
        "_weight_int8pack_mm fp16": lambda x: int8pack(x.half(), q, shf).float(),
        "_int_mm only (x already int8)": lambda x: torch._int_mm(x.to(torch.int8), qt),
        "_int_mm w8a8 (dyn act quant)": int_mm_dyn,
    }


def time_call(fn, x, min_s: float = 0.05) -> float:
    """Seconds per call: as many calls as fit in ``min_s`` (at least 3)."""
    fn(x)
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        dt = time.perf_counter() - t0
        if n >= 3 and dt >= min_s:
            return dt / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warm = torch.randn(256, 1024)
    for _ in range(50):  # wakes the OpenMP pool and MKL before the first timing
        warm @ warm.T
    rows = []
    for n, k in SHAPES:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s = (torch.rand(n) * 0.02 + 1e-3).float()
        variants = make_variants(q, s)
        wref = q.double() * s.double()[:, None]
        for m in args.m:
            x = torch.randn(m, k)
            ref = x.double() @ wref.T
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    times[name].append(time_call(fn, x))
            for name, fn in variants.items():
                y = fn(x)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                same = torch.equal(y, fn(x))
                row0 = fn(x[:1])  # does row 0 come out the same alone as in the batch?
                rows.append(dict(n=n, k=k, m=m, variant=name, us=statistics.median(times[name]) * 1e6,
                                 rel_err=err, deterministic=same, batch_invariant=torch.equal(row0[0], y[0])))
                r = rows[-1]
                print(f"{n:>6}x{k:<5} M={m:<3} {name:<44} {r['us']:>9.1f} us  err {err:.1e}  "
                      f"det {same!s:5} batch-inv {r['batch_invariant']}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(threads=args.threads, torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
