"""The fused int8 matmul (and with ``--int4 GS`` the int4 one) against fp16 ``F.linear`` on TinyLlama's
Linear shapes or Llama-3-8B's (``--shapes l8``: fused q/k/v, o, fused gate/up, down, head), each inside a
CUDA graph with weights rotated past L2; and for TinyLlama where the time of a CUDA-graph 16-token forward
goes (with real Linear layers, with int8 ones, with Linear layers that do nothing). Prints tables; writes
JSON (default benchmarks/results/kernel.json).

    python scripts/bench_kernel.py
    python scripts/bench_kernel.py --shapes l8 --int4 64 --ms 1,16,2048 --out benchmarks/results/kernel_int4_h100.json

With ``--expcode``: instead, lossless stream mode's exponent-coded bfloat16 matmul (12 bits per weight)
against bfloat16 ``F.linear`` on random-normal weights, and its decode into a bfloat16 buffer (GB/s of
bytes read and written).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import decode_step_ms, events_ms  # noqa: E402
from synthetic import TINYLLAMA  # noqa: E402

from codecllm.gpu.graphs import capture  # noqa: E402
from codecllm.kernels.int8_triton import int8_linear  # noqa: E402
from codecllm.schemes import get_scheme  # noqa: E402
from codecllm.schemes.int8.cuda import Int8CudaLinear  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEV = "cuda"
SHAPES = {"tinyllama": [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632), (32000, 2048)],
          "l8": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]}


def timed(fn, reps=10, inner=20) -> float:
    """Median ms per call of ``fn(i)``: ``inner`` calls captured back to back in a CUDA graph and
    replayed, so that host launch cost is out of the figure, as inside a captured model forward."""
    for i in range(inner):  # compile and autotune outside the capture
        fn(i)
    torch.cuda.synchronize()
    g, _ = capture(lambda: [fn(i) for i in range(inner)], warmup=1)
    ts = []
    for _ in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / inner)
    return statistics.median(ts[2:])


def matmuls(shapes, ms, int4_gs: int | None) -> list[dict]:
    from codecllm.kernels.int4_triton import Int4Matmul

    rows = []
    for n, k in shapes:
        copies = max(2, (256 << 20) // (n * k * 2))  # rotate weights so that L2 does not hold them
        w16 = [torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02 for _ in range(copies)]
        q8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV) for _ in range(copies)]
        s = torch.rand(n, device=DEV) * 1e-3
        q4 = []
        if int4_gs:
            g = -(-k // int4_gs)
            # every copy its own scales and zero points too, so that L2 holds none of them (as in a model)
            q4 = [Int4Matmul(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEV), torch.rand(n, g, device=DEV).half() * 1e-3,
                             torch.rand(n, g, device=DEV).half() * 15, int4_gs) for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            inner = min(copies, 64)
            t16 = timed(lambda i: F.linear(x, w16[i % copies]), inner=inner)
            t8 = timed(lambda i: int8_linear(x, q8[i % copies], s), inner=inner)
            row = {"M": m, "N": n, "K": k, "fp16_us": t16 * 1e3, "int8_us": t8 * 1e3, "speedup": t16 / t8,
                   "fp16_GBps": n * k * 2 / t16 / 1e6, "int8_GBps": n * k / t8 / 1e6}
            line = (f"M={m:<5} N={n:<6} K={k:<5} fp16 {t16 * 1e3:8.1f} us ({row['fp16_GBps']:6.0f} GB/s)  "
                    f"int8 {t8 * 1e3:8.1f} us ({row['int8_GBps']:6.0f} GB/s)  {t16 / t8:.2f}x")
            if q4:
                t4 = timed(lambda i: q4[i % copies](x), inner=inner)
                nbytes = n * k // 2 + 4 * n * -(-k // int4_gs)
                row.update({"int4_group_size": int4_gs, "int4_us": t4 * 1e3, "int4_speedup": t16 / t4, "int4_GBps": nbytes / t4 / 1e6})
                line += f"  int4 {t4 * 1e3:8.1f} us ({row['int4_GBps']:6.0f} GB/s)  {t16 / t4:.2f}x"
            rows.append(row)
            print(line, flush=True)
    return rows


def expcode_matmuls(shapes, ms) -> list[dict]:
    from codecllm.kernels import expcode_triton as expcode

    rows = []
    for n, k in shapes:
        copies = max(2, (256 << 20) // (n * k * 2))
        w16 = [(torch.randn(n, k, device=DEV) * 0.02).to(torch.bfloat16) for _ in range(copies)]
        layouts = []
        for w in w16:
            b = w.view(torch.int16)
            sm = ((b >> 8) & 0x80 | (b & 0x7F)).to(torch.uint8)
            layouts.append(expcode.encode(sm, ((b >> 7) & 0xFF).to(torch.uint8)))
        mms = [expcode.ExpCodeMatmul(t) for t in layouts]
        nbytes = expcode.nbytes(layouts[0])
        inner = min(copies, 64)
        outs = [torch.empty(n, k, device=DEV, dtype=torch.bfloat16) for _ in range(2)]
        td = timed(lambda i: expcode.decode_into(layouts[i % copies], 0, n, outs[i % 2]), inner=inner)
        assert torch.equal(outs[(inner - 1) % 2], w16[(inner - 1) % copies])
        for m in ms:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            t16 = timed(lambda i: F.linear(x, w16[i % copies]), inner=inner)
            te = timed(lambda i: mms[i % copies](x), inner=inner)
            row = {"M": m, "N": n, "K": k, "bf16_us": t16 * 1e3, "expcode_us": te * 1e3, "speedup": t16 / te,
                   "bf16_GBps": n * k * 2 / t16 / 1e6, "expcode_GBps": nbytes / te / 1e6, "expcode_bytes": nbytes,
                   "decode_us": td * 1e3, "decode_GBps": (nbytes + n * k * 2) / td / 1e6}
            rows.append(row)
            print(f"M={m:<5} N={n:<6} K={k:<5} bf16 {t16 * 1e3:8.1f} us ({row['bf16_GBps']:6.0f} GB/s)  expcode {te * 1e3:8.1f} us "
                  f"({row['expcode_GBps']:6.0f} GB/s)  {t16 / te:.2f}x   decode {td * 1e3:8.1f} us ({row['decode_GBps']:6.0f} GB/s)", flush=True)
    return rows


class _Nothing(nn.Module):
    def __init__(self, out_features):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_empty(*x.shape[:-1], self.out_features)


def graph16(model) -> float:
    ids = torch.randint(3, 32000, (1, 16), device=DEV)
    with torch.no_grad():
        g, _ = capture(lambda: model(ids, use_cache=False))
    return events_ms(g.replay, reps=30, warmup=5)


def step(model) -> float:
    with torch.no_grad():
        return decode_step_ms(model, model.config, 32000, torch.Generator(device=DEV).manual_seed(0))


def swap(model, make):
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                setattr(mod, cname, make(child))


def forward_breakdown() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in TINYLLAMA.items() if k not in ("architectures", "model_type", "dtype")})
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    out = {"fp16_ms": graph16(model), "fp16_step_ms": step(model)}

    def to_int8(lin):
        w = lin.weight.float()
        s = w.abs().amax(1) / 127
        q = torch.round(w / s[:, None]).to(torch.int8)
        return Int8CudaLinear(get_scheme("int8"), {"qweight": q, "scale": s}, tuple(q.shape), torch.float16, q.device, *q.shape, lin.bias)

    swap(model, to_int8)
    out["int8_ms"] = graph16(model)
    out["int8_step_ms"] = step(model)
    swap(model, lambda lin: lin)  # no Linear left
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, Int8CudaLinear):
                setattr(mod, cname, _Nothing(child.out_features))
    out["no_linear_ms"] = graph16(model)
    out["no_linear_step_ms"] = step(model)
    print(f"graph16: fp16 {out['fp16_ms']:.3f} ms, int8 {out['int8_ms']:.3f} ms, without any Linear work {out['no_linear_ms']:.3f} ms")
    print(f"decode step: fp16 {out['fp16_step_ms']:.3f} ms, int8 {out['int8_step_ms']:.3f} ms, without any Linear work {out['no_linear_step_ms']:.3f} ms")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--ms", default="1,16,256,2048", help="input rows, comma-separated")
    ap.add_argument("--int4", type=int, metavar="GS", help="also time the int4 kernels, groups of GS")
    ap.add_argument("--expcode", action="store_true", help="lossless stream mode's exponent-coded bfloat16 matmul instead")
    ap.add_argument("--dequant-block-mb", type=int, help="rows dequantized per cuBLAS call, in MB (default: the library's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernel.json")
    a = ap.parse_args()
    from codecllm.kernels import launch
    from codecllm.kernels.launch import reserve_scratch
    if a.dequant_block_mb:
        launch.DEQUANT_BLOCK_BYTES = a.dequant_block_mb << 20
    reserve_scratch(torch.device(DEV))  # split-K scratch for the capture stream of ``timed``
    ms = [int(m) for m in a.ms.split(",")]
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": a.shapes,
           "dequant_block_bytes": launch.DEQUANT_BLOCK_BYTES}
    if a.expcode:
        res["expcode_matmuls"] = expcode_matmuls(SHAPES[a.shapes], ms)
    else:
        res["matmuls"] = matmuls(SHAPES[a.shapes], ms, a.int4)
    if a.shapes == "tinyllama" and not a.expcode:
        res["forward16"] = forward_breakdown()
    from codecllm.kernels.launch import tuned_configs
    res["configs"] = tuned_configs()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
