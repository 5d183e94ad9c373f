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
(``.cuda``, ``codecllm.kernels.expcode_triton``); with ``gpu_stream_codec="ans"``, the codes are kept
entropy-coded too (about 10.7 bits per weight) and decoded by nvCOMP before each use. Any other lossless
weight loads decoded in either mode.
"""

from __future__ import annotations

from functools import partial

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
        if backend.startswith("cuda-stream") and (dtype != "BF16" or type(module) is not nn.Linear or module.in_features % 2):
            return None  # the exponent-coded layout: bfloat16 Linear weights with an even K
        return super().stand_in(module, backend, exact, dtype)

    def quantize(self, w, importance=None):
        w = w.contiguous()
        if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return {"data": w}
        x = w.reshape(-1).view(torch.int16)
        if w.dtype == torch.float16:
            low, high = _bytes(x)
            return {"data": low.reshape(w.shape), "high": high.reshape(w.shape)}
        if w.dtype == torch.bfloat16:
            signmant, planes = _split(x)
            return {"data": signmant.reshape(w.shape), **planes}
        # float32: the low half as it is (.clone: .contiguous() would keep the stride of a size-1 dimension,
        # which .view(torch.uint8) refuses), the high half as bfloat16
        x = x.reshape(-1, 2)
        signmant, planes = _split(x[:, 1])
        return {"data": x[:, 0].clone(memory_format=torch.contiguous_format).view(torch.uint8).reshape(*w.shape, 2), "signmant": signmant.reshape(w.shape), **planes}

    def dequantize(self, parts, dtype):
        if "high" in parts:  # F16
            shape = parts["data"].shape
            out = torch.empty((parts["data"].numel(), 2), dtype=torch.uint8, device=parts["data"].device)
            out[:, 0], out[:, 1] = parts["data"].reshape(-1), parts["high"].reshape(-1)
            t = out.view(torch.float16).reshape(shape)
        elif "exponent" in parts:  # BF16, or F32 with its low half in ``data``
            signmant = parts.get("signmant", parts["data"])
            f32 = "signmant" in parts
            out = torch.empty((signmant.numel(), 2 if f32 else 1), dtype=torch.int16, device=signmant.device)
            if f32:
                out[:, 0] = parts["data"].reshape(-1, 2).view(torch.int16).reshape(-1)
            _join(signmant.reshape(-1), parts["exponent"], parts["exponent_high"], int(parts["base"][0]), out[:, -1])
            t = out.view(torch.float32 if f32 else torch.bfloat16).reshape(signmant.shape)
        else:
            t = parts["data"]
        return t.to(dtype) if t.is_floating_point() and dtype is not None else t


def exponents(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 8-bit exponents (uint8, flat) of a ``BF16`` (or ``F32``) record's parts."""
    signmant = parts.get("signmant", parts["data"])
    return _unpack_exponents(parts["exponent"], parts["exponent_high"], signmant.numel()) + parts["base"]


register_module(Lossless, nn.Linear, "cuda-stream", "codecllm.schemes.lossless.cuda:LosslessCudaLinear")
register_module(Lossless, nn.Linear, "cuda-stream-ans", "codecllm.schemes.lossless.cuda:LosslessSmallLinear")


# The planes are split and joined a block of weights at a time, on contiguous int16 words, so that every
# step runs vectorised on operands in the CPU's cache (over whole tensors each step was a pass through
# memory, and strided byte views run ten times slower than contiguous words). Blocks of 2^18 weights
# (2-core x86 machine, 46M bf16 weights): split as fast as 2^16's on one torch thread and 1.4x faster on two,
# join 1.25x faster on one and 1.8x on two (torch splits larger operands over its threads). The converter
# splits on one torch thread (its codec threads use the other cores: ``converter.convert``); a load joins
# on the user's.
BLOCK = 1 << 18  # weights (even)


def _block(t: torch.Tensor) -> int:
    """Weights per block: ``BLOCK`` on the CPU; on a GPU one block (each step a kernel launch)."""
    return BLOCK if t.device.type == "cpu" else max(t.numel() + t.numel() % 2, 2)


def _blocks(n: int, block: int):
    return ((i, min(i + block, n)) for i in range(0, n, block))


