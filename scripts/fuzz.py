"""Fuzz the ``.cllm`` reader with mutated valid files, and print what it raised.

Every case takes one valid seed file and mutates it, structurally (the JSON header and the CodecLLM
document inside it are parsed, changed at random paths and written back, duplicate keys included) or
bytewise (bits, bytes, ranges, truncation, the 8-byte length), then opens it with ``CllmFile``, reads and
decodes every record with its checksums, and for one case in ``--load-every`` whose records all read
without error also loads it with ``codecllm.load`` on the CPU. A case passes when it ends without an exception or with a
``CodecLLMError``; any other exception ("foreign"), a case past the time limit ("hang") and an allocation
past the memory limit (a ``MemoryError``, foreign) fail it.

Cases are seeded: case ``i`` of seed ``S`` is always the same file, so each foreign exception is printed
with one case that reproduces it (``--repro S/i`` rebuilds that file, runs it and prints the traceback).

    python scripts/fuzz.py --cases 100000 --seed 1 --jobs 2
    python scripts/fuzz.py --repro 1/4711 --out case.cllm

``tests/test_fuzz.py`` runs a fixed number of cases of this engine in the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = str(ROOT / "codecllm")


# --- seed files ---------------------------------------------------------------------------------------


def tiny_config():
    """A Llama small enough to convert in a second, with an embedding of more than one zstd chunk."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )


def convert_seeds(checkpoint: Path, directory: Path) -> dict[str, bytes]:
    """``tiny-none`` and ``tiny-int8``: ``checkpoint`` converted with ``--quant none`` and ``int8``."""
    import codecllm

    out = {}
    for quant in ("none", "int8"):
        path = directory / f"tiny-{quant}.cllm"
        codecllm.convert(checkpoint, path, quant=quant, chunk_size=4096, force=True)
        out[f"tiny-{quant}"] = path.read_bytes()
    return out


