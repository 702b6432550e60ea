"""A small MaskGIT-style generator trained on token shards: the downstream use of tokkit, end to end, on a CPU.

1. a tokenizer checkpoint: ``--checkpoint PATH`` (e.g. from ``tokkit train``), or a tiny FSQ tokenizer trained here
   for ``--tok-steps`` steps on the built-in sample photos;
2. ``tokkit encode``: the images -> token shards (with ``--views flip``: the mirrored copy is a free augmentation);
3. a class-conditional masked transformer (MaskGIT, Chang et al. 2022) trained on ``tokkit.open_shards``: mask a
   cosine-scheduled fraction of the tokens, predict them;
4. iterative parallel decoding of a few token grids, then ``tokkit decode`` -> PNGs and a grid.

    python examples/maskgit_on_tokens.py                      # a few minutes on a CPU
    python examples/maskgit_on_tokens.py --checkpoint runs/sample-fsq --steps 3000 --batch-size 64
    python examples/maskgit_on_tokens.py --tok-steps 5 --steps 5 --limit 64 --dim 32 --depth 1   # seconds (the test)

Equivalent shell steps: ``tokkit encode CKPT sample --out W/shards --views flip`` and
``tokkit decode CKPT W/samples.npy --out W/samples --grid``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from tokkit.checkpoint import load, save_checkpoint
from tokkit.config import TokenizerConfig
from tokkit.data import ImageDataset, collate_skip_bad, open_source, to_float
from tokkit.decode import decode_tokens
from tokkit.encode import encode_dataset
from tokkit.models.tokenizer import Tokenizer
from tokkit.shards import open_shards


def train_tiny_tokenizer(data: str, path: Path, steps: int, seed: int) -> Path:
    """A 32 px FSQ tokenizer (8x8 tokens, 1000 codes) trained briefly with an L1 + MSE reconstruction loss."""
    torch.manual_seed(seed)
    cfg = TokenizerConfig(resolution=32, base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, z_channels=4,
                          quantizer="fsq", quantizer_kwargs={"levels": [8, 5, 5, 5]})  # fmt: skip
    model = Tokenizer(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = DataLoader(ImageDataset(open_source(data), 32, train=True, seed=seed), batch_size=32, shuffle=True,
                        collate_fn=collate_skip_bad, drop_last=True)  # fmt: skip
    step = 0
    while step < steps:
        for batch in loader:
            x = to_float(batch["images"])  # (B, 3, 32, 32) in [-1, 1]
            rec, q = model(x)
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + q.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0 or step == steps:
                print(f"  tokenizer step {step}/{steps}  loss {loss.item():.4f}", flush=True)
            if step >= steps:
                break
    return save_checkpoint(model.eval(), path)


class MaskGIT(nn.Module):
    """Bidirectional transformer over a token grid; predicts the codebook id of every masked position.

    Axes: B batch, L = h * w token positions, D model width, K codebook size.
    """

    def __init__(self, codebook_size: int, length: int, num_classes: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.mask_id = codebook_size  # one extra input id for [MASK]
        self.codebook_size = codebook_size
        self.tok = nn.Embedding(codebook_size + 1, dim)
        self.cls = nn.Embedding(num_classes + 1, dim)  # last class = unconditional
        self.pos = nn.Parameter(torch.zeros(1, length + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, codebook_size)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ids (B, L) in [0, K] (K = mask), labels (B,) -> logits (B, L, K)."""
        x = torch.cat([self.cls(labels)[:, None], self.tok(ids)], dim=1) + self.pos  # (B, 1 + L, D)
        return self.head(self.norm(self.blocks(x)))[:, 1:]  # (B, L, K)


def mask_schedule(r: torch.Tensor) -> torch.Tensor:
    """MaskGIT's cosine schedule: fraction of tokens masked at progress r in [0, 1]."""
    return torch.cos(r * math.pi / 2)


def train_maskgit(model: MaskGIT, shards: Path, steps: int, batch_size: int, lr: float, seed: int) -> None:
    ds = open_shards(shards, view="random", seed=seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=len(ds) > batch_size, num_workers=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.96), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)
    n_cls = model.cls.num_embeddings - 1
    step, t0 = 0, time.time()
    model.train()
    while step < steps:
        for tokens, labels in loader:
            ids = tokens.flatten(1)  # (B, h, w) -> (B, L)
            b, length = ids.shape
            labels = torch.where(torch.rand(b) < 0.1, torch.full_like(labels, n_cls), labels.clamp(min=0))  # CFG drop
            ratio = mask_schedule(torch.rand(b, 1))  # (B, 1)
            n_mask = (ratio * length).ceil().clamp(min=1)
            order = torch.rand(b, length).argsort(dim=1).argsort(dim=1)  # a random rank per position
            masked = order < n_mask  # (B, L)
            logits = model(ids.masked_fill(masked, model.mask_id), labels)
            loss = F.cross_entropy(logits[masked], ids[masked])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0 or step == steps:
                print(f"  maskgit step {step}/{steps}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)", flush=True)
            if step >= steps:
                break


