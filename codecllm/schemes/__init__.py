"""Quantization schemes: a registry of schemes with stable string ids. A scheme owns everything it means:
its parameters and their validation, ``quantize`` (the CPU reference) and ``dequantize``, the encoded
layout (the name, dtype and shape of every part it stores: codes, scales, zero points...) and the modules
that stand in for a float module on each backend, registered with ``register_module``.

The format reader, the converter, the loader, the stream layers, fusion and dump ask the scheme; none of
them tests a scheme id. Adding a scheme means adding one module here (and its kernels), nothing else.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import CodecLLMError, UnknownSchemeError


@dataclass(frozen=True)
class PartSpec:
    """One encoded part of a tensor: its dtype (a safetensors dtype string) and shape."""

    dtype: str
    shape: tuple[int, ...]


class Scheme:
    """Base class. A subclass sets ``id`` and ``lossless`` and implements ``layout``, ``quantize`` and
    ``dequantize``; an instance carries validated parameters (``params`` is what the header stores).

    ``main_part`` names the part that holds the bulk of the bytes: the one stream mode keeps compressed."""

    id: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    default: ClassVar[bool] = False  # the converter's default scheme (exactly one registered scheme says so)
    weighs_inputs: ClassVar[bool] = False  # whether quantize() uses an importance (the converter estimates one only then)
    # whether quantize() does enough arithmetic per weight for torch's threads to pay (a search, or float32
    # passes over large blocks); the converter runs every other step on one torch thread, beside the codec's
    # own threads
    parallel_quantize: ClassVar[bool] = False
    main_part: ClassVar[str] = "data"
    # whether ``dequantize`` builds a new tensor that keeps none of the parts (a loader may then decode them
    # into scratch memory, not beside the weights)
    parts_are_scratch: ClassVar[bool] = False
    # float module class -> {backend: stand-in class, or "module:Class" imported on first use}
    modules: ClassVar[dict[type, dict[str, Any]]] = {}

    def __init__(self, **params: Any):
        if params:
            raise CodecLLMError(f"scheme {self.id!r} takes no parameter {sorted(params)[0]!r}")

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params == self.params

    def __hash__(self) -> int:
        return hash((self.id, tuple(sorted(self.params.items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.id}({args})" if args else self.id

    # -- what the converter may apply it to --

    def applies_to(self, module: nn.Module, param: str, tensor_shape: tuple[int, ...], float_tensor: bool) -> bool:
        """Whether this scheme can store parameter ``param`` of ``module`` (a weight of that shape)."""
        return True

    def for_module(self, module: nn.Module) -> "Scheme":
        """The scheme instance to use for ``module``'s weight (a scheme may set a parameter from the
        module's layout, such as a transposed weight)."""
        return self

    def finer(self) -> "Scheme":
        """The variant for the weights that deserve more precision than the rest (the token embedding and
        the attention value projections: ``ModelPlan.finer``), or the scheme itself."""
        return self

    # -- the layout and the math --

    def layout(self, dtype: str, shape: tuple[int, ...]) -> dict[str, PartSpec]:
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The parts of ``w``. ``importance`` (``[in features]``, positive, or None) weighs the squared error
        of each input channel, where the scheme has choices to make (``weighs_inputs``)."""
        raise NotImplementedError

    def dequantize(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def embedding(self, parts: dict[str, torch.Tensor], ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of the weight, as an embedding lookup gives them (a scheme may gather encoded rows
        instead of dequantizing the whole table)."""
        return torch.nn.functional.embedding(ids, self.dequantize(parts, dtype))

    # -- the modules that stand in --

    @classmethod
    def stand_in(cls, module: nn.Module, backend: str, exact: bool = True, dtype: str | None = None) -> type | None:
        """The class standing in for ``module``'s exact class on ``backend``, or None. With
        ``exact=False``, also for a subclass (its nearest registered base class): the loader then keeps
        the subclass, whose own forward may differ, and gives it only the stand-in's ``weight``.
        ``dtype`` is the stored tensor's dtype (a safetensors dtype string), where the caller knows it."""
        kinds = [type(module)] if exact else [t for t in type(module).__mro__ if t in cls.modules]
        for kind in kinds:
            entry = cls.modules.get(kind, {}).get(backend)
            if isinstance(entry, str):
                mod, _, name = entry.partition(":")
                entry = cls.modules[kind][backend] = getattr(importlib.import_module(mod), name)
            if entry is not None:
                return entry
        return None


def keep_lower_error(best: tuple[torch.Tensor, ...], cand: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """For quantizers that search per group: of two candidates, tuples of per-group tensors whose last is
    the error, the one with the lower error in each group (``best``'s on a tie)."""
    m = cand[-1] < best[-1]
    return tuple(torch.where(m, c, b) for c, b in zip(cand, best))


def register_module(scheme: type[Scheme], float_class: type, backend: str, stand_in: Any) -> None:
    """Register the class (or a lazy ``"module:Class"`` path) standing in for ``float_class`` on
    ``backend`` ("cpu", "cuda") in files of ``scheme``."""
    if "modules" not in scheme.__dict__:
        scheme.modules = {}
    scheme.modules.setdefault(float_class, {})[backend] = stand_in


_REGISTRY: dict[str, type[Scheme]] = {}
ALIASES: dict[str, str] = {}


def register(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: register scheme ``cls`` under ``cls.id``."""
    if cls.id in _REGISTRY:
        raise ValueError(f"scheme id {cls.id!r} registered twice")
    _REGISTRY[cls.id] = cls
    return cls


def scheme_class(scheme_id: Any) -> type[Scheme]:
    if isinstance(scheme_id, str) and scheme_id in _REGISTRY:
        return _REGISTRY[scheme_id]
    raise UnknownSchemeError(f"unknown quantization scheme id {scheme_id!r} (known: {', '.join(sorted(_REGISTRY))})")


def get_scheme(scheme_id: Any, params: dict[str, Any] | None = None) -> Scheme:
    """A scheme instance; ``CodecLLMError`` if the id is unknown or a parameter is invalid."""
    cls = scheme_class(scheme_id)
    try:
        return cls(**(params or {}))
    except TypeError as e:
        raise CodecLLMError(f"scheme {scheme_id!r}: {e}") from None


def parse_scheme(spec: str) -> Scheme:
    """A scheme from its command-line spelling: an id, then ``:gN`` for a group size (``int4:g32``)."""
    sid, _, rest = str(spec).partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        if item.startswith("g") and item[1:].isdecimal() and item[1:].isascii() and "group_size" not in params:
            params["group_size"] = int(item[1:])
        else:
            raise CodecLLMError(f"scheme {spec!r}: {item!r} is not a parameter (a group size is written gN, as in int4:g64)")
    return get_scheme(sid, params)


def scheme_ids() -> list[str]:
    return sorted(_REGISTRY)


def default_scheme_id() -> str:
    return next(k for k, cls in _REGISTRY.items() if cls.default)


def float_modules() -> tuple[type, ...]:
    """Every float module class some scheme has a stand-in for (what the walker looks at)."""
    out: list[type] = []
    for cls in _REGISTRY.values():
        for t in cls.modules:
            if t not in out:
                out.append(t)
    return tuple(out)


# the schemes this package ships
from . import int4, int8, lossless, none  # noqa: E402,F401
