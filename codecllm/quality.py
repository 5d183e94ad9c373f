"""The quality measures tests and scripts share: perplexity over a fixed text and greedy continuations.
The same code evaluates the original model and the ``.cllm`` one."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, window: int = 1024) -> float:
    """Perplexity of ``input_ids`` (1-D) in consecutive non-overlapping windows of ``window`` tokens."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, input_ids.numel() - 1, window):
        ids = input_ids[start:start + window + 1].to(device)
        if ids.numel() < 2:
            break
        logits = model(ids[None, :-1]).logits[0].float()
        nll += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += ids.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """The ids of the ``new_tokens`` greedy continuation of ``prompt``."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)
    return out[0, enc["input_ids"].shape[1]:].tolist()
