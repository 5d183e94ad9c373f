"""A model spread over several devices: ``codecllm.load(path, device_map=..., max_memory=...)``.

**Placement.** ``device_map`` is ``"auto"``/``"balanced"``/``"balanced_low_0"``/``"sequential"`` (as in
transformers) or an explicit ``{module prefix: device}``. A named policy is computed with accelerate's
own ``infer_auto_device_map`` (and ``get_balanced_memory``), not over the float sizes of the model but over
what each tensor will hold on a GPU in the chosen mode: the model is sized for accelerate with a meta
``uint8`` tensor of that many bytes in place of each stored tensor. ``max_memory`` defaults to 90% of each
GPU's free memory (the rest for the KV cache and activations) and the CPU's available memory; the
workspaces of stream layers and the kernels' scratch are taken off every GPU's share first.

**Running.** Each GPU decodes its own modules with its own backend (nvCOMP state, arenas, streams,
workspaces): no weight crosses between devices after load. Every module of the map runs with its device
current and its inputs moved there (``accelerate.utils.send_to_device``); the model's outputs go back
to the device of its inputs. accelerate's ``AlignDevicesHook`` is not used: it moves float parameters
between devices, which a stand-in's encoded tensors do not allow.

**"cpu" in the map** means offload, as in accelerate: the module's weights stay in (pinned) CPU memory in
the form they take on the GPU (quantized codes, scales; a lossless weight decoded) and are computed on the
first GPU of the map. Each offloaded module is built on that GPU as any other, then its tensors are moved
to one pinned host buffer and become views of one *staging* buffer on the GPU, at the same relative
offsets (so siblings that lay back to back still fuse); before each forward of the module, its host
buffer is copied into the staging buffer. The GPU holds one staging buffer, as large as the largest
offloaded module. The results are those of the same modules loaded on the GPU, bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CodecLLMError, DeviceMapError, FormatError
from .gpu.stream import ALIGN, aligned
from .loader import _parent

POLICIES = ("auto", "balanced", "balanced_low_0", "sequential")
GPU_SHARE = 0.90  # default max_memory: this share of each GPU's free memory (the rest for the KV cache, activations)


def _accelerate():
    try:
        import accelerate.utils as acc
    except ImportError:
        raise CodecLLMError("device_map needs accelerate (pip install accelerate)") from None
    return acc


def _device_name(value) -> str:
    """One device of a map as "cuda:N" or "cpu"."""
    if isinstance(value, bool):
        raise DeviceMapError(f"device_map value {value!r} is not a device")
    if isinstance(value, int):
        return f"cuda:{value}"
    if isinstance(value, (str, torch.device)):
        text = str(value)
        if text in ("disk", "meta"):
            raise DeviceMapError(f"device_map value {text!r} is not supported: codecllm maps modules to CUDA devices and 'cpu' (offload)")
        try:
            dev = torch.device(text)
        except (RuntimeError, TypeError):
            raise DeviceMapError(f"device_map value {text!r} is not a device") from None
        if dev.type == "cpu":
            return "cpu"
        if dev.type == "cuda":
            return f"cuda:{dev.index if dev.index is not None else 0}"
        raise DeviceMapError(f"device_map value {text!r}: only CUDA devices and 'cpu' are supported")
    raise DeviceMapError(f"device_map value {value!r} is not a device")


def normalize(device_map) -> str | dict[str, str]:
    """A policy name, or ``{module prefix: "cuda:N" | "cpu"}``; a single device is ``{"": device}``."""
    if isinstance(device_map, str) and device_map in POLICIES:
        return device_map
    if isinstance(device_map, dict):
        if not device_map:
            raise DeviceMapError("device_map is empty")
        out = {}
        for prefix, value in device_map.items():
            if not isinstance(prefix, str):
                raise DeviceMapError(f"device_map key {prefix!r} is not a module name")
            out[prefix] = _device_name(value)
        return out
    return {"": _device_name(device_map)}


def entry_of(device_map: dict[str, str], name: str) -> str | None:
    """The key of the map that places tensor or module ``name``: its longest prefix (whole dotted
    components)."""
    best = None
    for prefix in device_map:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return best


def gpu_index(name: str) -> int:
    """N of a device name "cuda:N"."""
    return int(name.split(":")[1])


def gpus_of(names) -> list[str]:
    """The GPUs among device names ("cuda:N" or "cpu"), each once, by index."""
    return sorted({d for d in names if d != "cpu"}, key=gpu_index)


def _memory_key(key):
    if isinstance(key, int) or key in ("cpu", "disk"):
        return key
    name = _device_name(key)
    return "cpu" if name == "cpu" else gpu_index(name)


def max_memory_of(max_memory: dict | None) -> dict:
    """``max_memory`` with integer GPU keys and sizes in bytes (accelerate's forms: ``{0: "20GiB", "cpu": ...}``);
    by default 90% of each GPU's free memory and the CPU's available memory."""
    acc = _accelerate()
    if max_memory is None:
        out = {}
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                out[i] = int(torch.cuda.mem_get_info(i)[0] * GPU_SHARE)
        import psutil

        out["cpu"] = psutil.virtual_memory().available
        return out
    try:
        return acc.get_max_memory({_memory_key(k): v for k, v in max_memory.items()})
    except (ValueError, TypeError) as e:
        raise DeviceMapError(f"max_memory {max_memory!r}: {e}") from None


@dataclass
class Placement:
    """Where each module goes: ``map`` (module prefix -> "cuda:N" or "cpu"), the GPU that computes
    offloaded modules (``main``), and the bytes each device is predicted to hold (``predicted``: weights
    in the chosen mode, stream workspaces, the staging buffer of offloaded modules)."""

    map: dict[str, str]
    main: str | None
    mode: str = "resident"
    predicted: dict[str, int] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)  # stored tensor -> its device
    streamed: set[str] = field(default_factory=set)  # stored tensors kept compressed (stream mode)
    staging: int = 0  # bytes of the main GPU's staging buffer for offloaded modules
    units: list = field(default_factory=list)  # offloaded (map keys, stored tensors), each staged as one
    footprint: dict = field(default_factory=dict)  # what each mode would hold on a GPU (the loader's estimate)

    def device_of(self, name: str) -> str:
        entry = entry_of(self.map, name)
        if entry is None:
            raise DeviceMapError(f"device_map puts {name!r} nowhere (add it, or a prefix of it, or '')")
        return self.map[entry]

    def execution(self, name: str) -> str:
        """Where ``name`` computes: its device, or for an offloaded module the main GPU."""
        dev = self.device_of(name)
        return self.main if dev == "cpu" and self.main else dev

    @property
    def gpus(self) -> list[str]:
        return gpus_of(self.map.values())


def infer(model: nn.Module, held: dict[str, int], policy: str, max_memory: dict, reserve: int) -> dict[str, str]:
    """accelerate's placement of ``model`` (on the meta device) for ``policy``, over ``held``: bytes per
    tensor name (the stored tensors; others count at their own size). ``reserve`` bytes are kept free on
    every GPU (workspaces)."""
    acc = _accelerate()
    memory = {k: (max(0, int(v) - reserve) if isinstance(k, int) else int(v)) for k, v in max_memory.items()}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    with _sized(model, held):
        if policy == "sequential":
            limits = memory
        else:
            limits = acc.get_balanced_memory(model, max_memory=dict(memory), no_split_module_classes=no_split, low_zero=policy == "balanced_low_0")
        mapped = acc.infer_auto_device_map(model, max_memory=limits, no_split_module_classes=no_split)
    if "disk" in mapped.values() or not mapped:
        total = sum(held.values())
        room = sum(v for k, v in memory.items() if k != "disk")
        raise DeviceMapError(f"the model does not fit: it holds {_size(total)} in this mode, max_memory allows {_size(room)} on the GPUs "
                             f"and the CPU together{'' if 'cpu' in memory else ' (no CPU share given)'}; disk offload is not supported")
    return {p: _device_name(d) for p, d in mapped.items()}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


class _sized:
    """Within the block, each tensor named in ``held`` is a meta ``uint8`` tensor of that many bytes
    (tied names keep one object), so that accelerate's sizes are what the tensors will hold."""

    def __init__(self, model: nn.Module, held: dict[str, int]):
        self.model, self.held, self.saved = model, held, []

    def __enter__(self):
        made: dict[int, torch.Tensor] = {}
        for name, nbytes in self.held.items():
            module, attr = _parent(self.model, name)
            table = module._parameters if attr in module._parameters else module._buffers
            old = table[attr]
            new = made.get(id(old))
            if new is None:
                data = torch.empty(max(int(nbytes), 0), dtype=torch.uint8, device="meta")
                new = made[id(old)] = nn.Parameter(data, requires_grad=False) if isinstance(old, nn.Parameter) else data
            self.saved.append((table, attr, old))
            table[attr] = new
        return self

    def __exit__(self, *exc):
        for table, attr, old in reversed(self.saved):
            table[attr] = old


def flatten(model: nn.Module, device_map: dict[str, str]) -> dict[str, str]:
    """The map as a partition of the model into modules that run: a key naming a tensor becomes its
    module; a container (``nn.ModuleList``, ``nn.ModuleDict``: the model calls their children, never them)
    and a module with other keys inside it become their children (each keeping the device of its
    closest key), so that no key holds another and every key's module has a forward that runs."""
    mods = {}
    for prefix, dev in device_map.items():
        name = prefix
        try:
            model.get_submodule(name) if name else model
        except AttributeError:
            try:
                _parent(model, name)
            except FormatError:
                raise DeviceMapError(f"device_map key {prefix!r} names no module or tensor of {type(model).__name__}") from None
            name = name.rpartition(".")[0]
        if mods.get(name, dev) != dev:
            raise DeviceMapError(f"device_map puts parts of {name or 'the model'!r} on {mods[name]} and {dev}: map whole modules")
        mods[name] = dev
    out = {}
    stack = sorted(mods)
    while stack:
        name = stack.pop(0)
        module = model.get_submodule(name) if name else model
        inner = [k for k in mods if k != name and (name == "" or k.startswith(name + "."))]
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or inner:
            if inner and (module._parameters or module._buffers):
                raise DeviceMapError(f"device_map maps modules inside {name or 'the model'!r}, which holds tensors of its own: "
                                     "map it whole, or map each of its children")
            for child, _ in module.named_children():
                full = f"{name}.{child}" if name else child
                if full not in mods:
                    mods[full] = mods[name]
                    stack.append(full)
            continue
        out[name] = mods[name]
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return {k: out[k] for k in sorted(out, key=position.__getitem__)}


# -- running --


def wrap(module: nn.Module, device: str, before=None, outputs_back: bool = False) -> None:
    """Run ``module`` with its inputs on ``device`` and that device current (``before()`` first, with the
    device current); with ``outputs_back``, its outputs go back to the device of its first input tensor."""
    acc = _accelerate()
    dev = torch.device(device)
    forward = module.forward

    @functools.wraps(forward)
    def on_device(*args, **kwargs):
        origin = acc.find_device((args, kwargs)) if outputs_back else None
        with torch.cuda.device(dev):
            if before is not None:
                before()
            args = acc.send_to_device(args, dev)
            kwargs = acc.send_to_device(kwargs, dev, skip_keys="past_key_values")
            out = forward(*args, **kwargs)
        if origin is not None and origin != dev:
            out = acc.send_to_device(out, origin, skip_keys="past_key_values")
        return out

    module.forward = on_device


class Offload:
    """The offloaded modules that compute on one GPU, and the staging buffer they share there. A *unit*
    is one module of the map, or several that share a stored tensor (a tied embedding and head): one host
    buffer, staged as one."""

    def __init__(self, device: torch.device):
        self.device = device
        self.units: list[tuple[list[nn.Module], torch.Tensor, list]] = []  # (modules, pinned host bytes, tensor slots)
        self.staging: torch.Tensor | None = None
        self.current = -1  # the unit whose bytes the staging buffer holds (in stream order)
        self.flush = None  # called before the staging buffer is overwritten (sibling fusion's learner)

    def take(self, modules: list[nn.Module]) -> int:
        """Move the tensors of ``modules`` (built on this GPU) into one pinned host buffer, each storage's
        tensors at the same offsets from one another (so that siblings laid back to back stay so); they
        become views of the staging buffer in ``bind``. Returns the host buffer's size."""
        slots, spans, order = [], {}, []
        for module in modules:
            for owner in module.modules():
                for table_name in ("_parameters", "_buffers"):
                    for name, t in getattr(owner, table_name).items():
                        if t is None or t.device != self.device or _no_storage(t):
                            continue
                        key = t.untyped_storage().data_ptr()
                        start = t.storage_offset() * t.element_size()
                        end = start + _extent(t) * t.element_size()
                        if key not in spans:
                            spans[key] = [start, end, t.untyped_storage()]
                            order.append(key)
                        else:
                            spans[key][0], spans[key][1] = min(spans[key][0], start), max(spans[key][1], end)
                        slots.append((owner, table_name, name, t, key, start))
        pos, where = 0, {}
        for key in order:
            spans[key][0] = spans[key][0] // ALIGN * ALIGN
            where[key] = pos
            pos += aligned(spans[key][1] - spans[key][0])
        host = torch.empty(pos, dtype=torch.uint8, pin_memory=True)
        for key in order:
            lo, hi, storage = spans[key]
            src = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage, lo, (hi - lo,))
            host[where[key]:where[key] + hi - lo].copy_(src)
        placed = [(owner, table_name, name, t.dtype, tuple(t.shape), t.stride(), where[key] + start - spans[key][0], isinstance(t, nn.Parameter))
                  for owner, table_name, name, t, key, start in slots]
        for owner, table_name, name, *_ in placed:  # the GPU copies go now (the loader drops its arenas)
            getattr(owner, table_name)[name] = None
        self.units.append((modules, host, placed))
        return pos

    def bind(self) -> int:
        """Make one staging buffer for every offloaded unit; their tensors become views of it (sharing its
        version counter: autograd refuses a saved view that a later refill changed) and each module's
        forward first copies its unit's host bytes in; reading a stand-in's weight (``QModule.parts``) or
        ``state_dict()`` outside a forward stages its unit first. Returns the staging buffer's size."""
        if not self.units:
            return 0
        size = max(host.numel() for _, host, _ in self.units)
        self.staging = torch.empty(size, dtype=torch.uint8, device=self.device)
        for index, (modules, host, placed) in enumerate(self.units):
            made: dict[tuple, torch.Tensor] = {}
            for owner, table_name, name, dtype, shape, stride, offset, is_param in placed:
                key = (offset, dtype, shape, stride, is_param)
                t = made.get(key)
                if t is None:
                    item = torch.empty(0, dtype=dtype).element_size()
                    flat = self.staging[offset:offset + max(_extent_of(shape, stride), 1) * item].view(dtype)
                    t = flat.as_strided(shape, stride)
                    if is_param:
                        t = nn.Parameter(t, requires_grad=False)
                    made[key] = t
                getattr(owner, table_name)[name] = t
            stage = functools.partial(self.stage, index)
            for module in modules:
                # (a forward always copies: a CUDA graph captured from it must hold the copy)
                wrap(module, str(self.device), before=functools.partial(self.stage, index, True))
                module.register_state_dict_pre_hook(lambda *_, stage=stage: stage())
                module.register_state_dict_post_hook(functools.partial(self._detach_state))  # (torch marks the hook: no bound method)
                for m in module.modules():
                    if hasattr(m, "part_names"):  # a stand-in: its parts are read outside forwards too
                        m._stage = stage
        return size

    def stage(self, index: int, always: bool = False) -> None:
        """Have the staging buffer hold unit ``index`` (for what is enqueued from now on)."""
        if self.current == index and not always:
            return
        if self.flush is not None:
            self.flush()  # a sibling group still being learned reads the unit staged before this one
        host = self.units[index][1]
        with torch.cuda.device(self.device):
            self.staging[:host.numel()].copy_(host, non_blocking=True)
        self.current = index

    def _detach_state(self, module, state_dict, prefix, local_metadata) -> None:
        """``state_dict()`` entries that are views of the staging buffer become copies (the buffer moves on)."""
        lo = self.staging.data_ptr()
        hi = lo + self.staging.numel()
        for key, value in state_dict.items():
            if key.startswith(prefix) and isinstance(value, torch.Tensor) and value.device == self.device and not _no_storage(value) \
                    and lo <= value.data_ptr() < hi:
                state_dict[key] = value.detach().clone()


def _no_storage(t: torch.Tensor) -> bool:
    from .qmodules import QuantizedWeight

    return isinstance(t, QuantizedWeight)  # a stand-in's weight: no data of its own


def _extent(t: torch.Tensor) -> int:
    """Elements from a tensor's first to one past its last, in its storage."""
    return _extent_of(tuple(t.shape), t.stride())


def _extent_of(shape: tuple, stride: tuple) -> int:
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))
