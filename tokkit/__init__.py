"""tokkit: discrete image tokenizers (VQ, FSQ, lookup-free bit tokens) — train, pre-tokenize, decode, benchmark.

Public API::

    import tokkit
    tok = tokkit.load("runs/sample-fsq/checkpoint")        # a trained Tokenizer
    ids = tok.encode(images)                               # (B, 3, H, W) in [-1, 1] -> (B, h, w) int64
    q = tokkit.FSQ(levels=[8, 5, 5, 5])                    # any quantizer, alone
    ds = tokkit.open_shards("shards/")                     # token shards as a torch Dataset
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it; imported on first use so that `import tokkit` stays light
_LAZY = {
    "Tokenizer": "tokkit.models.tokenizer",
    "load": "tokkit.checkpoint",
    "TokenizerConfig": "tokkit.config",
    "open_shards": "tokkit.shards",
    "QuantizerOutput": "tokkit.quantizers",
    "Quantizer": "tokkit.quantizers",
    "VQ": "tokkit.quantizers",
    "FSQ": "tokkit.quantizers",
    "LFQ": "tokkit.quantizers",
    "ResidualQuantizer": "tokkit.quantizers",
    "CodebookUsage": "tokkit.quantizers",
    "build_quantizer": "tokkit.quantizers",
    "list_quantizers": "tokkit.quantizers",
    "register_quantizer": "tokkit.quantizers",
    "TokkitError": "tokkit.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokkit' has no attribute {name!r}")
