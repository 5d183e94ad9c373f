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
from torch import nn

from ..dtypes import torch_dtype
from ..errors import DecodeError
from ..qmodules import eager_only, payload_bytes
from . import nvcomp

SLOTS = 2
ALIGN = 256


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Unit:
    """Consecutive stream layers decoded by one nvCOMP call, each at its offset in a workspace."""

    def __init__(self, layers: list["CudaStream"], table: nvcomp.ChunkTable, out_ptrs: list[torch.Tensor]):
        self.layers, self.table, self.out_ptrs = layers, table, out_ptrs


class StreamSchedule:
    """What all stream layers of one model share: the workspaces, the side stream that decodes into
    them, nvCOMP's temp buffer, the status and decoded-size arrays every decode writes its part of,
    and the units learned from the first forward."""

    def __init__(self):
        self.layers: list[CudaStream] = []
        self.workspaces: list[torch.Tensor] = []
        self.temp: torch.Tensor | None = None
        # every decode writes its chunks' statuses and decoded sizes into these (the first half for layers
        # decoded alone, the second for units), checked against ``expected``
        self.statuses = self.actual = self.expected = None
        self.unit_pos = 0
        self.side: torch.cuda.Stream | None = None
        self.ready: list[torch.cuda.Event] = []  # decode into slot s done (side stream)
        self.freed: list[torch.cuda.Event] = []  # the compute stream is done with slot s (recorded when it moves on)
        self.freed_now: list[bool] = []  # whether ``freed[s]`` was recorded in this forward
        self.units: list[_Unit] = []
        self.unit_of: list[int] = []  # per layer: its unit, or -1
        self.order: list[int] | None = []  # the first forward's call order; None once units are built
        self.current: tuple[int, int] | None = None  # (unit or -(layer + 1), slot) the compute stream reads
        self.pending: tuple[int, int] | None = None  # (unit, slot) being prefetched
        self.device: torch.device | None = None

    def finish(self, model: nn.Module, device: torch.device) -> None:
        """After load: pack the compressed payloads into one allocation, set up the workspaces, decode
        every streamed weight once (a bad one fails the load) and hook the model's forward."""
        layers = self.layers
        if not layers:
            return
        packed = torch.empty(sum(aligned(l.table.comp.numel()) for l in layers), dtype=torch.uint8, device=device)
        pos = 0
        for l in layers:
            n = l.table.comp.numel()
            l.table.rebase(packed[pos:pos + n])
            l.payload = l.table.comp
            pos += aligned(n)
        self.setup(device)
        for l in layers:
            l.table.decode(self.temp, out_ptrs=l.alone[0])
        self.check()
        model.register_forward_pre_hook(eager_only(self.begin_forward))
        model.register_forward_hook(eager_only(self.end_forward))

    def setup(self, device: torch.device) -> None:
        self.device = device
        layers = self.layers
        self.workspace_bytes = 2 * max(aligned(l.nbytes) for l in layers)
        self.workspaces = [torch.empty(self.workspace_bytes, dtype=torch.uint8, device=device) for _ in range(SLOTS)]
        self.temp = torch.empty(max(max(l.table.temp_bytes for l in layers), 1), dtype=torch.uint8, device=device)
        self.side = torch.cuda.Stream(device)
        self.ready = [torch.cuda.Event() for _ in range(SLOTS)]
        self.freed = [torch.cuda.Event() for _ in range(SLOTS)]
        self.unit_of = [-1] * len(layers)
        total = sum(l.table.num_chunks for l in layers)
        self.statuses = torch.zeros(2 * total, dtype=torch.int32, device=device)
        self.actual = torch.zeros(2 * total, dtype=torch.int64, device=device)
        self.expected = torch.cat([l.table.out_sizes for l in layers] * 2)
        self.actual[total:] = self.expected[total:]  # the units' half: no decode there yet, nothing wrong
        self.unit_pos = total
        self.flag = torch.zeros(1, dtype=torch.bool, device=device)
        self.flag_host = torch.zeros(1, dtype=torch.bool, pin_memory=True)
        pos = 0
        for l in layers:
            t = l.table
            t.statuses, t.actual = self.statuses[pos:pos + t.num_chunks], self.actual[pos:pos + t.num_chunks]
            pos += t.num_chunks
            l.alone = [t.out_table(ws.data_ptr(), l.chunk_size) for ws in self.workspaces]
            l.alone_weights = l.weights = [l.view(ws, 0) for ws in self.workspaces]
        self.begin_forward()

    # -- forward boundaries (hooks on the model) --

    def begin_forward(self, *_) -> None:
        if bool(self.flag_host[0]):  # the previous forward saw a failed decode
            self.check()
        self._join()
        self.freed_now = [False] * SLOTS
        self.current = None

    def end_forward(self, *_) -> None:
        """Join the side stream's work into the compute stream (a prefetch nobody used included); fold
        every decode's status into the flag the next forward reads (no synchronization); after the first
        forward, build the units."""
        self._join()
        torch.any((self.statuses != 0) | (self.actual != self.expected), dim=0, keepdim=True, out=self.flag)
        self.flag_host.copy_(self.flag, non_blocking=True)
        if self.order:
            self._build_units()

    def _join(self) -> None:
        if self.pending is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[self.pending[1]])  # (the model's hooks may run with another device current)
            self.pending = None

    def _build_units(self) -> None:
        order, self.order = self.order, None
        seen: set[int] = set()
        unit: list[int] = []
        used = 0
        for i in order:
            if i in seen:
                continue
            seen.add(i)
            size = aligned(self.layers[i].nbytes)
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
        p = self.unit_pos
        table = nvcomp.ChunkTable.concat([l.table for l in layers], self.statuses[p:p + n], self.actual[p:p + n])
        self.expected[p:p + n] = self.actual[p:p + n] = table.out_sizes
        self.unit_pos += n
        if table.temp_bytes > self.temp.numel():
            self.temp = torch.empty(table.temp_bytes, dtype=torch.uint8, device=dev)
        out_ptrs, offsets, pos = [], [], 0
        for l in layers:
            offsets.append(pos)
            pos += aligned(l.nbytes)
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

    def weight_for(self, layer: "CudaStream") -> torch.Tensor:
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
        if self.statuses is None:
            return
        bad = (self.statuses != 0) | (self.actual != self.expected)
        if not bool(bad.any()):
            self.flag_host.zero_()
            return
        idx = int(torch.nonzero(bad)[0])
        status = int(self.statuses[idx])
        raise DecodeError(
            f"nvCOMP failed to decode a streamed weight (chunk {idx}: status "
            f"{nvcomp.STATUS_NAMES.get(status, status)}, {int(self.actual[idx])} of {int(self.expected[idx])} bytes)"
        )


