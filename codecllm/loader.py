"""``.cllm`` -> a ready transformers model whose Linear weights stay quantized (resident) or compressed
(stream). The model is built empty from the embedded config, quantized modules take the place of the
Linear layers, and every other tensor is decoded straight into place: no weight is allocated twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .architecture import empty_model
from .errors import CodecLLMError, DeviceError, FormatError
from .format import DTYPES, CllmFile, Record
from .modules import Int8Embedding, Int8Linear, StreamLinear

MODES = ("resident", "stream")
TOKENIZER_FILES_EXCLUDED = ("config.json", "generation_config.json")


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
    elif dev.type != "cpu":
        raise DeviceError(f"device {dev.type!r} is not supported (use 'cpu' or 'cuda')")
    return dev


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mpath, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(mpath) if mpath else model), attr
    except AttributeError:
        raise FormatError(f"tensor {name!r} names no module of {type(model).__name__}") from None


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    mode: str = "resident",
    dtype: torch.dtype | None = None,
    gpu_stream_codec: str = "ans",
) -> nn.Module:
    """Load a ``.cllm`` file as a transformers model in eval mode.

    ``mode="resident"`` keeps Linear weights int8 (decoded once at load); ``mode="stream"`` keeps them
    entropy-coded and decodes each just before use. ``dtype`` is the compute dtype; by default the dtype
    the original weights had, except that float16/bfloat16 models compute in float32 on the CPU (CPU
    half-precision matmuls are slow and round more). On CUDA, decoding runs on the GPU with nvCOMP and
    ``gpu_stream_codec`` chooses how stream mode keeps weights in GPU memory: ``"ans"`` (re-encoded at
    load, decodes fastest) or ``"zstd"`` (the file's own frames).

    >>> model = codecllm.load("model.cllm", device="cpu")          # doctest: +SKIP
    >>> model.generate(**tokenizer("Hello", return_tensors="pt"))  # doctest: +SKIP
    """
    if mode not in MODES:
        raise CodecLLMError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    dev = _device(device)
    with CllmFile(path) as f:
        doc = f.doc
        if "config.json" not in doc.files:
            raise FormatError(f"{path}: no embedded config.json")
        try:
            config = json.loads(f.read_file("config.json"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FormatError(f"{path}: embedded config.json is not valid JSON") from None
        if dtype is None:
            dtype = DTYPES.get(doc.model.get("dtype"), (torch.float32,))[0]
            if dev.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
        model = empty_model(config, dtype)
        decoder = None
        if dev.type == "cuda":
            from .gpu.loader import GpuDecoder

            decoder = GpuDecoder(f, dev, gpu_stream_codec)
        names_of: dict[str, list[str]] = {n: [n] for n in doc.tensors}
        for alias, target in doc.aliases.items():
            names_of[target].append(alias)
        streamed = _streamed(model, doc, names_of) if mode == "stream" else set()
        if decoder is not None:  # one allocation for every tensor decoded at load
            decoder.reserve([r.encoded_nbytes for n, r in doc.tensors.items() if n not in streamed])
        state: dict[str, torch.Tensor] = {}
        for rec in _in_model_order(model, doc, names_of):
            _place(model, f, rec, names_of[rec.name], rec.name in streamed, dev, dtype, state, decoder)
        if "generation_config.json" in doc.files:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_dict(json.loads(f.read_file("generation_config.json")))
    model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.device.type == "meta"]
    if missing:
        raise FormatError(f"{path}: the file holds no tensor for {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.to(dev)
    model.eval()
    if decoder is not None:
        decoder.finish(model)
    return model


def _in_model_order(model, doc, names_of: dict[str, list[str]]) -> list[Record]:
    """The file's records in the order the model registers their parameters: decoded in this order, the
    weights of layers registered together (a block's q/k/v, its gate/up) lie back to back in GPU memory,
    which lets ``codecllm.gpu.fusion`` view them as one matrix."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + [n for n, _ in model.named_buffers()]
    position = {n: i for i, n in enumerate(names)}
    return sorted(doc.tensors.values(), key=lambda r: min(position.get(n, len(position)) for n in names_of[r.name]))


def _streamed(model, doc, names_of: dict[str, list[str]]) -> set[str]:
    """The records stream mode keeps compressed: Linear weights (not tied to an embedding) with a chunked
    codec. The decode workspaces are as large as the largest streamed weight, so two kinds stay resident:
    a weight far larger than the typical one (an untied vocabulary projection), and, in a quantized
    model, an unquantized weight larger than every quantized one (an fp16 layer kept for accuracy): either
    would grow the workspaces by more than its compression saves."""
    candidates = {}
    for name, rec in doc.tensors.items():
        mods = [_parent(model, n) for n in names_of[name]]
        if rec.codec != "raw" and all(isinstance(m, nn.Linear) and a == "weight" for m, a in mods):
            candidates[name] = rec.encoded_nbytes
    ranked = sorted(candidates, key=candidates.get, reverse=True)
    while len(ranked) > 1 and candidates[ranked[0]] > 2 * candidates[ranked[1]]:
        ranked.pop(0)  # the workspace would be sized for this one weight alone
    quantized = [candidates[n] for n in ranked if doc.tensors[n].scheme != "none"]
    if quantized:
        ranked = [n for n in ranked if candidates[n] <= max(quantized)]
    return set(ranked)


def _place(model, f: CllmFile, rec: Record, names: list[str], stream: bool, dev, dtype, state, decoder) -> None:
    """Put one stored tensor (under each of its names) into the model."""
    modules = {n: _parent(model, n) for n in names}
    for n, (module, attr) in modules.items():
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor) and tuple(t.shape) != rec.shape:
            raise FormatError(f"tensor {n!r} has shape {list(rec.shape)} in the file, {list(t.shape)} in the model")
    decode = decoder.decode if decoder is not None else f.decode
    if rec.scheme == "none" and not stream:
        t = decode(rec)
        t = t.to(dtype) if t.is_floating_point() else t
        for n in names:
            state[n] = t
        return
    scale = f.read_side(rec, "scale").to(dev) if "scale" in rec.sides else None
    quantized = None if stream else decode(rec)
    for name, (old, attr) in modules.items():
        if attr != "weight" or not isinstance(old, (nn.Linear, nn.Embedding)):
            raise FormatError(f"tensor {name!r} is quantized but is no Linear or Embedding weight")
        parent, leaf = _parent(model, name.rpartition(".")[0])
        if stream and decoder is not None:
            new = decoder.stream_linear(rec, scale, old.bias)
        elif stream:
            new = StreamLinear(torch.from_numpy(f.read_stored(rec)), rec, scale, old.bias, dtype)
        elif isinstance(old, nn.Linear):
            new = Int8Linear(quantized, scale, old.bias)
        elif type(old) is nn.Embedding:
            new = Int8Embedding(quantized, scale, old.padding_idx, dtype)
        else:  # an Embedding subclass may scale or offset: give it a plain dequantized weight
            state[name] = (quantized.to(torch.float32) * scale.to(quantized.device)[:, None]).to(dtype)
            continue
        setattr(parent, leaf, new)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer embedded in a ``.cllm`` file, through ``transformers.AutoTokenizer``."""
    from transformers import AutoTokenizer

    with CllmFile(path) as f, tempfile.TemporaryDirectory(prefix="codecllm-tok-") as tmp:
        for name in f.doc.files:
            if os.sep in name or name.startswith(".") or "/" in name:
                raise FormatError(f"{path}: embedded file name {name!r} is not a plain file name")
            Path(tmp, name).write_bytes(f.read_file(name))
        return AutoTokenizer.from_pretrained(tmp)
