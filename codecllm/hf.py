"""transformers integration: ``AutoModel*.from_pretrained(DIR)`` loads a directory whose weights are a ``.cllm``.

The directory (``write_hf_dir``) holds ``config.json`` with a ``quantization_config`` of ``quant_method:
"codecllm"``, the tokenizer and generation config, and the ``.cllm`` file itself as ``model.safetensors`` (a
``.cllm`` is a valid safetensors file, so transformers finds and resolves it, locally or from the Hub, and
hands its path to the quantizer). ``import codecllm`` registers the config and the quantizer.

transformers never reads a tensor of that file: while it loads, the model's ``state_dict()`` is empty (so
nothing is missing, nothing is materialized empty or re-initialized) and the file's keys are ignored
(nothing unexpected). Once transformers is done (its non-persistent buffers, such as rotary tables, are
then computed on the target device), ``_process_model_after_weight_loading`` hands the meta-device model to
``codecllm.loader.load_into``, which puts the quantized modules in place and fills every tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .errors import CodecLLMError, FormatError, OutputExistsError

QUANT_METHOD = "codecllm"
WEIGHTS_FILE = "model.safetensors"  # the name transformers looks for first; the file is the .cllm unchanged


class NotSerializableError(CodecLLMError):
    """``save_pretrained`` was called on a model whose weights are codecllm modules."""


def _transformers():
    from transformers.quantizers import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    return HfQuantizer, QuantizationConfigMixin


def _define():
    HfQuantizer, QuantizationConfigMixin = _transformers()
    from .loader import MODES

    class CodecLLMConfig(QuantizationConfigMixin):
        """``quantization_config`` of a directory whose weights are a ``.cllm`` file.

        ``mode`` is the codecllm loading mode (``"resident"``, ``"stream"`` or ``"auto"``); ``file`` names the ``.cllm``
        in the directory (informative: transformers resolves the weights file itself).
        """

        def __init__(self, mode: str = "resident", file: str = WEIGHTS_FILE, **kwargs):
            self.quant_method = QUANT_METHOD
            self.mode = mode
            self.file = file
            self.post_init()

        def post_init(self):
            if self.mode not in MODES:
                raise CodecLLMError(f"quantization_config mode {self.mode!r} is not one of {', '.join(MODES)}")

    class CodecLLMQuantizer(HfQuantizer):
        """Loads a ``.cllm`` through ``from_pretrained``; the loading itself is ``codecllm.loader.load_into``."""

        requires_calibration = True  # refuses quantizing a float checkpoint on the fly: there is no such path

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.device = torch.device("cpu")
            self.device_map = None  # a map over several devices, which codecllm places itself
            self.dtype = None
            self.path = None
            self._hook = None

        def validate_environment(self, device_map=None, **kwargs):
            self.device, self.device_map = _devices(device_map)

        def update_device_map(self, device_map):
            # transformers would place "auto" and the like over the meta model's float sizes, and dispatch a
            # map of several devices with hooks that move float parameters: codecllm.loader places the
            # model itself (codecllm.placement); transformers sees one device
            return None if device_map is None else {"": self.device}

        def update_dtype(self, dtype):
            self.dtype = dtype
            return dtype

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            files = [f for f in checkpoint_files or [] if os.path.basename(f) != "adapter_model.safetensors"]
            if len(files) != 1:
                raise FormatError(f"a codecllm directory has one weights file ({WEIGHTS_FILE}), found {len(files)}")
            self.path = files[0]
            # transformers loads nothing: no key is missing (so none is materialized empty and re-initialized)
            # and every key of the file is left alone (so none is reported unexpected)
            self._hook = model.register_state_dict_post_hook(_empty_state_dict)
            model._keys_to_ignore_on_load_unexpected = {r"."}

        def _process_model_after_weight_loading(self, model, **kwargs):
            self._hook.remove()
            del model._keys_to_ignore_on_load_unexpected
            from .loader import load_into

            if self.device_map is None:
                load_into(model, self.path, device=self.device, mode=self.quantization_config.mode, dtype=self.dtype)
            else:
                load_into(model, self.path, device_map=self.device_map, mode=self.quantization_config.mode, dtype=self.dtype)
            # (stream layers that decode through ctypes do not compile; nor does a model over several devices,
            # whose modules run with their device current and inputs moved: untested under torch.compile)
            self.compiles = self.device_map is None and all(getattr(m, "compiles", True) for m in model.modules())
            _settle_ties(model)
            return model

        def is_serializable(self, safe_serialization=None):
            # transformers asks this only from save_pretrained; False would give a generic ValueError there
            raise NotSerializableError(
                "save_pretrained cannot write a codecllm model (its quantized modules would reload as random weights):"
                " keep the directory, or write a new one from the .cllm with codecllm.hf.write_hf_dir"
            )

        @property
        def is_trainable(self):
            return False

        @property
        def is_compileable(self):
            # generate() with a static cache compiles the forward: resident layers (and lossless fast stream
            # ones) are operators in the graph; other stream layers would run between graphs
            # (codecllm.qmodules.eager_only), slower than eager
            return getattr(self, "compiles", self.quantization_config.mode != "stream")

    return CodecLLMConfig, CodecLLMQuantizer


def _empty_state_dict(module, state_dict, prefix, local_metadata) -> None:
    state_dict.clear()


def _settle_ties(model) -> None:
    """The loader has tied what the file ties (one quantized tensor under several modules); transformers'
    ``tie_weights()`` would look for float ``weight`` parameters that no longer exist, so it has nothing to do."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            m._tied_weights_keys = None
            m.all_tied_weights_keys = {}


