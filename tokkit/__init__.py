"""tokkit: discrete image tokenizers (VQ, FSQ, lookup-free bit tokens) — train, pre-tokenize, decode, benchmark.

Public API::

    import os

    import torch
    from PIL import Image

    import tokkit

    tok = tokkit.load("runs/sample-fsq/checkpoint")        # a trained Tokenizer (or the run folder runs/sample-fsq)
    ids = tok.encode_images(["cat.jpg", Image.open("dog.png")])  # files / PIL images / uint8 arrays -> (2, h, w) int64
    pics = tok.decode_to_images(ids)                       # 2 RGB PIL images, tok.resolution pixels square
    x = tok.decode(ids)                                    # float (2, 3, H, W) in [-1, 1]; tok.encode(x) -> ids
    q = tokkit.FSQ(dim=4, levels=[8, 5, 5, 5])             # any quantizer, alone (dim: input channels)
    out = q(torch.randn(2, 4, 16, 16))                     # QuantizerOutput: out.codes, out.indices (2, 16, 16)
    ds = tokkit.open_shards("shards/")                     # token shards (tokkit encode) as a torch Dataset
    tokens, label = ds[0]                                  # (h, w) int64, class index (-1: unlabeled)
    sampler = tokkit.ShardSampler(ds, seed=0)              # resumable, rank-aware: state_dict() / load_state_dict()
    stream = tokkit.stream_shards("file://" + os.path.abspath("shards"))  # any fsspec URL (s3://...): IterableDataset

``encode_images`` preprocesses exactly as ``tokkit encode`` does, so its ids equal those in the shards.

``tokkit.load`` also takes a peer checkpoint (taming ``.ckpt``, LlamaGen ``.pt``, a diffusers ``VQModel`` folder,
``hf:ORG/REPO/FILE``) and converts it in memory; ``tokkit.convert(SOURCE, out=DIR)`` saves it as a tokkit checkpoint
with its provenance (``tokkit.peers``).
"""

from __future__ import annotations

import importlib

__version__ = "0.3.0"

# name -> module that defines it; imported on first use so that `import tokkit` stays light
_LAZY = {
    "Tokenizer": "tokkit.models.tokenizer",
    "load": "tokkit.loading",
    "convert": "tokkit.peers",
    "TokenizerConfig": "tokkit.config",
    "open_shards": "tokkit.shards",
    "ShardSampler": "tokkit.sampler",
    "stream_shards": "tokkit.shard_stream",
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
