"""Linear layers that read the same input run as one kernel launch at decode time.

In a decode step every matmul is short (a few microseconds) and costs nearly as much in launch and
ramp-up as in reading weights. Attention's q/k/v projections read the same hidden state, and so do an
MLP's gate and up projections. Which layers share an input is learned, not assumed from names: during a
model's first forward every int8 layer notes the tensor it was called with, and runs of consecutive
calls on the very same tensor (same object, unmodified) become groups of up to three.

A group's weights must form one ``[sum of N, K]`` matrix. The GPU loader decodes weights in the model's
parameter order, so the weights of one block's q/k/v (or gate/up) lie back to back in its arena and the
group's matrix is a view of them; where each member owns its weight instead, they are moved into one
tensor (memory stays the same). Scales and biases are moved into one tensor each, and every member's
tensors become views of the group's. Otherwise the run is left unfused.

From then on, for one-token inputs the first layer of a group computes the whole group in one launch and
keeps the other outputs for their layers, which return them when called with that same unmodified input;
a layer called with anything else computes its own output as usual, so results never depend on the guess.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules import Int8Linear
from .int8_matmul import RowMatmul

MAX_GROUP = 3


class _Group:
    def __init__(self, layers: list[Int8Linear], matmul: RowMatmul):
        self.layers, self.matmul = layers, matmul
        self.sizes = [m.out_features for m in layers]


class SiblingFusion:
    def __init__(self, layers: list[Int8Linear]):
        self.layers = layers
        self.learning = True
        self.run_: list[Int8Linear] = []  # while learning: the current run of calls on one input
        self.last: tuple[torch.Tensor, int] | None = None  # while learning: the last call's input
        self.groups: dict[int, _Group] = {}  # id(first layer) -> its group
        self.grouped: set[int] = set()  # id() of every layer in a group: a layer joins one group at most
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
        outs = group.matmul(x).split(group.sizes, dim=-1)
        version = x._version
        for member, y in zip(group.layers[1:], outs[1:]):
            self.kept[id(member)] = (x, version, y)
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
        if len(run) > 1 and not any(id(m) in self.grouped for m in run):
            group = _join(run)
            if group is not None:
                self.groups[id(run[0])] = group
                self.grouped.update(id(m) for m in run)


def _fusable(a: Int8Linear, b: Int8Linear) -> bool:
    return (a.in_features == b.in_features and (a.bias is None) == (b.bias is None)
            and all(m.qweight.is_contiguous() for m in (a, b)) and a.qweight.device == b.qweight.device
            and (a.bias is None or a.bias.dtype == b.bias.dtype))


def _join(run: list[Int8Linear]) -> _Group | None:
    """Give the layers of ``run`` one weight, scale and bias tensor each (theirs become views), or None."""
    ws = [m.qweight for m in run]
    rows, k = sum(w.shape[0] for w in ws), ws[0].shape[1]
    storage = ws[0].untyped_storage().data_ptr()
    if all(b.untyped_storage().data_ptr() == storage and b.data_ptr() == a.data_ptr() + a.nbytes for a, b in zip(ws, ws[1:])):
        weight = ws[0].as_strided((rows, k), (k, 1))  # back to back already
    elif all(w.untyped_storage().nbytes() == w.nbytes for w in ws):
        weight = torch.cat(ws)  # each member's own weight is freed once it points here
    else:
        return None
    scale = torch.cat([m.scale for m in run])
    bias = torch.cat([m.bias.detach() for m in run]) if run[0].bias is not None else None
    start = 0
    for m in run:
        end = start + m.out_features
        m.qweight, m.scale = weight[start:end], scale[start:end]
        if bias is not None:
            m.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return _Group(run, RowMatmul(weight, scale, bias))


def install(model: nn.Module) -> SiblingFusion | None:
    """Let the model's CUDA int8 layers learn their groups in the next forward."""
    layers = [m for m in model.modules() if type(m) is Int8Linear and m.qweight.is_cuda]
    if len(layers) < 2:
        return None
    fusion = SiblingFusion(layers)
    model.register_forward_hook(fusion.learn)
    return fusion
