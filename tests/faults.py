"""Fault injection at the OS boundary, the SQLite way: count the writes, fsyncs, renames and copies an erasekit
command makes, then run it again with the k-th of them failing (an ``OSError``) or the process dying there
(``os._exit`` in a child process), for every k, and check what the next command finds.

The calls are counted where they leave Python for the operating system: ``os.write``, ``os.pwrite``, ``os.fsync``,
``os.replace``, ``os.rename``, ``shutil.copyfile`` (``apply -o``'s copy), and ``write``/``flush`` of the file objects
that ``open`` and ``os.fdopen`` give for writing (the journal's in-place writes, ``erasekit.format._st.atomic_write``). A
failing write or copy is torn first (part of it reaches the file), as one cut short by a crash is.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import errno
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DIED = 137  # the exit status of a child that died at its fault
PAGE = 4096
CHILD_TIMEOUT_S = 120


@dataclass
class Call:
    kind: str  # write, flush, pwrite, fsync, replace, rename, copyfile
    target: str  # the file (or "src -> dst"), relative to the faults' root where it lies below it

    def __str__(self) -> str:
        return f"{self.kind} {self.target}"


@dataclass
class Faults:
    """Counts the calls; at call ``fail_at`` (1-based), and with ``persistent`` at every later one too, does
    ``action(call)`` (raise, or end the process) instead of the call, after its ``torn`` part (a write or copy cut
    short) where the call has one."""

    root: Path
    fail_at: int | None = None
    action: Callable[[Call], None] | None = None
    persistent: bool = False
    calls: list[Call] = field(default_factory=list)

    def hit(self, kind: str, target: str, torn: Callable[[], None] | None = None) -> None:
        call = Call(kind, self._short(target))
        self.calls.append(call)
        n = len(self.calls)
        if self.fail_at is not None and (n == self.fail_at or (self.persistent and n > self.fail_at)):
            assert self.action is not None
            if torn is not None and n == self.fail_at:
                torn()
            self.action(call)

    def _short(self, target: str) -> str:
        for root in (f"{self.root.resolve()}", f"{self.root}"):
            target = target.replace(f"{root}/", "").replace(root, ".")
        return target


def oserror(code: int) -> Callable[[Call], None]:
    def fail(call: Call) -> None:
        raise OSError(code, os.strerror(code))

    return fail


def die(call: Call) -> None:
    os._exit(DIED)


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


class _CountedFile:
    """A file object whose ``write`` and ``flush`` are counted calls; a failing write is torn first: its bytes up
    to the file's next page boundary are written (where a write cut short by a crash stops)."""

    def __init__(self, f: Any, faults: Faults) -> None:
        self._f, self._faults, self._path = f, faults, _fd_path(f.fileno())

    def write(self, data: Any) -> int:
        def torn() -> None:
            cut = PAGE - self._f.tell() % PAGE
            if cut < len(data):
                self._f.write(memoryview(data)[:cut])
                self._f.flush()

        self._faults.hit("write", self._path, torn)
        return self._f.write(data)

    def flush(self) -> None:
        self._faults.hit("flush", self._path)
        self._f.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _CountedFile:
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._f.__exit__(*exc)


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


