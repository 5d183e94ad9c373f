"""GPU benchmark: a Llama with random fp16 weights, TinyLlama-shaped or "L8x4" (Llama-3-8B's shapes, 4
decoder layers, untied 128,256-token head), as fp16, as torchao int8 weight-only (a peer, benchmark-only
dependency) and as int8 .cllm (resident and stream, each in-memory codec) or int4 .cllm (an ``int4-``
prefix: every weight int4, groups of 64, no recipe exceptions), each eager or compiled (``+compile``), all
in one run. With ``--dtype bfloat16`` the checkpoint is bfloat16; ``bf16`` is then the dense reference and
the ``lossless-`` prefix loads the ``--quant lossless`` file (``lossless-resident``: decoded at load;
``lossless-stream``: Linear weights exponent-coded, 12 bits per weight; ``lossless-stream-ans``: their codes
ANS-coded too, about 10.7 bits). A stream variant without a codec suffix takes the loader's default.

    python scripts/bench_gpu.py --model l8x4 --variants fp16,fp16+compile,torchao,torchao+compile,resident,resident+compile
    python scripts/bench_gpu.py --model l8x4 --variants fp16,fp16+compile,int4-resident,int4-resident+compile
    python scripts/bench_gpu.py --model l8x4 --dtype bfloat16 --variants bf16,lossless-resident,lossless-stream,lossless-stream-ans
    python scripts/bench_gpu.py [--workdir DIR] [--new-tokens 128] [--out benchmarks/results/gpu.json]

Measures per variant: a) generate() at batch 1 (ms/token, peak GPU memory); b) CUDA-graph replay of a
one-token decode step at position 256 of a static KV cache (and, eager, of a 16-token forward without
cache) (ms); c) prefill of 2048 tokens (ms); d) generate() at batch 16 and 64 (tokens/s); weight memory
after load; and whole-model GPU decode throughput per codec (GB/s of decoded bytes). Compiled variants
run ``torch.compile(model)`` for b) and c), and generate() with a static cache (which transformers
compiles, "reduce-overhead") for a) and d). Prints a table and writes JSON naming the GPU, driver,
torch, triton and nvCOMP, after every variant.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import MODELS, write_checkpoint  # noqa: E402

import codecllm  # noqa: E402
from codecllm.qmodules import QuantizedWeight  # noqa: E402
from codecllm.loader import footprint  # noqa: E402
from codecllm.gpu.graphs import capture, events_ms  # noqa: E402,F401  (events_ms: also for bench_kernel.py)

ROOT = Path(__file__).resolve().parent.parent
DEV = "cuda"


def wall_ms(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1000


@torch.no_grad()
def measure(model, vocab: int, new_tokens: int, batch_tokens: int, reps: int = 50, compiled: bool = False,
            batches: tuple[int, ...] = (16, 64), profile: bool = False, generate: bool = True) -> dict:
    """Eager: the model as it is, generate() with its dynamic cache. Compiled: ``torch.compile(model)`` for the
    forward passes, and generate() with a static cache, which transformers compiles ("reduce-overhead")."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    out: dict = {}
    fwd = torch.compile(model) if compiled else model
    prompt = torch.randint(3, vocab, (1, 16), device=DEV, generator=gen)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    if compiled:
        kw["cache_implementation"] = "static"
    # warm-up: kernels compile and autotune for the shapes used below
    fwd(torch.randint(3, vocab, (1, 2048), device=DEV, generator=gen), use_cache=False, logits_to_keep=1)
    if generate:
        # a) generate, batch 1: one full-length run to warm up, then the median of three
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw)
        run = lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)  # noqa: E731
        run()
        torch.cuda.reset_peak_memory_stats()
        ms = statistics.median(wall_ms(run) for _ in range(3))
        out["a_generate_ms_per_token"] = ms / new_tokens
        out["a_tokens_per_s"] = 1000 * new_tokens / ms
        out["a_peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    # b) CUDA-graph replay of a one-token decode step with a static KV cache, and of a 16-token forward
    kernels = {} if profile else None
    out["b_graph_decode_step_ms"] = decode_step_ms(fwd, model.config, vocab, gen, reps=2 * reps, kernels=kernels)
    if profile:
        out["b_step_kernel_ms"] = kernels
    if not compiled:
        ids = torch.randint(3, vocab, (1, 16), device=DEV, generator=gen)
        g, _ = capture(lambda: model(ids, use_cache=False))
        out["b_graph_forward16_ms"] = events_ms(g.replay, reps=reps, warmup=5)
        del g
    # c) prefill of 2048 tokens
    long = torch.randint(3, vocab, (1, 2048), device=DEV, generator=gen)
    out["c_prefill2048_ms"] = events_ms(lambda: fwd(long, use_cache=False, logits_to_keep=1), reps=10)
    # d) generate, batches of 16 and 64 prompts
    for b in batches if generate else ():
        batch = torch.randint(3, vocab, (b, 16), device=DEV, generator=gen)
        run_b = lambda: model.generate(batch, max_new_tokens=batch_tokens, min_new_tokens=batch_tokens, **kw)  # noqa: E731
        run_b()
        ms = statistics.median(wall_ms(run_b) for _ in range(2))
        out[f"d_batch{b}_tokens_per_s"] = b * 1000 * batch_tokens / ms
    return out


def decode_step_ms(model, config, vocab: int, gen, context: int = 256, reps: int = 100, kernels: dict | None = None) -> float:
    """CUDA-graph replay of a one-token forward at position ``context`` of a static KV cache. (Some
    transformers versions take the position from the cache's fill level on the device, so each replay
    appends one more token: the cache has room for every replay, 512 positions in all.)"""
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=context + 256)
    prompt = torch.randint(3, vocab, (1, context), device=DEV, generator=gen)
    model(prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(context, device=DEV))
    tok = torch.randint(3, vocab, (1, 1), device=DEV, generator=gen)
    pos = torch.tensor([context], device=DEV)
    g, _ = capture(lambda: model(tok, past_key_values=cache, use_cache=True, cache_position=pos, position_ids=pos[None]))
    ms = events_ms(g.replay, reps=reps, warmup=min(reps, 10))
    if kernels is not None:  # where a replay's time goes, per kernel name
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                g.replay()
            torch.cuda.synchronize()
        per = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                per[e.name[:90]] = per.get(e.name[:90], 0.0) + e.device_time / 10 / 1000
        kernels.update(sorted(per.items(), key=lambda kv: -kv[1])[:25])
    del g, cache
    return ms


