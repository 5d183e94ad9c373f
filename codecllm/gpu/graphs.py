"""Capturing a function in a CUDA graph, the way benchmarks and tests replay a model's forward."""

from __future__ import annotations

from typing import Any, Callable

import torch


def capture(fn: Callable[[], Any], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` ``warmup`` times on a side stream (kernels compile and autotune there), then capture
    one call. Returns the graph and the captured call's output, which each ``replay()`` overwrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
