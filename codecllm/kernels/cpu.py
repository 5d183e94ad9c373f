"""CPU int8 weight-only linear: ``y = x @ (q * scale[:, None]).T + bias`` without a float copy of the weight
for small batches.

Measured on SmolLM2-135M shapes with 2 threads (``scripts/bench_cpu_kernels.py``): the only stock
PyTorch route that reads the int8 weight directly and beats an fp32 ``F.linear`` on one-token inputs
is ``aten._weight_int8pack_mm`` with **bfloat16** activations (AVX512-BF16 code path, fp32 accumulate).
Its float32 and float16 paths are scalar and 8-30x slower; dequantizing the whole weight per call costs
~9x an fp32 linear. For many rows (prefill) the bf16 kernel grows linearly with M, and a dequantized
weight with MKL's fp32 GEMM wins, with fp32-exact results.

Numerics of the small-M path: activations are rounded to bf16 (8 significant bits), products
accumulate in fp32, the unscaled row sums are rounded to bf16 once more, then multiplied by the fp32
scale. Relative error against a float64 reference of the same int8 weight: ~2.4e-3 (int8 rounding of
the weight itself costs ~7e-3 on Gaussian weights). Deterministic run to run, and each output row
does not depend on the other rows of the batch.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

SMALL_M = 32  # rows up to which the bf16 int8 kernel beats dequantize + fp32 GEMM (crossover ~48-64)
K_MULTIPLE = 16  # _weight_int8pack_mm reads K in 16-wide vectors with no tail: other K crash or go wrong

_int8pack_mm = torch.ops.aten._weight_int8pack_mm


@lru_cache(maxsize=None)
def _unit(n: int) -> torch.Tensor:
    """bf16 ones of length ``n``: the kernel's scale argument. The true fp32 scale is applied after, so
    that no per-row scale is rounded to bf16 (that would bias a whole output row by up to 0.4%)."""
    return torch.ones(n, dtype=torch.bfloat16)


def fits(qweight: torch.Tensor) -> bool:
    """Whether ``qweight`` can take the int8 kernel: contiguous ``[N, K]`` int8 on the CPU, K % 16 == 0."""
    return (qweight.dtype == torch.int8 and qweight.dim() == 2 and qweight.is_contiguous()
            and qweight.shape[1] % K_MULTIPLE == 0 and qweight.device.type == "cpu")


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias`` on the CPU, in ``x``'s dtype.

    ``x``: ``[..., K]`` float32/bfloat16/float16. ``qweight``: int8 ``[N, K]``, contiguous (checked by
    :func:`fits`; a weight that does not fit is dequantized per call). ``scale``: float32 ``[N]``.
    """
    n, k = qweight.shape
    x2 = x.reshape(-1, k)
    if x2.shape[0] <= SMALL_M and fits(qweight):
        y = _int8pack_mm(x2.to(torch.bfloat16).contiguous(), qweight, _unit(n))
        y = torch.mul(y, scale)  # bf16 * fp32 -> fp32 in one pass
        if bias is not None:
            y = y.add_(bias)
        y = y.to(x.dtype)
    else:
        y = F.linear(x2, torch.mul(qweight, scale[:, None]).to(x.dtype), bias)
    return y.reshape(*x.shape[:-1], n)