class CudaStream:
    """Mixin for a stand-in whose main part stays compressed in GPU memory and is decoded before use into
    a workspace it shares with the model's other stream layers (see ``StreamSchedule``); its other parts
    (built with the stand-in) are resident."""

    fusable = False
    # L8x4 int8 on an H100: a decode step 1.946 ms streamed (ANS), 1.082 ms resident
    relative_speed = 0.56
    compiles = False

    @classmethod
    def held_bytes(cls, rec, dtype):
        return payload_bytes(rec)  # (the file's zstd size: re-encoded to ANS, about the same)

    @classmethod
    def shared_bytes(cls, held, dtype):
        return SLOTS * 2 * max(aligned(r.main.nbytes) for _, r in held)  # the workspaces (``StreamSchedule.setup``)

    @eager_only
    def forward(self, *args):
        return super().forward(*args)

    def set_stream(self, table: nvcomp.ChunkTable, part, schedule: StreamSchedule) -> None:
        self.table = table
        self.main_part = part.name
        self.main_dtype, self.main_shape = torch_dtype(part.dtype), part.shape
        self.nbytes = part.nbytes
        self.chunk_size = part.chunk_size
        self.schedule = schedule
        self.register_buffer("payload", table.comp, persistent=False)
        self.alone: list[torch.Tensor] = []  # per slot: output pointers when decoded alone (offset 0)
        self.alone_weights: list[torch.Tensor] = []  # per slot: the part's view when decoded alone
        self.weights: list[torch.Tensor] = []  # per slot: the part's view where its unit puts it
        self.index = len(schedule.layers)
        schedule.layers.append(self)

    def view(self, workspace: torch.Tensor, offset: int) -> torch.Tensor:
        return workspace[offset:offset + self.nbytes].view(self.main_dtype).view(self.main_shape)

    def parts(self) -> dict[str, torch.Tensor]:
        parts = {n: self._buffers[n] for n in self.part_names}
        parts[self.main_part] = self.schedule.weight_for(self)
        return parts

    def dequantized(self) -> torch.Tensor:
        """The weight decoded into a buffer of its own (not the shared workspace)."""
        out = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        temp = torch.empty(max(self.table.temp_bytes, 1), dtype=torch.uint8, device=self.device)  # not the prefetch's
        self.table.decode(temp, out_ptrs=self.table.out_table(out.data_ptr(), self.chunk_size))
        self.schedule.check()  # synchronizes: a rare call (model code reading a streamed weight)
        parts = {n: self._buffers[n] for n in self.part_names}
        parts[self.main_part] = out.view(self.main_dtype).view(self.main_shape)
        return self.scheme.dequantize(parts, self.compute_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stream {self.table.algo.name} on GPU"
