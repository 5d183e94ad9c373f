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
# up to three layers reading the same token in one launch: rows of a tile may belong to two layers
for split in (1, 2):
    int8_matmul._INTERPRET_CONFIG["SPLIT_K"] = split
    for ns, bias in (([6, 3], False), ([5, 7, 2], True), ([8], True)):
        x = torch.randn(1, 1, 96)
        qs = [torch.randint(-127, 128, (n, 96), dtype=torch.int8) for n in ns]
        ss = [torch.rand(n) * 0.01 for n in ns]
        bs = [torch.randn(n) for n in ns] if bias else None
        ys = int8_matmul.int8_linear_group(x, qs, ss, bs)
        for i, (y, q, sc) in enumerate(zip(ys, qs, ss)):
            ref = x[0].double() @ (q.double() * sc.double()[:, None]).T + (bs[i].double() if bias else 0)
            assert y.shape == (1, 1, q.shape[0]) and torch.allclose(y[0].double(), ref, rtol=1e-5, atol=1e-5), (ns, i)
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
    groups = sorted(tuple(names[id(m)].rsplit(".", 2)[-1] for m in g) for g in fusion.groups.values())
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
