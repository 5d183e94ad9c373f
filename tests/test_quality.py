"""The quality measures on small hand-made models whose answers are known."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codecllm.quality import Comparison, compare, perplexity, reference_logits, sqnr_db


class Bigram(nn.Module):
    """Next-token logits that depend on the current token only: a table row per token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, ids):
        return type("Out", (), {"logits": self.table[ids]})


@pytest.fixture
def text():
    return torch.randint(0, 50, (301,), generator=torch.Generator().manual_seed(0))


def expected(ref: Bigram, cand: Bigram, text: torch.Tensor) -> tuple[float, float]:
    """Mean KL and top-1 agreement computed position by position with torch's own kl_div."""
    lp_ref = F.log_softmax(ref.table.double()[text[:-1]], -1)
    lp = F.log_softmax(cand.table.double()[text[:-1]], -1)
    kl = F.kl_div(lp, lp_ref, log_target=True, reduction="none").sum(-1)
    return float(kl.mean()), float((lp_ref.argmax(-1) == lp.argmax(-1)).double().mean())


def test_a_model_against_itself():
    table = torch.randn(50, 50)
    model = Bigram(table)
    text = torch.randint(0, 50, (200,))
    c = compare(model, model, text, window=64)
    assert c.tokens == 199 and c.mean_kl == 0 and c.max_kl == 0 and c.top1_agreement == 1
    assert c.perplexity == c.reference_perplexity
    assert c.perplexity == pytest.approx(perplexity(model, text, window=64), rel=1e-5)


@pytest.mark.parametrize("window", [7, 64, 1024], ids=lambda w: f"window{w}")
def test_kl_and_top1_match_a_direct_computation(text, window):
    ref = Bigram(torch.randn(50, 50, generator=torch.Generator().manual_seed(1)))
    cand = Bigram(ref.table + 0.3 * torch.randn(50, 50, generator=torch.Generator().manual_seed(2)))
    kl, top1 = expected(ref, cand, text)
    c = compare(cand, ref, text, window=window)
    assert c.mean_kl == pytest.approx(kl, rel=1e-5) and c.top1_agreement == pytest.approx(top1)
    assert 0 < c.mean_kl <= c.p99_kl <= c.max_kl and 0.5 < c.top1_agreement < 1
    assert c.reference_perplexity == pytest.approx(perplexity(ref, text, window=window), rel=1e-5)
    assert c.perplexity == pytest.approx(perplexity(cand, text, window=window), rel=1e-5)
    assert c.to_json()["perplexity_ratio"] == pytest.approx(c.perplexity / c.reference_perplexity)


def test_stored_reference_in_another_dtype(text):
    """Logits kept from a float16 reference compare like the reference model itself."""
    ref = Bigram(torch.randn(50, 50).half())
    cand = Bigram(ref.table.float() + 0.1 * torch.randn(50, 50))
    kept = reference_logits(ref, text, window=100)
    assert [w.dtype for w in kept.logits] == [torch.float16] * 3
    assert compare(cand, kept) == compare(cand, ref, text, window=100)
    with pytest.raises(ValueError, match="input_ids differ"):
        compare(cand, kept, text.flip(0))


def test_top1_counts_the_positions_where_the_first_choice_moves():
    table = torch.zeros(4, 4)
    table[:, 0] = 2.0  # every token predicts 0 first
    cand = table.clone()
    cand[3, 1] = 3.0  # after token 3, the candidate predicts 1 first
    text = torch.tensor([0, 1, 3, 2, 3, 0])  # positions predicting from 0, 1, 3, 2, 3
    c = compare(Bigram(cand), Bigram(table), text)
    assert c.top1_agreement == pytest.approx(3 / 5)
    assert isinstance(c, Comparison) and math.isfinite(c.p99_kl)


def test_sqnr_db():
    ref = torch.ones(100)
    assert sqnr_db(ref, ref + 0.1) == pytest.approx(20.0)
    assert sqnr_db(ref, ref.half()) == math.inf
