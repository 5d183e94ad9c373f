"""``int4``: 4-bit codes in groups of ``group_size`` weights along K, each group with an fp16 scale and
an fp16 zero point: ``w ~ (q - zero) * scale``, ``q`` in [0, 15].

Parts: ``qweight`` (U8, ``[out, in / 2]``: two codes per byte, the even column in the low nibble),
``scale`` and ``zero`` (F16, ``[out, ceil(in / group_size)]``). ``in`` must be even (a weight with an odd
one is not int4: ``applies_to``; the converter keeps it exact); one that is not a multiple of the group size ends in a shorter group,
quantized over its own weights only.

Quantization needs no data: per group, the min/max range is shrunk over a grid of 8 clipping factors (1.0 down to 0.7) and
the one with the least squared error kept, then scale and zero are refitted by least squares to the codes
they give (twice, each kept only where it lowers the error). The squared error is weighted per input
channel by the converter's data-free ``importance`` where it has one (``codecllm.importance``), plain
otherwise. Deterministic. ``finer()`` is the same scheme at half the group size (down to 32). Stand-ins:
Linear, Conv1D and Embedding on the CPU (dequantized per call, one layer at a time) and on CUDA
(``.cuda``: the fused int4 kernels of ``codecllm.kernels.int4_triton``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...dtypes import FLOAT_DTYPES
from ...errors import CodecLLMError, FormatError
from ...kernels import cpu as cpu_kernels
from ...qmodules import CpuStream, CpuStreamed, QEmbedding, QLinear, payload_bytes
from .. import PartSpec, Scheme, keep_lower_error, register, register_module

GROUP_SIZES = (32, 64, 128)
QMAX = 15
# clipping factors tried per group, from 1.0 down to CLIP_MIN: with 12 (and before two in-place refit changes) the L8
# stack converted in 13.2 s against 10.6, and the model measured no better (benchmarks/NOTES.md)
CLIP_GRID = 8
CLIP_MIN = 0.7
REFITS = 2
_BLOCK_ELEMENTS = 1 << 18  # weights quantized at a time: float32 work buffers of a few times this, kept in cache (1.5x faster than 1 << 21)


@register
class Int4(Scheme):
    id = "int4"
    lossless = False
    main_part = "qweight"

    def __init__(self, group_size: int = 64, transpose: bool = False):
        if type(group_size) is not int or group_size not in GROUP_SIZES:
            raise CodecLLMError(f"int4 group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
        if not isinstance(transpose, bool):
            raise CodecLLMError(f"int4 parameter transpose must be true or false, got {transpose!r}")
        self.group_size, self.transpose = group_size, transpose

    @property
    def params(self):
        return {"group_size": self.group_size, **({"transpose": True} if self.transpose else {})}

    def stand_in(self, module, backend, exact=True, dtype=None):
        cls = super().stand_in(module, backend, exact, dtype)
        if cls is Int4StreamLinear:
            out_f, in_f = module.weight.shape[::-1] if self.transpose else module.weight.shape
            if cpu_kernels.planes_fit(out_f, in_f) and cpu_kernels.int4_fits(out_f, in_f, self.group_size):
                return Int4PackedStreamLinear
        return cls

    def applies_to(self, module, param, tensor_shape, float_tensor):
        if not (param == "weight" and float_tensor and len(tensor_shape) == 2 and isinstance(module, tuple(self.modules))):
            return False
        return (tensor_shape[0] if isinstance(module, Conv1D) else tensor_shape[1]) % 2 == 0

    def for_module(self, module):
        return Int4(self.group_size, transpose=True) if isinstance(module, Conv1D) else self

    def layout(self, dtype, shape):
        if len(shape) != 2 or dtype not in FLOAT_DTYPES:
            raise FormatError(f"int4 stores 2-D floating-point tensors, not {dtype} {list(shape)}")
        out_f, in_f = (shape[1], shape[0]) if self.transpose else shape
        if in_f % 2:
            raise FormatError(f"int4 stores weights with an even number of input features, not {in_f}")
        groups = -(-in_f // self.group_size)
        return {"qweight": PartSpec("U8", (out_f, in_f // 2)), "scale": PartSpec("F16", (out_f, groups)),
                "zero": PartSpec("F16", (out_f, groups))}

    # -- the math --

    weighs_inputs = True
    parallel_quantize = True

    def finer(self):
        return Int4(self.group_size // 2, self.transpose) if self.group_size // 2 in GROUP_SIZES else self

    def quantize(self, w, importance=None):
        if w.dim() != 2:
            raise ValueError(f"int4 quantizes 2-D weights, got shape {tuple(w.shape)}")
        if self.transpose:
            w = w.t()
        rows, cols = w.shape
        if cols % 2:
            raise ValueError(f"int4 quantizes weights with an even number of input features, got {cols}")
        gs = self.group_size
        groups = -(-cols // gs)
        codes = torch.empty((rows, groups * gs), dtype=torch.uint8)
        scale = torch.empty((rows, groups), dtype=torch.float16)
        zero = torch.empty((rows, groups), dtype=torch.float16)
        step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
        for r in range(0, rows, step):
            q, s, z = _quantize_groups(w[r:r + step].to(torch.float32), gs, importance)
            codes[r:r + step], scale[r:r + step], zero[r:r + step] = q, s, z
        codes = codes[:, :cols]
        return {"qweight": codes[:, 0::2] | (codes[:, 1::2] << 4), "scale": scale, "zero": zero}

    def dequantize(self, parts, dtype):
        w = _dequantize_rows(parts["qweight"], parts["scale"], parts["zero"], self.group_size, self._cols(parts))
        w = w.to(dtype)
        return w.t().contiguous() if self.transpose else w

    def embedding(self, parts, ids, dtype):
        if self.transpose:
            return super().embedding(parts, ids, dtype)
        flat = ids.reshape(-1)  # index_select: an id out of range is an error, as in an embedding lookup
        rows = _dequantize_rows(*(parts[n].index_select(0, flat) for n in ("qweight", "scale", "zero")), self.group_size, self._cols(parts))
        return rows.to(dtype).reshape(*ids.shape, -1)

    def _cols(self, parts) -> int:
        """K: the packed codes hold K / 2 bytes per row."""
        k, groups = 2 * parts["qweight"].shape[1], parts["scale"].shape[1]
        if -(-k // self.group_size) != groups:
            raise FormatError(f"int4 parts disagree: {k} codes per row, {groups} groups of {self.group_size}")
        return k


def _quantize_groups(w: torch.Tensor, gs: int, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[rows, groups * gs]`` (uint8), scales and zeros ``[rows, groups]`` (fp16) of float32 ``w``,
    minimizing the squared error weighted per column by ``importance`` (``[cols]``, positive; None: 1)."""
    rows, cols = w.shape
    groups = -(-cols // gs)
    pad = groups * gs - cols
    valid = torch.zeros((1, groups * gs))
    valid[:, :cols] = 1 if importance is None else importance.to(torch.float32)
    if pad:  # the last group is shorter: padded with its own last weight (min/max unchanged), weighted 0
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    g = w.reshape(rows, groups, gs)
    om = valid.reshape(1, groups, gs)
    lo0, hi0 = g.amin(-1), g.amax(-1)

    # the least scale: |zero| stays within 2048 (exact in fp16, and a constant group decodes exactly), and
    # fp16 keeps it above 0
    floor = torch.maximum(torch.maximum(lo0.abs(), hi0.abs()) / 2048, torch.tensor(2.0 ** -24))

    def fit(lo, hi):
        s = torch.maximum((hi - lo) / QMAX, floor)
        z = -lo / s
        return s, z

    weighted = importance is not None or pad

    def codes(s, z):  # w / s + z rounded (a division, then an addition; addcdiv's broadcast ran 3-4x slower)
        return g.div(s[..., None]).add_(z[..., None]).round_().clamp_(0, QMAX)

    def assign(s, z):
        """(scale, zero) as the file stores them, and each group's weighted squared error with them."""
        s, z = s.half().float(), z.half().float()
        e = codes(s, z).sub_(z[..., None]).mul_(s[..., None]).sub_(g).square_()
        if weighted:
            e.mul_(om)
        return s, z, e.sum(-1)

    best = None
    for a in torch.linspace(1.0, CLIP_MIN, CLIP_GRID).tolist():
        cand = assign(*fit(lo0 * a, hi0 * a))
        best = cand if best is None else keep_lower_error(best, cand)
    n = om.sum(-1, keepdim=True)
    wm = (om * g).sum(-1, keepdim=True) / n
    gc = g - wm
    for _ in range(REFITS):  # least squares of w ~ s * q + c over each group, given its codes
        q = codes(best[0], best[1])
        qm = (om * q).sum(-1, keepdim=True) / n
        qc = q.sub_(qm)
        var = qc.square().mul_(om).sum(-1)
        s = torch.maximum(torch.where(var > 0, qc.mul_(om).mul_(gc).sum(-1) / var.clamp_min(1e-12), best[0]), floor)
        z = qm[..., 0] - wm[..., 0] / s
        best = keep_lower_error(best, assign(s, z))
    s, z, _ = best
    return codes(s, z).to(torch.uint8).reshape(rows, groups * gs), s.half(), z.half()


def _dequantize_rows(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, gs: int, cols: int) -> torch.Tensor:
    """float32 ``[rows, cols]`` from packed codes and per-group scale and zero."""
    return _dequantize_codes(torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1), scale, zero, gs, cols)