@contextlib.contextmanager
def injected(faults: Faults) -> Iterator[Faults]:
    """Route the counted calls through ``faults`` while the block runs."""
    real = {name: getattr(os, name) for name in ("write", "pwrite", "fsync", "replace", "rename")}
    real_open, real_copyfile = builtins.open, shutil.copyfile

    def counted_fd(name: str) -> Callable[..., Any]:
        def call(fd: int, *args: Any) -> Any:
            faults.hit(name, _fd_path(fd))
            return real[name](fd, *args)

        return call

    def pwrite(fd: int, data: Any, offset: int) -> int:
        def torn() -> None:
            cut = PAGE - offset % PAGE
            if cut < len(data):
                real["pwrite"](fd, memoryview(data)[:cut], offset)

        faults.hit("pwrite", _fd_path(fd), torn)
        return real["pwrite"](fd, data, offset)

    def counted_move(name: str) -> Callable[..., Any]:
        def call(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            faults.hit(name, f"{os.path.basename(src)} -> {os.fspath(dst)}")
            return real[name](src, dst, *args, **kwargs)

        return call

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:  # os.fdopen calls it too
        f = real_open(file, mode, *args, **kwargs)
        return _CountedFile(f, faults) if _writes(mode) else f

    def copyfile(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        def torn() -> None:  # the first half copied
            with real_open(src, "rb") as f, real_open(dst, "wb") as g:
                g.write(f.read(os.path.getsize(src) // 2))

        faults.hit("copyfile", f"{os.path.basename(src)} -> {os.fspath(dst)}", torn)
        return real_copyfile(src, dst, *args, **kwargs)

    patched = {
        "write": counted_fd("write"),
        "pwrite": pwrite,
        "fsync": counted_fd("fsync"),
        "replace": counted_move("replace"),
        "rename": counted_move("rename"),
    }
    try:
        for name, fn in patched.items():
            setattr(os, name, fn)
        builtins.open = io.open = open_
        shutil.copyfile = copyfile
        yield faults
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)
        builtins.open = io.open = real_open
        shutil.copyfile = real_copyfile


# -- running commands ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    exit_code: int
    stderr: str


def run_cli(argv: list[str], faults: Faults | None = None, stubs: Stubs | None = None) -> Outcome:
    """``erasekit ARGV`` in this process (under ``faults``, with ``stubs`` in place)."""
    from typer.testing import CliRunner

    from erasekit.cli import app

    with contextlib.ExitStack() as stack:
        if stubs is not None:
            stack.enter_context(stubs.installed())
        if faults is not None:
            stack.enter_context(injected(faults))
        result = CliRunner().invoke(app, argv, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return Outcome(-1, f"uncaught {type(result.exception).__name__}: {result.exception}")
    return Outcome(result.exit_code, result.stderr)


@dataclass
class Stubs:
    """Module attributes replaced while a command runs: ``factory`` (``"module.function"``, importable in a child
    process too) called with ``args`` gives dotted name -> value."""

    factory: str
    args: tuple[Any, ...] = ()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        module, _, name = self.factory.rpartition(".")
        saved = []
        try:
            for dotted, value in getattr(importlib.import_module(module), name)(*self.args).items():
                module, _, name = dotted.rpartition(".")
                mod = importlib.import_module(module)
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, value)
            yield
        finally:
            for mod, name, value in reversed(saved):
                setattr(mod, name, value)


def erase_without_training(patch: str) -> dict[str, Any]:
    """Stubs for ``erase``: no model is loaded and the training gives the patch at ``patch``; what runs is the rest
    of the command, writing the patch included."""
    from erasekit.erasing.unlearn import EraseReport
    from erasekit.format.patchfile import load_patch

    def trained(*args: Any, **kwargs: Any) -> EraseReport:
        return EraseReport(
            concepts=["circle"],
            output=None,
            steps=1,
            loss_start=0.1,
            loss_end=0.2,
            losses=[0.1],
            forget_loss_before=None,
            forget_loss_after=None,
            loop_seconds=0.0,
            total_seconds=0.0,
            patch_bytes=0,
            num_images=1,
            device="cpu",
            patch=load_patch(patch),
        )

    return {
        "erasekit.erasing.erase_job.import_libraries": lambda: None,
        "erasekit.erasing.erase_job.load_for": lambda job, clock: (None, None),
        "erasekit.erasing.erase_job.erase": trained,
        "erasekit.checkpoints.pipeline.model_threads": lambda model: contextlib.nullcontext(),
    }


def count_calls(argv: list[str], root: Path, stubs: Stubs | None = None) -> tuple[Outcome, list[Call]]:
    faults = Faults(root)
    outcome = run_cli(argv, faults, stubs)
    return outcome, faults.calls


def fail_at(
    argv: list[str], root: Path, k: int, code: int, persistent: bool, stubs: Stubs | None = None
) -> tuple[Outcome, list[Call]]:
    """Run with the k-th call failing with ``OSError(code)`` (and every later one too if ``persistent``: a disk
    that stays full)."""
    faults = Faults(root, k, oserror(code), persistent)
    return run_cli(argv, faults, stubs), faults.calls


# -- dying at a call: children forked from a server that imported erasekit once ----------------------------

_server: subprocess.Popen[str] | None = None
PRELOAD = (
    "erasekit.cli",
    "erasekit.checkpoints.apply",
    "erasekit.checkpoints.merge",
    "erasekit.format.ui_export",
    "erasekit.checkpoints.inspect",
    "erasekit.erasing.erase_job",
    "erasekit.checkpoints.pipeline",
    "erasekit.erasing.unlearn",
)


def die_at(argv: list[str], root: Path, k: int, stubs: Stubs | None = None, env: dict[str, str] | None = None) -> int:
    """Run ``erasekit ARGV`` (with ``env`` set) in a child process that ends itself with ``os._exit(137)`` at the
    k-th call, no cleanup run; its exit status (137 when it got there). Its output goes to ``ROOT/died-at-K.log``."""
    global _server
    if _server is None or _server.poll() is not None:
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import faults; faults.serve()"
        _server = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        atexit.register(_stop, _server)
    request = {
        "argv": argv,
        "root": str(root),
        "k": k,
        "log": str(root / f"died-at-{k}.log"),
        "env": {**os.environ, **(env or {})},
        "stubs": [stubs.factory, list(stubs.args)] if stubs else None,
    }
    _server.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
    _server.stdin.flush()  # type: ignore[union-attr]
    return int(_server.stdout.readline())  # type: ignore[union-attr]


def _stop(server: subprocess.Popen[str]) -> None:
    server.stdin.close()  # type: ignore[union-attr]
    server.wait(30)


def serve() -> None:
    """The server: one JSON request a line on stdin, a child forked for each, its exit status a line on stdout.
    It has one thread, so forking it is safe."""
    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


def _child(request: dict[str, Any]) -> None:
    signal.alarm(CHILD_TIMEOUT_S)  # a child that hangs ends (exit status -14) instead of the test
    os.environ.clear()
    os.environ.update(request["env"])
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    stubs = Stubs(request["stubs"][0], tuple(request["stubs"][1])) if request["stubs"] else None
    code = 1
    try:
        with contextlib.ExitStack() as stack:
            if stubs is not None:
                stack.enter_context(stubs.installed())
            stack.enter_context(injected(Faults(Path(request["root"]), request["k"], die)))
            from erasekit.cli import app

            app(args=request["argv"], prog_name="erasekit")
            code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# -- what a run left ---------------------------------------------------------------------------------------


def temporaries(root: Path) -> list[str]:
    """erasekit's temporaries (``.NAME.*.incomplete``, :mod:`erasekit._temps`) anywhere below ``root``."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob(".*.incomplete"))


def one_line_error(outcome: Outcome) -> str | None:
    """What is wrong with a failed command's report (None: a non-zero exit and one line ``error: ...``)."""
    lines = outcome.stderr.strip().splitlines()
    if outcome.exit_code <= 0:
        return f"exit code {outcome.exit_code} ({outcome.stderr.strip()[:200]})"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"stderr is not one 'error:' line: {outcome.stderr.strip()[:300]!r}"
    if lines[0].startswith("error: internal error"):
        return f"an internal error, not one naming the problem: {lines[0][:300]!r}"
    return None


def plan(calls: list[Call], modes: list[str], per: int, every: bool) -> list[tuple[int, str]]:
    """The (k, mode) runs for a command that makes ``calls``: every k in every mode when ``every``, else one k in
    ``per`` (at least 4), spread evenly, and the last rename (where the command's result appears), the modes taking
    turns."""
    n = len(calls)
    if every:
        return [(k, mode) for mode in modes for k in range(1, n + 1)]
    picks = min(n, max(4, -(-n // per)))
    ks = [int((i + 0.5) * n / picks) + 1 for i in range(picks)]
    renames = [k for k, call in enumerate(calls, 1) if call.kind in ("replace", "rename")]
    ks += [renames[-1]] if renames and renames[-1] not in ks else []
    return [(k, modes[i % len(modes)]) for i, k in enumerate(ks)]


def every_k() -> bool:
    return os.environ.get("ERASEKIT_FAULTS", "") == "all"


ENOSPC, EIO = errno.ENOSPC, errno.EIO
