"""Reading inputs safely: regular files only, a byte cap on everything read, a folder walk that lists each file once.

- **A byte cap** (``MAX_INPUT_BYTES``, 256 MiB; override with ``$TOKKIT_MAX_INPUT_BYTES`` or
  ``open_source(..., max_input_bytes=N)``) bounds every input that is read into memory: a file (its size is checked
  before reading and the read stops at the cap), a zip member (its declared size and compressed size are checked, and
  the inflated bytes are read through a bounded reader, since headers can lie), one image of an array, and a whole
  ``.npz`` array (inflated in full by numpy). A bigger input is a bad input with the reason, never read further.
- **Regular files only.** A FIFO, socket or device named ``x.png`` (or a link to one, such as ``/dev/zero``) is a bad
  input: it is never opened, so it cannot block or stream forever.
- **Each file once.** ``walk_files`` follows links to folders but enters each folder once (by device and inode), so a
  link loop is listed once instead of forever; a link to a file already listed is left out. Paths without links win
  over paths through links.
"""

from __future__ import annotations

import os
import re
import stat
from collections import deque
from collections.abc import Callable
from typing import BinaryIO

from tokkit.data.images import BadImage
from tokkit.errors import ConfigError

MAX_INPUT_BYTES = 256 * 2**20
MAX_INPUT_BYTES_ENV = "TOKKIT_MAX_INPUT_BYTES"
_CHUNK = 2**20
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def max_input_bytes(value: int | str | None = None) -> int:
    """The byte cap in effect: ``value`` if given, else ``$TOKKIT_MAX_INPUT_BYTES``, else ``MAX_INPUT_BYTES``.

    Args:
        value: bytes, or a string such as ``"512M"`` / ``"2GiB"`` (binary units).

    Raises:
        ConfigError: a value that is not a positive size.
    """
    where = "max_input_bytes"
    if value is None:
        value = os.environ.get(MAX_INPUT_BYTES_ENV, "").strip() or MAX_INPUT_BYTES
        where = MAX_INPUT_BYTES_ENV
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", value.lower())
        if not m:
            raise ConfigError(f"{where}={value!r} is not a size: give bytes, e.g. 268435456 or 256M")
        value = int(m.group(1)) * _UNITS[m.group(2)]
    if int(value) < 1:
        raise ConfigError(f"{where} must be a positive number of bytes, got {value}")
    return int(value)


def too_large(size: int, limit: int, what: str = "input") -> str:
    """The reason given for an input over the cap (one line, says how to raise it)."""
    return f"{what} too large: {size} bytes > {limit} (raise the limit with {MAX_INPUT_BYTES_ENV}=BYTES)"