def decode_throughput(path: Path) -> dict:
    """Whole-model GPU decode: every zstd chunk of the file's Linear weights in one batched call, and the
    same bytes re-encoded to ANS in GPU memory, decoded in one call. GB/s of decoded bytes."""
    from codecllm.format import CllmFile
    from codecllm.gpu import nvcomp
    from codecllm.gpu.decoders import padded

    res = {}
    with CllmFile(path) as f:
        recs = [r for r in f.doc.tensors.values() if r.main.codec == "zstd" and not r.scheme.lossless]
        z = nvcomp.algo(nvcomp.ZSTD)
        blobs, offs, sizes, outs, pos = [], [], [], [], 0
        chunk = recs[0].main.chunk_size
        for r in recs:
            p = r.main
            data, o = padded(f.read_stored(r, p), p.chunks, max(z.input_align, 8))
            blobs.append(data)
            offs += [pos + x for x in o]
            sizes += p.chunks
            outs += [min(chunk, p.nbytes - i * chunk) for i in range(len(p.chunks))]
            pos += len(data)
            pos += -pos % 8
            blobs.append(torch.zeros(-len(data) % 8, dtype=torch.uint8).numpy())
        comp = torch.from_numpy(np.concatenate(blobs)).to(DEV)
        total = sum(outs)
        # outputs at a fixed stride of chunk_size: the decoded model, back to back per chunk
        out = torch.empty(len(outs) * chunk, dtype=torch.uint8, device=DEV)
        st = torch.empty(len(outs), dtype=torch.int32, device=DEV)
        act = torch.empty(len(outs), dtype=torch.int64, device=DEV)
        t = nvcomp.ChunkTable(nvcomp.ZSTD, comp, offs, sizes, out.data_ptr(), outs, chunk, st, act)
        temp = torch.empty(max(t.temp_bytes, 1), dtype=torch.uint8, device=DEV)
        ms = events_ms(lambda: t.decode(temp), reps=5)
        assert bool((st == 0).all()) and act.tolist() == outs
        res["zstd"] = {"decoded_bytes": total, "ms": ms, "GBps": total / ms / 1e6, "compressed_bytes": sum(sizes)}
        del comp, temp, t
        a_comp, a_offs, a_sizes = nvcomp.ans_encode(out, chunk)
        ta = nvcomp.ChunkTable(nvcomp.ANS, a_comp, a_offs, a_sizes, out.data_ptr(), [chunk] * len(a_sizes), chunk, st, act)
        temp = torch.empty(max(ta.temp_bytes, 1), dtype=torch.uint8, device=DEV)
        ms = events_ms(lambda: ta.decode(temp), reps=10)
        assert bool((st == 0).all())
        res["ans"] = {"decoded_bytes": out.numel(), "ms": ms, "GBps": out.numel() / ms / 1e6, "compressed_bytes": sum(a_sizes)}
    return res


