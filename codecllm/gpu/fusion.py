"""Linear layers that read the same input run as one kernel launch at decode time.

In a decode step every matmul is short (a few microseconds) and costs nearly as much in launch and
ramp-up as in reading weights. Attention's q/k/v projections read the same hidden state, and so do an
MLP's gate and up projections. Which layers share an input is learned, not assumed from names: during a
model's first forward every int8 layer notes the tensor it was called with, and runs of consecutive
calls on the very same tensor (same object, unmodified) become groups of up to three. From then on, for
one-token inputs the first layer of a group computes the whole group in one launch and keeps the other
outputs for their layers, which return them when called with that same unmodified input; a layer
called with anything else computes its own output as usual, so results never depend on the guess.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules import Int8Linear
from .int8_matmul import int8_linear_group

MAX_GROUP = 3


class SiblingFusion:
    def __init__(self, layers: list[Int8Linear]):
        self.layers = layers
        self.learning = True
        self.run_: list[Int8Linear] = []  # while learning: the current run of calls on one input
        self.last: tuple[torch.Tensor, int] | None = None  # while learning: the last call's input
        self.groups: dict[int, list[Int8Linear]] = {}  # id(first layer) -> the group's layers
        self.kept: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id(layer) -> (input, version, output)
        for layer in layers:
            layer.runner = self.run

    def run(self, layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
        if self.learning:
            self._observe(layer, x)
            return layer.plain(x)
        kept = self.kept.pop(id(layer), None)
        if kept is not None and kept[0] is x and kept[1] == x._version:
            return kept[2]
        group = self.groups.get(id(layer))
        if group is None or x.numel() != x.shape[-1]:
            return layer.plain(x)
        outs = int8_linear_group(x, [m.qweight for m in group], [m.scale for m in group],
                                 [m.bias for m in group] if group[0].bias is not None else None)
        for member, y in zip(group[1:], outs[1:]):
            self.kept[id(member)] = (x, x._version, y)
        return outs[0]

    def _observe(self, layer: Int8Linear, x: torch.Tensor) -> None:
        run = self.run_
        same = self.last is not None and self.last[0] is x and self.last[1] == x._version
        if same and run and len(run) < MAX_GROUP and layer not in run and _fusable(run[0], layer):
            run.append(layer)
        else:
            self._close()
            self.run_ = [layer]
        self.last = (x, x._version)

    def learn(self, *_) -> None:
        """After the first forward: the runs of consecutive calls on one unmodified input are the groups."""
        if self.learning:
            self._close()
            self.learning, self.last = False, None

    def _close(self) -> None:
        run, self.run_ = self.run_, []
        if len(run) > 1 and id(run[0]) not in self.groups:
            self.groups[id(run[0])] = run


def _fusable(a: Int8Linear, b: Int8Linear) -> bool:
    return (a.in_features == b.in_features and (a.bias is None) == (b.bias is None)
            and all(m.qweight.is_contiguous() for m in (a, b)) and a.qweight.device == b.qweight.device
            and (a.bias is None or a.bias.dtype == b.bias.dtype))


def install(model: nn.Module) -> SiblingFusion | None:
    """Let the model's CUDA int8 layers learn their groups in the next forward."""
    layers = [m for m in model.modules() if type(m) is Int8Linear and m.qweight.is_cuda]
    if len(layers) < 2:
        return None
    fusion = SiblingFusion(layers)
    model.register_forward_hook(fusion.learn)
    return fusion
