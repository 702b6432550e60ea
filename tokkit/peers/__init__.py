"""Peer checkpoint families (placeholder registry: the ``peers`` branch's version replaces this file at merge).

Only the interface the converters code against: ``PeerFamily`` and ``register_family``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from tokkit.config import TokenizerConfig


@dataclass(frozen=True)
class PeerFamily:
    """A peer's checkpoint format: how to recognise it and how to convert it to a tokkit state dict."""

    name: str
    license: str
    url: str
    detect: Callable[[Mapping[str, Tensor], dict[str, Any]], bool]
    convert: Callable[[Mapping[str, Tensor], dict[str, Any]], tuple[TokenizerConfig, dict[str, Tensor], str]]


FAMILIES: dict[str, PeerFamily] = {}


def register_family(family: PeerFamily) -> None:
    """Add ``family`` to the registry (a second registration under the same name replaces the first)."""
    FAMILIES[family.name] = family


__all__ = ["FAMILIES", "PeerFamily", "register_family"]
