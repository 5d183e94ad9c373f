"""``torch.compile`` on loaded models, on the CPU (the CUDA stand-ins: test_int8_kernel_interpreted.py
and test_gpu.py)."""

import pytest
import torch

import codecllm
from codecllm.qmodules import STREAM_EAGER


@pytest.fixture
def cllm(tiny_llama, tmp_path):
    codecllm.convert(tiny_llama, tmp_path / "m.cllm")
    return tmp_path / "m.cllm"


def test_resident_model_traces_as_one_graph(cllm):
    model = codecllm.load(cllm, device="cpu")
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(ids)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
        torch.testing.assert_close(got, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_stream_layers_run_eagerly_inside_a_compiled_model(cllm):
    """Stream layers decode outside compiled graphs: the model compiles around them and computes the same;
    ``fullgraph=True`` is refused with the reason."""
    model = codecllm.load(cllm, device="cpu", mode="stream")
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        eager = model(ids).logits
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(ids).logits, eager, rtol=1e-4, atol=1e-5)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="codecllm stream mode decodes each weight"):
            torch.compile(model, backend="aot_eager", fullgraph=True)(ids)
    assert "mode='resident'" in STREAM_EAGER
