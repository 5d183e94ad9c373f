import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


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
