"""Deterministic kill points: run tokkit in a child process that SIGKILLs itself at its N-th file operation.

A test first runs a command to the end with ``kill_at=None`` to list the file operations it performs (``ops``), then
re-runs it once per kill point of interest with ``kill_at=k``: the child kills itself with SIGKILL *just before*
operation ``k`` (1-based), exactly as ``kill -9`` would at that moment, with no timing involved.

Counted operations (in the main process only; DataLoader workers and other children are not counted):

- ``open:w``: ``open()`` / ``Path.open()`` / ``Path.write_*`` for writing (any mode with ``w``, ``a``, ``x`` or ``+``)
- ``replace``, ``rename``: ``os.replace`` / ``os.rename`` (and ``Path.replace`` / ``Path.rename``)
- ``unlink``, ``rmdir``, ``rmtree``, ``mkdir``: ``os.unlink`` / ``os.remove``, ``os.rmdir``, ``shutil.rmtree``,
  ``os.mkdir``
- ``fsync``: ``os.fsync``

Usage::

    full = run_tokkit(["encode", ...])                    # ops: ["mkdir out", "open:w out/.plan.json.tmp-..", ...]
    k = first_op(full.ops, "replace", "plan.json")        # the kill point: just before plan.json is renamed into place
    killed = run_tokkit(["encode", ...], kill_at=k)
    assert killed.killed
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

_ENV_AT, _ENV_LOG = "TOKKIT_KILL_AT", "TOKKIT_KILL_LOG"
_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent


@dataclass
class KillRun:
    """Outcome of one child run: its exit code, whether it died of SIGKILL, and the file operations it performed."""

    returncode: int
    stdout: str
    stderr: str
    ops: list[str] = field(default_factory=list)

    @property
    def killed(self) -> bool:
        """True when the child died of SIGKILL (at the requested kill point)."""
        return self.returncode == -signal.SIGKILL


def install_from_env() -> None:
    """Wrap the file operations of this process; called in the child before tokkit is imported."""
    at = int(os.environ.get(_ENV_AT, "0") or 0)
    log_path = os.environ.get(_ENV_LOG)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log_path else None
    pid = os.getpid()
    lock = threading.Lock()
    count = [0]
    write = os.write

    def hit(kind: str, path: object) -> None:
        if os.getpid() != pid:
            return
        with lock:
            count[0] += 1
            if log_fd is not None:
                name = path if isinstance(path, (int, str)) else os.fspath(path) if path is not None else ""
                write(log_fd, (json.dumps([count[0], kind, name]) + "\n").encode())
            if at and count[0] == at:
                os.kill(pid, signal.SIGKILL)

    def wrap(kind: str, fn, path_arg: int = 0):
        def inner(*args, **kwargs):
            target = args[path_arg] if len(args) > path_arg else None
            if kind in ("replace", "rename") and len(args) > 1:
                target = f"{os.fspath(args[0])} -> {os.fspath(args[1])}"  # both names, so tests can match either
            hit(kind, target)
            return fn(*args, **kwargs)

        inner.__wrapped__ = fn  # type: ignore[attr-defined]
        return inner

    real_open = builtins.open

    def open_hook(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            hit("open:w", file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_hook
    import io

    io.open = open_hook  # pathlib's Path.open / write_text / write_bytes go through io.open
    os.replace = wrap("replace", os.replace)
    os.rename = wrap("rename", os.rename)
    os.unlink = wrap("unlink", os.unlink)
    os.remove = wrap("unlink", os.remove)
    os.rmdir = wrap("rmdir", os.rmdir)
    os.mkdir = wrap("mkdir", os.mkdir)
    os.fsync = wrap("fsync", os.fsync)
    shutil.rmtree = wrap("rmtree", shutil.rmtree)


_BOOT = (
    "import sys; sys.path.insert(0, {here!r}); import killpoints; killpoints.install_from_env(); "
    "sys.argv = ['tokkit'] + {args!r}; from tokkit.cli import main; main()"
)


def run_tokkit(
    args: list[str],
    kill_at: int | None = None,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    log: str | Path | None = None,
) -> KillRun:
    """Run ``tokkit ARGS`` in a child process, killed with SIGKILL just before its ``kill_at``-th file operation.

    Args:
        args: the command line after ``tokkit``.
        kill_at: 1-based index of the file operation to die at; None runs to the end.
        cwd: working folder of the child.
        env: extra environment variables.
        timeout: seconds before the child is considered hung (the test fails).
        log: where the operation log is kept (default: a file beside ``cwd`` or the current folder).

    Returns:
        A ``KillRun`` with the operations performed up to the kill (the killed one is the last listed).
    """
    log = Path(log) if log else Path(cwd or ".").resolve() / f".killpoints-{os.getpid()}-{kill_at}.jsonl"
    log.unlink(missing_ok=True)
    child_env = {**os.environ, **(env or {}), _ENV_AT: str(kill_at or 0), _ENV_LOG: str(log)}
    child_env["PYTHONPATH"] = os.pathsep.join([str(_REPO), child_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", _BOOT.format(here=str(_HERE), args=list(map(str, args)))],
        cwd=cwd,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    ops = []
    if log.exists():
        ops = [f"{kind} {path}" for _, kind, path in map(json.loads, log.read_text().splitlines())]
        log.unlink()
    return KillRun(proc.returncode, proc.stdout, proc.stderr, ops)


def op_indices(ops: list[str], kind: str, contains: str = "") -> list[int]:
    """1-based indices (usable as ``kill_at``) of the operations of ``kind`` whose path contains ``contains``."""
    return [i + 1 for i, op in enumerate(ops) if op.split(" ", 1)[0] == kind and contains in op.split(" ", 1)[1]]


def first_op(ops: list[str], kind: str, contains: str = "") -> int:
    """The first matching operation's ``kill_at`` index; AssertionError (listing the ops) when there is none."""
    found = op_indices(ops, kind, contains)
    assert found, f"no {kind} op on a path containing {contains!r} among:\n" + "\n".join(ops)
    return found[0]
