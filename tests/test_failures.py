"""Clean failures and no litter: every failure is one line and a non-zero exit, and no conversion leaves a
temporary file behind (failed, interrupted by a signal, or killed: then the next conversion removes it).

Full and read-only file systems are real tmpfs mounts where this process may mount one (root with
CAP_SYS_ADMIN) and simulated ``OSError``s everywhere.
"""

import contextlib
import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

import codecllm
from codecllm import converter as converter_mod
from codecllm import output as output_mod
from codecllm.cli import convert_cmd, dump_cmd
from codecllm.errors import InputError, Interrupted, NotCllmError, OutputError, SourceError, TruncatedFileError
from codecllm.format import CllmFile
from codecllm.output import STALE_NAME, temp_name

ROOT = Path(codecllm.__file__).resolve().parent.parent


@pytest.fixture
def runner():
    return CliRunner()


def one_line_error(r, exit_code=1) -> str:
    assert r.exit_code == exit_code, r.output
    assert "Traceback" not in r.output and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    return r.output.strip()


def temps(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if STALE_NAME.match(n))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path``; skips the test where mounting is not allowed."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


# --- --version --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd, name", [(convert_cmd, "codecllm-convert"), (dump_cmd, "codecllm-dump")], ids=["convert", "dump"])
def test_version(runner, cmd, name):
    r = runner.invoke(cmd, ["--version"])
    assert r.exit_code == 0 and r.output == f"{name} {codecllm.__version__}\n"


# --- output that cannot be written ------------------------------------------------------------------


def simulate_read_only(monkeypatch, directory: Path) -> None:
    """Creating a file in ``directory`` fails with EROFS, as on a read-only mount."""
    real_open = os.open

    def fake_open(path, flags, *args, **kw):
        if flags & os.O_CREAT and Path(os.fspath(path)).parent == directory:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", fake_open)


class _FullDisk:
    """Wraps a temporary file; writes fail with ENOSPC once ``space[0]`` bytes are used up."""

    def __init__(self, f, space: list[int]):
        self.f, self.space = f, space

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.space[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.space[0] -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def simulate_full_disk(monkeypatch, space: int) -> None:
    left = [space]
    real_init = output_mod._TempFile.__init__

    def init(self, path, fd, out, *rest):
        real_init(self, path, fd, out, *rest)
        self._f = _FullDisk(self._f, left)

    monkeypatch.setattr(output_mod._TempFile, "__init__", init)


def small_folder(tmp_path: Path, monkeypatch, how: str, space: int):
    """A folder with room for ``space`` bytes: a tmpfs of that size (``mounted``), or writes through
    ``AtomicOutput``'s files failing past it (``simulated``)."""
    if how == "mounted":
        return tmpfs(tmp_path / "small", f"size={space}")
    (tmp_path / "small").mkdir()
    simulate_full_disk(monkeypatch, space)
    return contextlib.nullcontext(tmp_path / "small")


@pytest.fixture(scope="module")
def tiny_size(tmp_path_factory) -> int:
    """Bytes of the tiny model's ``.cllm``."""
    from conftest import llama_config, save_tiny

    d = tmp_path_factory.mktemp("size")
    codecllm.convert(save_tiny(d / "src", llama_config()), d / "m.cllm")
    return (d / "m.cllm").stat().st_size


@pytest.mark.parametrize("how", ["mounted", "simulated"])
def test_read_only_file_system(runner, tiny_llama, tmp_path, monkeypatch, how):
    if how == "mounted":
        ctx = tmpfs(tmp_path / "ro", "ro,size=1m")
    else:
        (tmp_path / "ro").mkdir()
        ctx = contextlib.nullcontext(tmp_path / "ro")
        simulate_read_only(monkeypatch, tmp_path / "ro")
    with ctx as d:
        r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(d / "m.cllm")])
        assert one_line_error(r) == f"error: cannot write {d / 'm.cllm'}: Read-only file system"
        assert os.listdir(d) == []


@pytest.mark.parametrize("out", ["/proc/x.cllm", "/sys/x.cllm"])
def test_pseudo_file_systems(runner, tiny_llama, out):
    if not Path(out).parent.is_dir():
        pytest.skip(f"no {Path(out).parent} here")
    r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", out])
    line = one_line_error(r)
    assert line.startswith(f"error: cannot write {out}: ")  # ENOENT in /proc, EACCES in /sys
    assert not os.path.lexists(out)


