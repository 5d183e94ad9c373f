"""What a model is made of, read from its config alone: an empty (meta) instance of its transformers class,
which Linear and Embedding weights it has and which parameters are tied. The converter uses it to choose
what to quantize; the loader uses it to rebuild the model without allocating any weight twice.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import CodecLLMError
from .schemes import Scheme, float_modules


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


def walk(model: nn.Module, keep: Callable[[nn.Module, str], bool]) -> Iterator[tuple[str, nn.Module]]:
    """The one walker over a model: ``(qualified name, module)`` for every module ``keep(module, name)``
    accepts (torchao's ``filter_fn`` convention)."""
    for name, module in model.named_modules():
        if keep(module, name):
            yield name, module


def stand_in_modules(module: nn.Module, name: str) -> bool:
    """The filter of modules some scheme has a stand-in for, subclasses included (a subclass keeps its
    own forward and gets the stand-in's ``weight``: see ``loader._place``)."""
    return isinstance(module, float_modules())


@dataclass
class ModelPlan:
    """A model's tensors by role. ``tied`` maps each tied parameter name to the sorted names sharing it."""

    modules: dict[str, tuple[str, nn.Module]] = field(default_factory=dict)  # weight name -> (module name, module)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every parameter and buffer
    parameters: list[str] = field(default_factory=list)
    tied: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sensitive: set[str] = field(default_factory=set)
    finer: set[str] = field(default_factory=set)

    def matches(self, pattern: str) -> bool:
        """Whether glob ``pattern`` names any module a scheme could quantize."""
        return any(fnmatch.fnmatchcase(m, pattern) for m, _ in self.modules.values())

    def scheme_for(self, name: str, w: torch.Tensor, scheme: Scheme, skip: tuple[str, ...], quantize_sensitive: bool = False,
                   overrides: tuple[tuple[str, Scheme], ...] = ()) -> Scheme | None:
        """The scheme instance for tensor ``name`` (and every parameter tied to it), or None: keep it exact.
        ``overrides`` are (module glob, scheme) pairs: the last one matching any of the tied modules wins,
        over the edge rule too (a scheme that cannot store the weight keeps it exact). Unless
        ``quantize_sensitive``, the edge weights stay exact and the ``finer`` ones take ``scheme.finer()``."""
        group = self.tied.get(name, (name,))
        if not all(n in self.modules for n in group):
            return None
        modules = [self.modules[n] for n in group]
        if any(fnmatch.fnmatchcase(m, pat) for m, _ in modules for pat in skip):
            return None
        chosen_override = [s for pat, s in overrides if any(fnmatch.fnmatchcase(m, pat) for m, _ in modules)]
        if chosen_override:
            scheme = chosen_override[-1]
            if scheme.lossless:  # stores any tensor as it is
                return scheme
        elif not quantize_sensitive and any(n in self.sensitive for n in group):
            return None
        elif not quantize_sensitive and any(n in self.finer for n in group):
            scheme = scheme.finer()
        chosen = {scheme.for_module(mod) for _, mod in modules}
        if len(chosen) != 1:
            return None
        s = chosen.pop()
        ok = all(s.applies_to(mod, "weight", tuple(w.shape), w.is_floating_point()) for _, mod in modules)
        return s if ok else None


def plan(model: nn.Module) -> ModelPlan:
    p = ModelPlan()
    for mname, module in walk(model, stand_in_modules):
        p.modules[f"{mname}.weight" if mname else "weight"] = (mname, module)
    p.sensitive = _edge_outputs(model)
    p.finer = _finer_weights(model)
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
        p.shapes[name] = tuple(param.shape)
        p.parameters.append(name)
    for name, buf in model.named_buffers(remove_duplicate=False):
        p.shapes[name] = tuple(buf.shape)
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
        linears = [names[id(m)] for m in block.modules() if type(m) in float_modules() and not isinstance(m, nn.Embedding)]
        if linears:
            out.add(f"{linears[-1]}.weight")
    return out


VALUE_PROJECTIONS = ("v_proj", "value", "v")  # Llama, Qwen2, Gemma, BART...; BERT; T5


def _finer_weights(model: nn.Module) -> set[str]:
    """The input embedding table (with a tied LM head, the output one too) and the attention value
    projections: the weights a low-bit scheme gives more precision (``Scheme.finer``), as llama.cpp's
    Q4_K_M gives ``token_embd`` and ``attn_v`` more bits. On SmolLM2-135M at int4 g64 (edge projections
    exact), group size 32 on these two kinds took mean KL from 0.249 to 0.150 for +0.1 bits per weight;
    the embedding alone to 0.214, ``v_proj`` alone at int8 to 0.189 (measured with 12 clipping factors; with
    today's 8, 0.143)."""
    out = set()
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    for name, module in model.named_modules():
        if module is emb or (isinstance(module, tuple(float_modules())) and not isinstance(module, nn.Embedding)
                             and name.rpartition(".")[2] in VALUE_PROJECTIONS):
            out.add(f"{name}.weight")
    return out