def _dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, gs: int, cols: int) -> torch.Tensor:
    """float32 ``[rows, cols]`` from one uint8 code per weight and per-group scale and zero."""
    rows, groups = q.shape[0], scale.shape[1]
    if q.shape[1] < groups * gs:
        q = F.pad(q, (0, groups * gs - q.shape[1]))
    q = q[:, :groups * gs].reshape(rows, groups, gs).to(torch.float32)
    w = (q - zero.to(torch.float32)[..., None]) * scale.to(torch.float32)[..., None]
    return w.reshape(rows, groups * gs)[:, :cols]


def _pairs_bytes(rec) -> int:
    """The bytes of the int4 kernel's (scale, offset) pairs for ``rec``: bf16 ``[groups, N, 2]``."""
    return 4 * rec.parts["scale"].shape[0] * rec.parts["scale"].shape[1]


class Int4Linear(QLinear):
    """Linear (or Conv1D) with int4 weights on the CPU: up to ``cpu_kernels.SMALL_M`` rows (decode steps)
    through the int4 kernel of ``codecllm.kernels.cpu`` on codes repacked for it at the first such call
    (kept beside the file's codes: 0.56 more bytes per weight); more rows, or a weight the kernel does not
    take, dequantized for the call (``QLinear.linear``)."""

    @classmethod
    def held_bytes(cls, rec, dtype):
        n, k = rec.parts["scale"].shape[0], 2 * rec.parts["qweight"].shape[1]
        held = super().held_bytes(rec, dtype)
        if cpu_kernels.int4_fits(n, k, rec.scheme.group_size):  # the repacked codes and pairs, from the first decode step
            held += n * k // 2 + _pairs_bytes(rec)
        return held

    def linear(self, x, parts):
        if x.numel() <= cpu_kernels.SMALL_M * x.shape[-1]:
            packed = self._packed(parts)
            if packed is not None:
                return cpu_kernels.int4_linear(x, *packed, self.scheme.group_size, self.bias)
        return super().linear(x, parts)

    def _packed(self, parts):
        """The kernel's operands for ``parts`` (made once per codes tensor), or None."""
        kept = self.__dict__.get("_int4pack")
        if kept is not None and kept[0] is parts["qweight"]:
            return kept[1]
        pairs = self._pairs(parts)
        if pairs is None:
            return None
        packed = (cpu_kernels.int4_pack_codes(parts["qweight"]), pairs)
        self.__dict__["_int4pack"] = (parts["qweight"], packed)
        return packed

    def _pairs(self, parts):
        """The kernel's (scale, offset) pairs, made once, or None where the kernel does not take the weight."""
        pairs = self.__dict__.get("_int4pairs")
        if pairs is None:
            q = parts["qweight"]
            if not cpu_kernels.int4_fits(q.shape[0], 2 * q.shape[1], self.scheme.group_size):  # (Conv1D's codes too are [out, in / 2])
                return None
            pairs = self.__dict__["_int4pairs"] = cpu_kernels.int4_pairs(parts["scale"], parts["zero"])
        return pairs