@pytest.mark.parametrize("phase, fraction", [("data", 0.25), ("final", 1.5)], ids=["while-encoding", "while-publishing"])
@pytest.mark.parametrize("how", ["mounted", "simulated"])
def test_full_disk(runner, tiny_llama, tmp_path, monkeypatch, tiny_size, how, phase, fraction):
    space = int(tiny_size * fraction)
    if phase == "final":  # a header larger than the space left for it: the data file fits, the copy beside it does not
        monkeypatch.setattr(converter_mod, "_header_bound", lambda *a: 0)
    with small_folder(tmp_path, monkeypatch, how, space) as d:
        r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(d / "m.cllm")])
        assert one_line_error(r) == f"error: cannot write {d / 'm.cllm'}: No space left on device"
        assert os.listdir(d) == []


@pytest.mark.parametrize("how", ["mounted", "simulated"])
def test_conversion_needs_no_second_copy_of_the_file(runner, tiny_llama, tmp_path, monkeypatch, tiny_size, how):
    """The data goes where the finished file has it and the header into the space left before it: the
    disk needs room for the output once (plus its header's padding), not twice."""
    monkeypatch.setattr(output_mod.shutil, "copyfileobj", None)  # no copy is made
    with small_folder(tmp_path, monkeypatch, how, int(tiny_size * 1.25)) as d:
        r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(d / "m.cllm")])
        assert r.exit_code == 0, r.output
        assert os.listdir(d) == ["m.cllm"]
        with CllmFile(d / "m.cllm") as f:
            assert f.doc.tensors


def test_failure_writing_the_header_into_its_space_leaves_nothing(runner, tiny_llama, tmp_path, monkeypatch):
    """The header goes last, into the space left before the data: a failure there is the same one-line
    error, and the data file goes away."""
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output_mod.os, "pwrite", full)
    r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(tmp_path / "m.cllm")])
    assert one_line_error(r) == f"error: cannot write {tmp_path / 'm.cllm'}: No space left on device"
    assert temps(tmp_path) == [] and not (tmp_path / "m.cllm").exists()


def test_write_errors_are_codecllm_errors(tiny_llama, tmp_path, monkeypatch):
    simulate_full_disk(monkeypatch, 1000)
    with pytest.raises(OutputError, match="No space left on device") as e:
        codecllm.convert(tiny_llama, tmp_path / "m.cllm")
    assert isinstance(e.value, codecllm.CodecLLMError) and str(tmp_path / "m.cllm") in str(e.value)
    assert temps(tmp_path) == [] and not (tmp_path / "m.cllm").exists()


def test_os_error_reading_the_source_is_one_line(runner, tiny_llama, tmp_path, monkeypatch):
    from codecllm.source import Checkpoint

    def unreadable(self, name):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self.tensors[name].path))

    monkeypatch.setattr(Checkpoint, "read", unreadable)
    r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(tmp_path / "m.cllm")])
    assert one_line_error(r) == f"error: {tiny_llama / 'model.safetensors'}: Permission denied"
    assert temps(tmp_path) == [] and not (tmp_path / "m.cllm").exists()


# --- truncated and foreign files ----------------------------------------------------------------------


@pytest.mark.parametrize("keep", [200, 0.5], ids=["in-header", "in-data"])
def test_truncated_source_names_the_file(runner, tiny_llama, tmp_path, keep):
    shard = tiny_llama / "model.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: keep if isinstance(keep, int) else int(len(raw) * keep)])
    r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(tmp_path / "m.cllm")])
    assert str(shard) in one_line_error(r)
    assert temps(tmp_path) == [] and not (tmp_path / "m.cllm").exists()


@pytest.mark.parametrize("keep, message", [(200, "runs past the end"), (-100, "truncated")], ids=["in-header", "in-data"])
def test_truncated_cllm_names_the_file(runner, tmp_path, golden_bytes, keep, message):
    bad = tmp_path / "cut.cllm"
    bad.write_bytes(golden_bytes[:keep])
    line = one_line_error(runner.invoke(dump_cmd, [str(bad)]))
    assert line.startswith(f"error: {bad}: ") and message in line
    with pytest.raises(TruncatedFileError, match=message) as e:
        codecllm.load(bad)
    assert str(e.value).startswith(f"{bad}: ")


def _text(p: Path) -> Path:
    p.write_text("hello, this is not a model at all\n")
    return p


def _json(p: Path) -> Path:
    p.write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}\n')
    return p


def _safetensors(p: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(p))
    return p


@pytest.mark.parametrize("make", [_text, _json, _safetensors], ids=["text", "json", "safetensors"])
def test_not_a_cllm_file(runner, tmp_path, make):
    f = make(tmp_path / "model.bin")
    line = one_line_error(runner.invoke(dump_cmd, [str(f)]))
    assert line.startswith(f"error: {f}: ") and "not a .cllm file" in line and "header length" not in line
    with pytest.raises(NotCllmError, match="not a .cllm file"):
        codecllm.load(f)


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_load_unopenable_names_the_path(tmp_path, what):
    path = tmp_path / "nope.cllm"
    if what == "directory":
        path.mkdir()
    with pytest.raises(InputError, match="cannot open") as e:
        CllmFile(path)
    assert str(e.value).startswith(f"{path}: ")
    with pytest.raises(codecllm.CodecLLMError):
        codecllm.load(path)


