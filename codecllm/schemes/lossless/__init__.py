"""``lossless``: a floating-point tensor bit for bit, split into byte planes so that the codec's entropy
coder sees the bytes that compress apart from those that do not.

- ``F16``: ``high`` (sign, exponent and the two top mantissa bits of each weight) and ``data`` (its low
  byte).
- ``BF16``: ``data`` (sign and the seven mantissa bits) and the 8-bit exponent as an offset ``d = (e -
  base) mod 256`` from the tensor's ``base``, the start of the 16 consecutive exponents that cover most
  of its weights. The offset's low nibbles (``exponent``) and high nibbles (``exponent_high``, nearly all
  zero) are packed two per byte: an entropy coder then codes pairs of exponents, whose byte values rarely
  repeat in runs, and comes within about 2% of the exponent's order-0 entropy (zstd on the exponent
  bytes themselves spends about 25% more, on short matches).
- ``F32``: ``data`` (the low 16 bits, two bytes per weight) and the high 16 bits as for ``BF16``
  (``signmant``, ``exponent``, ``exponent_high``, ``base``).
- any other dtype: ``data``, the tensor as it is (as ``none``).

Resident, a lossless weight is decoded once at load into an ordinary parameter. In stream mode on
CUDA, a ``BF16`` Linear weight (an even number of input features) is re-encoded at load into 12 bits per
weight, its sign+mantissa bytes and a 4-bit code per exponent, which the one-row matmul reads as it is
(``.cuda``, ``codecllm.kernels.expcode_triton``); any other lossless weight loads decoded in either mode.
"""

from __future__ import annotations

import torch

from torch import nn

from .. import PartSpec, Scheme, register, register_module

WINDOW = 16  # exponents whose offset from ``base`` fits the low nibble


@register
class Lossless(Scheme):
    id = "lossless"
    lossless = True
    main_part = "data"
    parts_are_scratch = True

    def layout(self, dtype, shape):
        shape = tuple(shape)
        n = 1
        for s in shape:
            n *= s
        half = (n + 1) // 2
        exponent = {"exponent": PartSpec("U8", (half,)), "exponent_high": PartSpec("U8", (half,)), "base": PartSpec("U8", (1,))}
        if dtype == "F16":
            return {"data": PartSpec("U8", shape), "high": PartSpec("U8", shape)}
        if dtype == "BF16":
            return {"data": PartSpec("U8", shape), **exponent}
        if dtype == "F32":
            return {"data": PartSpec("U8", (*shape, 2)), "signmant": PartSpec("U8", shape), **exponent}
        return {"data": PartSpec(dtype, shape)}

    def stand_in(self, module, backend, exact=True, dtype=None):
        if backend == "cuda-stream" and (dtype != "BF16" or type(module) is not nn.Linear or module.in_features % 2):
            return None  # the exponent-coded layout: bfloat16 Linear weights with an even K
        return super().stand_in(module, backend, exact, dtype)

    def quantize(self, w, importance=None):
        w = w.contiguous()
        if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return {"data": w}
        if w.dtype == torch.float16:
            b = w.reshape(-1).view(torch.uint8).reshape(-1, 2)
            return {"data": b[:, 0].reshape(w.shape).clone(), "high": b[:, 1].reshape(w.shape).clone()}
        if w.dtype == torch.bfloat16:
            x = w.reshape(-1).view(torch.int16)
            return {"data": _signmant(x).reshape(w.shape), **_exponent_planes(x)}
        # float32: the low half as it is, the high half as bfloat16 (.clone(): .contiguous() would keep the
        # stride of a size-1 dimension, which .view(torch.uint8) refuses)
        x = w.reshape(-1).view(torch.int16).reshape(-1, 2)
        low, high = (x[:, i].clone(memory_format=torch.contiguous_format) for i in (0, 1))
        return {"data": low.view(torch.uint8).reshape(*w.shape, 2), "signmant": _signmant(high).reshape(w.shape), **_exponent_planes(high)}

    def dequantize(self, parts, dtype):
        if "high" in parts:  # F16
            t = _interleave(parts["data"], parts["high"]).view(torch.float16).reshape(parts["data"].shape)
        elif "exponent" in parts:  # BF16, or F32 with its low half in ``data``
            signmant = parts.get("signmant", parts["data"])
            sm, e = signmant.reshape(-1), exponents(parts)  # uint8: mod 256
            high = _interleave((e << 7) | (sm & 0x7F), (sm & 0x80) | (e >> 1))  # uint8 shifts drop the bits shifted out
            if "signmant" in parts:
                t = _interleave(parts["data"].view(torch.int16), high).view(torch.float32)
            else:
                t = high.view(torch.bfloat16)
            t = t.reshape(signmant.shape)
        else:
            t = parts["data"]
        return t.to(dtype) if t.is_floating_point() and dtype is not None else t


def exponents(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 8-bit exponents (uint8, flat) of a ``BF16`` (or ``F32``) record's parts."""
    signmant = parts.get("signmant", parts["data"])
    return _unpack_exponents(parts["exponent"], parts["exponent_high"], signmant.numel()) + parts["base"]


register_module(Lossless, nn.Linear, "cuda-stream", "codecllm.schemes.lossless.cuda:LosslessCudaLinear")


def _signmant(x: torch.Tensor) -> torch.Tensor:
    """The sign and the 7 mantissa bits of the bfloat16 words ``x`` (int16, flat), one byte each."""
    b = (x & -32641).view(torch.uint8).reshape(-1, 2)  # 0x807F: the sign in the high byte, the mantissa in the low
    return b[:, 0] | b[:, 1]


def _exponent_planes(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The planes of the exponents of the bfloat16 words ``x`` (int16, flat): ``base``, the start of the
    window of ``WINDOW`` exponents holding the most of them (the lowest such start), and the offsets from
    it, low and high nibbles packed two per byte."""
    e = (x << 1).view(torch.uint8).reshape(-1, 2)[:, 1].contiguous()  # the sign shifted out of the high byte
    counts = torch.bincount(e, minlength=256)
    sums = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    base = int(torch.argmax(sums[WINDOW:] - sums[:-WINDOW]))  # weights in [b, b + WINDOW) for b = 0..256 - WINDOW
    d = e - base  # uint8: mod 256
    if d.numel() % 2:
        d = torch.cat([d, d.new_zeros(1)])
    z = d.view(torch.int16)  # element 2j in the low byte (little-endian), 2j + 1 in the high byte
    low, high = z & 0x0F0F, (z >> 4) & 0x0F0F
    return {"exponent": (low | (low >> 4)).to(torch.uint8), "exponent_high": (high | (high >> 4)).to(torch.uint8),
            "base": torch.tensor([base], dtype=torch.uint8)}


def _unpack_exponents(low: torch.Tensor, high: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` offsets whose low nibbles ``low`` and high nibbles ``high`` hold, two per byte."""
    out = torch.empty((low.numel(), 2), dtype=torch.uint8, device=low.device)
    torch.bitwise_or(low & 0x0F, high << 4, out=out[:, 0])
    torch.bitwise_or(low >> 4, high & 0xF0, out=out[:, 1])
    return out.reshape(-1)[:n]


def _interleave(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``lo`` and ``hi`` (flat, one dtype) element by element: ``lo[0], hi[0], lo[1], ...``, as words twice
    their size (little-endian)."""
    out = torch.stack([lo.reshape(-1), hi.reshape(-1)], dim=1)
    return out.view(torch.int16 if lo.dtype == torch.uint8 else torch.int32).reshape(-1)