def _bytes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The low and the high byte of each of the int16 words ``x`` (flat), as two planes: a block at a time
    on contiguous words (on one torch thread 4x faster than copying the strided bytes of each plane)."""
    n, block = x.numel(), _block(x)
    low, high = (torch.empty(n, dtype=torch.uint8, device=x.device) for _ in range(2))
    t = torch.empty(block, dtype=torch.int16, device=x.device)
    for i, j in _blocks(n, block):
        low[i:j] = x[i:j]  # int16 into uint8: the low byte
        torch.bitwise_right_shift(x[i:j], 8, out=t[:j - i])
        high[i:j] = t[:j - i]
    return low, high


def _split(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The planes of the bfloat16 words ``x`` (int16, flat, any stride): the sign+mantissa bytes, and the
    exponents' planes: ``base``, the start of the window of ``WINDOW`` exponents holding the most of a
    sample of them (the lowest such start), and the offsets from it, low and high nibbles packed two per
    byte."""
    n, h = x.numel(), (x.numel() + 1) // 2
    counts = torch.bincount(((x[::max(n >> 16, 1) | 1] >> 7) & 0xFF).to(torch.uint8), minlength=256)  # about 65536 evenly spaced
    sums = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    base = int(torch.argmax(sums[WINDOW:] - sums[:-WINDOW]))  # weights in [b, b + WINDOW) for b = 0..256 - WINDOW
    block, new = _block(x), partial(torch.empty, device=x.device)
    signmant, low, high = new(n, dtype=torch.uint8), new(h, dtype=torch.uint8), new(h, dtype=torch.uint8)
    s, t, e = new(block, dtype=torch.int16), new(block, dtype=torch.int16), new(block, dtype=torch.uint8)
    for i, j in _blocks(n, block):
        k, m = j - i, (j - i + 1) // 2
        w, a, b = x[i:j], s[:k], t[:k]
        torch.bitwise_and(w, 0x7F, out=a)
        torch.bitwise_right_shift(w, 8, out=b)
        b &= 0x80
        a |= b
        signmant[i:j] = a  # int16 into uint8: the low byte
        torch.bitwise_right_shift(w, 7, out=a)
        e[:k] = a  # the low byte: the exponent (the sign falls out)
        e[:k] -= base  # uint8: mod 256, the offset
        e[k:k + 1] = 0  # n odd: an offset of 0 in the unused high nibbles
        z, a, b = e[:2 * m].view(torch.int16), s[:m], t[:m]  # two offsets per word, element 2k in the low byte
        torch.bitwise_right_shift(z, 4, out=b)
        torch.bitwise_and(z, 0x0F, out=a)
        a |= b & 0xF0
        low[i // 2:i // 2 + m] = a
        torch.bitwise_right_shift(z, 8, out=a)
        a &= 0xF0
        b &= 0x0F
        a |= b
        high[i // 2:i // 2 + m] = a
    return signmant, {"exponent": low, "exponent_high": high, "base": torch.tensor([base], dtype=torch.uint8, device=x.device)}


def _join(signmant: torch.Tensor, low: torch.Tensor, high: torch.Tensor, base: int, out: torch.Tensor) -> None:
    """Inverse of ``_split``: the bfloat16 words into ``out`` (int16, flat, any stride)."""
    n, block = signmant.numel(), _block(signmant)
    a, b, c = (torch.empty(block, dtype=torch.int16, device=signmant.device) for _ in range(3))
    for i, j in _blocks(n, block):
        k = j - i
        p, q, z = a[:(k + 1) // 2], b[:(k + 1) // 2], c[:(k + 1) // 2]
        p.copy_(low[i // 2:(j + 1) // 2])
        q.copy_(high[i // 2:(j + 1) // 2])
        torch.bitwise_and(p, 0x0F, out=z)
        p &= 0xF0
        p <<= 4
        z |= p
        torch.bitwise_and(q, 0x0F, out=p)
        p <<= 4
        z |= p
        q &= 0xF0
        q <<= 8
        z |= q  # the offsets, two per word
        ex = z.view(torch.uint8)[:k]
        ex += base  # uint8: mod 256, the exponents
        x, y = a[:k], b[:k]
        x.copy_(ex)
        x <<= 7
        y.copy_(signmant[i:j])
        torch.bitwise_and(y, 0x7F, out=c[:k])
        x |= c[:k]
        y &= 0x80
        y <<= 8
        x |= y
        out[i:j] = x


def _unpack_exponents(low: torch.Tensor, high: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` offsets whose low nibbles ``low`` and high nibbles ``high`` hold, two per byte."""
    out = torch.empty((low.numel(), 2), dtype=torch.uint8, device=low.device)
    torch.bitwise_or(low & 0x0F, high << 4, out=out[:, 0])
    torch.bitwise_or(low >> 4, high & 0xF0, out=out[:, 1])
    return out.reshape(-1)[:n]
