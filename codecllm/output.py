"""Writing the output file atomically, and leaving nothing behind when that fails.

A conversion writes into temporary files next to the output and moves the finished one into place. The
temporary files go away when the conversion fails, on Ctrl-C, and on SIGTERM or SIGHUP, which
``AtomicOutput`` turns into ``Interrupted`` while it is open (only where the signal's action was the
default one: that would have killed the process with its temporary files still there). A SIGKILL cannot
be caught; the next conversion into the same folder removes what such a writer left (``remove_stale``).

Every ``OSError`` of writing becomes an ``OutputError`` that names the output and the system's reason,
e.g. "cannot write /mnt/x.cllm: No space left on device".

Temporary files are named ``.<output name>.codecllm-<pid>-<16 hex digits>.data`` (or ``.tmp``). Their
writer holds an exclusive ``flock`` on each from the moment it exists until it is removed or published.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from pathlib import Path

from .errors import Interrupted, OutputError, OutputExistsError

COPY_BUFFER = 16 * 1024 * 1024
STALE_NAME = re.compile(r"\A\..+\.codecllm-(?P<pid>[1-9][0-9]{0,9})-[0-9a-f]{16}\.(?:data|tmp)\Z", re.DOTALL)
CAUGHT_SIGNALS = ("SIGTERM", "SIGHUP")


def temp_name(out: Path, suffix: str, pid: int | None = None, token: str | None = None) -> str:
    """The name of a temporary file for ``out`` (``suffix`` is ``data`` or ``tmp``)."""
    pid = os.getpid() if pid is None else pid
    token = secrets.token_hex(8) if token is None else token
    return f".{out.name}.codecllm-{pid}-{token}.{suffix}"


def _output_error(out: Path, e: OSError) -> OutputError:
    return OutputError(f"cannot write {out}: {e.strerror or e}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # another user's process, or a number no process can have
        return True
    return True


def remove_stale(directory: Path) -> list[Path]:
    """Remove the temporary files of conversions into ``directory`` that died without cleaning up.

    A file is removed only if all of these hold: its name is exactly a temporary name of this module
    (``STALE_NAME``), it is a regular file (not a link) owned by this user, the process whose id the name
    carries is not alive, and an exclusive ``flock`` on it can be taken at once. A live writer holds that
    lock, including one on another host or in another PID namespace where the id means nothing; a
    user's file of a similar name has no matching name or a live or foreign owner. Nothing here raises.
    """
    removed: list[Path] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = STALE_NAME.match(name)
        if m is None or _alive(int(m["pid"])):
            continue
        path = directory / name
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            # opened for writing: NFS grants an exclusive lock only on such a descriptor
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError when a writer holds it
            opened, now = os.fstat(fd), os.lstat(path)
            if (opened.st_dev, opened.st_ino) == (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


class _SignalsToInterrupted:
    """While armed, SIGTERM and SIGHUP raise ``Interrupted`` in the main thread; while held, they wait and
    are delivered again, to the handler that was there before, when the handlers are restored."""

    def __init__(self, what: str):
        self.what = what
        self.previous: dict[int, object] = {}
        self.armed = False
        self.deferred: int | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works in the main thread only; there the default action stays
        for name in CAUGHT_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
                self.previous[signum] = signal.signal(signum, self._handle)
        self.armed = True

    def _handle(self, signum, frame) -> None:
        if self.armed:
            self.armed = False
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}; {self.what} was not written")
        if self.deferred is None:
            self.deferred = signum

    def hold(self) -> None:
        self.armed = False

    def restore(self) -> None:
        self.armed = False
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()
        if self.deferred is not None:
            signum, self.deferred = self.deferred, None
            signal.raise_signal(signum)  # the default action: the process ends, with nothing left behind


class _TempFile:
    """A temporary file open for writing; an ``OSError`` becomes an ``OutputError`` naming the output."""

    def __init__(self, path: str, fd: int, out: Path, reserve: int = 0):
        self.path = path
        self.out = out
        self.reserve = reserve  # bytes left free at the start, for a header written last
        self._f = os.fdopen(fd, "wb")
        if reserve:
            self._f.seek(reserve)

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            raise _output_error(self.out, e) from e

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:
            raise _output_error(self.out, e) from e

    def __enter__(self) -> "_TempFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: keep that error, not one from flushing what is left
            self._f.close()
        except OSError:
            pass


class AtomicOutput:
    """The temporary files of one output, and moving the finished one into place.

    >>> with AtomicOutput(Path("model.cllm"), force=False) as output:   # doctest: +SKIP
    ...     with output.temp("data") as data:
    ...         data.write(payload)
    ...     output.publish(header, data)

    ``publish`` never replaces an existing file unless ``force``. Leaving the block removes every
    temporary file still there, whatever happened.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        self._locks: dict[str, int] = {}  # temporary path -> a descriptor holding its flock
        self._signals = _SignalsToInterrupted(str(self.out))

    def __enter__(self) -> "AtomicOutput":
        remove_stale(self.out.parent)
        self._signals.install()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._signals.hold()
        try:
            for path in list(self._locks):
                self._discard(path)
        finally:
            self._signals.restore()

    def temp(self, suffix: str, reserve: int = 0) -> _TempFile:
        """A new temporary file next to the output, locked, open for writing from byte ``reserve`` on."""
        for _ in range(100):
            path = str(self.out.parent / temp_name(self.out, suffix))
            self._locks[path] = -1  # known before it exists: an interrupt from here on still removes it
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                del self._locks[path]
                continue
            except OSError as e:
                del self._locks[path]
                raise _output_error(self.out, e) from e
            try:
                self._locks[path] = os.dup(fd)
                try:
                    fcntl.flock(self._locks[path], fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # a file system without locks: the PID in the name still protects it
                    pass
                return _TempFile(path, fd, self.out, reserve)
            except BaseException as e:
                os.close(fd)
                self._discard(path)
                if isinstance(e, OSError):
                    raise _output_error(self.out, e) from e
                raise
        raise OutputError(f"cannot write {self.out}: no free temporary file name in {self.out.parent}")

    def publish(self, header: bytes, data: _TempFile) -> None:
        """Put ``header`` before the bytes written to ``data`` and move the result into place: into the
        space ``data`` left free at its start where ``header`` fills it exactly, else (a header of another
        size) into a new file with a copy of the data after it."""
        if data.reserve and len(header) == data.reserve:
            self._finish(data.path, header)
            return
        with self.temp("tmp") as final:
            try:
                final.write(header)
                with open(data.path, "rb") as src:
                    src.seek(data.reserve)
                    shutil.copyfileobj(src, final, COPY_BUFFER)
            except OSError as e:
                raise _output_error(self.out, e) from e
        self._finish(final.path, b"")

    def _finish(self, path: str, start: bytes) -> None:
        """Write ``start`` at the beginning of the temporary file ``path`` (closed, its data written),
        sync it, make it readable as a new file would be and move it into place. Writes through the
        descriptor this object holds for the file's lock, a copy of the one it was created with."""
        fd = self._locks[path]
        try:
            done = 0
            while done < len(start):
                n = os.pwrite(fd, memoryview(start)[done:], done)
                if n <= 0:
                    raise OSError(0, "nothing written")
                done += n
            os.fchmod(fd, 0o666 & ~_umask())
            os.fsync(fd)
        except OSError as e:
            raise _output_error(self.out, e) from e
        self._signals.hold()  # from here on the output is complete: a signal waits until the end
        self._move(path)
        self._discard(path)

    def _move(self, tmp: str) -> None:
        out = self.out
        try:
            if self.force:
                os.replace(tmp, out)
                return
            try:
                os.link(tmp, out)  # fails if ``out`` appeared meanwhile
            except FileExistsError:
                raise OutputExistsError(f"{out} exists; pass --force to overwrite it") from None
            except OSError:  # file systems without hard links
                if os.path.lexists(out):
                    raise OutputExistsError(f"{out} exists; pass --force to overwrite it") from None
                os.replace(tmp, out)
        except OSError as e:
            raise _output_error(out, e) from e

    def _discard(self, path: str) -> None:
        """Remove a temporary file (if it is still there) and release its lock."""
        try:
            os.unlink(path)
        except OSError:
            pass
        fd = self._locks.pop(path, -1)
        if fd >= 0:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
