"""Lossless coding on the CPU: for a random-normal bf16 Llama (TinyLlama's shapes, ``--layers`` decoder
layers, std 0.02) and SmolLM2-135M in fp16, the ``.cllm`` of ``--quant lossless`` against the
checkpoint's safetensors size and against the order-0 entropy bound of its byte planes, compression and
decompression speed in MB of original tensor bytes per second, and a bit-for-bit check of every tensor.
Prints a table and writes JSON.

"One thread" is one codec pool worker and one torch thread, but not one core: a conversion then runs
the main thread (reading, splitting, writing, coding its share of the zstd chunks, the entropy bound)
and the pool worker (hashing, zstd) at once, so on this 2-core machine up to two cores are busy. Every
conversion's CPU time (``time.process_time``, all threads, user and system) is measured beside its
wall time: ``cores_busy`` is CPU over wall, ``MB_per_cpu_s`` the honest per-core speed. A conversion
is timed cold (the first in the process, which also imports transformers to plan the model) and warm
(best of two more).

Two speeds each way: the coding itself (``codec``: the scheme's planes and the codec's chunks, from the
tensor in memory to the stored bytes and back), and the whole file (``file``: ``codecllm.convert``, which
also reads the checkpoint, hashes every part, computes the entropy bound and writes and syncs the file;
reading: the stored bytes from the file, their sha256 and the decoded bytes' check).

    python scripts/bench_lossless.py [--layers 2] [--out benchmarks/results/lossless_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import TINYLLAMA, write_checkpoint  # noqa: E402

import codecllm  # noqa: E402
from codecllm import codecs  # noqa: E402
from codecllm.codecs import decode_cpu, get_codec  # noqa: E402
from codecllm.dtypes import torch_dtype  # noqa: E402
from codecllm.format import CllmFile  # noqa: E402
from codecllm.source import Checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
USER_THREADS = torch.get_num_threads()  # torch's default, before one_thread()


def entropy_bits(b: np.ndarray) -> float:
    """Order-0 entropy of the bytes ``b``, in bits (all of them)."""
    p = np.bincount(b, minlength=256) / max(b.size, 1)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() * b.size)


def planes(t: torch.Tensor) -> list[np.ndarray]:
    """The byte planes whose order-0 entropy bounds a lossless coding of ``t`` by planes: for bfloat16 (and
    float32's high half) the exponent and the sign with the mantissa, for float16 the high and the low byte
    of each word, else every byte of an element apart."""
    t = t.contiguous().reshape(-1)
    if t.dtype in (torch.bfloat16, torch.float32):
        x = (t.view(torch.int32) >> 16) if t.dtype == torch.float32 else t.view(torch.int16).to(torch.int32)
        out = [((x >> 7) & 0xFF).to(torch.uint8).numpy(), (((x >> 8) & 0x80) | (x & 0x7F)).to(torch.uint8).numpy()]
        if t.dtype == torch.float32:
            low = t.view(torch.uint8).reshape(-1, 4)
            out += [low[:, 0].numpy().copy(), low[:, 1].numpy().copy()]
        return out
    b = t.view(torch.uint8).reshape(-1, t.element_size()).numpy()
    return [np.ascontiguousarray(b[:, i]) for i in range(b.shape[1])]


def plane_bound(src: Path) -> float:
    """The checkpoint's tensor bytes against their order-0 entropy by planes (``planes``), per tensor."""
    ck = Checkpoint(src)
    bits = size = 0
    for name in ck.tensors:
        t = ck.read(name)
        bits += sum(entropy_bits(p) for p in planes(t))
        size += t.nbytes
    return size * 8 / bits


def one_thread():
    torch.set_num_threads(1)
    codecs._shared_pool = ThreadPoolExecutor(max_workers=1)


def timed_convert(src: Path, out: Path, runs: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of ``runs`` conversions of ``src`` (CPU: every thread of the process)."""
    best = None
    for _ in range(runs):
        out.unlink(missing_ok=True)
        t, c = time.perf_counter(), time.process_time()
        codecllm.convert(src, out, quant="lossless")
        run = time.perf_counter() - t, time.process_time() - c
        best = run if best is None or run[0] < best[0] else best
    return best


def all_cores_convert_s(src: Path, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of ``codecllm.convert`` as a user runs it, on every core (the default codec pool
    and torch's default thread count, which ``convert`` itself lowers to one outside a searching
    quantizer), best of two; one thread's setting is restored after."""
    pool, threads = codecs._shared_pool, torch.get_num_threads()
    codecs._shared_pool = None
    torch.set_num_threads(USER_THREADS)
    try:
        return timed_convert(src, out, 2)
    finally:
        if codecs._shared_pool is not None:
            codecs._shared_pool.shutdown()
        codecs._shared_pool = pool
        torch.set_num_threads(threads)


def codec_speed(src: Path, cllm: Path) -> tuple[float, float, float, float]:
    """Seconds to code every tensor of ``src`` into its lossless parts' stored bytes (the planes, then zstd
    at the converter's level and chunk size), and to decode the stored parts of ``cllm`` back into
    tensors, and the CPU seconds of each (zstd's calling thread and the pool worker code and decode chunks
    together); reading, hashing and writing files are outside them."""
    zstd = get_codec("zstd")
    ck = Checkpoint(src)
    enc = dec = enc_cpu = dec_cpu = 0.0
    with CllmFile(cllm) as f:
        for name in ck.tensors:
            w = ck.read(name)
            t, c = time.perf_counter(), time.process_time()
            for part in f.doc.tensors[name].scheme.quantize(w).values():
                zstd.encode(memoryview(part.contiguous().view(torch.uint8).reshape(-1).numpy()), codecs.DEFAULT_CHUNK_SIZE, level=3)
            enc += time.perf_counter() - t
            enc_cpu += time.process_time() - c
        for rec in f.doc.tensors.values():
            stored = {n: f.read_stored(rec, p) for n, p in rec.parts.items()}
            t, c = time.perf_counter(), time.process_time()
            parts = {n: torch.from_numpy(decode_cpu(p.codec, stored[n], p.chunks, p.chunk_size or 0, p.nbytes)).view(torch_dtype(p.dtype)).reshape(p.shape)
                     for n, p in rec.parts.items()}
            rec.scheme.dequantize(parts, None)
            dec += time.perf_counter() - t
            dec_cpu += time.process_time() - c
    return enc, dec, enc_cpu, dec_cpu


def measure(name: str, src: Path, tmp: Path) -> dict:
    out = tmp / f"{name}.cllm"
    st = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    t, c = time.perf_counter(), time.process_time()
    summary = codecllm.convert(src, out, quant="lossless")
    conv, conv_cpu = time.perf_counter() - t, time.process_time() - c
    warm, warm_cpu = timed_convert(src, tmp / f"{name}-warm.cllm", 2)
    tensor_bytes = summary.to_json()["totals"]["bytes_in"]
    ck = Checkpoint(src)
    exact = True
    t = time.perf_counter()
    decoded = {}
    with CllmFile(out) as f:
        for rec in f.doc.tensors.values():
            parts = {n: f.read_part(rec, p) for n, p in rec.parts.items()}
            decoded[rec.name] = rec.scheme.dequantize(parts, None)
    dec = time.perf_counter() - t
    for n, w in decoded.items():
        ref = ck.read(n)
        exact &= w.dtype == ref.dtype and torch.equal(w.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))
    enc, dec_codec, enc_cpu, dec_codec_cpu = codec_speed(src, out)
    conv_all, conv_all_cpu = all_cores_convert_s(src, tmp / f"{name}-all.cllm")
    bound = plane_bound(src)
    row = {"model": name, "safetensors_bytes": st, "cllm_bytes": out.stat().st_size, "ratio": st / out.stat().st_size,
           "plane_entropy_bound": bound, "tensor_bytes": tensor_bytes, "codec_compress_s": enc, "codec_decompress_s": dec_codec,
           "codec_compress_MBps": tensor_bytes / enc / 1e6,
           "codec_compress_cpu_s": enc_cpu, "codec_compress_MB_per_cpu_s": tensor_bytes / enc_cpu / 1e6, "codec_decompress_MBps": tensor_bytes / dec_codec / 1e6,
           "codec_decompress_cpu_s": dec_codec_cpu, "codec_decompress_MB_per_cpu_s": tensor_bytes / dec_codec_cpu / 1e6,
           "file_compress_cold_s": conv, "file_compress_cold_cpu_s": conv_cpu, "file_compress_cold_MBps": tensor_bytes / conv / 1e6,
           "file_compress_warm_s": warm, "file_compress_cpu_s": warm_cpu, "file_compress_cores_busy": warm_cpu / warm,
           "file_compress_MBps": tensor_bytes / warm / 1e6, "file_compress_MB_per_cpu_s": tensor_bytes / warm_cpu / 1e6,
           "file_decompress_s": dec, "file_decompress_MBps": tensor_bytes / dec / 1e6,
           "file_compress_all_cores_s": conv_all, "file_compress_all_cores_cpu_s": conv_all_cpu,
           "file_compress_all_cores_cores_busy": conv_all_cpu / conv_all, "file_compress_all_cores_MBps": tensor_bytes / conv_all / 1e6,
           "file_compress_all_cores_MB_per_cpu_s": tensor_bytes / conv_all_cpu / 1e6, "cores": os.cpu_count(),
           "bit_exact": bool(exact)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lossless_cpu.json"))
    args = ap.parse_args()
    one_thread()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = dict(TINYLLAMA, num_hidden_layers=args.layers, dtype="bfloat16")
        rows.append(measure(f"random-normal bf16 Llama (TinyLlama shapes, {args.layers} layers)", write_checkpoint(tmp / "bf16", cfg), tmp))
        if not args.no_smollm2:
            from codecllm.examples import smollm2_checkpoint

            rows.append(measure("SmolLM2-135M-Instruct fp16", smollm2_checkpoint(), tmp))
    print(f"\n{'':<52}{'':>16}{'codec MB/CPU-s':>18}{'file, one thread':>39}{'file, all cores':>23}")
    print(f"{'model':<52}{'ratio':>8}{'bound':>8}{'comp':>9}{'dec':>9}{'cold':>8}{'comp':>8}{'cores':>7}{'/CPU-s':>8}{'dec':>8}"
          f"{'comp':>8}{'cores':>7}{'/CPU-s':>8}  exact")
    for r in rows:
        print(f"{r['model']:<52}{r['ratio']:>8.4f}{r['plane_entropy_bound']:>8.4f}{r['codec_compress_MB_per_cpu_s']:>9.0f}"
              f"{r['codec_decompress_MB_per_cpu_s']:>9.0f}{r['file_compress_cold_MBps']:>8.0f}{r['file_compress_MBps']:>8.0f}"
              f"{r['file_compress_cores_busy']:>7.2f}{r['file_compress_MB_per_cpu_s']:>8.0f}{r['file_decompress_MBps']:>8.0f}"
              f"{r['file_compress_all_cores_MBps']:>8.0f}{r['file_compress_all_cores_cores_busy']:>7.2f}"
              f"{r['file_compress_all_cores_MB_per_cpu_s']:>8.0f}  {r['bit_exact']}")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; 'one thread': one codec pool worker and "
                         "one torch thread (two threads: up to 2 cores busy, see cores_busy)",
              "torch": torch.__version__, "codecllm": codecllm.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