class Int4StreamLinear(CpuStream, Int4Linear):
    """The int4 codes stay compressed (the file's payload) and are decoded on each call (CPU stream mode,
    for shapes ``Int4PackedStreamLinear`` does not take); at small M they are repacked for the kernel at
    each call (about 3.5x cheaper than dequantizing them; the scale/offset pairs, resident, are made
    once): results equal resident mode's."""

    def _packed(self, parts):
        pairs = self._pairs(parts)
        return None if pairs is None else (cpu_kernels.int4_pack_codes(parts["qweight"]), pairs)


class Int4PackedStreamLinear(CpuStreamed, Int4Linear):
    """CPU stream mode for int4: the codes are kept zstd-coded in memory in the int4 kernel's own layout
    (``cpu_kernels.int4_pack_codes``, about the file's size), so that a call decodes them straight into
    what the kernel reads, with no repacking; more than ``cpu_kernels.SMALL_M`` rows dequantize the
    codes unpacked. Results equal resident mode's."""

    relative_speed = 0.32  # SmolLM2 int4:g64 on the 2-core CPU: a decode step 48.4 ms, resident 15.5 ms

    @classmethod
    def held_bytes(cls, rec, dtype):
        # the same codes in another order (about the file's zstd size), and the kernel's pairs
        return payload_bytes(rec) + _pairs_bytes(rec)

    @classmethod
    def from_float(cls, module, scheme, parts, compute_dtype, device):
        q = parts["qweight"]
        new = super().from_float(module, scheme, {"scale": parts["scale"], "zero": parts["zero"]}, compute_dtype, device)
        new.n, new.k = q.shape[0], 2 * q.shape[1]
        new.keep_compressed(cpu_kernels.int4_pack_codes(q).reshape(-1), "the packed codes of an int4 weight")
        new.__dict__["_int4pairs"] = cpu_kernels.int4_pairs(parts["scale"], parts["zero"])
        return new

    def stream_parts(self, buf):
        return {"packed": torch.from_numpy(buf), "scale": self._buffers["scale"], "zero": self._buffers["zero"]}

    def scheme_parts(self, buf):
        codes = cpu_kernels.unpack_nibbles(torch.from_numpy(buf), self.n, self.k)
        return {"qweight": codes[:, 0::2] | (codes[:, 1::2] << 4), "scale": self._buffers["scale"], "zero": self._buffers["zero"]}

    def linear(self, x, parts):
        if x.numel() <= cpu_kernels.SMALL_M * x.shape[-1]:
            packed = parts["packed"].view(self.n, self.k // 2)
            return cpu_kernels.int4_linear(x, packed, self.__dict__["_int4pairs"], self.scheme.group_size, self.bias)
        codes = cpu_kernels.unpack_nibbles(parts["packed"], self.n, self.k)
        w = _dequantize_codes(codes, parts["scale"], parts["zero"], self.scheme.group_size, self.k)
        return F.linear(x, w.to(x.dtype), self.bias)


class Int4Embedding(QEmbedding):
    """An int4 embedding table: ``Int4.embedding`` dequantizes the rows asked for."""


for _float in (nn.Linear, Conv1D):
    register_module(Int4, _float, "cpu", Int4Linear)
    register_module(Int4, _float, "cpu-stream", Int4StreamLinear)
    register_module(Int4, _float, "cuda", "codecllm.schemes.int4.cuda:Int4CudaLinear")
    register_module(Int4, _float, "cuda-stream", "codecllm.schemes.int4.cuda:Int4CudaStreamLinear")
register_module(Int4, nn.Embedding, "cpu", Int4Embedding)
register_module(Int4, nn.Embedding, "cuda", Int4Embedding)