def seed_files(directory: Path) -> dict[str, bytes]:
    """The golden file and two files converted from a tiny random Llama; deterministic."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny  # the tests' own helper

    seeds = {"golden": (ROOT / "tests" / "data" / "golden.cllm").read_bytes()}
    seeds.update(convert_seeds(save_tiny(directory / "tiny-src", tiny_config()), directory))
    return seeds


# --- JSON that json.dumps cannot write: raw text and objects with duplicate keys --------------------------


class Raw(str):
    """JSON text written as it is (a 5,000-digit integer, 10,000 nested arrays)."""


@dataclass
class Pairs:
    """A JSON object written from a list of (key, value) pairs: keys may repeat."""

    items: list[tuple[str, Any]]


def dumps(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, Pairs):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{dumps(x)}" for k, x in v.items) + "}"
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{dumps(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dumps(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)  # str, int, float (NaN, Infinity), bool, None


# --- mutations ------------------------------------------------------------------------------------------

HUGE_INTS = [2**31 - 1, 2**31, 2**32, 2**48, 2**48 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, 10**300]
STRINGS = ["", "NaN", "nan", "Infinity", "-Infinity", "1e999", "-1", "0x10", "null", "true", "F32", "U8", "I8", "BF16",
           "int8", "none", "zstd", "raw", "config.json", "../etc/passwd", ".hidden", "a/b", "\x00", "\ud7ff\u2028", "é" * 3]


def extreme_value(rng: random.Random, names: list[str]) -> Any:
    """A value of another type, or an extreme of the same one."""
    k = rng.randrange(16)
    if k == 0:
        return rng.choice([None, True, False])
    if k == 1:
        return rng.choice([0, 1, -1, 2, 7, 8, 4095, 4096, 65536, 16 * 2**20, 16 * 2**20 + 1])
    if k == 2:
        n = rng.choice(HUGE_INTS)
        return -n if rng.random() < 0.3 else n
    if k == 3:
        return rng.choice([0.0, -0.0, 0.5, 1.0, 1.5, 4096.0, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan])
    if k == 4:
        return rng.choice(STRINGS)
    if k == 5:
        return rng.choice(names) if names else ""
    if k == 6:
        return "x" * rng.choice([1, 64, 65, 1000, 100_000])
    if k == 7:
        return rng.choice([[], [None], [0], [1, 2, 3], [-1], [2**63], [[1]], ["F32"], [1.5], [True], list(range(9))])
    if k == 8:
        return rng.choice([{}, {"id": "zstd"}, {"id": "none"}, {"a": 1}, {"tensor": rng.choice(names or ["x"]), "sha256": "0" * 64}])
    if k == 9:
        depth = rng.choice([100, 1000, 100_000])
        return Raw("[" * depth + "]" * depth) if rng.random() < 0.5 else Raw('{"a":' * depth + "1" + "}" * depth)
    if k == 10:
        return Raw(("-" if rng.random() < 0.3 else "") + "9" * rng.choice([20, 400, 4301, 5000]))  # past int max-str-digits
    if k == 11:
        return Raw(rng.choice(["1e400", "-1e400", "1.0", "0e0", "-0", "NaN", "Infinity", "-Infinity"]))
    if k == 12:
        return "0" * 64 if rng.random() < 0.5 else "A" * 64  # sha256-shaped
    if k == 13:
        return [rng.choice([0, 1, 2**32, -1])] * rng.choice([0, 1, 2, 3, 8, 9])
    if k == 14:
        return {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    return {rng.choice(names or ["x"]): extreme_value(rng, names)}


def _slots(v: Any, path: tuple = ()) -> list[tuple[Any, Any, tuple]]:
    """Every (container, key, path) in a JSON tree, for values to replace or delete."""
    out = []
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        out.append((v, k, path + (k,)))
        out.extend(_slots(x, path + (k,)))
    return out


def _containers(v: Any, kind: type) -> list[Any]:
    out = [v] if isinstance(v, kind) else []
    for x in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()):
        out.extend(_containers(x, kind))
    return out


def mutate_tree(tree: Any, rng: random.Random, names: list[str]) -> str:
    """Change a parsed JSON tree in place; returns what was done. May put ``Pairs`` (duplicate keys) in it.
    Half the time the change falls in one top-level member, so that small ones (the document's ``model``,
    ``aliases``) are hit as often as the large ``tensors``."""
    if isinstance(tree, dict) and rng.random() < 0.5:
        top = [k for k, v in tree.items() if isinstance(v, (dict, list)) and v]
        if top:
            k = rng.choice(top)
            return f"in {k!r}: " + mutate_tree(tree[k], rng, names)
    slots = _slots(tree)
    op = rng.choice(["replace", "replace", "replace", "int", "int", "int", "delete", "add", "list", "swap", "swap", "dup", "rename"])
    if op == "int":
        ints = [s for s in slots if isinstance(s[0][s[1]], int) and not isinstance(s[0][s[1]], bool)]
        if ints:
            c, k, p = rng.choice(ints)
            x = c[k]
            c[k] = rng.choice([x + 1, x - 1, x + 8, x - 8, x * 2, x // 2, 0, -x, -1, 2**63 - 1, 2**64, 2**48, x + 2**32])
            return f"int {p} {x} -> {c[k]}"
        op = "replace"
    if op == "delete" and slots:
        c, k, p = rng.choice(slots)
        del c[k]
        return f"delete {p}"
    if op == "add" and not _containers(tree, dict):
        op = "replace"
    if op == "add":
        d = rng.choice(_containers(tree, dict))
        key = rng.choice([*names, *d.keys(), "x", "", "__metadata__", "parts", "params", "chunk_size", "chunks"]) if rng.random() < 0.8 else "k"
        d[key] = extreme_value(rng, names)
        return f"add {key!r}"
    if op == "list":
        lists = _containers(tree, list)
        if lists:
            lst = rng.choice(lists)
            how = rng.randrange(4)
            if how == 0 and lst:
                lst.append(rng.choice(lst))
            elif how == 1 and lst:
                lst.pop(rng.randrange(len(lst)))
            elif how == 2:
                lst.insert(rng.randint(0, len(lst)), extreme_value(rng, names))
            else:
                lst.reverse()
            return f"list op {how}"
        op = "replace"
    if op == "swap":
        dicts = [d for d in _containers(tree, dict) if len(d) >= 2]
        if dicts:
            d = rng.choice(dicts)
            a, b = rng.sample(list(d), 2)
            d[a], d[b] = d[b], d[a]
            return f"swap {a!r} {b!r}"
        op = "replace"
    if op in ("dup", "rename"):
        cands = [(c, k, p) for c, k, p in slots if isinstance(c[k], dict) and c[k]] + [(None, None, ())] * isinstance(tree, dict)
        if not cands:
            return "nothing"
        c, k, p = rng.choice(cands)
        d = tree if c is None else c[k]
        if not isinstance(d, dict) or not d:
            return "nothing"
        key = rng.choice(list(d))
        if op == "rename":
            new = rng.choice([*names, *d.keys(), key + "x"])
            d[new] = d.pop(key)
            return f"rename {p} {key!r} -> {new!r}"
        pairs = list(d.items())
        other = extreme_value(rng, names) if rng.random() < 0.5 else rng.choice(pairs)[1]
        pairs.insert(rng.randint(0, len(pairs)), (key, other))
        if c is None:
            return "dup at root (skipped)"  # the root is rebuilt below
        c[k] = Pairs(pairs)
        return f"duplicate key {p + (key,)}"
    if slots:
        c, k, p = rng.choice(slots)
        c[k] = extreme_value(rng, names)
        return f"replace {p}"
    return "nothing"


def mutate_structure(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Parse header and document, change one or both (1-3 changes), write them back with a fresh length."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    doc = json.loads(header["__metadata__"]["codecllm"])
    names += list(doc.get("tensors", {})) + list(doc.get("files", {}))
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if rng.random() < 0.7:
            done.append("doc: " + mutate_tree(doc, rng, names))
        else:
            done.append("header: " + mutate_tree(header, rng, names))
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and isinstance(meta.get("codecllm"), str):
        meta["codecllm"] = dumps(doc)
    elif isinstance(meta, Pairs):  # a duplicated __metadata__ key: fill in every codecllm string
        for _, v in meta.items:
            if isinstance(v, dict) and isinstance(v.get("codecllm"), str):
                v["codecllm"] = dumps(doc)
    text = dumps(header)
    if rng.random() < 0.1:  # a duplicate top-level key
        key = rng.choice(["__metadata__", *names[:5]])
        text = text[:-1] + f",{json.dumps(key)}:{dumps(extreme_value(rng, names))}}}"
        done.append(f"duplicate top-level key {key!r}")
    raw = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.8:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body, "; ".join(done)


INTERESTING_BYTES = [0x00, 0xFF, 0x7F, 0x80, ord("{"), ord("}"), ord('"'), ord("\\"), ord(","), ord(":"), ord(" "), ord("0")]


def mutate_bytes(data: bytes, rng: random.Random, region: str | None = None) -> tuple[bytes, str]:
    """One bytewise change: in the length, the header or the data."""
    b = bytearray(data)
    if not b:
        return rng.randbytes(rng.choice([1, 8, 9])), "bytes into an empty file"
    n = struct.unpack("<Q", data[:8])[0] if len(b) >= 8 else 0
    json_end = 8 + len(data[8:8 + n].rstrip(b" "))  # the header's JSON, without the padding after it
    region = region or rng.choice(["header", "header", "data", "any"])
    lo, hi = {"header": (8, json_end), "data": (8 + n, len(b)), "any": (0, len(b))}[region]
    lo, hi = min(lo, len(b)), min(hi, len(b))
    if hi <= lo:
        lo, hi = 0, len(b)
    ops = ["flip", "flip", "byte", "insert", "delete", "truncate", "extend", "length", "length", "copy"]
    op = rng.choice(ops[:3] + ops[-1:] if region == "data" else ops)
    if op == "flip":
        for _ in range(rng.choice([1, 1, 2, 8])):
            i = rng.randrange(lo, hi)
            b[i] ^= 1 << rng.randrange(8)
    elif op == "byte":
        i = rng.randrange(lo, hi)
        b[i] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.7 else rng.randrange(256)
    elif op == "insert":
        i = rng.randint(lo, hi)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 1, 4, 8, 100])))
    elif op == "delete":
        i = rng.randrange(lo, hi)
        del b[i:i + rng.choice([1, 1, 4, 8, 100])]
    elif op == "truncate":
        del b[rng.randrange(0, len(b)):]
    elif op == "extend":
        b += bytes(rng.choice([0, 32])) * rng.choice([1, 7, 8, 4096]) if rng.random() < 0.5 else rng.randbytes(rng.choice([1, 8, 100]))
    elif op == "length":
        new = rng.choice([n + 1, n - 1, n + 8, n - 8, 0, 1, 2, len(b) - 8, len(b) - 7, 100 * 2**20, 100 * 2**20 + 1,
                          2**63, 2**64 - 1, rng.randrange(2**64)])
        b[:8] = struct.pack("<Q", new % 2**64)
        return bytes(b), f"length {n} -> {new % 2**64}"
    else:  # copy a range over another
        size = rng.choice([4, 8, 64, 512])
        src, dst = rng.randrange(0, max(1, len(b) - size)), rng.randrange(lo, hi)
        b[dst:dst + size] = data[src:src + size]
    return bytes(b), f"{op} in {region}"


def resign(data: bytes) -> bytes:
    """Recompute every checksum in the document from the bytes as they are, so that corrupt payloads get
    past the stored sha256 and reach the decoders (an attacker can write any checksum)."""
    import hashlib

    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    doc = json.loads(header["__metadata__"]["codecllm"])
    start = 8 + n

    def digest(name: str) -> str:
        b, e = header[name]["data_offsets"]
        return hashlib.sha256(data[start + b:start + e]).hexdigest()

    for rec in [*doc["tensors"].values(), *doc["files"].values()]:
        for part in rec["parts"].values():
            part["sha256"]["stored"] = digest(part["tensor"])
            if part["codec"]["id"] == "raw":
                part["sha256"]["decoded"] = part["sha256"]["stored"]
    header["__metadata__"]["codecllm"] = json.dumps(doc, separators=(",", ":"))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[start:]


def mutate(seeds: dict[str, bytes], seed: int, case: int) -> tuple[bytes, str]:
    """Case ``case`` of seed ``seed``: always the same file."""
    rng = random.Random(f"{seed}/{case}")
    name = rng.choice(sorted(seeds))
    data = seeds[name]
    steps = []
    kind = rng.random()
    if kind < 0.2:  # payload bytes changed, checksums recomputed: the decoders see corrupt frames
        for _ in range(rng.choice([1, 1, 2, 8])):
            data, what = mutate_bytes(data, rng, "data")
            steps.append(what)
        steps.append("checksums recomputed")
        data = resign(data)
        if rng.random() < 0.3:
            data, what = mutate_structure(data, rng)
            steps.append(what)
        return data, f"{name}: " + " | ".join(steps)
    if kind < 0.6:
        data, what = mutate_structure(data, rng)
        steps.append(what)
    if kind >= 0.5:
        for _ in range(rng.choice([1, 1, 1, 2, 4])):
            data, what = mutate_bytes(data, rng)
            steps.append(what)
    return data, f"{name}: " + " | ".join(steps)


# --- running one case -----------------------------------------------------------------------------------


class Hang(BaseException):
    """A case ran past its time limit (a BaseException, so that no ``except Exception`` hides it)."""


def read_record(f, rec) -> None:
    """Read and decode one record fully, with every checksum: the reader's public way to get a tensor."""
    f.read_tensor(rec)


