import json
import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"

# Without a CUDA device the Triton kernels run under Triton's interpreter (tests/test_int8_kernel_interpreted.py).
# It is chosen when a kernel is decorated, that is when codecllm.gpu is first imported: so here, before any
# test module is collected. With a device, the kernels are compiled and tests/test_gpu.py checks them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def save_tiny(directory: Path, config, shard_size=None, seed=0, dtype=torch.float16) -> Path:
    """A small random model of ``config`` saved as an ordinary Hugging Face safetensors checkpoint."""
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, config.architectures[0])
    model = cls(config).to(dtype).eval()
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return save_tiny(tmp_path / "tiny-llama", llama_config())


@pytest.fixture
def tiny_llama_tied(tmp_path) -> Path:
    return save_tiny(tmp_path / "tiny-llama-tied", llama_config(tie_word_embeddings=True))


@pytest.fixture
def golden_bytes() -> bytes:
    return (DATA / "golden.cllm").read_bytes()


def read_header(path: Path) -> tuple[dict, dict]:
    """(safetensors header, CodecLLM document) of a file, without any checks."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return header, json.loads(header["__metadata__"]["codecllm"])


# --- SmolLM2, shared by the real-model tests (CPU and GPU) ------------------------------------------


@pytest.fixture(scope="session")
def smollm2_src():
    pytest.importorskip("gguf")
    import codecllm
    from codecllm.examples import smollm2_checkpoint

    try:
        return smollm2_checkpoint()
    except codecllm.CodecLLMError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_cllm(smollm2_src, tmp_path_factory):
    import codecllm

    out = tmp_path_factory.mktemp("smollm2") / "smollm2.cllm"
    codecllm.convert(smollm2_src, out)
    return out


@pytest.fixture(scope="session")
def eval_ids(smollm2_src):
    from transformers import AutoTokenizer

    text = " ".join((DATA / "eval_text.txt").read_text().split())
    ids = AutoTokenizer.from_pretrained(smollm2_src)(text, return_tensors="pt").input_ids[0]
    assert ids.numel() > 4096
    return ids[:4097]


PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_src, eval_ids):
    """The original fp16 checkpoint on the GPU: its logits over ``eval_ids`` (fp16, kept on the GPU, 0.4 GB)
    and its 24 greedy tokens after ``PROMPT`` (a sample to print)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codecllm.quality import greedy, reference_logits

    model = AutoModelForCausalLM.from_pretrained(smollm2_src, dtype=torch.float16).to("cuda").eval()
    tok = AutoTokenizer.from_pretrained(smollm2_src)
    out = reference_logits(model, eval_ids), greedy(model, tok, PROMPT, 24)
    del model
    torch.cuda.empty_cache()
    return out