def file_kind(mode: int) -> str:
    """A word for a file type: ``regular file``, ``folder``, ``FIFO``, ``socket``, ``device`` ..."""
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def read_regular_file(path: str | os.PathLike, key: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``BadImage`` (with the reason) for anything else.

    The file is stat'ed before it is opened (opening a FIFO blocks, opening some devices has side effects), opened
    non-blocking, stat'ed again through the open handle (it may have been replaced in between), and read no further
    than ``limit`` bytes even when it grows while being read.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise BadImage(key, f"cannot read file: {e.strerror or e}") from None
    _check_regular(st, key, limit)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise BadImage(key, f"cannot read file: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        _check_regular(st, key, limit)
        chunks, total = [], 0
        want = st.st_size + 1  # one read for a file that does not change; +1 sees EOF (or growth) at once
        while True:
            try:
                b = os.read(fd, max(1, min(max(want - total, _CHUNK), limit + 1 - total)))
            except OSError as e:
                raise BadImage(key, f"cannot read file: {e.strerror or e}") from None
            if not b:
                return b"".join(chunks)
            chunks.append(b)
            total += len(b)
            if total > limit:
                raise BadImage(key, too_large(total, limit, "file (grew while read)"))
    finally:
        os.close(fd)


def _check_regular(st: os.stat_result, key: str, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise BadImage(key, f"not a regular file but a {file_kind(st.st_mode)}: only regular files are read")
    if st.st_size > limit:
        raise BadImage(key, too_large(st.st_size, limit, "file"))


def read_bounded(f: BinaryIO, key: str, limit: int, what: str = "input") -> bytes:
    """Read a stream to its end, but never more than ``limit`` bytes (``BadImage`` past it)."""
    chunks, total = [], 0
    while True:
        b = f.read(min(_CHUNK, limit + 1 - total))
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        total += len(b)
        if total > limit:
            raise BadImage(key, too_large(total, limit, f"{what} (more bytes than its header says)"))


def walk_files(root: str, accept: Callable[[str], bool]) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Every accepted file under ``root`` (a resolved folder), each file once, through links to folders.

    Folders are entered once each (by ``(st_dev, st_ino)``): links are followed only after every folder reachable
    without links, so a folder reachable both ways is listed under its real path, and a link loop (or a second link to
    a folder already listed) is skipped. Files reached through links are compared by real path, so a link to a file
    already listed is skipped. Hidden folders (``.*``) and ``__MACOSX`` are skipped.

    Args:
        root: the folder (already resolved: no links in the path itself).
        accept: file name -> whether it is an input.

    Returns:
        ``(files, skipped)``: relative posix path -> ``(size, mtime_ns)`` (``(-1, -1)`` when it cannot be stat'ed: a
        broken link, kept so that reading it reports the reason), and relative path -> why it was left out.
    """
    root_st = os.stat(root)
    visited: dict[tuple[int, int], str] = {(root_st.st_dev, root_st.st_ino): "."}
    queue: deque[tuple[str, bool]] = deque([("", False)])  # (relative folder, reached through a link)
    links: deque[str] = deque()  # folders behind links, entered once no link-free folder is left
    best: dict[str, tuple[bool, str]] = {}  # real path -> (through a link, key): the preferred key of a file
    facts: dict[str, tuple[int, int]] = {}
    skipped: dict[str, str] = {}
    while queue or links:
        if queue:
            rel, via_link = queue.popleft()
        else:
            rel, via_link = links.popleft(), True
            try:
                st = os.stat(os.path.join(root, rel))
            except OSError as e:
                skipped[rel + "/"] = f"cannot enter folder: {e.strerror or e}"
                continue
            seen = visited.setdefault((st.st_dev, st.st_ino), rel)
            if seen != rel:
                skipped[rel + "/"] = f"a link to a folder listed already as {seen}/ (loop or repeated link)"
                continue
        folder = os.path.join(root, rel)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped[(rel or ".") + "/"] = f"cannot list folder: {e.strerror or e}"
            continue
        for entry in entries:
            key = f"{rel}/{entry.name}" if rel else entry.name
            is_link = entry.is_symlink()
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                if entry.name.startswith(".") or entry.name == "__MACOSX":
                    continue
                if is_link:
                    links.append(key)
                    continue
                try:
                    st = entry.stat()
                except OSError as e:
                    skipped[key + "/"] = f"cannot enter folder: {e.strerror or e}"
                    continue
                seen = visited.setdefault((st.st_dev, st.st_ino), key)
                if seen != key:  # a bind mount of a folder already listed
                    skipped[key + "/"] = f"the same folder as {seen}/"
                    continue
                queue.append((key, via_link))
                continue
            if not accept(entry.name):
                continue
            try:
                st = entry.stat()
            except OSError:
                facts[key] = (-1, -1)  # a broken link: listed, and reported as unreadable when read
                continue
            facts[key] = (int(st.st_size), int(st.st_mtime_ns))
            through = via_link or is_link
            real = os.path.realpath(entry.path) if through else os.path.normpath(entry.path)
            prev = best.get(real)
            if prev is None or (through, key) < prev:
                if prev is not None:
                    skipped[prev[1]] = f"the same file as {key}"
                best[real] = (through, key)
            else:
                skipped[key] = f"the same file as {prev[1]}"
    for key in skipped:
        facts.pop(key, None)
    return facts, skipped
