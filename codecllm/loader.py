"""``.cllm`` -> a ready transformers model whose weights stay quantized (``mode="resident"``) or compressed
(``mode="stream"``).

The model is built empty (parameters on the meta device) from the embedded config. One walk over the
file's records, in the model's parameter order, puts each tensor in place: where the record's scheme has
a stand-in for the module on the chosen backend, the stand-in takes the module's place; otherwise the
module gets a plain (dequantized) tensor. A *backend* chosen once per load (``CpuBackend`` here,
``codecllm.gpu.backend.CudaBackend`` on CUDA) decodes parts onto its device and sets up stream layers.
No weight is allocated twice.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .architecture import empty_model
from .dtypes import FLOAT_DTYPES, torch_dtype
from .errors import CodecLLMError, DeviceError, DeviceMapError, FormatError
from .format import CllmFile, Record
from .qmodules import CpuPipeline, CpuStreamed, QEmbedding, QModule, dense_state_dict

MODES = ("resident", "stream", "auto")
STREAM_MIN_SAVING = 0.05  # stream mode saving less than this (or holding more) is worth a notice
AUTO_MAX_SLOWDOWN = 0.10  # mode="auto" takes the mode that holds less unless it is estimated this much slower
TOKENIZER_FILES_EXCLUDED = ("config.json", "generation_config.json")


class CpuBackend:
    """Decodes parts with the codecs' CPU decoders; stream layers keep their weights compressed in memory
    and share one ``CpuPipeline``."""

    name = "cpu"
    stream_keys = ("cpu-stream",)  # the registry keys of stream stand-ins, most specific first

    def __init__(self, f: CllmFile, device: torch.device):
        self.f, self.device = f, device

    def reserve(self, records: list[Record], streamed: set[str]) -> None:
        pass

    def read_parts(self, rec: Record, skip: str | None = None) -> dict[str, torch.Tensor]:
        return {n: self.f.read_part(rec, p) for n, p in rec.parts.items() if n != skip}

    def stream(self, layer: nn.Module, rec: Record) -> None:
        main = rec.main
        layer.set_stream(rec.scheme.main_part, torch.from_numpy(self.f.read_stored(rec, main)), main)

    def finish(self, model: nn.Module) -> None:
        layers = [m for m in model.modules() if isinstance(m, CpuStreamed)]
        if layers:
            pipeline = CpuPipeline(layers)
            for m in layers:
                m.pipeline = pipeline
            pipeline.attach(model)


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{device!r} is not a torch device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' was asked for, but torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(dev)!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise DeviceError(f"device {dev.type!r} is not supported (use 'cpu' or 'cuda')")
    return dev


def _backend(f: CllmFile, dev: torch.device, gpu_stream_codec: str | None):
    from .gpu.backend import CudaBackend, stream_keys

    stream_keys(gpu_stream_codec)  # a bad value is an error on any device
    if dev.type == "cuda":
        return CudaBackend(f, dev, gpu_stream_codec)
    return CpuBackend(f, dev)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mpath, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(mpath) if mpath else model
    except AttributeError:
        module = None
    if module is None or not (attr in module._parameters or attr in module._buffers):
        raise FormatError(f"tensor {name!r} names no parameter or buffer of {type(model).__name__}")
    return module, attr


def default_dtype(f: CllmFile, dev: torch.device) -> torch.dtype:
    """The dtype most floating-point weights had, except that float16/bfloat16 models compute in float32
    on the CPU (CPU half-precision matmuls are slow and round more)."""
    name = f.doc.model.get("dtype")
    dtype = torch_dtype(name) if name in FLOAT_DTYPES else torch.float32
    if dev.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return dtype


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    mode: str = "resident",
    dtype: torch.dtype | None = None,
    gpu_stream_codec: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> nn.Module:
    """Load a ``.cllm`` file as a transformers model in eval mode.

    ``mode="resident"`` keeps weights in their scheme's encoding (int8 codes, decoded once at load);
    ``mode="stream"`` keeps Linear weights entropy-coded and decodes each just before use (with a one-line
    warning where that holds more memory than resident mode, or saves under 5%); ``mode="auto"`` takes
    the mode that holds less, unless the loader estimates it more than 10% slower (``footprint``). The
    mode taken is ``model.codecllm_mode``. ``dtype`` is
    the compute dtype (``default_dtype`` if None). On CUDA, decoding runs on the GPU with nvCOMP and
    ``gpu_stream_codec`` chooses how stream mode keeps weights in GPU memory: ``None`` (each scheme's
    fastest form: quantized weights re-encoded to nvCOMP's ANS, lossless bfloat16 weights in a 12-bit
    fixed-length exponent code), ``"ans"`` (everything entropy-coded with ANS: lossless weights then take
    about 10.7 bits, decoded per layer before use) or ``"zstd"`` (quantized weights as the file's own
    frames).

    ``device_map`` spreads the model over several devices instead of ``device``: ``"auto"``,
    ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` (placed by accelerate over what each module
    holds in the chosen mode, within ``max_memory``, ``{0: "20GiB", "cpu": ...}``; by default 90% of each
    GPU's free memory) or ``{module prefix: device}``, where ``"cpu"`` offloads a module: its weights stay
    in CPU memory and it computes on the map's first GPU (``codecllm.placement``).

    >>> model = codecllm.load("model.cllm", device="cpu")          # doctest: +SKIP
    >>> model.generate(**tokenizer("Hello", return_tensors="pt"))  # doctest: +SKIP
    """
    if mode not in MODES:
        raise CodecLLMError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    placement = _placement(device, device_map, max_memory)
    with CllmFile(path) as f:
        if isinstance(placement, torch.device):
            dtype = dtype or default_dtype(f, placement)
            model = empty_model(f.config(), dtype)
            _fill(model, f, placement, mode, dtype, gpu_stream_codec)
        else:
            model = _fill_mapped(None, f, placement, max_memory, mode, dtype, gpu_stream_codec)
    return model


def load_into(model: nn.Module, path: str | os.PathLike, device: str | torch.device | None = None, mode: str = "resident",
              dtype: torch.dtype | None = None, gpu_stream_codec: str | None = None, device_map: str | dict | None = None,
              max_memory: dict | None = None) -> nn.Module:
    """Fill ``model`` (built from the file's config, parameters on the meta device, as transformers builds
    it before loading weights) from the ``.cllm`` file in place; returns it."""
    if mode not in MODES:
        raise CodecLLMError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    placement = _placement(device, device_map, max_memory)
    with CllmFile(path) as f:
        if isinstance(placement, torch.device):
            _fill(model, f, placement, mode, dtype or default_dtype(f, placement), gpu_stream_codec)
        else:
            _fill_mapped(model, f, placement, max_memory, mode, dtype, gpu_stream_codec)
    return model


def _placement(device, device_map, max_memory) -> torch.device | str | dict[str, str]:
    """One device, or a normalized device map (a policy name or ``{prefix: device}``) that names several."""
    from .placement import POLICIES, normalize

    if device_map is None:
        if max_memory is not None:
            raise DeviceMapError("max_memory is used with device_map only")
        return _device("cpu" if device is None else device)
    if device is not None:
        raise DeviceMapError("give device or device_map, not both")
    norm = normalize(device_map)
    if isinstance(norm, str):  # a policy: over the GPUs there are, else the CPU alone
        return norm if torch.cuda.is_available() else _device("cpu")
    if max_memory is not None:
        raise DeviceMapError("max_memory is used with a named device_map policy (" + ", ".join(POLICIES) + "), not an explicit map")
    devices = set(norm.values())
    for d in devices - {"cpu"}:
        _device(d)  # (a clear error for a GPU that is not there)
    if len(devices) == 1:
        return _device(devices.pop())
    return norm


def _fill(model: nn.Module, f: CllmFile, dev: torch.device, mode: str, dtype: torch.dtype, gpu_stream_codec: str | None) -> None:
    doc = f.doc
    backend = _backend(f, dev, gpu_stream_codec)
    names_of, order, targets = _targets(model, doc)
    if mode != "resident":
        mode = _choose(f.path, dev, mode, _footprint(doc, targets, backend.name, backend.stream_keys, dtype))
    model.codecllm_mode = mode
    streamed = _streamed(doc, targets, backend.stream_keys) if mode == "stream" else set()
    backend.reserve(order, streamed)
    for rec in order:
        _place(model, backend, rec, names_of[rec.name], rec.name in streamed, dtype)
    _settle(model, f)
    model.to(dev)  # buffers made at construction (rotary tables); every loaded tensor is there already
    model.eval()
    _finish_loads(model)
    backend.finish(model)


def _settle(model: nn.Module, f: CllmFile) -> None:
    """The embedded generation config; no tensor left unloaded."""
    doc = f.doc
    if "generation_config.json" in doc.files:
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_dict(json.loads(f.read_file("generation_config.json")))
        except (ValueError, TypeError, UnicodeDecodeError):
            raise FormatError(f"{f.path}: embedded generation_config.json is not a valid generation config") from None
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.device.type == "meta"]
    if missing:
        raise FormatError(f"{f.path}: the file holds no tensor for {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _finish_loads(model: nn.Module) -> None:
    by_owner: dict[tuple, list[nn.Module]] = {}  # stand-ins by the class whose finish_load they share, per device
    for m in model.modules():
        if isinstance(m, QModule):
            by_owner.setdefault((next(c for c in type(m).__mro__ if "finish_load" in c.__dict__), m.device), []).append(m)
    for (owner, _), layers in by_owner.items():
        owner.finish_load(layers)


def plan(path: str | os.PathLike, device_map: str | dict = "auto", max_memory: dict | None = None, mode: str = "resident",
         dtype: torch.dtype | None = None, gpu_stream_codec: str | None = None):
    """Where ``load(path, device_map=..., max_memory=..., mode=...)`` would put each module, and the bytes
    each device would hold (a ``codecllm.placement.Placement``), from the header alone: no GPU is needed
    when ``max_memory`` names the GPUs (``{0: "8GiB", 1: "8GiB", "cpu": "32GiB"}``)."""
    from .placement import normalize

    if mode not in MODES:
        raise CodecLLMError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    with CllmFile(path) as f:
        dtype = dtype or default_dtype(f, torch.device("cuda"))
        return _plan(empty_model(f.config(), dtype), f, normalize(device_map), max_memory, mode, dtype, gpu_stream_codec)[0]


def _plan(model: nn.Module, f: CllmFile, device_map: str | dict[str, str], max_memory: dict | None, mode: str, dtype: torch.dtype,
          gpu_stream_codec: str | None):
    """The placement of ``model``'s records (``codecllm.placement``): the map (computed by accelerate for a
    policy), each record's device, the mode and streamed records, and the bytes each device holds."""
    from .gpu.backend import stream_keys
    from .gpu.stream import aligned
    from .kernels.launch import scratch_bytes
    from .placement import Placement, flatten, gpu_index, gpus_of, infer, max_memory_of

    doc = f.doc
    keys = stream_keys(gpu_stream_codec)
    names_of, order, targets = _targets(model, doc)
    footprint = _footprint(doc, targets, "cuda", keys, dtype) if mode != "resident" else {}
    if mode != "resident":  # (its notice: where the load goes, once that is known)
        mode = _choose(f.path, torch.device("cuda"), mode, footprint, warn=False)
    streamed = _streamed(doc, targets, keys) if mode == "stream" else set()
    held = _held(doc, targets, "cuda", keys, dtype, streamed)
    main = None
    if isinstance(device_map, str):
        sizes = {n: held[r.name][0] for r in order for n in names_of[r.name]}
        memory = max_memory_of(max_memory)
        device_map = infer(model, sizes, device_map, memory, _shared(held, doc, dtype) + scratch_bytes())
        gpu_keys = sorted(k for k, v in memory.items() if isinstance(k, int) and v > 0)
        main = f"cuda:{gpu_keys[0]}" if gpu_keys else None  # (where offloaded modules compute, even with none placed on a GPU)
    device_map = flatten(model, device_map)
    gpus = gpus_of(device_map.values())
    placement = Placement(device_map, gpus[0] if gpus else main, mode=mode, footprint=footprint)
    for rec in order:
        devices = {placement.device_of(n) for n in names_of[rec.name]}
        if len(devices) > 1:
            raise DeviceMapError(f"tensor {rec.name!r} is shared by {', '.join(names_of[rec.name])}, which device_map puts on "
                                 f"{', '.join(sorted(devices))}: map them to one device")
        placement.where[rec.name] = devices.pop()
    placement.streamed = {n for n in streamed if placement.where[n] != "cpu"}
    offloaded = [r.name for r in order if placement.where[r.name] == "cpu"]
    if offloaded and placement.main:  # computed on the main GPU in their resident form, held in pinned CPU memory
        resident = _held(doc, {n: targets[n] for n in offloaded}, "cuda", keys, dtype, set())
        for prefixes, records in _units(device_map, {n: names_of[n] for n in offloaded}):
            placement.units.append((prefixes, records))
            nbytes = sum(aligned(resident[n][0]) for n in records)
            placement.predicted["cpu"] = placement.predicted.get("cpu", 0) + nbytes
            placement.staging = max(placement.staging, nbytes)
    for d in gpus_of([*gpus, *([placement.main] if placement.units else [])]):
        mine = {n: v for n, v in held.items() if placement.where[n] == d}
        placement.predicted[d] = (sum(n for n, _ in mine.values()) + _shared(mine, doc, dtype) + scratch_bytes(gpu_index(d))
                                  + (placement.staging if d == placement.main else 0))
    return placement, names_of, order


def _units(device_map: dict[str, str], offloaded: dict[str, list[str]]) -> list[tuple[list[str], list[str]]]:
    """The offloaded modules as units staged together: one per key of the map, merged where keys share a
    stored tensor (a tied embedding and head). Each: (keys, record names)."""
    from .placement import entry_of

    unit_of: dict[str, int] = {}
    units: list[tuple[list[str], list[str]]] = []
    for rec, names in offloaded.items():
        keys = {entry_of(device_map, n) for n in names}
        found = sorted({unit_of[k] for k in keys if k in unit_of})
        if not found:
            units.append(([], []))
            found = [len(units) - 1]
        target = found[0]
        for other in found[1:]:  # merge
            units[target][0].extend(units[other][0])
            units[target][1].extend(units[other][1])
            for k in units[other][0]:
                unit_of[k] = target
            units[other] = ([], [])
        for k in keys:
            if k not in unit_of:
                unit_of[k] = target
                units[target][0].append(k)
        units[target][1].append(rec)
    return [u for u in units if u[0]]


def _fill_mapped(model: nn.Module | None, f: CllmFile, device_map: str | dict[str, str], max_memory: dict | None, mode: str,
                 dtype: torch.dtype | None, gpu_stream_codec: str | None) -> nn.Module:
    """Load over several devices (``codecllm.placement``): each GPU's records through a backend of its
    own; each module mapped to "cpu" built on the main GPU, then moved to pinned host memory."""
    from .gpu import fusion
    from .gpu.backend import CudaBackend
    from .placement import Offload, gpu_index, gpus_of, wrap

    asked, given = dtype, model
    dtype = dtype or default_dtype(f, torch.device("cuda"))
    if model is None:
        model = empty_model(f.config(), dtype)
    placement, names_of, order = _plan(model, f, device_map, max_memory, mode, dtype, gpu_stream_codec)
    gpus = placement.gpus
    if not placement.main or gpus == [placement.main] and not placement.units:  # all on one device after all
        dev = _device(placement.main or "cpu")
        if dev.type == "cpu":
            dtype = asked or default_dtype(f, dev)
            if given is None:
                model = empty_model(f.config(), dtype)
        _fill(model, f, dev, mode, dtype, gpu_stream_codec)  # (the mode chosen, and its notice given, for that device)
        model.codecllm_device_map = {"": str(dev)}
        return model
    if mode == "stream":
        _choose(f.path, torch.device(placement.main), mode, placement.footprint)  # the notice where stream does not pay
    model.codecllm_mode = placement.mode
    where, streamed = placement.where, placement.streamed
    _move_constructed(model, placement)
    backends = {}
    for d in gpus_of([*gpus, placement.main]):
        dev = torch.device(d)
        backend = backends[d] = CudaBackend(f, dev, gpu_stream_codec)
        with torch.cuda.device(dev):
            recs = [r for r in order if where[r.name] == d]
            backend.reserve(recs, streamed)
            for rec in recs:
                _place(model, backend, rec, names_of[rec.name], rec.name in streamed, dtype)
    main = torch.device(placement.main)
    offload = Offload(main)
    records = {r.name: r for r in order}
    for prefixes, names in placement.units:
        recs = [records[n] for n in names]
        temp = CudaBackend(f, main, gpu_stream_codec)
        with torch.cuda.device(main):
            temp.reserve(recs, set())
            for rec in recs:
                _place(model, temp, rec, names_of[rec.name], False, dtype)
            offload.take([model.get_submodule(p) if p else model for p in prefixes])
        del temp
    _settle(model, f)
    model.eval()
    _finish_loads(model)
    for backend in backends.values():
        backend.finish(model, fuse=False)
    fuser = fusion.install(model)
    if fuser is not None:
        offload.flush = fuser.flush
    with torch.cuda.device(main):
        offload.bind()
    several = len({*gpus, placement.main}) > 1
    if several:
        for prefix, d in placement.map.items():
            if d != "cpu":
                wrap(model.get_submodule(prefix) if prefix else model, d)
    if several or main != torch.device("cuda", torch.cuda.current_device()):
        wrap(model, placement.main, outputs_back=True)  # (with the main GPU current, whichever the caller's is)
    model.codecllm_device_map = dict(placement.map)
    model.codecllm_placement = placement
    # (as accelerate reports offload: transformers then leaves generate() uncompiled)
    model.hf_device_map = {p: "cpu" if d == "cpu" else gpu_index(d) for p, d in placement.map.items()}
    return model


def _move_constructed(model: nn.Module, placement) -> None:
    """Tensors made when the model was built (rotary tables), not stored in the file: to the device their
    module computes on."""
    for mname, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for attr, t in list(table.items()):
                if t is None or t.device.type == "meta":
                    continue
                dev = torch.device(placement.execution(f"{mname}.{attr}" if mname else attr))
                if t.device != dev:
                    moved = t.to(dev)
                    table[attr] = nn.Parameter(moved, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else moved


def _targets(model: nn.Module, doc) -> tuple[dict[str, list[str]], list[Record], dict[str, list]]:
    """Each record's names in ``model``, the records in the model's order, and each record's targets
    (name, module, attribute)."""
    names_of: dict[str, list[str]] = {n: [n] for n in doc.tensors}
    for alias, target in doc.aliases.items():
        names_of[target].append(alias)
    if type(model).__name__ not in (doc.model.get("architectures") or []):
        names_of = _renamed(model, names_of)
    order = _in_model_order(model, doc, names_of)
    return names_of, order, {r.name: [(n, *_parent(model, n)) for n in names_of[r.name]] for r in order}


def footprint(path: str | os.PathLike, device: str | torch.device = "cuda", dtype: torch.dtype | None = None,
              gpu_stream_codec: str | None = None) -> dict[str, dict]:
    """What each mode would hold of a ``.cllm`` file's tensors on ``device`` ("cpu" or "cuda"; no GPU is
    needed to ask), from the header alone: ``{"resident": {"bytes", "speed"}, "stream": {...}}``, where
    ``bytes`` counts every tensor the model holds (stand-ins' forms, plain tensors in ``dtype``) and the
    stream layers' workspaces, and ``speed`` is the loader's estimate of a one-token decode step's speed
    against resident mode's: each stand-in's measured ``relative_speed``, weighted by the resident bytes
    of the weights a step reads in full (embeddings, read by rows, left out). Stream mode's escapes and
    ANS re-encoding are estimated, not counted. ``gpu_stream_codec`` as for ``load``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{device!r} is not a torch device") from None
    from .gpu.backend import stream_keys

    keys = stream_keys(gpu_stream_codec)  # (checked on any device)
    if dev.type == "cpu":
        keys = CpuBackend.stream_keys
    elif dev.type != "cuda":
        raise DeviceError(f"device {dev.type!r} is not supported (use 'cpu' or 'cuda')")
    with CllmFile(path) as f:
        dtype = dtype or default_dtype(f, dev)
        model = empty_model(f.config(), dtype)
        return _footprint(f.doc, _targets(model, f.doc)[2], dev.type, keys, dtype)


def _footprint(doc, targets: dict[str, list], backend: str, stream_keys: tuple[str, ...], dtype: torch.dtype) -> dict[str, dict]:
    resident: dict[str, int] = {}
    out = {}
    for mode in ("resident", "stream"):
        streamed = _streamed(doc, targets, stream_keys) if mode == "stream" else set()
        each = _held(doc, targets, backend, stream_keys, dtype, streamed)
        time = 0.0
        for name, mods in targets.items():
            n, cls = each[name]
            resident.setdefault(name, n)
            if not all(isinstance(m, nn.Embedding) for _, m, _ in mods):  # (a tied head reads its weight in full)
                time += resident[name] / (cls.relative_speed if cls is not None else 1.0)
        out[mode] = {"bytes": sum(n for n, _ in each.values()) + _shared(each, doc, dtype), "time": time}
    base = out["resident"]["time"]
    return {m: {"bytes": v["bytes"], "speed": base / v["time"] if v["time"] else 1.0} for m, v in out.items()}


def _held(doc, targets: dict[str, list], backend: str, stream_keys: tuple[str, ...], dtype: torch.dtype,
          streamed: set[str]) -> dict[str, tuple[int, type | None]]:
    """Per record: the bytes it would hold, and the stand-in class holding it (None: a plain tensor)."""
    out = {}
    for name, mods in targets.items():
        rec = doc.tensors[name]
        cls = _holder(rec, mods, backend, stream_keys if name in streamed else None)
        if cls is None:
            out[name] = (rec.numel * (dtype.itemsize if rec.dtype in FLOAT_DTYPES else torch_dtype(rec.dtype).itemsize), None)
        else:
            out[name] = (cls.held_bytes(rec, dtype), cls)
    return out


def _shared(held: dict[str, tuple[int, type | None]], doc, dtype: torch.dtype) -> int:
    """The workspaces the stand-ins of ``held`` (a ``_held`` result) share, once per owning class."""
    by_owner: dict[type, list[tuple[type, Record]]] = {}  # (class, record) by the class whose workspaces they share
    for name, (_, cls) in held.items():
        if cls is not None:
            owner = next(c for c in cls.__mro__ if "shared_bytes" in c.__dict__)
            by_owner.setdefault(owner, []).append((cls, doc.tensors[name]))
    return sum(owner.shared_bytes(pairs, dtype) for owner, pairs in by_owner.items())


def _holder(rec: Record, mods: list, backend: str, stream_keys: tuple[str, ...] | None) -> type | None:
    """The stand-in class that would hold ``rec`` (as ``_place`` chooses it; streamed with
    ``stream_keys``), or None for a plain tensor."""
    for _, module, attr in mods:
        if attr != "weight":
            continue
        cls = _stand_in(rec, module, stream_keys or (backend,))
        if cls is None and not stream_keys:
            base = rec.scheme.stand_in(module, backend, exact=False, dtype=rec.dtype)
            cls = base if base is not None and issubclass(base, QEmbedding) else None
        if cls is not None:
            return cls
    return None


def _stand_in(rec: Record, module: nn.Module, keys: tuple[str, ...]) -> type | None:
    """The stand-in for ``module``'s exact class under the first of ``keys`` the scheme registers one for."""
    for key in keys:
        cls = rec.scheme.stand_in(module, key, dtype=rec.dtype)
        if cls is not None:
            return cls
    return None


def _choose(path: str, dev: torch.device, mode: str, plan: dict[str, dict], warn: bool = True) -> str:
    """The mode to load in: ``auto``'s choice, or ``stream`` with a notice (``warn``) where it does not pay."""
    res, st = plan["resident"]["bytes"], plan["stream"]["bytes"]
    if mode == "auto":
        return "stream" if st < res and plan["stream"]["speed"] >= 1 - AUTO_MAX_SLOWDOWN else "resident"
    if warn and st > res * (1 - STREAM_MIN_SAVING):
        than = f"{(st / max(res, 1) - 1) * 100:.1f}% more than" if st > res else f"only {(1 - st / res) * 100:.1f}% less than"
        warnings.warn(f"{path}: stream mode holds {st / 1e6:.1f} MB on {dev.type}, {than} resident mode's {res / 1e6:.1f} MB, "
                      f"at about {plan['stream']['speed']:.2f}x its speed (mode='auto' chooses)", stacklevel=4)
    return mode


def _renamed(model: nn.Module, names_of: dict[str, list[str]]) -> dict[str, list[str]]:
    """For a model of another class than the file's (``AutoModel`` gives the base model of the file's
    task model): each name as this model has it (the base model prefix stripped), and the tensors it has
    no place for (the task head) left out."""
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    prefix = getattr(model, "base_model_prefix", "") + "."
    out = {}
    for target, names in names_of.items():
        mapped = [n if n in known else n[len(prefix):] for n in names if n in known or (n.startswith(prefix) and n[len(prefix):] in known)]
        if mapped:
            out[target] = mapped
    return out


def _in_model_order(model, doc, names_of: dict[str, list[str]]) -> list[Record]:
    """The file's records in the order the model registers their parameters: decoded in this order, the
    weights of layers registered together (a block's q/k/v, its gate/up) lie back to back in device
    memory, which lets sibling layers run as one matmul (``codecllm.gpu.fusion``)."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + [n for n, _ in model.named_buffers()]
    position = {n: i for i, n in enumerate(names)}
    return sorted((r for r in doc.tensors.values() if r.name in names_of), key=lambda r: min(position.get(n, len(position)) for n in names_of[r.name]))


def _streamed(doc, targets: dict[str, list], keys: tuple[str, ...]) -> set[str]:
    """The records stream mode keeps compressed: weights whose every module has a stream stand-in for the
    record's scheme, and either that stand-in keeps a compact form of its own that it computes from (no
    decode buffer) or it decodes per call, from the record's entropy-coded main part (``_payload``) or from
    a form it builds at load (``CpuStreamed``). The decode buffers are as large as the largest such weight,
    so two of them stay resident: a weight far larger than the typical one (an untied vocabulary
    projection) and, in a quantized model, a lossless weight larger than every quantized one (a float
    layer kept for accuracy): either would grow the buffers by more than its compression saves."""
    from .codecs import get_codec

    candidates, compact = {}, set()
    for name, mods in targets.items():
        rec = doc.tensors[name]
        # (exact classes only: a subclass keeps its own forward)
        classes = [_stand_in(rec, m, keys) if a == "weight" else None for _, m, a in mods]
        if not all(classes):
            continue
        if not any(_payload(c) or issubclass(c, CpuStreamed) for c in classes):
            compact.add(name)
        elif not any(_payload(c) for c in classes) or get_codec(rec.main.codec).chunked:
            candidates[name] = max(c.decoded_bytes(rec) if issubclass(c, CpuStreamed) else rec.main.nbytes for c in classes)
    ranked = sorted(candidates, key=candidates.get, reverse=True)
    while len(ranked) > 1 and candidates[ranked[0]] > 2 * candidates[ranked[1]]:
        ranked.pop(0)  # the buffers would be sized for this one weight alone
    lossy = [candidates[n] for n in ranked if not doc.tensors[n].scheme.lossless]
    if lossy:
        ranked = [n for n in ranked if candidates[n] <= max(lossy)]
    return set(ranked) | compact


def _payload(cls: type) -> bool:
    """Whether stream stand-in ``cls`` keeps its record's main part as the backend hands it over (and
    decodes it per use), rather than a form it builds from every decoded part."""
    return hasattr(cls, "set_stream")


def _place(model, backend, rec: Record, names: list[str], stream: bool, dtype: torch.dtype) -> None:
    """Put one stored tensor (under each of its names) into the model. Modules are looked up now: a
    Linear's bias may go to the stand-in that replaced it."""
    keys = backend.stream_keys if stream else (backend.name,)
    targets = [(n, *_parent(model, n)) for n in names]
    for name, module, attr in targets:
        have = getattr(module, attr).shape
        if tuple(have) != rec.shape:
            raise FormatError(f"tensor {name!r} has shape {list(rec.shape)} in the file, {list(have)} in the model")
    stand_ins = [_stand_in(rec, m, keys) if a == "weight" else None for _, m, a in targets]
    payload = stream and any(c is not None and _payload(c) for c in stand_ins)
    parts = backend.read_parts(rec, skip=rec.scheme.main_part if payload else None)
    dense = owner = None
    for (name, module, attr), cls in zip(targets, stand_ins):
        base = rec.scheme.stand_in(module, backend.name, exact=False, dtype=rec.dtype) if cls is None and attr == "weight" else None
        if base is not None and issubclass(base, QEmbedding) and not stream:
            # an Embedding subclass (Gemma's scaled embedding) keeps its forward; its weight is the
            # stand-in's, whose lookup gathers rows (a Linear subclass would dequantize per call: it gets a
            # plain weight below)
            if owner is None:
                owner = base.from_float(module, rec.scheme, parts, dtype, backend.device)
            module._parameters["weight"] = owner.weight
            module.register_state_dict_post_hook(dense_state_dict)
            continue
        if cls is None:  # a plain tensor: the original, or dequantized (shared by tied names)
            if dense is None:
                dense = rec.scheme.dequantize(parts, dtype if rec.dtype in FLOAT_DTYPES else None)
                if attr in module._parameters:
                    dense = nn.Parameter(dense, requires_grad=False)
            if attr in module._parameters:
                module._parameters[attr] = dense
            else:
                module._buffers[attr] = dense
            continue
        new = cls.from_float(module, rec.scheme, parts, dtype, backend.device)
        if payload:
            backend.stream(new, rec)
        if owner is None:
            owner = new
        else:  # tied: one weight, as transformers ties them
            new.weight = owner.weight
        parent, leaf = _parent_module(model, name.rpartition(".")[0])
        setattr(parent, leaf, new)


def _parent_module(model: nn.Module, module_name: str) -> tuple[nn.Module, str]:
    mpath, _, leaf = module_name.rpartition(".")
    return (model.get_submodule(mpath) if mpath else model), leaf


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer embedded in a ``.cllm`` file, through ``transformers.AutoTokenizer``."""
    from transformers import AutoTokenizer

    with CllmFile(path) as f, tempfile.TemporaryDirectory(prefix="codecllm-tok-") as tmp:
        names = [n for n in f.doc.files if n not in TOKENIZER_FILES_EXCLUDED]
        if not any(n.startswith("tokenizer") or n.endswith((".model", ".tiktoken")) or n in ("vocab.json", "vocab.txt") for n in names):
            raise CodecLLMError(f"{path}: the file embeds no tokenizer (convert a model directory that has one)")
        for name in f.doc.files:
            Path(tmp, name).write_bytes(f.read_file(name))
        return AutoTokenizer.from_pretrained(tmp)
