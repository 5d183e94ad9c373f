"""The fused int8 matmul's logic, checked on the CPU under Triton's interpreter (its speed is measured
on a GPU only, by scripts/bench_gpu.py). bfloat16 is checked on the GPU only: the interpreter's bf16
emulation gives wrong values for int8 -> bf16 casts."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import torch
from codecllm.gpu import int8_matmul
from codecllm.gpu.int8_matmul import int8_linear
torch.manual_seed(0)
cases = [(1, 40, 70, torch.float32, True, 1), (5, 64, 256, torch.float16, False, 1),
         (33, 20, 130, torch.float16, True, 1), (16, 16, 32, torch.float32, False, 1),
         # K split over programs whose partials the last one adds: uneven and empty splits, twice in a row
         (1, 40, 70, torch.float32, True, 2), (7, 50, 300, torch.float16, False, 3), (16, 33, 64, torch.float32, True, 4),
         (1, 50, 300, torch.float16, False, 3), (1, 9, 64, torch.float32, False, 4)]
for m, n, k, dtype, bias, split in cases:
    int8_matmul._INTERPRET_CONFIG["SPLIT_K"] = split
    x = torch.randn(m, k).to(dtype)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n) * 0.01
    b = torch.randn(n).to(dtype) if bias else None
    y = int8_linear(x.reshape(1, m, k), q, s, b)
    assert y.shape == (1, m, n) and y.dtype == dtype
    ref = x.double() @ (q.double() * s.double()[:, None]).T + (b.double() if bias else 0)
    err = ((y[0].double() - ref).norm() / ref.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 2e-3), (m, n, k, dtype, split, err)
    assert torch.equal(int8_linear(x.reshape(1, m, k), q, s, b), y)
# a prepared one-row matmul, called again and again (with and without a K split)
for split in (1, 3):
    int8_matmul._INTERPRET_CONFIG["SPLIT_K"] = split
    for n, bias in ((14, True), (9, False)):
        x = torch.randn(1, 1, 96)
        q = torch.randint(-127, 128, (n, 96), dtype=torch.int8)
        sc = torch.rand(n) * 0.01
        b = torch.randn(n) if bias else None
        row = int8_matmul.RowMatmul(q, sc, b)
        y = row(x)
        ref = x[0].double() @ (q.double() * sc.double()[:, None]).T + (b.double() if bias else 0)
        assert y.shape == (1, 1, n) and torch.allclose(y[0].double(), ref, rtol=1e-5, atol=1e-5), (n, split)
        assert torch.equal(row(x), y)
assert not int8_matmul._scratch_for(torch.device("cpu")).counts.any()  # every call leaves its counters at zero
print("ok")
"""


def test_int8_matmul_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


FUSION_SCRIPT = r"""
import sys
import torch
import codecllm
from codecllm.gpu.fusion import SiblingFusion
from codecllm.modules import Int8Linear

model = codecllm.load(sys.argv[1])
names = {id(m): n for n, m in model.named_modules()}
fusion = SiblingFusion([m for m in model.modules() if type(m) is Int8Linear])
model.register_forward_hook(fusion.learn)
ids = torch.tensor([[5]])
with torch.no_grad():
    ref = model(ids).logits  # the first forward learns which layers read the same input
    groups = sorted(tuple(names[id(m)].rsplit(".", 2)[-1] for m in g.layers) for g in fusion.groups.values())
    assert set(groups) == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}, groups
    assert len(groups) == 2 * len(model.model.layers), groups  # one of each per block
    out = model(ids).logits  # now one launch per group
    assert not fusion.kept  # every output computed ahead was taken by its layer
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), (out - ref).abs().max()
    longer = torch.tensor([[5, 6, 7]])
    assert torch.allclose(model(longer).logits[:, -1], model(longer).logits[:, -1])
print("ok")
"""


def test_sibling_fusion_under_interpreter(tiny_llama, tmp_path):
    """q/k/v and gate/up are found from the calls themselves and run as one launch per group for a
    one-token input, with the same result as layer by layer."""
    import codecllm

    codecllm.convert(tiny_llama, tmp_path / "m.cllm")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", FUSION_SCRIPT, str(tmp_path / "m.cllm")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_fusion_joins_weights_without_copying_when_back_to_back():
    """A group's weight is a view of its members' weights where they lie back to back (as the GPU
    loader decodes them); members that own their weights are moved into one tensor; others are not fused."""
    import torch

    from codecllm.gpu.fusion import _join
    from codecllm.modules import Int8Linear

    def layers(weights):
        return [Int8Linear(w, torch.rand(w.shape[0]), torch.nn.Parameter(torch.randn(w.shape[0]))) for w in weights]

    arena = torch.randint(-127, 128, (9 * 8 + 8,), dtype=torch.int8)
    run = layers([arena[0:16].view(2, 8), arena[16:40].view(3, 8), arena[40:72].view(4, 8)])
    before = [(m.qweight.clone(), m.scale.clone(), m.bias.detach().clone()) for m in run]
    group = _join(run)
    assert group.matmul.qweight.data_ptr() == arena.data_ptr() and group.matmul.qweight.shape == (9, 8)
    assert group.sizes == [2, 3, 4]
    for m, (q, s, b) in zip(run, before):  # same values, now views of the group's tensors
        assert torch.equal(m.qweight, q) and torch.equal(m.scale, s) and torch.equal(m.bias, b)
        assert m.qweight.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
        assert m.scale.untyped_storage().data_ptr() == group.matmul.scale.untyped_storage().data_ptr()

    own = layers([torch.randint(-127, 128, (n, 8), dtype=torch.int8) for n in (2, 3)])
    before = [m.qweight.clone() for m in own]
    group = _join(own)
    assert group.matmul.qweight.shape == (5, 8) and all(torch.equal(m.qweight, q) for m, q in zip(own, before))

    gap = layers([arena[0:16].view(2, 8), arena[24:48].view(3, 8)])  # a hole between them, in a shared buffer
    assert _join(gap) is None


def test_wrong_input_width_is_an_error():
    import torch

    from codecllm.gpu.int8_matmul import RowMatmul, int8_linear

    q, s = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(ValueError, match="one row of 8"):
        RowMatmul(q, s)(torch.zeros(2, 4))  # 8 elements, but not one row of them
    with pytest.raises(ValueError, match="6 features, the weight 8"):
        int8_linear(torch.zeros(3, 6), q, s)
    with pytest.raises(ValueError, match="contiguous"):
        RowMatmul(q.t().contiguous().t(), s)