@torch.no_grad()
def sample(
    model: MaskGIT, labels: torch.Tensor, length: int, steps: int, temperature: float, seed: int
) -> torch.Tensor:
    """MaskGIT iterative decoding: start fully masked, keep the most confident predictions, re-mask the rest."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    b = len(labels)
    ids = torch.full((b, length), model.mask_id, dtype=torch.long)
    for t in range(steps):
        logits = model(ids, labels)  # (B, L, K)
        probs = F.softmax(logits / max(temperature, 1e-6), dim=-1)
        pred = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=g).reshape(b, length)
        conf = torch.gather(probs, -1, pred[..., None])[..., 0]  # (B, L)
        unknown = ids == model.mask_id
        pred = torch.where(unknown, pred, ids)
        conf = torch.where(unknown, conf, torch.full_like(conf, float("inf")))
        n_masked_next = int(math.floor(mask_schedule(torch.tensor((t + 1) / steps)).item() * length))
        if n_masked_next <= 0:
            ids = pred
            break
        noise = -torch.log(-torch.log(torch.rand(conf.shape, generator=g).clamp(1e-9, 1 - 1e-9)))  # Gumbel
        score = torch.log(conf) + temperature * (1 - (t + 1) / steps) * noise
        cutoff = score.sort(dim=1).values[:, n_masked_next - 1 : n_masked_next]  # (B, 1)
        ids = torch.where(score <= cutoff, torch.full_like(pred, model.mask_id), pred)
    return ids


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="MaskGIT on tokkit token shards (CPU-sized).")
    p.add_argument("--checkpoint", type=Path, default=None, help="tokenizer checkpoint (default: train a tiny one)")
    p.add_argument("--data", default="sample", help="images to encode (folder, zip, npz, 'sample')")
    p.add_argument("--work-dir", type=Path, default=Path("runs/maskgit_example"))
    p.add_argument("--tok-steps", type=int, default=200, help="steps of the tiny tokenizer (without --checkpoint)")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N images (quick runs)")
    p.add_argument("--steps", type=int, default=500, help="transformer training steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--samples", type=int, default=8, help="images to generate")
    p.add_argument("--sample-steps", type=int, default=8, help="MaskGIT decoding iterations")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for tokkit encode")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models gain little from more)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)

    ckpt = args.checkpoint
    if ckpt is None:
        print(f"[1/4] training a tiny tokenizer for {args.tok_steps} steps on {args.data!r}")
        ckpt = train_tiny_tokenizer(args.data, work / "tokenizer", args.tok_steps, args.seed)
    print(f"[2/4] tokkit encode {ckpt} {args.data} --out {work / 'shards'} --views flip")
    source = open_source(args.data)
    if args.limit:
        source.keys, source.labels = source.keys[: args.limit], source.labels[: args.limit]
    res = encode_dataset(ckpt, source, work / "shards", shard_size=256, batch_size=64, workers=args.workers,
                         views="flip", overwrite=True)  # fmt: skip
    print(f"  {res.images} images -> {res.shards[0]} shards ({res.seconds:.1f} s)")

    tok = load(ckpt)
    grid = tok.token_grid
    n_cls = max(1, len(open_shards(work / "shards").manifest["class_to_idx"]))
    torch.manual_seed(args.seed)
    model = MaskGIT(tok.codebook_size, grid[0] * grid[1], n_cls, args.dim, args.depth, args.heads)
    print(f"[3/4] training MaskGIT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params) "
          f"for {args.steps} steps on {grid[0]}x{grid[1]} tokens")  # fmt: skip
    train_maskgit(model, work / "shards", args.steps, args.batch_size, args.lr, args.seed)

    labels = torch.arange(args.samples) % n_cls
    ids = sample(model, labels, grid[0] * grid[1], args.sample_steps, args.temperature, args.seed)
    ids = ids.reshape(args.samples, *grid).numpy().astype(np.int64)  # (S, L) -> (S, h, w)
    np.save(work / "samples.npy", ids)
    print(f"[4/4] tokkit decode {ckpt} {work / 'samples.npy'} --out {work / 'samples'} --grid")
    out = decode_tokens(ckpt, work / "samples.npy", work / "samples", grid=True)
    print(f"  wrote {out.count} samples; grid: {out.grid}")
    return out.grid


if __name__ == "__main__":
    main()