# --- signals ------------------------------------------------------------------------------------------

# Runs codecllm-convert SRC -o OUT with one step made slow: at PHASE it prints "ready" and sleeps, so that
# the test can signal it while its temporary files exist. "published": it signals itself just before the
# finished file is moved into place (the signal must wait until the output is complete and the
# temporary files are gone, then end the process as it would have).
SCRIPT = r"""
import os, signal, sys, time
from codecllm import output, source
from codecllm.cli import convert_cmd

phase, src, out = sys.argv[1:]

def pause():
    print("ready", flush=True)
    time.sleep(60)

if phase == "encoding":
    read, calls = source.Checkpoint.read, []
    def slow_read(self, name):
        calls.append(name)
        if len(calls) == 5:
            pause()
        return read(self, name)
    source.Checkpoint.read = slow_read
elif phase == "publishing":
    finish = output.AtomicOutput._finish
    def slow_finish(*a, **kw):
        pause()
        return finish(*a, **kw)
    output.AtomicOutput._finish = slow_finish
elif phase == "copying":  # a header larger than its space: the data is copied behind it
    from codecllm import converter
    converter._header_bound = lambda *a: 0
    copy = output.shutil.copyfileobj
    def slow_copy(*a, **kw):
        pause()
        return copy(*a, **kw)
    output.shutil.copyfileobj = slow_copy
elif phase == "published":
    move = output.AtomicOutput._move
    def signalled_move(self, tmp):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # a handler would run here if the signal were not held
        return move(self, tmp)
    output.AtomicOutput._move = signalled_move
convert_cmd([src, "-o", out])
"""


def _default_signals():
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)


def start_conversion(phase: str, src: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, phase, str(src), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_signals,
    )


def wait_ready(p: subprocess.Popen) -> None:
    line = p.stdout.readline()
    if line != "ready\n":
        p.kill()
        raise AssertionError(f"the conversion did not pause: {line!r} {p.communicate()}")


@pytest.mark.parametrize(
    "sig, phase",
    [(signal.SIGTERM, "encoding"), (signal.SIGTERM, "publishing"), (signal.SIGHUP, "encoding"), (signal.SIGHUP, "publishing"), (signal.SIGINT, "encoding"),
     (signal.SIGTERM, "copying")],
    ids=["term-encoding", "term-publishing", "hup-encoding", "hup-publishing", "int-encoding", "term-copying"],
)
def test_signal_leaves_no_temporary_file(tiny_llama, tmp_path, sig, phase):
    d = tmp_path / "out"
    d.mkdir()
    p = start_conversion(phase, tiny_llama, d / "m.cllm")
    wait_ready(p)
    assert len(temps(d)) == (2 if phase == "copying" else 1)  # the signal does come while they exist
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert os.listdir(d) == []
    if sig == signal.SIGINT:  # KeyboardInterrupt: click's "Aborted!"
        assert p.returncode == 1
        return
    assert p.returncode == 128 + sig
    assert err == f"error: stopped by {signal.Signals(sig).name}; {d / 'm.cllm'} was not written\n"


def test_signal_after_publishing_waits_for_the_end(tiny_llama, tmp_path):
    p = start_conversion("published", tiny_llama, tmp_path / "m.cllm")
    _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM, err  # the default action, once nothing is left to clean
    assert temps(tmp_path) == []
    with CllmFile(tmp_path / "m.cllm") as f:  # complete
        assert f.doc.tensors


def test_sigkill_leftovers_are_removed_by_the_next_conversion(tiny_llama, tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    p = start_conversion("encoding", tiny_llama, d / "m.cllm")
    wait_ready(p)
    p.kill()
    p.communicate(timeout=60)
    left = temps(d)
    assert len(left) == 1 and f"-{p.pid}-" in left[0]
    codecllm.convert(tiny_llama, d / "other.cllm")
    assert os.listdir(d) == ["other.cllm"]


def _require_default(*signums):
    for s in signums:
        if signal.getsignal(s) != signal.SIG_DFL:
            pytest.skip(f"{signal.Signals(s).name} is handled by the test runner")


def test_handlers_are_installed_only_during_a_conversion(tiny_llama, tmp_path):
    _require_default(signal.SIGTERM, signal.SIGHUP)
    seen = []
    codecllm.convert(tiny_llama, tmp_path / "m.cllm", progress=lambda *_: seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP))))
    assert all(callable(t) and callable(h) for t, h in seen)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


