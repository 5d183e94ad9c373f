"""Capturing a function in a CUDA graph, the way benchmarks and tests replay a model's forward, and timing
GPU work with events (benchmarks, and the large-M path choice of ``codecllm.kernels.int8_triton``)."""

from __future__ import annotations

import statistics
from functools import lru_cache
from typing import Any, Callable

import torch


@lru_cache(maxsize=None)
def _side_stream(device_index: int) -> torch.cuda.Stream:
    """One warm-up stream per device, reused (work keyed by stream, like split-K scratch, is not
    set up again for every capture)."""
    return torch.cuda.Stream(device_index)


def capture(fn: Callable[[], Any], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` ``warmup`` times on a side stream (kernels compile and autotune there), then capture
    one call. Returns the graph and the captured call's output, which each ``replay()`` overwrites."""
    side = _side_stream(torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def events_ms(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` on the current stream, timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)
