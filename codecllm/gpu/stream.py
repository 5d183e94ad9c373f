"""Stream mode on CUDA: weights stay compressed in GPU memory and are decoded just before use.

Decoding runs on a side stream into two workspaces used in turn, while the compute stream works on the
weights decoded before. The first forward runs layer by layer and records the order in which the stream
layers are called; after it, consecutive layers are packed into *units* that fill a workspace (each
workspace holds twice the largest layer), and each unit is decoded with one nvCOMP call. When a forward
reaches a unit, the next unit's decode starts in the other workspace. Events order the two streams: a
decode into a workspace waits for everything the compute stream had enqueued when the forward moved on
from that workspace (its matmuls, and the work between them and the next unit's first layer), and a
matmul waits for its decode. A layer called out of the recorded order decodes its own unit then, so results never depend
on the order guessed. Prefetches never cross the model's forward: each forward starts and ends with
both streams joined, so a forward can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DecodeError
from ..format import DTYPES, Record
from . import nvcomp
from .int8_matmul import RowMatmul, int8_linear

SLOTS = 2
ALIGN = 256


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Unit:
    """Consecutive stream layers decoded by one nvCOMP call, each at its offset in a workspace."""

    def __init__(self, layers: list["CudaStreamLinear"], table: nvcomp.ChunkTable, out_ptrs: list[torch.Tensor]):
        self.layers, self.table, self.out_ptrs = layers, table, out_ptrs


class StreamSchedule:
    """What all stream layers of one model share: the workspaces, the side stream that decodes into
    them, nvCOMP's temp buffer, the status and decoded-size arrays every decode writes its part of,
    and the units learned from the first forward."""

    def __init__(self):
        self.layers: list[CudaStreamLinear] = []
        self.workspaces: list[torch.Tensor] = []
        self.temp: torch.Tensor | None = None
        self.checks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (statuses, actual, expected)
        self.side: torch.cuda.Stream | None = None
        self.ready: list[torch.cuda.Event] = []  # decode into slot s done (side stream)
        self.freed: list[torch.cuda.Event] = []  # the compute stream is done with slot s (recorded when it moves on)
        self.freed_now: list[bool] = []  # whether ``freed[s]`` was recorded in this forward
        self.units: list[_Unit] = []
        self.unit_of: list[int] = []  # per layer: its unit, or -1
        self.order: list[int] | None = []  # the first forward's call order; None once units are built
        self.current: tuple[int, int] | None = None  # (unit or -(layer + 1), slot) the compute stream reads
        self.pending: tuple[int, int] | None = None  # (unit, slot) being prefetched

    def setup(self, device: torch.device) -> None:
        layers = self.layers
        self.workspace_bytes = 2 * max(_aligned(l.nbytes) for l in layers)
        self.workspaces = [torch.empty(self.workspace_bytes, dtype=torch.uint8, device=device) for _ in range(SLOTS)]
        self.temp = torch.empty(max(max(l.table.temp_bytes for l in layers), 1), dtype=torch.uint8, device=device)
        self.side = torch.cuda.Stream(device)
        self.ready = [torch.cuda.Event() for _ in range(SLOTS)]
        self.freed = [torch.cuda.Event() for _ in range(SLOTS)]
        self.unit_of = [-1] * len(layers)
        total = sum(l.table.num_chunks for l in layers)
        statuses = torch.zeros(total, dtype=torch.int32, device=device)
        actual = torch.zeros(total, dtype=torch.int64, device=device)
        self.checks.append((statuses, actual, torch.cat([l.table.out_sizes for l in layers])))
        pos = 0
        for l in layers:
            t = l.table
            t.statuses, t.actual = statuses[pos:pos + t.num_chunks], actual[pos:pos + t.num_chunks]
            pos += t.num_chunks
            l.alone = [t.out_table(ws.data_ptr(), l.chunk_size) for ws in self.workspaces]
            l.alone_weights = l.weights = [l.view(ws, 0) for ws in self.workspaces]
        self.begin_forward()

    # -- forward boundaries (hooks on the model) --

    def begin_forward(self, *_) -> None:
        self.end_forward()
        self.freed_now = [False] * SLOTS
        self.current = None

    def end_forward(self, *_) -> None:
        """Join the side stream's work into the compute stream (a prefetch nobody used included); after
        the first forward, build the units."""
        if self.pending is not None:
            torch.cuda.current_stream().wait_event(self.ready[self.pending[1]])
            self.pending = None
        if self.order:
            self._build_units()

    def _build_units(self) -> None:
        order, self.order = self.order, None
        seen: set[int] = set()
        unit: list[int] = []
        used = 0
        for i in order:
            if i in seen:
                continue
            seen.add(i)
            size = _aligned(self.layers[i].nbytes)
            if unit and used + size > self.workspace_bytes:
                self._add_unit(unit)
                unit, used = [], 0
            unit.append(i)
            used += size
        if unit:
            self._add_unit(unit)

    def _add_unit(self, idx: list[int]) -> None:
        layers = [self.layers[i] for i in idx]
        dev = self.workspaces[0].device
        n = sum(l.table.num_chunks for l in layers)
        statuses = torch.zeros(n, dtype=torch.int32, device=dev)
        actual = torch.zeros(n, dtype=torch.int64, device=dev)
        table = nvcomp.ChunkTable.concat([l.table for l in layers], statuses, actual)
        self.checks.append((statuses, actual, table.out_sizes))
        if table.temp_bytes > self.temp.numel():
            self.temp = torch.empty(table.temp_bytes, dtype=torch.uint8, device=dev)
        out_ptrs, offsets, pos = [], [], 0
        for l in layers:
            offsets.append(pos)
            pos += _aligned(l.nbytes)
        for ws in self.workspaces:
            out_ptrs.append(torch.cat([l.table.out_table(ws.data_ptr() + o, l.chunk_size) for l, o in zip(layers, offsets)]))
        u = len(self.units)
        for l, o, i in zip(layers, offsets, idx):
            l.weights = [l.view(ws, o) for ws in self.workspaces]
            self.unit_of[i] = u
        self.units.append(_Unit(layers, table, out_ptrs))

    # -- decoding --

    def _decode(self, slot: int, main: torch.cuda.Stream, table: nvcomp.ChunkTable, out_ptrs: torch.Tensor) -> None:
        """Enqueue a decode into ``slot`` on the side stream, after the last matmul that read it."""
        side = self.side
        if self.freed_now[slot]:
            side.wait_event(self.freed[slot])
        else:  # not used yet in this forward: after everything enqueued so far
            side.wait_stream(main)
        table.decode(self.temp, side, out_ptrs)
        self.ready[slot].record(side)

    def _free_slot(self, main: torch.cuda.Stream) -> int:
        """A slot to decode into now: not the one being read; any prefetch in flight is joined first."""
        if self.pending is not None:
            main.wait_event(self.ready[self.pending[1]])
            self.pending = None
        return 0 if self.current is None else 1 - self.current[1]

    def weight_for(self, layer: "CudaStreamLinear") -> torch.Tensor:
        """``layer``'s decoded weight, ready for the compute stream; starts the next unit's decode."""
        i = layer.index
        u = self.unit_of[i]
        current = self.current
        if current is not None and current[0] == (u if u >= 0 else -(i + 1)):
            return layer.weights[current[1]]
        main = torch.cuda.current_stream()
        if current is not None:  # every matmul reading the current slot is enqueued: it may be refilled after them
            self.freed[current[1]].record(main)
            self.freed_now[current[1]] = True
        if u < 0:  # no unit yet (the first forward) or a layer outside the recorded order: alone
            if self.order is not None:
                self.order.append(i)
            slot = self._free_slot(main)
            self._decode(slot, main, layer.table, layer.alone[slot])
            main.wait_event(self.ready[slot])
            self.current = (-(i + 1), slot)
            return layer.alone_weights[slot]
        if self.pending is not None and self.pending[0] == u:
            slot = self.pending[1]
            self.pending = None
        else:
            slot = self._free_slot(main)
            self._decode(slot, main, self.units[u].table, self.units[u].out_ptrs[slot])
        main.wait_event(self.ready[slot])
        self.current = (u, slot)
        if u + 1 < len(self.units):
            nxt = self.units[u + 1]
            self._decode(1 - slot, main, nxt.table, nxt.out_ptrs[1 - slot])
            self.pending = (u + 1, 1 - slot)
        return layer.weights[slot]

    def check(self) -> None:
        """Raise if any decode since load reported an error or a wrong size (synchronizes once)."""
        if not self.checks:
            return
        flags = [((s != 0) | (a != e)) for s, a, e in self.checks]
        if not bool(torch.stack([f.any() for f in flags]).any().item()):
            return
        for (s, a, e), f in zip(self.checks, flags):
            if f.any():
                idx = int(torch.nonzero(f)[0])
                status = int(s[idx])
                raise DecodeError(
                    f"nvCOMP failed to decode a streamed weight (chunk {idx}: status "
                    f"{nvcomp.STATUS_NAMES.get(status, status)}, {int(a[idx])} of {int(e[idx])} bytes)"
                )


class CudaStreamLinear(nn.Module):
    """A Linear layer whose weight stays compressed in GPU memory and is decoded before use into a
    workspace it shares with the model's other stream layers (see ``StreamSchedule``)."""

    def __init__(self, table: nvcomp.ChunkTable, rec: Record, scale: torch.Tensor | None, bias, schedule: StreamSchedule):
        super().__init__()
        self.out_features, self.in_features = rec.shape
        self.table = table
        self.scheme = rec.scheme
        self.encoded_dtype = DTYPES[rec.encoded_dtype][0]
        self.nbytes = rec.encoded_nbytes
        self.chunk_size = rec.chunk_size
        self.schedule = schedule
        self.register_buffer("payload", table.comp, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.bias = bias
        self.alone: list[torch.Tensor] = []  # per slot: output pointers when decoded alone (offset 0)
        self.alone_weights: list[torch.Tensor] = []  # per slot: the weight's view when decoded alone
        self.weights: list[torch.Tensor] = []  # per slot: the weight's view where its unit puts it
        self.rows: dict[int, RowMatmul] = {}  # id(weight view) -> its prepared one-row matmul
        self.index = len(schedule.layers)
        schedule.layers.append(self)

    def view(self, workspace: torch.Tensor, offset: int) -> torch.Tensor:
        return workspace[offset:offset + self.nbytes].view(self.encoded_dtype).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.schedule.weight_for(self)
        if self.scheme != "int8":
            return F.linear(x, w.to(x.dtype), self.bias)
        if x.numel() != self.in_features:
            return int8_linear(x, w, self.scale, self.bias)
        row = self.rows.get(id(w))
        if row is None or row.scale is not self.scale or row.bias is not self.bias:
            row = self.rows[id(w)] = RowMatmul(w, self.scale, self.bias)
        return row(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.scheme}+{self.table.algo.name} on GPU")
