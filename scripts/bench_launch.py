"""Host time per Linear call at decode (one token), the cost that bounds eager ``generate()``: fp16
``nn.Linear`` against the int8 layer (its prepared one-row matmul), the generic ``int8_linear`` function
and a fused group of three. Small layers, so that the GPU keeps up and the loop measures the host.
Prints a table; writes JSON to benchmarks/results/launch.json.

    python scripts/bench_launch.py
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from codecllm.kernels.int8_triton import Int8Matmul, int8_linear
from codecllm.schemes import get_scheme
from codecllm.schemes.int8.cuda import Int8CudaLinear

ROOT = Path(__file__).resolve().parent.parent
DEV = "cuda"


def per_call_us(fn, calls: int = 3000, rounds: int = 5) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    n = k = 256
    x = torch.randn(1, 1, k, device=DEV, dtype=torch.float16)
    lin = nn.Linear(k, n, bias=False, device=DEV, dtype=torch.float16)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    s = torch.rand(n, device=DEV) * 1e-3
    layer = Int8CudaLinear(get_scheme("int8"), {"qweight": q, "scale": s}, (n, k), torch.float16, q.device, n, k, None)
    row = Int8Matmul(q, s)
    q3, s3 = torch.cat([q, q, q]), torch.cat([s, s, s])
    row3 = Int8Matmul(q3, s3)
    rows = {
        "fp16 nn.Linear": per_call_us(lambda: lin(x)),
        "fp16 F.linear": per_call_us(lambda: torch.nn.functional.linear(x, lin.weight)),
        "int8 Int8CudaLinear": per_call_us(lambda: layer(x)),
        "int8 Int8Matmul": per_call_us(lambda: row(x)),
        "int8 int8_linear()": per_call_us(lambda: int8_linear(x, q, s)),
        "int8 group of 3 (one launch + split)": per_call_us(lambda: row3(x).split([n, n, n], dim=-1)),
        "torch.empty": per_call_us(lambda: torch.empty((1, 1, n), dtype=torch.float16, device=DEV)),
    }
    for name, us in rows.items():
        print(f"{name:40s} {us:7.2f} us per call")
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "N": n, "K": k, "host_us_per_call": rows}
    dest = ROOT / "benchmarks" / "results" / "launch.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", dest)


if __name__ == "__main__":
    main()
