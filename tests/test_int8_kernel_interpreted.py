"""The fused int8 matmul's logic, checked on the CPU under Triton's interpreter (its speed is measured
on a GPU only, by scripts/bench_gpu.py). bfloat16 is checked on the GPU only: the interpreter's bf16
emulation gives wrong values for int8 -> bf16 casts."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import torch
from codecllm.gpu.int8_matmul import int8_linear
torch.manual_seed(0)
for m, n, k, dtype, bias in [(1, 40, 70, torch.float32, True), (5, 64, 256, torch.float16, False),
                             (33, 20, 130, torch.float16, True), (16, 16, 32, torch.float32, False)]:
    x = torch.randn(m, k).to(dtype)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n) * 0.01
    b = torch.randn(n).to(dtype) if bias else None
    y = int8_linear(x.reshape(1, m, k), q, s, b)
    assert y.shape == (1, m, n) and y.dtype == dtype
    ref = x.double() @ (q.double() * s.double()[:, None]).T + (b.double() if bias else 0)
    err = ((y[0].double() - ref).norm() / ref.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 2e-3), (m, n, k, dtype, err)
print("ok")
"""


def test_int8_matmul_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
