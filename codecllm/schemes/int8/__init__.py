"""``int8``: symmetric, one float32 scale per output channel, codes in [-127, 127].

``scale[r] = max|w[r, :]| / 127`` (1 for an all-zero row), ``q = round_half_even(w / scale[r])``. Parts:
``qweight`` (I8, ``[out, in]``) and ``scale`` (F32, ``[out]``). With ``group_size`` (32, 64, 128), one fp16
scale per group of that many weights along K instead (llama.cpp's Q8_0 with groups of 32): ``scale`` is F16
``[out, ceil(in / group_size)]``, chosen per group over a grid of clipping factors of max|w| / 127 and
refitted twice by least squares, minimizing the squared error weighted by the converter's ``importance``
where it has one (``codecllm.importance``); such weights compute dequantized per call on the CPU and are kept
dequantized on CUDA, whose kernels take one scale per row. A weight stored as ``[in, out]`` (transformers'
``Conv1D``) is encoded transposed, with the parameter ``transpose``, so that its output channels are rows
like a Linear's. Stand-ins: Linear, Conv1D and Embedding on the CPU (here) and on CUDA (``.cuda``).
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

QMAX = 127
GROUP_SIZES = (32, 64, 128)
CLIP_GRID = 16  # grouped: clipping factors tried per group, from 1.0 down to CLIP_MIN
CLIP_MIN = 0.85
REFITS = 2
# rows quantized at a time, so that converting a large tensor needs one float32 block, not a float32 copy
_BLOCK_ELEMENTS = 1 << 22
_GROUP_BLOCK_ELEMENTS = 1 << 18  # the grouped search's passes over a block stay in cache (1.6x faster than 1 << 22)


@register
class Int8(Scheme):
    id = "int8"
    lossless = False
    default = True
    main_part = "qweight"

    def __init__(self, transpose: bool = False, group_size: int | None = None):
        if not isinstance(transpose, bool):
            raise CodecLLMError(f"int8 parameter transpose must be true or false, got {transpose!r}")
        if group_size is not None and (type(group_size) is not int or group_size not in GROUP_SIZES):
            raise CodecLLMError(f"int8 group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
        self.transpose, self.group_size = transpose, group_size

    @property
    def params(self):
        return {**({"transpose": True} if self.transpose else {}), **({"group_size": self.group_size} if self.group_size else {})}

    @property
    def weighs_inputs(self):  # per row, max|w| leaves no choice
        return self.group_size is not None

    # groups: a search per group; per row: float32 passes over large blocks, 1.5x faster on two threads
    # on a 14336 x 4096 weight
    parallel_quantize = True

    def stand_in(self, module, backend, exact=True, dtype=None):
        if self.group_size and backend.startswith("cuda"):  # the CUDA kernels take one scale per row
            return None
        cls = super().stand_in(module, backend, exact, dtype)
        if cls is Int8StreamLinear and not self.group_size:
            out_f, in_f = module.weight.shape[::-1] if self.transpose else module.weight.shape
            if cpu_kernels.planes_fit(out_f, in_f):
                return Int8PlanesStreamLinear
        return cls

    def applies_to(self, module, param, tensor_shape, float_tensor):
        return param == "weight" and float_tensor and len(tensor_shape) == 2 and isinstance(module, tuple(self.modules))

    def for_module(self, module):
        return Int8(transpose=True, group_size=self.group_size) if isinstance(module, Conv1D) else self

    def layout(self, dtype, shape):
        if len(shape) != 2 or dtype not in FLOAT_DTYPES:
            raise FormatError(f"int8 stores 2-D floating-point tensors, not {dtype} {list(shape)}")
        out_f, in_f = (shape[1], shape[0]) if self.transpose else shape
        if self.group_size:
            return {"qweight": PartSpec("I8", (out_f, in_f)), "scale": PartSpec("F16", (out_f, -(-in_f // self.group_size)))}
        return {"qweight": PartSpec("I8", (out_f, in_f)), "scale": PartSpec("F32", (out_f,))}

    def quantize(self, w, importance=None):
        if w.dim() != 2:
            raise ValueError(f"int8 quantizes 2-D weights, got shape {tuple(w.shape)}")
        if self.transpose:
            w = w.t()
        rows, cols = w.shape
        if self.group_size:
            return self._quantize_groups(w, importance)
        q = torch.empty((rows, cols), dtype=torch.int8)
        scale = torch.empty(rows, dtype=torch.float32)
        step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
        for r in range(0, rows, step):
            block = w[r:r + step].to(torch.float32)
            s = block.abs().amax(dim=1) / QMAX
            s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row quantizes to zeros with any scale
            q[r:r + step] = torch.round(block / s[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
            scale[r:r + step] = s
        return {"qweight": q, "scale": scale}

    def _quantize_groups(self, w, importance):
        """One fp16 scale per group of ``group_size`` weights along K (as llama.cpp's Q8_0): of the
        clipped ranges ``a * max|w| / 127`` and two least-squares refits, the one with the least squared
        error (weighted by ``importance``), rounded to fp16 before the codes are computed from it."""
        rows, cols = w.shape
        gs = self.group_size
        groups = -(-cols // gs)
        weight = torch.zeros(groups * gs)
        weight[:cols] = 1 if importance is None else importance.to(torch.float32)  # padding weighs nothing
        weight = weight.reshape(1, groups, gs)
        q = torch.empty((rows, cols), dtype=torch.int8)
        scale = torch.empty((rows, groups), dtype=torch.float16)
        step = max(1, _GROUP_BLOCK_ELEMENTS // max(cols, 1))
        for r in range(0, rows, step):
            block = w[r:r + step].to(torch.float32)
            g = F.pad(block, (0, groups * gs - cols)).reshape(block.shape[0], groups, gs)

            def codes(s):
                return g.div(s[..., None]).round_().clamp_(-QMAX, QMAX)

            def assign(s):
                """The scale as the file stores it, and each group's weighted squared error with it."""
                s = s.half().float()
                s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group: codes 0 with any scale
                return s, codes(s).mul_(s[..., None]).sub_(g).square_().mul_(weight).sum(-1)

            amax = g.abs().amax(dim=2) / QMAX
            best = None
            for a in torch.linspace(1.0, CLIP_MIN, CLIP_GRID).tolist():
                cand = assign(amax * a)
                best = cand if best is None else keep_lower_error(best, cand)
            for _ in range(REFITS):  # least squares of w ~ s * q over each group, given its codes
                c = codes(best[0])
                best = keep_lower_error(best, assign((weight * g * c).sum(-1) / (weight * c * c).sum(-1).clamp_min(1e-30)))
            q[r:r + step] = codes(best[0]).reshape(block.shape[0], -1)[:, :cols].to(torch.int8)
            scale[r:r + step] = best[0].half()
        return {"qweight": q, "scale": scale}

    def dequantize(self, parts, dtype):
        q = parts["qweight"]
        s = parts["scale"].to(q.device, torch.float32)
        if self.group_size:  # groups as a [rows, groups, group_size] view of the padded codes
            rows, cols = q.shape
            g = F.pad(q, (0, s.shape[1] * self.group_size - cols)).reshape(rows, s.shape[1], self.group_size)
            w = (g.to(torch.float32) * s[..., None]).reshape(rows, -1)[:, :cols].to(dtype)
        else:
            w = (q.to(torch.float32) * s[:, None]).to(dtype)
        return w.t().contiguous() if self.transpose else w

    def embedding(self, parts, ids, dtype):
        if self.transpose or self.group_size:
            if self.group_size and not self.transpose:  # dequantize the rows asked for only
                flat = ids.reshape(-1)
                rows = {n: parts[n].index_select(0, flat) for n in ("qweight", "scale")}
                return self.dequantize(rows, dtype).reshape(*ids.shape, -1)
            return super().embedding(parts, ids, dtype)
        rows = F.embedding(ids, parts["qweight"]).to(torch.float32)
        return (rows * parts["scale"][ids].unsqueeze(-1)).to(dtype)


class Int8Linear(QLinear):
    """Linear (or Conv1D) with an int8 weight: the CPU kernel of ``codecllm.kernels.cpu``."""

    def linear(self, x, parts):
        if self.scheme.group_size:  # no kernel for group scales: dequantized per call
            return super().linear(x, parts)
        return cpu_kernels.int8_linear(x, parts["qweight"], parts["scale"], self.bias)


class Int8StreamLinear(CpuStream, Int8Linear):
    """The int8 codes stay compressed (the file's payload) and are decoded on each call (CPU stream mode:
    grouped scales, and shapes ``Int8PlanesStreamLinear`` does not take)."""


class Int8PlanesStreamLinear(CpuStreamed, Int8Linear):
    """CPU stream mode for per-row int8: the codes are kept as two 4-bit planes (``cpu_kernels.int8_planes``),
    the low one as it is and the high one zstd-coded in memory. A call decodes the high
    plane only (half the bytes of the codes) and, up to ``cpu_kernels.SMALL_M`` rows, computes with two
    calls of the int4 kernel; more rows dequantize the rebuilt codes. It holds about what the file's
    zstd-coded codes take (SmolLM2's streamed weights: 94.7 MB against 94.8 MB; resident 104.4 MB): the low bits of a trained
    weight's code carry nearly all their bits, the high ones about 3.2 of 4."""

    relative_speed = 0.45  # SmolLM2 on the 2-core CPU: a decode step 58-62 ms, resident 26 ms (see CpuPipeline)

    @classmethod
    def held_bytes(cls, rec, dtype):
        return payload_bytes(rec)  # (the high plane compressed and the low plane hold about what zstd makes of the codes)

    @classmethod
    def decoded_bytes(cls, rec):
        return rec.main.nbytes // 2

    @classmethod
    def from_float(cls, module, scheme, parts, compute_dtype, device):
        q = parts["qweight"]
        new = super().from_float(module, scheme, {"scale": parts["scale"]}, compute_dtype, device)
        new.n, new.k = q.shape
        high, low = cpu_kernels.int8_planes(q)
        new.register_buffer("low", low, persistent=False)
        new.keep_compressed(high, "the high plane of an int8 weight")
        return new

    def stream_parts(self, buf):
        return {"high": torch.from_numpy(buf), "low": self.low, "scale": self._buffers["scale"]}

    def scheme_parts(self, buf):
        return {"qweight": cpu_kernels.int8_from_planes(torch.from_numpy(buf), self.low, self.n, self.k), "scale": self._buffers["scale"]}

    def linear(self, x, parts):
        if x.numel() <= cpu_kernels.SMALL_M * x.shape[-1]:
            return cpu_kernels.planes_linear(x, parts["high"], parts["low"], parts["scale"], self.bias)
        q = cpu_kernels.int8_from_planes(parts["high"], parts["low"], self.n, self.k)
        return cpu_kernels.int8_linear(x, q, parts["scale"], self.bias)


class Int8Embedding(QEmbedding):
    """An embedding table stored int8 (the layout a tied int8 ``lm_head`` shares): ``Int8.embedding``
    gathers the rows asked for."""


for _float in (nn.Linear, Conv1D):
    register_module(Int8, _float, "cpu", Int8Linear)
    register_module(Int8, _float, "cpu-stream", Int8StreamLinear)
    register_module(Int8, _float, "cuda", "codecllm.schemes.int8.cuda:Int8CudaLinear")
    register_module(Int8, _float, "cuda-stream", "codecllm.schemes.int8.cuda:Int8CudaStreamLinear")
register_module(Int8, nn.Embedding, "cpu", Int8Embedding)
register_module(Int8, nn.Embedding, "cuda", Int8Embedding)
