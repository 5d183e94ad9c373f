"""Linear layers that read the same input run as one kernel launch at decode time.

In a decode step every matmul is short (a few microseconds) and costs nearly as much in launch and
ramp-up as in reading weights. Attention's q/k/v projections read the same hidden state, and so do an
MLP's gate and up projections. Which layers share an input is learned, not assumed from names: during a
model's first forward every fusable (int8 or int4) layer notes the tensor it was called with, and runs of consecutive
calls on the very same tensor (same object, unmodified) become groups of up to three.

A group's weights must form one ``[sum of N, K]`` matrix. The GPU loader decodes weights in the model's
parameter order, so the weights of one block's q/k/v (or gate/up) lie back to back in its arena and the
group's matrix is a view of them; where each member owns its weight instead, they are moved into one
tensor (memory stays the same). Scales (and int4's zero points) and biases are copied into one tensor
each, and every member's tensors become views of the group's; the originals stay in the loader's arena of
small parts, which the other layers' views keep alive: a group's small parts are held twice (int8: 4
bytes per output row; int4 at group size 64: 1/16 byte per weight, about 7% over its codes on the
grouped layers). Otherwise the run is left unfused.

From then on, for inputs of up to ``MAX_ROWS`` rows (decode steps, batched or not, and short prompts) the
first layer of a group computes the whole group in one launch and keeps the other outputs (views of the
group's output) for their layers, which return them when called with that same unmodified input; a layer
called with anything else computes its own output as usual, so results never depend on the guess. Longer
inputs (prefill) run layer by layer: their matmuls are long enough that a launch is not worth saving.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..qmodules import QuantizedWeight

MAX_GROUP = 3
MAX_ROWS = 64  # rows of input up to which a group runs as one launch


class _Group:
    def __init__(self, layers: list[nn.Module], matmul: Callable[[torch.Tensor], torch.Tensor]):
        self.layers, self.matmul = layers, matmul
        self.sizes = [m.out_features for m in layers]
        self.traced_outs: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    def traced(self, layer: nn.Module, x: torch.Tensor, op) -> torch.Tensor:
        """Under ``torch.compile``: the group's first layer computes the whole group with one ``op(x, src)``
        call, ``src`` the group's matmul (holding the joined tensors) instead of a layer;
        the others take their slices when called on that same input, later in the same traced forward (the
        last one clears them, so that nothing outlives the trace). Any other call computes on its own."""
        i = self.layers.index(layer)
        if i == 0:
            outs = list(op(x, self.matmul).split(self.sizes, dim=-1))
            self.traced_outs = (x, outs)
            return outs[0]
        kept = self.traced_outs
        if kept is not None and kept[0] is x:
            if i == len(self.layers) - 1:
                self.traced_outs = None
            return kept[1][i]
        return op(x, layer)


class FusableLinear:
    """Mixin for a CUDA stand-in whose kernel fusion may group with its siblings: the forward every such
    layer shares. The class provides ``op(x, src)`` (its custom operator on the tensors of ``src``, the
    layer itself or its group's matmul), ``plain(x)`` (the layer alone, eagerly), ``can_fuse`` and
    ``join``. Under ``torch.compile`` the graph sees the operator (a group's first layer calls it once
    for the group on up to ``MAX_ROWS`` rows: ``_Group.traced``); eager calls go through the fusion runner, once one is
    installed, or ``plain``. A float weight assigned after load computes as a plain Linear."""

    fusable = True
    runner = None  # set by ``SiblingFusion`` to run this layer together with its siblings
    group = None  # the sibling group it joined

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if type(self._parameters["weight"]) is not QuantizedWeight:
                return super().forward(x)
            if self.group is not None and x.numel() <= MAX_ROWS * self.in_features:
                return self.group.traced(self, x, self.op)
            return self.op(x, self)
        if self.runner is not None:
            return self.runner(self, x)
        return self.plain(x)


class SiblingFusion:
    """Learns groups among layers that are ``fusable`` (``FusableLinear``: the int8 and int4 CUDA stand-ins)."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.learning = True
        self.run_: list[nn.Module] = []  # while learning: the current run of calls on one input
        self.last: tuple[torch.Tensor, int] | None = None  # while learning: the last call's input
        self.groups: dict[int, _Group] = {}  # id(first layer) -> its group
        self.grouped: set[int] = set()  # id() of every layer in a group: a layer joins one group at most
        self.kept: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id(layer) -> (input, version, output)
        for layer in layers:
            layer.runner = self.run

    def run(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.learning:
            self._observe(layer, x)
            return layer.plain(x)
        kept = self.kept.pop(id(layer), None)
        if kept is not None and kept[0] is x and kept[1] == x._version:
            return kept[2]
        group = self.groups.get(id(layer))
        if group is None or x.numel() > MAX_ROWS * x.shape[-1]:
            return layer.plain(x)
        outs = group.matmul(x).split(group.sizes, dim=-1)
        version = x._version
        for member, y in zip(group.layers[1:], outs[1:]):
            self.kept[id(member)] = (x, version, y)
        return outs[0]

    def _observe(self, layer: nn.Module, x: torch.Tensor) -> None:
        run = self.run_
        same = self.last is not None and self.last[0] is x and self.last[1] == x._version
        if same and run and len(run) < MAX_GROUP and layer not in run and run[0].can_fuse(layer):
            run.append(layer)
        else:
            self._close()
            self.run_ = [layer]
        self.last = (x, x._version)

    def flush(self) -> None:
        """While learning: close the run of calls seen so far (its layers' tensors are about to change:
        an offloaded module's staging buffer is refilled, ``codecllm.placement``)."""
        if self.learning:
            self._close()

    def learn(self, *_) -> None:
        """After the first forward: the runs of consecutive calls on one unmodified input are the groups."""
        if self.learning and not torch.compiler.is_compiling():  # a compiled forward calls no runner
            self._close()
            self.learning, self.last = False, None

    def _close(self) -> None:
        run, self.run_ = self.run_, []
        if len(run) > 1 and not any(id(m) in self.grouped for m in run):
            matmul = type(run[0]).join(run)
            if matmul is not None:
                group = self.groups[id(run[0])] = _Group(run, matmul)
                for m in run:
                    m.group = group
                self.grouped.update(id(m) for m in run)


def install(model: nn.Module) -> SiblingFusion | None:
    """Let the model's fusable CUDA layers learn their groups in the next forward."""
    layers = [m for m in model.modules() if getattr(m, "fusable", False) and m.device.type == "cuda"]
    if len(layers) < 2:
        return None
    fusion = SiblingFusion(layers)
    model.register_forward_hook(fusion.learn)
    return fusion
