"""Peer checkpoint families (minimal registry; helper ``peers`` owns the full module with loading and ``convert``).

Each family module registers a ``PeerFamily`` at import: ``detect(state, extra)`` recognises its key layout and
``convert(state, extra)`` returns the tokkit config, the tokkit state dict and the variant name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from tokkit.config import TokenizerConfig

FAMILY_MODULES = ("tokkit.peers.open_magvit2", "tokkit.peers.maskbit")


@dataclass(frozen=True)
class PeerFamily:
    """One peer codebase whose checkpoints tokkit converts.

    Attributes:
        name: "taming", "llamagen", "diffusers", "open-magvit2", "maskbit".
        license: the peer's license, e.g. "MIT".
        url: the peer's repository.
        detect: (state_dict, extra) -> whether the checkpoint is this family's.
        convert: (state_dict, extra) -> (tokkit config, tokkit state dict, variant name).
    """

    name: str
    license: str
    url: str
    detect: Callable[[Mapping[str, Tensor], dict], bool]
    convert: Callable[[Mapping[str, Tensor], dict], tuple[TokenizerConfig, dict[str, Tensor], str]]


_FAMILIES: dict[str, PeerFamily] = {}


def register_family(family: PeerFamily) -> None:
    """Make ``family`` known to detection and conversion."""
    _FAMILIES[family.name] = family


def families() -> dict[str, PeerFamily]:
    """Every registered family by name (imports the family modules first)."""
    for name in FAMILY_MODULES:
        importlib.import_module(name)
    return dict(_FAMILIES)


__all__ = ["PeerFamily", "families", "register_family"]