def run_file(path: str, load: bool) -> bool:
    """Open, read every record; then, if ``load``, load the model. Returns whether it loaded."""
    from codecllm.format import CllmFile

    with CllmFile(path) as f:
        for rec in [*f.doc.tensors.values(), *f.doc.files.values()]:
            read_record(f, rec)
    if load:
        import codecllm

        codecllm.load(path, device="cpu")
    return load


def _where(tb) -> str:
    frames = traceback.extract_tb(tb)
    ours = [fr for fr in frames if fr.filename.startswith(PACKAGE_DIR)]
    loc = [ours[-1]] if ours else []
    if frames and frames[-1] not in loc:
        loc.append(frames[-1])
    return " -> ".join(f"{os.path.relpath(fr.filename, ROOT) if fr.filename.startswith(str(ROOT)) else Path(fr.filename).name}:{fr.lineno} {fr.name}" for fr in loc)


def _on_alarm(signum, frame):
    raise Hang()


@dataclass
class Outcome:
    kind: str  # "ok", "package", "foreign", "hang"
    name: str = ""  # error class
    message: str = ""
    where: str = ""
    seconds: float = 0.0
    loaded: bool = False


def run_case(path: str, data: bytes, load: bool, time_limit: float) -> Outcome:
    from codecllm.errors import CodecLLMError

    Path(path).write_bytes(data)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    t0 = time.perf_counter()
    try:
        out = Outcome("ok", loaded=run_file(path, load))
    except CodecLLMError as e:
        out = Outcome("package", type(e).__name__)
    except Hang:
        out = Outcome("hang", "Hang", f"over {time_limit} s")
    except Exception as e:  # noqa: BLE001 - everything else is what we look for (MemoryError and RecursionError included)
        out = Outcome("foreign", f"{type(e).__module__}.{type(e).__qualname__}".removeprefix("builtins."), str(e), _where(e.__traceback__))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    out.seconds = time.perf_counter() - t0
    return out


