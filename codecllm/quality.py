"""The quality measures tests and scripts share. The same code evaluates the original model and the
``.cllm`` one.

- ``perplexity``: over one long text, in consecutive windows.
- ``reference_logits`` and ``compare``: how far a candidate's next-token distributions lie from a
  reference's over that text, as llama.cpp's ``perplexity --kl-divergence`` reports it: mean KL
  divergence KL(P_ref || P_cand) per token, its 99th percentile, and top-1 agreement (the fraction of
  positions where both models rank the same token first). These see every position's whole distribution;
  an exact greedy continuation (``greedy``) flips on one near tie, so it is a sample to print, not a measure.
- ``sqnr_db``: signal-to-quantization-noise ratio of one tensor against its approximation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

ROWS = 256  # positions per step of the KL computation: [256, vocab] float32 blocks (48 MiB at a 49152-token vocabulary)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(|ref|^2 / |ref - approx|^2)`` in float64 (inf where ``approx`` equals ``ref``)."""
    ref, approx = ref.double(), approx.double().to(ref.device)
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _windows(input_ids: torch.Tensor, window: int):
    """(start, ids) of the consecutive windows: each predicts ``ids[1:]`` from ``ids[:-1]``."""
    for start in range(0, input_ids.numel() - 1, window):
        ids = input_ids[start:start + window + 1]
        if ids.numel() < 2:
            break
        yield start, ids


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, window: int = 1024) -> float:
    """Perplexity of ``input_ids`` (1-D) in consecutive non-overlapping windows of ``window`` tokens."""
    device = _device(model)
    nll, count = 0.0, 0
    for _, ids in _windows(input_ids, window):
        ids = ids.to(device)
        logits = model(ids[None, :-1]).logits[0].float()
        nll += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += ids.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """The ids of the ``new_tokens`` greedy continuation of ``prompt``."""
    device = _device(model)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)
    return out[0, enc["input_ids"].shape[1]:].tolist()


@dataclass(frozen=True)
class ReferenceLogits:
    """A reference model's logits over one text, window by window, kept (in the model's own output dtype,
    so nothing is rounded) to compare candidates against without the reference model."""

    input_ids: torch.Tensor  # the 1-D text, on the CPU
    window: int
    logits: list[torch.Tensor]  # per window: [tokens in window, vocab]


@torch.no_grad()
def reference_logits(model, input_ids: torch.Tensor, window: int = 1024, device: torch.device | str | None = None) -> ReferenceLogits:
    """Run ``model`` over ``input_ids`` in the windows ``perplexity`` uses and keep its logits on ``device``
    (by default where the model computes). 4096 tokens of a 49152-token vocabulary take 0.8 GB in float32,
    0.4 GB in float16."""
    at = _device(model)
    keep = []
    for _, ids in _windows(input_ids, window):
        keep.append(model(ids[None, :-1].to(at)).logits[0].to(device or at))
    return ReferenceLogits(input_ids.cpu(), window, keep)


@dataclass(frozen=True)
class Comparison:
    """A candidate model against a reference over the same tokens (llama.cpp ``--kl-divergence``)."""

    tokens: int  # positions compared
    reference_perplexity: float
    perplexity: float
    mean_kl: float  # mean over positions of KL(P_ref || P_cand), nats
    p99_kl: float  # 99th percentile of the per-position KL
    max_kl: float
    top1_agreement: float  # fraction of positions whose most likely next token is the same in both

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity

    def to_json(self) -> dict:
        return {**asdict(self), "perplexity_ratio": self.perplexity_ratio}

    def __str__(self) -> str:
        return (f"{self.tokens} tokens: perplexity {self.reference_perplexity:.4f} -> {self.perplexity:.4f} "
                f"({100 * (self.perplexity_ratio - 1):+.3f}%), mean KL {self.mean_kl:.6f}, p99 KL {self.p99_kl:.6f}, "
                f"max KL {self.max_kl:.4f}, top-1 agreement {100 * self.top1_agreement:.3f}%")


@torch.no_grad()
def compare(candidate, reference, input_ids: torch.Tensor | None = None, window: int = 1024) -> Comparison:
    """Compare ``candidate``'s next-token distributions with ``reference``'s over one text.

    ``reference`` is a ``ReferenceLogits`` (``input_ids`` and ``window`` then come from it) or a model,
    run window by window alongside the candidate. The two may live on different devices and compute in
    different dtypes: each window's logits are brought to the candidate's device, and log-softmax, KL and
    cross-entropy are computed from them in float32 (as llama.cpp does; float64 takes twice the time on a
    CPU, and on SmolLM2 moves perplexity by 1e-5 relative and KL not at all in 4 digits), ``ROWS`` positions
    at a time, and added up in float64."""
    if isinstance(reference, ReferenceLogits):
        if input_ids is not None and not torch.equal(input_ids.cpu(), reference.input_ids):
            raise ValueError("input_ids differ from the ones the reference logits were computed on")
        input_ids, window = reference.input_ids, reference.window
        ref_windows = iter(reference.logits)
    elif input_ids is None:
        raise ValueError("comparing with a reference model needs input_ids")
    else:
        at = _device(reference)
        ref_windows = (reference(ids[None, :-1].to(at)).logits[0] for _, ids in _windows(input_ids, window))
    device = _device(candidate)
    kls, same, nll_ref, nll = [], [], [], []  # per block of rows, added up at the end (no host sync per block)
    for (_, ids), ref_w in zip(_windows(input_ids, window), ref_windows):
        ids = ids.to(device)
        cand_w = candidate(ids[None, :-1]).logits[0]
        if ref_w.shape != cand_w.shape:
            raise ValueError(f"reference logits {tuple(ref_w.shape)} and candidate logits {tuple(cand_w.shape)} differ")
        for r in range(0, cand_w.shape[0], ROWS):
            lp_ref = F.log_softmax(ref_w[r:r + ROWS].to(device, torch.float32), dim=-1)
            lp = F.log_softmax(cand_w[r:r + ROWS].to(torch.float32), dim=-1)
            kls.append((lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp_min(0))
            same.append((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
            target = ids[1:][r:r + ROWS, None]
            nll_ref.append(-lp_ref.gather(-1, target).double().sum())
            nll.append(-lp.gather(-1, target).double().sum())
    kl = torch.cat(kls).cpu().double()
    n = kl.numel()
    return Comparison(
        tokens=n, reference_perplexity=math.exp(float(sum(nll_ref)) / n), perplexity=math.exp(float(sum(nll)) / n),
        mean_kl=float(kl.mean()), p99_kl=float(torch.quantile(kl, 0.99)), max_kl=float(kl.max()),
        top1_agreement=int(sum(same)) / n,
    )
