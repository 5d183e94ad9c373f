"""What every stand-in module shares, whatever its scheme and backend.

A stand-in keeps a weight as its scheme's encoded parts (buffers) and exposes what transformers code reads
of a float module: ``weight`` (a ``QuantizedWeight``: the original shape, the compute dtype, the module's
device, dequantized on demand by any torch operation, never in the hot path), ``bias``, ``in_features`` /
``out_features`` or ``num_embeddings`` / ``embedding_dim``. ``state_dict()`` holds dense weights under the
original names, so ``save_pretrained`` writes a checkpoint that transformers reloads as it is (full size).

Stream mode keeps weights compressed: a ``CpuStreamed`` stand-in decodes its weight on each call, into
buffers of the model's ``CpuPipeline``, which decodes the next layers on a thread of its own while the
model computes; ``codecllm.gpu.stream`` does the same on CUDA.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from . import codecs
from .codecs import checked_chunk_decoder, chunk_bounds, decode_cpu, get_codec
from .errors import DecodeError, DeviceError
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
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):  # (the caller's current device may be another GPU)
                return self.module.dequantized()
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
    _stage = None  # set for a module offloaded to the CPU: puts its parts in place before they are read

    @classmethod
    def held_bytes(cls, rec, dtype: torch.dtype) -> int:
        return sum(p.nbytes for p in rec.parts.values())

    @classmethod
    def shared_bytes(cls, held: list, dtype: torch.dtype) -> int:
        """``held``: (stand-in class, record) of each weight that shares them."""
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
        if self._stage is not None:
            self._stage()
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



class CpuPipeline:
    """Decodes a model's CPU stream layers ahead of their use, on a thread of its own.

    The first forward of the model (``begin`` and ``end`` bracket it: ``attach``) decodes each layer when
    it is called and learns their order (kept if that forward returns). Each later forward runs a
    decoder thread that decodes the layers in that order into up to ``SLOTS`` buffers while the model
    computes with the layers decoded before; past the last layer it goes on with the first layers of the
    next forward (kept for it), while the model computes its head. So that the decoder has a core, the
    forward's torch threads are one fewer than the cores (restored after it). A layer called out of the
    learned order (another code path) stops the decoder: the rest of that forward decodes each layer when
    called, and learns the order again. Calls from another thread, from a forward nested in the running
    one, or with no forward begun (a layer called alone) decode on their own. On one core there is no
    decoder thread, and one buffer. A decode error in the thread is raised in the forward that needs
    the layer.

    Measured on SmolLM2 int8 as 4-bit planes (2-core CPU, 2 torch threads), one decode step: 125 ms
    decoding each layer when called (the file's codes; 85 ms as planes); with the decoder thread, 71 ms
    with 4 buffers (it runs ahead while the model computes attention), 58-62 ms with the codec's
    checked-chunk decoder and going on into the next forward; resident mode 26 ms. A second decoder
    thread, or the forward decoding parts of a layer it waits for, made it slower (more threads than
    cores; Python's cost per piece).
    """

    SLOTS = 4

    def __init__(self, layers: list):
        self.nbytes = max(layer.decoded_nbytes for layer in layers)
        self.free = [np.empty(self.nbytes, dtype=np.uint8) for _ in range(self.slots())]
        self.own = {id(b) for b in self.free}  # (a call outside the pipeline may decode into a buffer of its own)
        self.cv = threading.Condition()
        self.order: list | None = None  # the layers in the order a forward calls them, once learned
        self.owner: int | None = None  # the thread whose forward is under way
        self.depth = 0  # forwards of the model nested in the owner's
        self.seen: list | None = None  # the calls of a forward whose order is being learned
        self.decoder: threading.Thread | None = None
        self.threads = 0  # torch's thread count before ``begin`` lowered it (0: untouched)
        self.ready: dict[int, np.ndarray] = {}  # position in ``order`` -> its decoded buffer
        self.pos = self.next = 0  # the positions the forward and the decoder take next
        self.stop, self.error = False, None

    @staticmethod
    def cores() -> int:
        return codecs.cores()

    @classmethod
    def slots(cls) -> int:
        """The buffers a pipeline holds here: ``SLOTS``, one where there is no core for a decoder."""
        return cls.SLOTS if cls.cores() >= 2 else 1

    def begin(self) -> str | None:
        """Before a forward of the model: "own" where this call runs the pipeline (``end`` must follow,
        whatever happens), "nested" within this thread's forward, None while another thread's runs (its
        layers then decode as they are called)."""
        with self.cv:
            if self.owner == threading.get_ident():
                self.depth += 1
                return "nested"
            if self.owner is not None:
                return None
            self.owner, self.depth = threading.get_ident(), 0
            self.pos, self.stop, self.error = 0, False, None
            cores = self.cores()
            if self.order is None or cores < 2:
                self.seen = [] if self.order is None else None
                return "own"
            self.seen = None
            if sorted(self.ready) != list(range(len(self.ready))):  # (never expected: start afresh)
                self.free.extend(self.ready.values())
                self.ready = {}
            self.next = len(self.ready)  # (the first layers, decoded during the last forward's head)
            self.decoder = threading.Thread(target=self._decode_ahead, args=(self.order,), name="codecllm-decoder", daemon=True)
        try:
            threads = torch.get_num_threads()
            if threads >= cores:
                self.threads = threads
                torch.set_num_threads(max(1, cores - 1))
            self.decoder.start()
        except BaseException:
            self.end("own", completed=False)
            raise
        return "own"

    def end(self, token: str | None, completed: bool) -> None:
        """After the forward ``begin`` gave ``token`` for; ``completed``: it returned (an order being
        learned is kept only then)."""
        if token == "nested":
            with self.cv:
                self.depth -= 1
            return
        if token != "own":
            return
        done = completed and self.decoder is not None and self.seen is None and self.error is None and self.pos == len(self.order)
        try:
            self._halt(keep=done)
        finally:  # (an interrupt while halting must not leave the forward open)
            if self.threads:
                torch.set_num_threads(self.threads)
                self.threads = 0
            with self.cv:
                if self.seen and completed:
                    self.order = self.seen
                self.seen, self.owner = None, None

    def _halt(self, keep: bool = False) -> None:
        """Stop the decoder thread; with ``keep``, what it decoded of the next forward stays ready for it."""
        with self.cv:
            self.stop = True
            self.cv.notify_all()
        try:
            if self.decoder is not None:
                self.decoder.join()
        finally:
            if self.decoder is not None and self.decoder.is_alive():  # interrupted: it stops after its layer
                self.decoder.join()
            self.decoder = None
            with self.cv:
                n = len(self.order) if self.order else 0
                kept = {p - n: b for p, b in self.ready.items() if keep and p >= n}
                self.free.extend(b for p, b in self.ready.items() if not (keep and p >= n))
                self.ready = kept

    def _decode_ahead(self, order: list) -> None:
        n = len(order)
        while True:
            with self.cv:
                while not self.stop and (not self.free or self.next >= min(self.pos + self.SLOTS, 2 * n)):
                    self.cv.wait()
                if self.stop:
                    return
                pos, buf = self.next, self.free.pop()
                self.next += 1
            layer = order[pos % n]
            try:
                layer.decode_into(buf[:layer.decoded_nbytes])
            except BaseException as e:  # raised in the forward that needs this layer
                with self.cv:
                    self.free.append(buf)
                    self.error = e
                    self.stop = True
                    self.cv.notify_all()
                return
            with self.cv:
                self.ready[pos] = buf
                self.cv.notify_all()

    def _take(self, layer) -> np.ndarray | None:
        """The buffer of ``layer`` decoded in the learned order, or None where ``layer`` is not the one
        the order expects."""
        with self.cv:
            pos = self.pos
            if pos >= len(self.order) or self.order[pos] is not layer:
                return None
            while pos not in self.ready:
                if self.error is not None:
                    raise self.error
                self.cv.wait()
            self.pos += 1
            return self.ready.pop(pos)

    @contextmanager
    def decoded(self, layer):
        """``layer``'s decoded bytes, for the duration of the ``with`` block."""
        buf = None
        mine = self.owner == threading.get_ident() and not self.depth  # (not in a nested forward)
        if mine and self.decoder is not None:
            buf = self._take(layer)
            if buf is None:  # out of order: the rest of this forward decodes as it goes, and learns again
                self._halt()
                self.seen = self.order[:self.pos]
        if buf is None:
            with self.cv:
                buf = self.free.pop() if self.free else np.empty(self.nbytes, dtype=np.uint8)
            try:
                layer.decode_into(buf[:layer.decoded_nbytes])
            except BaseException:
                self._give(buf)
                raise
            if mine and self.seen is not None:
                self.seen.append(layer)
        try:
            yield buf[:layer.decoded_nbytes]
        finally:
            self._give(buf)

    def _give(self, buf: np.ndarray) -> None:
        if id(buf) in self.own:
            with self.cv:
                self.free.append(buf)
                self.cv.notify_all()

    def attach(self, model: nn.Module) -> None:
        """Bracket ``model``'s forwards with ``begin`` and ``end`` (outside compiled graphs): a wrapper of
        this model's ``forward``, as the end must run whatever ends the forward (a forward hook with
        ``always_call`` misses ``KeyboardInterrupt``)."""
        forward, begin, end = model.forward, eager_only(self.begin), eager_only(self.end)

        @functools.wraps(forward)
        def bracketed(*args, **kwargs):
            token, completed = None, False
            try:
                token = begin()
                out = forward(*args, **kwargs)
                completed = True
                return out
            finally:
                end(token, completed)

        model.forward = bracketed


def payload_bytes(rec) -> int:
    """What a stand-in keeping ``rec``'s main part compressed holds: the stored main part and the other
    parts decoded."""
    main = rec.main
    return (sum(main.chunks) if main.chunks else main.nbytes) + sum(p.nbytes for p in rec.parts.values() if p is not main)


class CpuStreamed:
    """Mixin for a Linear stand-in whose weight stays compressed in CPU memory (``set_payload``: a codec's
    chunks) and is decoded on each call (``decoded_nbytes`` bytes) into a buffer of the model's
    ``CpuPipeline``; ``stream_parts`` makes from it the parts its ``linear``
    computes with, ``scheme_parts`` the scheme's parts (for ``dequantized``, in a new buffer each time)."""

    compiles = False
    pipeline: CpuPipeline | None = None  # set by the loader's CPU backend once the model is loaded
    FRAME = 1 << 20  # ``keep_compressed``'s zstd frames (1 MiB: one per layer up to 2M weights; 128 KiB decoded 25% slower)
    decoded_nbytes = 0

    @classmethod
    def decoded_bytes(cls, rec) -> int:
        """The bytes a call decodes (``decoded_nbytes``), from the record."""
        return rec.main.nbytes

    @classmethod
    def shared_bytes(cls, held, dtype):
        return CpuPipeline.slots() * max(c.decoded_bytes(r) for c, r in held)  # the pipeline's buffers

    def set_payload(self, codec: str, payload: torch.Tensor, chunk_sizes: list[int], chunk_size: int | None, nbytes: int) -> np.ndarray:
        """Keep ``payload`` (``codec``'s chunks of ``chunk_size`` bytes, ``chunk_sizes`` stored bytes each;
        one unchunked piece where ``chunk_sizes`` is empty), and decode it once with every check: returns
        the decoded bytes."""
        self.register_buffer("payload", payload, persistent=False)
        self.codec, self.chunk_sizes, self.chunk_size, self.decoded_nbytes = codec, list(chunk_sizes), chunk_size or 0, nbytes
        self.checked = False
        first = np.empty(nbytes, dtype=np.uint8)
        self.decode_into(first)  # a bad payload fails the load
        self.checked = True  # from now on chunks decode straight into the buffer, with the least work around them
        fn, mv = checked_chunk_decoder(codec), memoryview(payload.numpy())
        if fn is not None and chunk_sizes:
            ends = np.cumsum(chunk_sizes).tolist()
            self._chunks = (fn, [(mv[e - c:e], lo, hi) for c, e, (lo, hi) in zip(chunk_sizes, ends, chunk_bounds(nbytes, chunk_size))])
        return first

    def keep_compressed(self, data: torch.Tensor, what: str) -> None:
        """Keep uint8 ``data`` (a form this stand-in built at load) zstd-coded in ``FRAME``-byte frames,
        checked to decode to itself."""
        frames = get_codec("zstd").encode(memoryview(data.numpy()), self.FRAME, level=3)
        payload = torch.frombuffer(bytearray(b"".join(frames)), dtype=torch.uint8)
        if not np.array_equal(self.set_payload("zstd", payload, [len(f) for f in frames], self.FRAME, data.numel()), data.numpy()):
            raise DecodeError(f"{what} did not decode to itself")

    def decode_into(self, out: np.ndarray) -> None:
        chunks = self.__dict__.get("_chunks")
        if chunks is None:
            decode_cpu(self.codec, self.payload.numpy(), self.chunk_sizes, self.chunk_size, self.decoded_nbytes, out=out, checked=self.checked)
            return
        fn, chunks = chunks
        dst = memoryview(out)
        for i, (frame, lo, hi) in enumerate(chunks):
            fn(frame, dst[lo:hi], i)

    def stream_parts(self, buf: np.ndarray) -> dict[str, torch.Tensor]:
        return self.scheme_parts(buf)

    def scheme_parts(self, buf: np.ndarray) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @eager_only
    def forward(self, x):
        w = self._parameters["weight"]
        if type(w) is not QuantizedWeight:
            return super().forward(x)
        owner = w.module
        if owner.pipeline is None:  # not loaded by codecllm.load (a layer made by hand)
            return self.linear(x, owner.stream_parts(owner._fresh()))
        with owner.pipeline.decoded(owner) as buf:
            if x.requires_grad and torch.is_grad_enabled():  # autograd may keep the weight for the backward
                buf = buf.copy()  # pass, which a pipeline buffer would not stay
            return self.linear(x, owner.stream_parts(buf))

    def _fresh(self) -> np.ndarray:
        buf = np.empty(self.decoded_nbytes, dtype=np.uint8)
        self.decode_into(buf)
        return buf

    def parts(self) -> dict[str, torch.Tensor]:
        return self.scheme_parts(self._fresh())


class CpuStream(CpuStreamed):
    """A stream stand-in that keeps the file's payload of its scheme's main part (``set_stream``); its
    other parts (built with the stand-in) are resident."""

    relative_speed = 0.2  # SmolLM2 int8 on the 2-core CPU before the pipeline (stream 114 ms per token, resident 22 ms);
    # SmolLM2's layers now take Int8PlanesStreamLinear / Int4PackedStreamLinear, and this kind was not measured again

    @classmethod
    def held_bytes(cls, rec, dtype):
        return payload_bytes(rec)

    def set_stream(self, main: str, payload: torch.Tensor, part) -> None:
        self.main_part = main
        self.stream_part = part  # codec id, chunk table, dtype, shape of the main part
        self.set_payload(part.codec, payload, part.chunks or [], part.chunk_size, part.nbytes)

    def scheme_parts(self, buf: np.ndarray) -> dict[str, torch.Tensor]:
        p = self.stream_part
        parts = {n: self._buffers[n] for n in self.part_names}
        parts[self.main_part] = torch.from_numpy(buf).view(torch_dtype(p.dtype)).reshape(p.shape)
        return parts


def dense_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """A state-dict hook for a module that keeps its own class but holds a stand-in's weight (an
    Embedding subclass): its entries are dense, as a stand-in's own are."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and type(value) is QuantizedWeight:
            state_dict[key] = value.dequantize()
