"""The fused int4 kernels' logic, checked on the CPU under Triton's interpreter (tests/test_gpu_int4.py
checks the compiled kernels and scripts/bench_kernel.py --int4 times them)."""

import pytest
import torch

pytest.importorskip("triton")

from codecllm.kernels import int4_triton  # noqa: E402
from codecllm.kernels import int8_triton  # noqa: E402
from codecllm.kernels.int4_triton import Int4Matmul, int4_linear  # noqa: E402
from codecllm.schemes.int4 import Int4  # noqa: E402

interpreted = pytest.mark.skipif(not int8_triton._INTERPRET, reason="runs under Triton's interpreter (no CUDA device)")


def parts_and_reference(n, k, gs, seed):
    torch.manual_seed(seed)
    scheme = Int4(gs)
    parts = scheme.quantize(torch.randn(n, k))
    return parts, scheme.dequantize(parts, torch.float64)


CASES = [  # M, N, K, group size, dtype, bias, K split
    (1, 12, 256, 64, torch.float32, True, 1), (1, 10, 100, 32, torch.float32, False, 1), (1, 7, 384, 128, torch.float16, False, 1),
    (1, 9, 640, 64, torch.float32, True, 3),  # split over programs, one of them empty
    (1, 6, 320, 32, torch.float32, True, 1), (1, 5, 576, 64, torch.float16, False, 2),
    (3, 20, 192, 64, torch.float16, True, 1), (5, 33, 130, 32, torch.float32, False, 1), (17, 18, 160, 32, torch.float32, True, 1),
    (16, 24, 512, 64, torch.float32, False, 4),
]


@interpreted
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-g{c[3]}-{str(c[4])[6:]}-{'bias' if c[5] else 'nobias'}-split{c[6]}")
def test_int4_matmul(case, monkeypatch):
    """The GEMV (one row) and the GEMM (more) against the scheme's own dequantization, K not
    a multiple of the group size among them; the split-K counters are left at zero."""
    m, n, k, gs, dtype, bias, split = case
    monkeypatch.setitem(int4_triton.INTERPRET_GEMV, "SPLIT_K", split)
    monkeypatch.setitem(int4_triton.INTERPRET_CONFIG, "SPLIT_K", split)
    parts, w = parts_and_reference(n, k, gs, m + n + k)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    y = int4_linear(x.reshape(1, m, k), parts["qweight"], parts["scale"], parts["zero"], gs, b)
    assert y.shape == (1, m, n) and y.dtype == dtype
    ref = x.double() @ w.T + (b.double() if bias else 0)
    err = ((y[0].double() - ref).norm() / ref.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 2e-3), err
    assert not int8_triton._scratch_for(torch.device("cpu")).counts.any()


@interpreted
def test_int4_matmul_checks_its_parts():
    parts, _ = parts_and_reference(8, 64, 32, 0)
    q, s, z = parts["qweight"], parts["scale"], parts["zero"]
    with pytest.raises(ValueError, match="input has 60 features, the weight 64"):
        int4_linear(torch.randn(1, 60), q, s, z, 32)
    with pytest.raises(ValueError, match="int4 parts disagree"):
        Int4Matmul(q, s, z, 64)
    with pytest.raises(ValueError, match="contiguous"):
        Int4Matmul(q, s.t().contiguous().t(), z, 32)


@interpreted
def test_int4_dequantize_into():
    parts, w = parts_and_reference(6, 200, 64, 1)
    out = torch.empty(6, 200)
    int4_triton.dequantize_into(parts["qweight"], parts["scale"], parts["zero"], 64, out)
    assert torch.equal(out, w.float())
