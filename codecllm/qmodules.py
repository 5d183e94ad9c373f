"""What every stand-in module shares, whatever its scheme and backend.

A stand-in keeps a weight as its scheme's encoded parts (buffers) and exposes what transformers code reads
of a float module: ``weight`` (a ``QuantizedWeight``: the original shape, the compute dtype, the module's
device, dequantized on demand by any torch operation, never in the hot path), ``bias``, ``in_features`` /
``out_features`` or ``num_embeddings`` / ``embedding_dim``. ``state_dict()`` holds dense weights under the
original names, so ``save_pretrained`` writes a checkpoint that transformers reloads as it is (full size).

Stream mode keeps the scheme's main part compressed: ``CpuStream`` decodes it on each call into a
workspace shared by the model's stream layers; ``codecllm.gpu.stream`` does the same on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from .codecs import decode_cpu
from .errors import DeviceError
from .dtypes import torch_dtype


class QuantizedWeight(torch.Tensor):
    """A module's weight as model code sees it: no data of its own; any operation on it works on the
    dequantized weight (optimum-quanto's idea). ``weight.dtype`` is what the module computes in."""

    @staticmethod
    def __new__(cls, module: "QModule"):
        return torch.Tensor._make_wrapper_subclass(cls, module.weight_shape, dtype=module.compute_dtype, device=module.device,
                                                   requires_grad=False)

    def __init__(self, module: "QModule"):
        self.module = module

    def dequantize(self) -> torch.Tensor:
        return self.module.dequantized()

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"QuantizedWeight({self.module.scheme!r}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return QuantizedWeight(args[0].module)
        if func is torch.ops.aten.embedding.default and type(args[0]) is QuantizedWeight:  # rows only, not the table
            owner = args[0].module
            return owner.scheme.embedding(owner.parts(), args[1], owner.compute_dtype)
        args, kwargs = pytree.tree_map_only(QuantizedWeight, lambda t: t.dequantize(), (args, kwargs or {}))
        return func(*args, **kwargs)


class QModule(nn.Module):
    """Base of every stand-in: the scheme, the encoded parts as buffers, the compute dtype. A stand-in is
    also an instance of the float class it replaces (``isinstance(m, nn.Linear)`` holds, as in
    optimum-quanto), though that class's ``__init__`` never runs: no float weight is ever allocated.

    What a stand-in class would hold for a record, before any is built (``codecllm.loader.footprint``):
    ``held_bytes`` per weight, ``shared_bytes`` once per model for the weights of every class that
    inherits it from this one (workspaces), and ``relative_speed``, the decode-step speed of its weights
    against the same weights resident, as measured (an estimate for the loader's choice of mode).
    ``compiles``: whether ``torch.compile`` traces its forward (stream layers that decode through
    ctypes run between graphs)."""

    relative_speed: float = 1.0
    compiles: bool = True

    @classmethod
    def held_bytes(cls, rec, dtype: torch.dtype) -> int:
        return sum(p.nbytes for p in rec.parts.values())

    @classmethod
    def shared_bytes(cls, recs: list, dtype: torch.dtype) -> int:
        return 0

    @classmethod
    def finish_load(cls, layers: list) -> None:
        """Called once a model is loaded, with its stand-ins of every class that inherits this method from
        this class (to share workspaces)."""

    def __init__(self, scheme, parts: dict[str, torch.Tensor], weight_shape: tuple[int, ...], compute_dtype: torch.dtype,
                 device: torch.device):
        nn.Module.__init__(self)
        self.scheme = scheme
        self.weight_shape = tuple(weight_shape)
        self.compute_dtype = compute_dtype
        self.part_names = tuple(parts)
        for name, t in parts.items():
            self.register_buffer(name, t, persistent=False)
        self._device = torch.device(device)
        self.weight = nn.Parameter(QuantizedWeight(self), requires_grad=False)

    @property
    def device(self) -> torch.device:
        return self._device

    def parts(self) -> dict[str, torch.Tensor]:
        """The encoded parts, ready to compute with."""
        return {n: self._buffers[n] for n in self.part_names}

    def dequantized(self) -> torch.Tensor:
        """The weight in the compute dtype, as a new dense tensor."""
        return self.scheme.dequantize(self.parts(), self.compute_dtype)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``...: the compute dtype follows; the encoded parts stay as they are.
        Moving to another device is refused: the parts were decoded for this one."""
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.device))
        if probe.device != self.device:
            raise DeviceError(f"a loaded codecllm model cannot move from {self.device} to {probe.device}: "
                              f"load it with codecllm.load(..., device={str(probe.device)!r})")
        bias = self._parameters.get("bias")
        if bias is not None:
            new = fn(bias)
            if new is not bias:
                self._parameters["bias"] = nn.Parameter(new, requires_grad=bias.requires_grad)
        if probe.is_floating_point() and probe.dtype != self.compute_dtype:
            self.compute_dtype = probe.dtype
            w = self._parameters.get("weight")
            if type(w) is QuantizedWeight:  # a tied peer's weight is its owner's: owner and peers follow
                owner = w.module
                owner.compute_dtype = probe.dtype
                if owner._parameters["weight"].dtype != probe.dtype:
                    owner._parameters["weight"] = nn.Parameter(QuantizedWeight(owner), requires_grad=False)
                self._parameters["weight"] = owner._parameters["weight"]
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self._parameters.get("weight")
        if type(w) is QuantizedWeight:
            destination[prefix + "weight"] = w.dequantize()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if type(self._parameters.get("weight")) is QuantizedWeight and prefix + "weight" in state_dict:
            error_msgs.append(f"{prefix}weight: a codecllm module keeps its weight quantized and cannot load a float one "
                              "(convert the checkpoint again instead)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")


class QLinear(QModule, nn.Linear):
    """Stands in for ``nn.Linear`` (and for transformers' ``Conv1D``, whose weight is stored transposed:
    its scheme encodes it as ``[out, in]`` like a Linear's). ``linear`` computes from the encoded parts."""

    def __init__(self, scheme, parts, weight_shape, compute_dtype, device, out_features: int, in_features: int,
                 bias: torch.Tensor | None):
        super().__init__(scheme, parts, weight_shape, compute_dtype, device)
        self.out_features, self.in_features = out_features, in_features
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    transposed = False  # the original weight is [in, out] (Conv1D)

    @classmethod
    def from_float(cls, module: nn.Module, scheme, parts, compute_dtype, device) -> "QLinear":
        if isinstance(module, nn.Linear):
            out_f, in_f = module.out_features, module.in_features
        else:  # Conv1D: weight [in, out]
            in_f, out_f = module.weight.shape
        new = cls(scheme, parts, tuple(module.weight.shape), compute_dtype, device, out_f, in_f, module.bias)
        new.transposed = not isinstance(module, nn.Linear)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._parameters["weight"]
        if type(w) is not QuantizedWeight:  # a float weight assigned after load: plain Linear semantics
            return F.linear(x, w.t() if self.transposed else w, self.bias)
        return self.linear(x, w.module.parts())

    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight dequantized for this call (one layer's float copy at a time, never the model's);
        a stand-in with a kernel for its codes overrides this."""
        w = self.scheme.dequantize(parts, x.dtype)
        return F.linear(x, w.t() if self.transposed else w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self.scheme!r}"


class QEmbedding(QModule, nn.Embedding):
    """Stands in for ``nn.Embedding``; ``embedding`` gathers rows from the encoded parts."""

    def __init__(self, scheme, parts, weight_shape, compute_dtype, device, padding_idx: int | None):
        super().__init__(scheme, parts, weight_shape, compute_dtype, device)
        self.num_embeddings, self.embedding_dim = weight_shape
        self.padding_idx = padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False

    @classmethod
    def from_float(cls, module: nn.Embedding, scheme, parts, compute_dtype, device) -> "QEmbedding":
        return cls(scheme, parts, tuple(module.weight.shape), compute_dtype, device, module.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self._parameters["weight"]
        if type(w) is not QuantizedWeight:
            return F.embedding(ids, w, self.padding_idx)
        return self.embedding(ids, w.module.parts())

    def embedding(self, ids: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The rows ``ids``, as the scheme gathers them (``Scheme.embedding``)."""
        return self.scheme.embedding(parts, ids, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.scheme!r}"


# --- stream mode ---------------------------------------------------------------------------------------

STREAM_EAGER = ("codecllm stream mode decodes each weight as the model reaches it, outside compiled graphs; "
                "load with mode='resident' to compile whole graphs")


def eager_only(fn):
    """``fn`` runs as it is under ``torch.compile`` (a graph break around it, never traced): stream layers
    decode through ctypes and numpy, and order work between streams with events."""
    try:
        return torch.compiler.disable(fn, reason=STREAM_EAGER)
    except TypeError:  # torch before 2.8 takes no reason
        return torch.compiler.disable(fn)



class CpuWorkspace:
    """One decode buffer for all stream layers of a model: a forward runs one layer at a time, so
    memory holds the largest decoded weight once, not every weight."""

    def __init__(self):
        self.buf = np.empty(0, dtype=np.uint8)

    def take(self, nbytes: int) -> np.ndarray:
        if self.buf.size < nbytes:
            self.buf = np.empty(nbytes, dtype=np.uint8)
        return self.buf[:nbytes]


def payload_bytes(rec) -> int:
    """What a stand-in keeping ``rec``'s main part compressed holds: the stored main part and the other
    parts decoded."""
    main = rec.main
    return (sum(main.chunks) if main.chunks else main.nbytes) + sum(p.nbytes for p in rec.parts.values() if p is not main)


class CpuStream:
    """Mixin for a stand-in whose main part stays compressed (the file's own payload) and is decoded on
    each call into the model's shared ``CpuWorkspace``; its other parts (built with the stand-in) are
    resident."""

    relative_speed = 0.2  # SmolLM2 int8 on the 2-core CPU: stream 114 ms per token, resident 22 ms
    compiles = False

    @classmethod
    def held_bytes(cls, rec, dtype):
        return payload_bytes(rec)

    @classmethod
    def shared_bytes(cls, recs, dtype):
        return max(r.main.nbytes for r in recs)  # the workspace

    @eager_only
    def forward(self, *args):
        return super().forward(*args)

    def set_stream(self, main: str, payload: torch.Tensor, part, workspace: CpuWorkspace) -> None:
        self.main_part = main
        self.register_buffer("payload", payload, persistent=False)
        self.stream_part = part  # codec id, chunk table, dtype, shape of the main part
        self.workspace = workspace
        self.checked = False
        self._decode(workspace.take(part.nbytes))  # once with every check: a bad payload fails the load
        self.checked = True  # from now on frames decode straight into the workspace

    def _decode(self, out: np.ndarray) -> torch.Tensor:
        p = self.stream_part
        decode_cpu(p.codec, self.payload.numpy(), p.chunks, p.chunk_size or 0, p.nbytes, out=out, checked=self.checked)
        return torch.from_numpy(out).view(torch_dtype(p.dtype)).reshape(p.shape)

    def parts(self) -> dict[str, torch.Tensor]:
        parts = {n: self._buffers[n] for n in self.part_names}
        parts[self.main_part] = self._decode(self.workspace.take(self.stream_part.nbytes))
        return parts

    def dequantized(self) -> torch.Tensor:
        parts = {n: self._buffers[n] for n in self.part_names}
        parts[self.main_part] = self._decode(np.empty(self.stream_part.nbytes, dtype=np.uint8))
        return self.scheme.dequantize(parts, self.compute_dtype)


def dense_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """A state-dict hook for a module that keeps its own class but holds a stand-in's weight (an
    Embedding subclass): its entries are dense, as a stand-in's own are."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and type(value) is QuantizedWeight:
            state_dict[key] = value.dequantize()
