"""Eager ``generate()`` on SmolLM2-135M on CUDA: ms/token for fp16, resident int8 (with sibling fusion,
then without groups, then without the fusion runner) and stream int8, and a cProfile of the resident
model's host time. Variants run one after the other in one process, so host-speed drift between them
shows in the figures. Prints everything (`benchmarks/results/eager_smollm2_h100.txt` is one run).

    python scripts/profile_eager_smollm2.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import codecllm
from codecllm.examples import smollm2_checkpoint

KW = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


def ms_per_token(model, ids, n: int = 64) -> float:
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, **KW)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **KW)
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) * 1000 / n)
    return best


@torch.no_grad()
def main() -> None:
    src = smollm2_checkpoint()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]], device="cuda")  # a short prompt's token ids
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.cllm"
        codecllm.convert(src, path)
        fp16 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).cuda().eval()
        print("fp16 ms/tok", ms_per_token(fp16, ids))
        del fp16
        resident = codecllm.load(path, device="cuda")
        print("resident fused ms/tok", ms_per_token(resident, ids))
        prof = cProfile.Profile()
        prof.enable()
        resident.generate(ids, max_new_tokens=32, min_new_tokens=32, **KW)
        torch.cuda.synchronize()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(22)
        print(out.getvalue()[-6000:])
        fusion = next(m.runner.__self__ for m in resident.modules() if getattr(m, "runner", None) is not None)
        print("groups", len(fusion.groups))
        fusion.groups = {}
        print("resident unfused ms/tok", ms_per_token(resident, ids))
        for m in resident.modules():
            if getattr(m, "runner", None) is not None:
                m.runner = None
        print("resident no runner ms/tok", ms_per_token(resident, ids))
        del resident
        stream = codecllm.load(path, device="cuda", mode="stream")
        print("stream ms/tok", ms_per_token(stream, ids))


if __name__ == "__main__":
    main()