def _devices(device_map) -> tuple[torch.device, str | dict | None]:
    """The device transformers is told about, and the map codecllm places the model with (None: that
    one device), for a ``device_map`` as ``from_pretrained`` normalizes it (``codecllm.loader``'s rules)."""
    from .loader import _placement
    from .placement import gpus_of

    if device_map is None:
        return torch.device("cpu"), None
    placed = _placement(None, device_map, None)
    if isinstance(placed, torch.device):
        return placed, None
    if isinstance(placed, str):  # a policy, over the GPUs there are
        return torch.device("cuda", torch.cuda.current_device()), placed
    gpus = gpus_of(placed.values())
    return torch.device(gpus[0] if gpus else "cpu"), placed


CodecLLMConfig = CodecLLMQuantizer = None


def register() -> None:
    """Make ``quant_method: "codecllm"`` known to transformers (run by ``import codecllm``; idempotent)."""
    global CodecLLMConfig, CodecLLMQuantizer
    if CodecLLMConfig is not None:
        return
    from transformers.quantizers import register_quantization_config, register_quantizer

    CodecLLMConfig, CodecLLMQuantizer = _define()
    for reg, cls in ((register_quantization_config, CodecLLMConfig), (register_quantizer, CodecLLMQuantizer)):
        try:
            reg(QUANT_METHOD)(cls)
        except ValueError:  # already registered (the module was reloaded): keep the first
            pass


def write_hf_dir(cllm_path: str | os.PathLike, outdir: str | os.PathLike, mode: str = "resident", force: bool = False) -> Path:
    """A directory ``from_pretrained`` loads after ``import codecllm``: the embedded config (with
    ``quantization_config``), generation config and tokenizer files, and the ``.cllm`` as ``model.safetensors``
    (hard-linked where the file system allows, else copied)."""
    from .dtypes import FLOAT_DTYPES, torch_dtype
    from .format import CllmFile

    register()
    config_class = CodecLLMConfig(mode=mode)
    out = Path(outdir)
    weights = out / WEIGHTS_FILE
    if weights.exists() and not force:
        raise OutputExistsError(f"{weights} exists (overwrite not asked for)")
    with CllmFile(cllm_path) as f:  # the reader checks the file names and that config.json is there
        files = {name: f.read_file(name) for name in f.doc.files}
        config = f.config()
        stored = f.doc.model.get("dtype")
        if "dtype" not in config and "torch_dtype" not in config and stored in FLOAT_DTYPES:
            config["dtype"] = str(torch_dtype(stored)).removeprefix("torch.")  # else transformers guesses from U8
    config["quantization_config"] = config_class.to_dict()
    files["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    if weights.exists():
        weights.unlink()
    try:
        os.link(cllm_path, weights)
    except OSError:
        shutil.copyfile(cllm_path, weights)
    return out