def test_ignored_signal_stays_ignored(tiny_llama, tmp_path):
    _require_default(signal.SIGTERM)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        seen = []
        codecllm.convert(tiny_llama, tmp_path / "m.cllm", progress=lambda *_: seen.append(signal.getsignal(signal.SIGHUP)))
        assert set(seen) == {signal.SIG_IGN} and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_sigterm_in_process_raises_interrupted(tiny_llama, tmp_path):
    _require_default(signal.SIGTERM)

    def terminate(name, n):
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL  # never kill the test runner
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as e:
        codecllm.convert(tiny_llama, tmp_path / "m.cllm", progress=terminate)
    assert e.value.signum == signal.SIGTERM and not isinstance(e.value, Exception)
    assert os.listdir(tmp_path) == ["tiny-llama"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_conversion_in_a_thread_leaves_handlers_alone(tiny_llama, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    seen, errors = [], []

    def work():
        try:
            codecllm.convert(tiny_llama, tmp_path / "m.cllm", progress=lambda *_: seen.append(signal.getsignal(signal.SIGTERM)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert errors == [] and set(seen) == {before} and (tmp_path / "m.cllm").is_file()


# --- what a killed writer left: recognized exactly --------------------------------------------------


def test_stale_temporary_files_of_dead_writers_are_removed(tiny_llama, tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    dead = dead_pid()
    stale = [d / temp_name(d / "m.cllm", "data", pid=dead), d / temp_name(d / "other.cllm", "tmp", pid=dead)]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    codecllm.convert(tiny_llama, d / "m.cllm")
    assert os.listdir(d) == ["m.cllm"]


def test_files_that_are_not_stale_are_kept(tiny_llama, tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    dead = dead_pid()
    user_file = tmp_path / "precious.cllm"
    user_file.write_bytes(b"mine")
    keep = {
        temp_name(d / "m.cllm", "data", pid=os.getppid()): "live writer (the parent process)",
        temp_name(d / "m.cllm", "tmp", pid=os.getpid()): "live writer (this process)",
        temp_name(d / "m.cllm", "data", pid=dead, token="0123456789abcdef"): "locked: a writer on another host",
        f".m.cllm.codecllm-{dead}-0123456789abcde.data": "token too short",
        f"m.cllm.codecllm-{dead}-0123456789abcdef.data": "no leading dot",
        f".m.cllm.codecllm-{dead}-0123456789abcdef.data.bak": "other suffix",
        f".m.cllm.{dead}.data": "not our mark",
        f".m.cllm.codecllm-{dead}-0123456789ABCDEF.tmp": "not our token",
    }
    for name in keep:
        (d / name).write_bytes(b"user data")
    symlink = d / temp_name(d / "m.cllm", "data", pid=dead, token="fedcba9876543210")
    symlink.symlink_to(user_file)
    directory = d / temp_name(d / "m.cllm", "tmp", pid=dead, token="00000000000000ff")
    directory.mkdir()
    lock = os.open(d / temp_name(d / "m.cllm", "data", pid=dead, token="0123456789abcdef"), os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        codecllm.convert(tiny_llama, d / "m.cllm")
    finally:
        os.close(lock)
    assert sorted(os.listdir(d)) == sorted([*keep, symlink.name, directory.name, "m.cllm"])
    assert all((d / n).read_bytes() == b"user data" for n in keep)
    assert user_file.read_bytes() == b"mine"


def test_failed_conversion_into_a_folder_with_stale_files_still_fails_cleanly(runner, tiny_llama, tmp_path, monkeypatch):
    simulate_full_disk(monkeypatch, 1000)
    stale = tmp_path / temp_name(tmp_path / "m.cllm", "data", pid=dead_pid())
    stale.write_bytes(b"x")
    r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(tmp_path / "m.cllm")])
    assert "No space left on device" in one_line_error(r)
    assert temps(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["tiny-llama"]


def test_source_error_leaves_no_temporary_file(runner, tiny_llama, tmp_path, monkeypatch):
    from codecllm.source import Checkpoint

    def broken(self, name):
        raise SourceError(f"{self.tensors[name].path}: short read of tensor {name!r}")

    monkeypatch.setattr(Checkpoint, "read", broken)
    r = runner.invoke(convert_cmd, [str(tiny_llama), "-o", str(tmp_path / "m.cllm")])
    assert "short read" in one_line_error(r)
    assert sorted(os.listdir(tmp_path)) == ["tiny-llama"]


def test_file_system_without_locks_still_converts(tiny_llama, tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(output_mod.fcntl, "flock", no_locks)
    codecllm.convert(tiny_llama, tmp_path / "m.cllm")
    assert temps(tmp_path) == []
    with CllmFile(tmp_path / "m.cllm") as f:
        assert f.doc.tensors