def environment() -> dict:
    import triton

    from codecllm.gpu import nvcomp

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        driver = "unknown"
    import transformers

    return {
        "gpu": torch.cuda.get_device_name(), "driver": driver, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton.__version__, "nvcomp": nvcomp.version(), "transformers": transformers.__version__,
        "codecllm": codecllm.__version__,
    }


DENSE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def load_variant(name: str, src: Path, files: dict[str, Path]):
    """``fp16`` or ``bf16`` (transformers), ``torchao`` (int8 weight-only, torchao's ``quantize_``), or a
    codecllm mode (``resident``, ``stream-ans``, ``stream-zstd``) of the int8 file, or with a prefix
    (``int4-``, ``lossless-``) of that scheme's file in ``files``; a ``+compile`` suffix is taken off by the
    caller."""
    from transformers import AutoModelForCausalLM

    if name in (*DENSE, "torchao"):
        model = AutoModelForCausalLM.from_pretrained(src, dtype=DENSE.get(name, torch.float16)).to(DEV).eval()
        if name == "torchao":  # a benchmark-only dependency
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            quantize_(model, Int8WeightOnlyConfig())
        return model
    family, _, rest = name.partition("-")
    if family in ("int4", "lossless"):
        name = rest
    else:
        family = "int8"
    cllm = files[family]
    mode, _, codec = name.partition("-")
    model = codecllm.load(cllm, device=DEV, mode=mode, gpu_stream_codec=codec or None)
    model.codecllm_path, model.codecllm_codec = cllm, codec or None
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--model", choices=sorted(MODELS), default="tinyllama")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=64, help="new tokens per generate() at batch 16 and 64")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--variants", default="fp16,resident,stream-ans,stream-zstd,fp16",
                    help="fp16, bf16, torchao, resident, stream-ans, stream-zstd (int8, or int4 or lossless with an int4- or "
                         "lossless- prefix), each optionally with +compile")
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="the checkpoint's dtype")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    ap.add_argument("--profile-step", action="store_true", help="record where the decode step's time goes, per kernel")
    ap.add_argument("--peers-step-only", action="store_true",
                    help="torchao: decode step and prefill only (its compiled generate() takes minutes to compile)")
    args = ap.parse_args()
    cfg = dict(MODELS[args.model], dtype=args.dtype)
    variants = args.variants.split(",")
    families = {"int4" if v.startswith("int4-") else "lossless" if v.startswith("lossless-") else "int8"
                for v in variants if v.partition("+")[0] not in (*DENSE, "torchao")}
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    batches = tuple(int(b) for b in args.batches.split(",") if b)
    result = {"environment": environment(), "model": {"name": args.model, **cfg}, "variants": [], "errors": {}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t = time.perf_counter()
        src = write_checkpoint(Path(tmp) / args.model, cfg)
        files: dict[str, Path] = {}
        for family, kw in (("int8", {}), ("int4", dict(quant="int4", group_size=64, quantize_all=True)), ("lossless", dict(quant="lossless"))):
            if family not in families:
                continue
            t = time.perf_counter()
            out = files[family] = Path(tmp) / f"{args.model}-{family}.cllm"
            summary = codecllm.convert(src, out, **kw)
            key = "conversion" if family == "int8" else f"conversion_{family}"
            result[key] = {"seconds": time.perf_counter() - t, "file_bytes": out.stat().st_size,
                           "quantized": summary.to_json()["quantized_weights"]}
            print(f"{family}: converted in {result[key]['seconds']:.1f} s: {out.stat().st_size / 1e9:.3f} GB", flush=True)
        out = files.get("int8")
        if any(v.startswith("stream") for v in args.variants.split(",")):
            try:
                result["decode_throughput"] = decode_throughput(out)
            except Exception as e:  # keep measuring the rest
                result["errors"]["decode_throughput"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        for name in variants:
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            base = torch.cuda.memory_allocated()
            row = {"variant": name}
            model = None
            try:
                t = time.perf_counter()
                base_name, _, compile_flag = name.partition("+")
                model = load_variant(base_name, src, files)
                torch.cuda.synchronize()
                row["load_s"] = time.perf_counter() - t
                row["weight_bytes"] = torch.cuda.memory_allocated() - base
                # the weights less the input embedding and the norms: the Linear weights (and their scales)
                emb = model.get_input_embeddings()
                small = [emb] + [m for n, m in model.named_modules() if n.endswith("norm") or "layernorm" in n]
                row["linear_weight_bytes"] = row["weight_bytes"] - sum(
                    t.numel() * t.element_size() for m in small for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
                    if not isinstance(t, QuantizedWeight))  # a stand-in's weight: its shape, no storage of its own
                if hasattr(model, "codecllm_path"):  # the loader's estimate from the header, for comparison
                    row["footprint"] = footprint(model.codecllm_path, DEV, gpu_stream_codec=model.codecllm_codec)
                    row["estimated_weight_bytes"] = row["footprint"][model.codecllm_mode]["bytes"]
                print(f"{name}: loaded in {row['load_s']:.1f} s, {row['weight_bytes'] / 1e9:.3f} GB"
                      + (f" (estimated {row['estimated_weight_bytes'] / 1e9:.3f} GB)" if "footprint" in row else ""), flush=True)
                # zstd decodes at about a tenth of ANS's speed: fewer tokens keep the run short
                slow = base_name == "stream-zstd"
                row["new_tokens"] = 8 if slow else args.new_tokens
                t = time.perf_counter()
                row.update(measure(model, cfg["vocab_size"], row["new_tokens"], 2 if slow else args.batch_tokens, 3 if slow else 50,
                                   compiled=compile_flag == "compile", batches=batches, profile=args.profile_step,
                                   generate=not (args.peers_step_only and base_name == "torchao")))
                row["measure_s"] = time.perf_counter() - t
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            finally:
                model = None
            result["variants"].append(row)
            print(json.dumps(row), flush=True)
            record_kernels(result)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # so far: a cut run keeps what it measured
    record_kernels(result)
    report(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


def record_kernels(result: dict) -> None:
    from codecllm.kernels import launch

    # the Triton kernels of every scheme (int8, int4): keys named as when only int8 had kernels
    result["environment"]["int8_direct_launch"] = all(l.direct for l in launch.LAUNCHERS.values())
    result["int8_configs"] = launch.tuned_configs()
    result["int8_large_m_paths"] = {str(k): v for k, v in launch.PATHS.items()}


def report(result: dict) -> None:
    rows = result["variants"]
    dense = "bf16" if any(r["variant"].partition("+")[0] == "bf16" for r in rows) else "fp16"

    def fp16_ref(compiled: bool) -> dict:
        fp16 = [r for r in rows if r["variant"] == (dense + "+compile" if compiled else dense) and "error" not in r]
        # numbers only: a row may also hold a dict (the profiled step's kernels, a footprint)
        return {k: statistics.mean(r[k] for r in fp16) for k, v in fp16[0].items()
                if isinstance(v, (int, float)) and k in fp16[-1]} if fp16 else {}

    refs = {False: fp16_ref(False), True: fp16_ref(True)}
    cols = [("weight_bytes", "weights GB", 1e9, False), ("linear_weight_bytes", "Linear GB", 1e9, False), ("a_generate_ms_per_token", "a) ms/tok", 1, True),
            ("a_peak_gpu_bytes", "a) peak GB", 1e9, False), ("b_graph_decode_step_ms", "b) step ms", 1, True),
            ("b_graph_forward16_ms", "b) graph16 ms", 1, True),
            ("c_prefill2048_ms", "c) prefill ms", 1, True), ("d_batch16_tokens_per_s", "d) b16 tok/s", 1, False),
            ("d_batch64_tokens_per_s", "d) b64 tok/s", 1, False)]
    print(f"\n{result['environment']['gpu']}, torch {result['environment']['torch']}, nvCOMP {result['environment']['nvcomp']}")
    print(f"{'variant':<23}" + "".join(f"{c[1]:>15}" for c in cols))
    print(f"(ratios: against {dense} compiled for +compile rows, {dense} eager otherwise; weights and peak: fraction of {dense})")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<23}  error: {r['error'][:100]}")
            continue
        ref = refs[r["variant"].endswith("+compile")]
        cells = []
        for key, _, div, lower_better in cols:
            v = r.get(key)
            rel = ""
            if key in ref and v:
                x = ref[key] / v if lower_better else v / ref[key]
                rel = f" {x:.2f}x" if key not in ("weight_bytes", "linear_weight_bytes", "a_peak_gpu_bytes") else f" {v / ref[key]:.2f}"
            cells.append(f"{v / div:.3f}{rel}" if v is not None else "-")
        print(f"{r['variant']:<23}" + "".join(f"{c:>15}" for c in cells))
    for codec, d in result.get("decode_throughput", {}).items():
        print(f"whole-model decode, {codec}: {d['decoded_bytes'] / 1e9:.3f} GB in {d['ms']:.2f} ms = {d['GBps']:.0f} GB/s "
              f"(ratio {d['decoded_bytes'] / d['compressed_bytes']:.3f}x)")


if __name__ == "__main__":
    main()