# --- many cases -------------------------------------------------------------------------------------------


@dataclass
class Report:
    cases: int = 0
    ok: int = 0
    package: Counter = field(default_factory=Counter)
    foreign: dict = field(default_factory=dict)  # (type, message pattern, where) -> [count, first case, message]
    hangs: list = field(default_factory=list)  # case numbers
    loads: int = 0
    seconds: float = 0.0  # summed over cases
    slowest: tuple = (0.0, -1)

    def add(self, case: int, out: Outcome) -> None:
        self.cases += 1
        self.loads += out.loaded
        self.seconds += out.seconds
        self.slowest = max(self.slowest, (out.seconds, case))
        if out.kind == "ok":
            self.ok += 1
        elif out.kind == "package":
            self.package[out.name] += 1
        elif out.kind == "hang":
            self.hangs.append(case)
        else:
            key = (out.name, re.sub(r"\d+", "N", out.message)[:160], out.where)
            entry = self.foreign.setdefault(key, [0, case, " ".join(out.message.split())[:300]])
            entry[0] += 1
            entry[1] = min(entry[1], case)

    def merge(self, other: "Report") -> None:
        self.cases += other.cases
        self.ok += other.ok
        self.package.update(other.package)
        for key, (n, case, msg) in other.foreign.items():
            entry = self.foreign.setdefault(key, [0, case, msg])
            entry[0] += n
            if case < entry[1]:
                entry[1], entry[2] = case, msg
        self.hangs += other.hangs
        self.loads += other.loads
        self.seconds += other.seconds
        self.slowest = max(self.slowest, other.slowest)

    @property
    def failures(self) -> int:
        return sum(n for n, _, _ in self.foreign.values()) + len(self.hangs)

    def table(self, seed: int, wall: float | None = None) -> str:
        lines = [f"cases          {self.cases}", f"opened, read   {self.ok} without error ({self.loads} of them also loaded)"]
        lines.append(f"package errors {sum(self.package.values())}")
        for name, n in self.package.most_common():
            lines.append(f"  {n:>8}  {name}")
        lines.append(f"foreign        {sum(n for n, _, _ in self.foreign.values())} in {len(self.foreign)} kinds")
        for (name, _, where), (n, case, msg) in sorted(self.foreign.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"  {n:>8}  {name}: {msg[:120]}")
            lines.append(f"            at {where}; reproduce: --repro {seed}/{case}")
        lines.append(f"hangs          {len(self.hangs)}" + (f" (e.g. --repro {seed}/{self.hangs[0]})" if self.hangs else ""))
        mean = 1000 * self.seconds / max(self.cases, 1)
        lines.append(f"time per case  {mean:.2f} ms mean, {1000 * self.slowest[0]:.0f} ms max (case {self.slowest[1]})")
        if wall is not None:
            lines.append(f"wall time      {wall:.1f} s ({self.cases / max(wall, 1e-9):.0f} cases/s)")
        return "\n".join(lines)


