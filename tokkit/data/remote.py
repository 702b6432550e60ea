"""fsspec URLs as inputs: ``s3://``, ``gs://``, ``https://``, ``hf://``, ``memory://``, ``file://`` ...

fsspec (and the backend of a protocol, such as ``s3fs`` for ``s3://``) is imported only when a URL is given. A
missing backend is one line naming the package to install. Paths stay full URLs everywhere (keys, manifest), and
reads are ranged (``cat_file(path, start, end)``), so that a source never downloads more than the bytes it reads.

A remote file's fingerprint facts are its size and the first of its version fields that the store reports (ETag,
mtime, creation time, checksum), so that a replaced object refuses a resume as a touched local file does.
"""

from __future__ import annotations

import glob
import posixpath
import re
from typing import Any

from tokkit.errors import DataError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_VERSION_FIELDS = ("ETag", "etag", "VersionId", "version_id", "mtime", "LastModified", "last_modified", "created",
                   "checksum", "md5", "crc32c", "blob_id", "last_commit")  # fmt: skip


def is_url(text: str) -> bool:
    """Whether ``text`` is a URL with a scheme (``s3://b/k``), i.e. a path for fsspec rather than the local disk."""
    return bool(_SCHEME.match(str(text)))


def filesystem(url: str) -> tuple[Any, str]:
    """``(fs, path)`` for ``url`` (``fsspec.core.url_to_fs``).

    Raises:
        DataError: fsspec, or the protocol's backend, is not installed (one line naming the package), or the
            protocol is unknown.
    """
    scheme = _SCHEME.match(url)
    proto = scheme.group(1).lower() if scheme else "file"
    try:
        import fsspec
    except ImportError:
        raise DataError(f"{url}: reading URLs needs fsspec: pip install fsspec") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        from fsspec.registry import known_implementations

        impl = known_implementations.get(proto, {})
        package = str(impl.get("class", "")).split(".")[0] or f"an fsspec backend for {proto}://"
        extra = " aiohttp" if package == "fsspec" else ""  # http(s):// is fsspec's own, on top of aiohttp
        raise DataError(f"{url}: {proto}:// needs {package}{extra}: pip install {package}{extra}") from None
    except ValueError as e:
        raise DataError(f"{url}: {e}") from None


def full_url(fs: Any, path: str) -> str:
    """A path as fsspec lists it, back to a URL with its protocol."""
    return fs.unstrip_protocol(path)


def expand_urls(names: list[str]) -> list[str]:
    """Brace-expanded URLs (one per name) -> the sorted URLs that exist (globs matched with ``fs.glob``).

    Raises:
        DataError: a named object that does not exist, or a glob that matches nothing.
    """
    urls: set[str] = set()
    for name in names:
        fs, path = filesystem(name)
        try:
            if glob.has_magic(path):
                hits = fs.glob(path)
                if not hits:
                    raise DataError(f"no files match {name}")
                urls.update(full_url(fs, h) for h in hits)
            elif fs.isfile(path):
                urls.add(full_url(fs, path))
            else:
                raise DataError(f"data not found: {name}")
        except DataError:
            raise
        except (OSError, ValueError) as e:
            raise DataError(f"cannot list {name}: {_first(e)}") from None
    return sorted(urls)


def url_facts(fs: Any, path: str) -> list:
    """``[size, version]`` of a remote file: what changes when the object is replaced."""
    try:
        info = fs.info(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {full_url(fs, path)}: {_first(e)}") from None
    version = next((str(info[k]) for k in _VERSION_FIELDS if info.get(k) not in (None, "")), "")
    return [int(info.get("size") or -1), version]


def read_range(fs: Any, path: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a remote file (one ranged request)."""
    if size <= 0:
        return b""
    return fs.cat_file(path, start=offset, end=offset + size)


def short_names(urls: list[str]) -> list[str]:
    """URLs or local paths relative to their common folder (base names when they share one)."""
    paths = [_SCHEME.sub("", u) for u in urls]
    common = posixpath.commonpath([posixpath.dirname(p) for p in paths]) if paths else ""
    return [posixpath.relpath(p, common) if common else p for p in paths]


def _first(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
