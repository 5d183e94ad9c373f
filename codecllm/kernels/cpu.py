"""CPU int8 weight-only linear: ``y = x @ (q * scale[:, None]).T + bias``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    w = (qweight.to(torch.float32) * scale[:, None]).to(x.dtype)
    return F.linear(x, w, bias)