def fuzz(seeds: dict[str, bytes], cases: range, seed: int, load_every: int = 10, time_limit: float = 10.0,
         workdir: str | None = None) -> Report:
    """Run ``cases`` in this process; returns the report."""
    report = Report()
    with tempfile.TemporaryDirectory(prefix="cllm-fuzz-", dir=workdir) as tmp:
        path = os.path.join(tmp, "case.cllm")
        for i in cases:
            data, _ = mutate(seeds, seed, i)
            load = load_every > 0 and i % load_every == 0
            report.add(i, run_case(path, data, load, time_limit))
    return report


# --- worker processes -----------------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(seeds: dict[str, bytes], seed: int, load_every: int, time_limit: float, mem_gb: float) -> None:
    import torch

    torch.set_num_threads(1)
    _worker.update(seeds=seeds, seed=seed, load_every=load_every, time_limit=time_limit)
    # warm up (imports, thread pools), then cap the address space: an allocation sized by a claim in a
    # corrupt file fails with MemoryError (foreign) instead of taking the machine
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "seed.cllm")
        Path(path).write_bytes(seeds[sorted(seeds)[0]])
        run_file(path, load=True)
    if mem_gb > 0:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        limit = vm + int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _run_batch(batch: tuple[int, int]) -> Report:
    w = _worker
    return fuzz(w["seeds"], range(*batch), w["seed"], w["load_every"], w["time_limit"])


