"""``codecllm-convert`` and ``codecllm-dump``: thin Click layers over the library.

Library errors (``CodecLLMError``, and ``OSError`` as a safety net) become one line on stderr and exit
code 1; usage errors exit 2; SIGTERM/SIGHUP during a conversion exit 128 + the signal's number, after the
temporary files are gone.
"""

from __future__ import annotations

import json
import math
import sys

import click

from . import __version__
from .codecs import DEFAULT_CHUNK_SIZE, codec_ids, default_codec_id
from .errors import CodecLLMError, Interrupted
from .schemes import default_scheme_id, scheme_ids


def _fail(e: Exception) -> None:
    click.echo(f"error: {_escape(str(e))}", err=True)
    sys.exit(1)


def _os_error(e: OSError) -> CodecLLMError:
    where = f"{e.filename}: " if e.filename is not None else ""
    return CodecLLMError(f"{where}{e.strerror or e}")


def _escape(s: str) -> str:
    """Names read from a file may hold control characters: show them escaped, never raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _parse_size(text: str) -> int:
    t = text.strip().lower()
    for suffix, mult in (("kib", 1024), ("k", 1024), ("mib", 1 << 20), ("m", 1 << 20)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


class _SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return _parse_size(value)
        except ValueError:
            self.fail(f"{value!r} is not a size (e.g. 65536, 64k, 1m)", param, ctx)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(file_okay=False, dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .cllm file to write.")
@click.option("--quant", type=click.Choice(scheme_ids()), default=default_scheme_id(), show_default=True,
              help="Quantization scheme of Linear, Conv1D and Embedding weights (lossless: every tensor bit-exact, entropy-coded in byte planes; none: bit-exact, the bytes entropy-coded as they are).")
@click.option("--group-size", type=int, default=None, help="Weights per scale of a grouped scheme (int4: 32, 64 or 128; default 64).")
@click.option("--quant-override", "overrides", multiple=True, metavar="PATTERN=SCHEME",
              help="Scheme for modules matching PATTERN (repeatable; the last match wins, also over the exact edge down_proj; "
                   "a tied pair follows its matching member; the --quant scheme named alone takes --group-size), "
                   "e.g. 'model.embed_tokens=int8' or '*.down_proj=int4:g32'.")
@click.option("--codec", type=click.Choice(codec_ids()), default=default_codec_id(), show_default=True,
              help="Entropy codec of the stored parts (raw: uncompressed).")
@click.option("--chunk-size", type=_SizeType(), default=DEFAULT_CHUNK_SIZE, show_default=True, help="Bytes per independently coded chunk.")
@click.option("--level", type=int, default=None, help="Codec level (zstd: 1-22, default 3).")
@click.option("--skip", multiple=True, metavar="PATTERN", help="Keep modules matching this glob unquantized (repeatable), e.g. 'lm_head' or 'model.embed_tokens'.")
@click.option("--quantize-all", is_flag=True, help="Also quantize the MLP output projections of the first and last blocks, and give the "
              "embedding and value projections the scheme's own group size (by default they take half of it).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--hf-dir", type=click.Path(file_okay=False), default=None,
              help="Also write a directory that transformers' from_pretrained loads (after `import codecllm`).")
@click.version_option(__version__, "--version", prog_name="codecllm-convert", message="%(prog)s %(version)s")
def convert_cmd(source, output, quant, group_size, overrides, codec, chunk_size, level, skip, quantize_all, force, as_json, hf_dir):
    """Convert the Hugging Face model directory SOURCE into a compressed .cllm file."""
    from .converter import convert

    bar = None
    try:
        progress = None
        if sys.stderr.isatty() and not as_json:
            from .source import Checkpoint

            total = sum(t.nbytes for t in Checkpoint(source).tensors.values())
            bar = click.progressbar(length=total, label="converting", file=sys.stderr)
            bar.__enter__()
            progress = lambda name, n: bar.update(n)  # noqa: E731
        pairs = []
        for item in overrides:
            pat, eq, spec = item.partition("=")
            if not eq or not pat or not spec:
                raise CodecLLMError(f"--quant-override {item!r} is not PATTERN=SCHEME")
            pairs.append((pat, spec))
        summary = convert(source, output, quant=quant, group_size=group_size, overrides=pairs, codec=codec, chunk_size=chunk_size, level=level, skip=skip, quantize_all=quantize_all,
                          force=force, progress=progress)
        if hf_dir is not None:
            from .hf import write_hf_dir

            write_hf_dir(output, hf_dir, force=force)
    except CodecLLMError as e:
        _fail(e)
    except OSError as e:
        _fail(_os_error(e))
    except Interrupted as e:
        if bar is not None:
            bar.__exit__(None, None, None)
            bar = None
        click.echo(f"error: {_escape(str(e))}", err=True)
        sys.exit(128 + e.signum)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    data = summary.to_json()
    for w in summary.warnings:
        click.echo(f"warning: {_escape(w)}", err=True)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    t, q = data["totals"], data["quantized_weights"]
    rows = [
        ("tensors", f"{t['tensors']}", "", "", ""),
        ("all tensors", "", _size(t["bytes_in"]), _size(t["bytes_out"]), f"{t['bytes_in'] / max(t['bytes_out'], 1):.2f}x"),
        (f"{quant} weights", f"{q['tensors']}", _size(q["bytes_in"]), _size(q["bytes_out"]), f"{q['bytes_in'] / max(q['bytes_out'], 1):.2f}x"),
        ("file", "", "", _size(data["file_bytes"]), ""),
    ]
    click.echo(f"{'':<16}{'count':>8}{'bytes in':>14}{'bytes out':>14}{'ratio':>9}")
    for r in rows:
        click.echo(f"{r[0]:<16}{r[1]:>8}{r[2]:>14}{r[3]:>14}{r[4]:>9}")
    click.echo(
        f"{quant} weights: {q['ratio']:.3f}x of their original bytes; the order-0 entropy bound of the encoded "
        f"bytes is {q['bound_ratio']:.3f}x ({q['ratio'] / max(q['bound_ratio'], 1e-9):.1%} of it reached)"
    )
    by_scheme: dict[str, list[int]] = {}  # scheme -> [tensors, weights, bytes out]
    for ts in data["tensors"]:
        acc = by_scheme.setdefault(ts["scheme"], [0, 0, 0])
        acc[0], acc[1], acc[2] = acc[0] + 1, acc[1] + math.prod(ts["shape"]), acc[2] + ts["bytes_out"]
    per = "; ".join(f"{_escape(k)} {8 * v[2] / max(v[1], 1):.2f} ({v[0]} tensors)" for k, v in sorted(by_scheme.items()))
    click.echo(f"{data['bits_per_weight']:.2f} bits per weight over all tensors: {per} (per tensor: codecllm-dump, or --json)")
    click.echo(f"{data['seconds']:.2f} s -> {output}" + (f" (and {hf_dir}/)" if hf_dir else ""))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--verify", is_flag=True, help="Decode every tensor and check both checksums.")
@click.option("--no-tensors", is_flag=True, help="Leave out the per-tensor table.")
@click.version_option(__version__, "--version", prog_name="codecllm-dump", message="%(prog)s %(version)s")
def dump_cmd(file, as_json, verify, no_tensors):
    """Show the header of a .cllm FILE: format, model, embedded files and tensors."""
    from .dump import describe

    try:
        info = describe(file, verify=verify, tensors=not no_tensors)
    except CodecLLMError as e:
        _fail(e)
    except OSError as e:
        _fail(_os_error(e) if e.filename is not None else CodecLLMError(f"{file}: {e.strerror or e}"))
    if as_json:
        click.echo(json.dumps(info, indent=2, ensure_ascii=True))
        return
    m = info["model"]
    click.echo(f"{_escape(info['path'])}: CodecLLM format v{info['format_version']}, {info['file_bytes']} bytes (header {info['header_bytes']})")
    click.echo(f"model: {_escape(str(m.get('model_type')))} {_escape(', '.join(map(str, m.get('architectures') or [])))} ({_escape(str(m.get('dtype')))})")
    click.echo("files: " + ", ".join(f"{_escape(n)} ({v['bytes']} B)" for n, v in info["files"].items()))
    for alias, target in info["aliases"].items():
        click.echo(f"alias: {_escape(alias)} -> {_escape(target)}")
    if "tensors" in info:
        width = max([len(_escape(r["name"])) for r in info["tensors"]] + [4])
        sw = max([len(_escape(r["scheme"])) + 2 for r in info["tensors"]] + [18])
        click.echo(f"{'name':<{width}}  {'shape':<14}{'scheme':<{sw}}{'codec':<6}{'chunks':>7}{'bytes':>12}{'stored':>12}{'ratio':>8}{'bits/w':>8}")
        for r in info["tensors"]:
            shape = "x".join(map(str, r["shape"]))
            click.echo(
                f"{_escape(r['name']):<{width}}  {shape:<14}{_escape(r['scheme']):<{sw}}{r['codec']:<6}{r['chunks']:>7}"
                f"{r['bytes_original']:>12}{r['bytes_stored']:>12}{r['ratio']:>7.2f}x{r['bits_per_weight']:>8.2f}"
            )
    t = info["totals"]
    click.echo(
        f"total: {t['tensors']} tensors, {t['bytes_original']} bytes -> {t['bytes_stored']} stored ({t['ratio']:.2f}x, "
        f"{t['bits_per_weight']:.2f} bits per weight), embedded files {t['bytes_files']} bytes"
    )
    g = info["gpu_bytes"]
    if "error" in g:
        click.echo(f"on a GPU: not estimated ({_escape(g['error'])})")
    else:
        click.echo(f"on a GPU: resident {g['resident']['bytes']} bytes; stream {g['stream']['bytes']} bytes "
                   f"({g['stream']['bytes'] / max(g['resident']['bytes'], 1):.2f}x, decode step about {g['stream']['speed']:.2f}x as fast)")
    if verify:
        click.echo("verify: every tensor decoded and both checksums match")


@click.group()
@click.version_option(__version__, "--version", prog_name="codecllm", message="%(prog)s %(version)s")
def main():
    """codecllm: convert (codecllm-convert) and dump (codecllm-dump)."""


main.add_command(convert_cmd, "convert")
main.add_command(dump_cmd, "dump")

if __name__ == "__main__":
    main()
