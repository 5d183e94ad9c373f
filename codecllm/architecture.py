"""What a model is made of, read from its config alone: an empty (meta) instance of its transformers class,
which Linear and Embedding weights it has and which parameters are tied. The converter uses it to choose
what to quantize; the loader uses it to rebuild the model without allocating any weight twice.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .errors import CodecLLMError


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create modules with their parameters on the meta device and their buffers where they are computed
    (rotary tables and the like are built in ``__init__`` and stored nowhere else)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def make_config(config: dict[str, Any]):
    import transformers

    model_type = config.get("model_type")
    try:
        config_class = transformers.CONFIG_MAPPING[model_type]
    except KeyError:
        raise CodecLLMError(f"model_type {model_type!r} is not known to transformers {transformers.__version__}") from None
    return config_class.from_dict(dict(config))


def model_class(config) -> type:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    archs = getattr(config, "architectures", None)
    raise CodecLLMError(f"config architectures {archs!r} name no transformers model class (transformers {transformers.__version__})")


def empty_model(config_dict: dict[str, Any], dtype: torch.dtype | None = None) -> nn.Module:
    """An instance of the config's model class whose parameters are all on the meta device."""
    config = make_config(config_dict)
    cls = model_class(config)
    with parameters_on_meta():
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = cls._from_config(config, **kwargs)
    model.eval()
    return model


@dataclass
class ModelPlan:
    """Parameter names by role. ``tied`` maps each tied parameter name to the sorted names sharing it."""

    linear_weights: dict[str, str] = field(default_factory=dict)  # weight name -> module name
    embedding_weights: dict[str, str] = field(default_factory=dict)
    tied: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sensitive: set[str] = field(default_factory=set)

    def quantizable(self, name: str, skip: tuple[str, ...], quantize_sensitive: bool = False) -> bool:
        """Whether weight ``name`` (and every parameter tied to it) may be quantized per output channel."""
        group = self.tied.get(name, (name,))
        if not quantize_sensitive and any(n in self.sensitive for n in group):
            return False
        if not all(n in self.linear_weights or n in self.embedding_weights for n in group):
            return False
        modules = [self.linear_weights.get(n) or self.embedding_weights[n] for n in group]
        return not any(fnmatch.fnmatchcase(m, pat) for m in modules for pat in skip)


def plan(model: nn.Module) -> ModelPlan:
    p = ModelPlan()
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear):
            p.linear_weights[f"{mname}.weight" if mname else "weight"] = mname
        elif isinstance(module, nn.Embedding):
            p.embedding_weights[f"{mname}.weight" if mname else "weight"] = mname
    p.sensitive = _edge_outputs(model)
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    for names in by_id.values():
        if len(names) > 1:
            group = tuple(sorted(names))
            for n in names:
                p.tied[n] = group
    return p


def _edge_outputs(model: nn.Module) -> set[str]:
    """The weight of the last Linear (the MLP's output projection: ``down_proj``, ``fc2``, ``output.dense``)
    in the first and the last block of the model's longest stack of blocks.

    Those two feed the residual stream at its most sensitive points; on SmolLM2-135M, int8 on them alone
    costs about half of the whole model's int8 perplexity loss (0.64% -> 0.32% when kept), for about 1% of
    the file. llama.cpp's quantization mixes give the same tensors more bits for the same reason.
    """
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not stacks:
        return set()
    blocks = max(stacks, key=len)
    names = {id(m): n for n, m in model.named_modules()}
    out = set()
    for block in (blocks[0], blocks[-1]):
        linears = [names[id(m)] for m in block.modules() if isinstance(m, nn.Linear)]
        if linears:
            out.add(f"{linears[-1]}.weight")
    return out