def run_parallel(seeds: dict[str, bytes], cases: int, seed: int, jobs: int, load_every: int, time_limit: float,
                 mem_gb: float, progress: Callable[[Report], None] | None = None, batch: int = 500) -> Report:
    import multiprocessing as mp

    batches = [(s, min(s + batch, cases)) for s in range(0, cases, batch)]
    report = Report()
    ctx = mp.get_context("spawn")  # the parent has run the converter's thread pools: no fork
    with ctx.Pool(jobs, _init_worker, (seeds, seed, load_every, time_limit, mem_gb), maxtasksperchild=20) as pool:
        for r in pool.imap_unordered(_run_batch, batches):
            report.merge(r)
            if progress:
                progress(report)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--load-every", type=int, default=10,
                    help="codecllm.load every Nth case, once its records have been read without error (0: never)")
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--mem-gb", type=float, default=4.0, help="address space a worker may add to its own (0: no cap)")
    ap.add_argument("--repro", metavar="SEED/CASE", help="rebuild one case, run it, print its traceback")
    ap.add_argument("--out", help="with --repro: also write the case's file here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cllm-fuzz-seeds-") as tmp:
        seeds = seed_files(Path(tmp))
    if args.repro:
        s, c = (int(x) for x in args.repro.split("/"))
        data, what = mutate(seeds, s, c)
        print(f"case {s}/{c}: {what} ({len(data)} bytes)")
        with tempfile.TemporaryDirectory() as tmp:
            path = args.out or os.path.join(tmp, "case.cllm")
            Path(path).write_bytes(data)
            try:
                run_file(path, load=c % args.load_every == 0 if args.load_every else False)
                print("no exception")
            except Exception:
                traceback.print_exc()
        return 0

    print(f"seed files: {', '.join(f'{k} ({len(v)} bytes)' for k, v in seeds.items())}")
    print(f"{args.cases} cases, seed {args.seed}, {args.jobs} jobs, load every {args.load_every}, "
          f"time limit {args.time_limit} s, memory cap +{args.mem_gb} GiB per worker", flush=True)
    t0 = time.perf_counter()
    last = [t0]

    def progress(r: Report) -> None:
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            print(f"  {r.cases} cases, {r.failures} failures, {time.perf_counter() - t0:.0f} s", flush=True)

    report = run_parallel(seeds, args.cases, args.seed, args.jobs, args.load_every, args.time_limit, args.mem_gb, progress)
    print(report.table(args.seed, time.perf_counter() - t0))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
