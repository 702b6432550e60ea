"""Throughput of `tokkit encode` (the whole pipeline) against the bare `tokenizer.encode`, in one run.

Two inputs:

- ``cifar``: the CIFAR-10 test JPEGs (10,000 tiny files in a zip) with a ``cifar10-f4-fsq`` tokenizer (32 px);
- ``imagenet``: the 400 full-resolution ImageNet sample photographs (a zip) with an ``imagenet-f16-fsq`` tokenizer
  at 256 px (real JPEG decode + resize cost; 31 photos are below 256 px on one side and are upscaled).

For each, the same images are first decoded and center-cropped once into a uint8 tensor; the bare number is
``tokenizer.encode(to_float(batch))`` over those tensors (inference only). The pipeline number is one call of
``tokkit.encode.encode_dataset`` from the zip: reading, decoding, resizing, inference, writing and hashing the shards,
including its start-up (checkpoint hash check, input fingerprint, worker start). Weights are randomly initialised
(throughput does not depend on them). The ratio pipeline / bare is the fraction of inference speed that survives the
I/O; the target is >= 0.9.

    nice -n 10 python benchmarks/encode.py                       # both, defaults below
    python benchmarks/encode.py --which cifar --limit 2000       # a quicker look
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tokkit.checkpoint import save_checkpoint
from tokkit.config import get_preset
from tokkit.data import ImageSource, center_crop_resize, open_source, to_float
from tokkit.encode import encode_dataset
from tokkit.models.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
CASES = {
    "cifar": ("CIFAR-10 test JPEGs", ASSETS / "cifar10" / "cifar10_jpeg_test.zip", "cifar10-f4-fsq", 10000, 64),
    "imagenet": ("ImageNet 400 photos", ASSETS / "imagenet_samples" / "imagenet_sample_400.zip", "imagenet-f16-fsq",
                 400, 8),
}  # fmt: skip


class Head(ImageSource):
    """The first ``n`` inputs of a source (same keys, labels, reads)."""

    def __init__(self, source: ImageSource, n: int) -> None:
        super().__init__(source.root, source.keys[:n], source.labels[:n], source.class_to_idx)
        self.kind = source.kind
        self.inner = source

    def read(self, i: int):
        return self.inner.read(i)


def bare_encode(model: Tokenizer, images: torch.Tensor, batch_size: int) -> float:
    """Images/s of ``model.encode`` over already decoded uint8 (N, 3, r, r) images."""
    with torch.inference_mode():
        model.encode(to_float(images[:batch_size]))  # warm-up
        t = time.perf_counter()
        for a in range(0, len(images), batch_size):
            model.encode(to_float(images[a : a + batch_size]))
        return len(images) / (time.perf_counter() - t)


def run_case(key: str, limit: int | None, workers: int, batch_size: int | None, repeats: int, tmp: Path) -> dict:
    title, path, preset, default_n, default_bs = CASES[key]
    if not path.is_file():
        raise SystemExit(f"{path} not found: the benchmark needs ../shared/assets")
    bs = batch_size or default_bs
    n = min(limit or default_n, default_n)
    torch.manual_seed(0)
    model = Tokenizer(get_preset(preset).tokenizer).eval()
    ckpt = save_checkpoint(model, tmp / f"{key}-ckpt")
    source = Head(open_source(path), n)
    r = model.resolution
    t = time.perf_counter()
    decoded = np.stack([center_crop_resize(source.read(i), r) for i in range(len(source))])  # (N, r, r, 3)
    decode_s = time.perf_counter() - t
    images = torch.from_numpy(decoded).permute(0, 3, 1, 2).contiguous()  # (N, r, r, 3) -> (N, 3, r, r)
    bares, pipes, loops = [], [], []
    for rep in range(repeats):  # alternate the two, keep the best of each: the least disturbed by other jobs
        bares.append(bare_encode(model, images, bs))
        t = time.perf_counter()
        res = encode_dataset(ckpt, source, tmp / f"{key}-shards-{rep}", shard_size=1000, batch_size=bs,
                             workers=workers, device="cpu")  # fmt: skip
        pipes.append(res.images / (time.perf_counter() - t))
        loops.append(res.images_per_second)
    bare, pipeline = max(bares), max(pipes)
    return {
        "case": f"{title} ({n}) / {preset} @ {r}px",
        "bare": bare,
        "pipeline": pipeline,
        "loop": max(loops),
        "runs": " ".join(f"{b:.3g}/{p:.3g}" for b, p in zip(bares, pipes, strict=True)),
        "decode_only": n / decode_s,
        "ratio": pipeline / bare,
        "skipped": res.skipped,
        "upscaled": res.upscaled,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--which", choices=["cifar", "imagenet", "both"], default="both")
    p.add_argument("--limit", type=int, default=None, help="images per case (default: all)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the pipeline")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (cifar) / 8 (imagenet)")
    p.add_argument("--repeats", type=int, default=3, help="alternating bare / pipeline runs; the best of each counts")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = ["cifar", "imagenet"] if args.which == "both" else [args.which]
    tmp = Path(tempfile.mkdtemp(prefix="tokkit-bench-encode-"))
    rows = []
    try:
        for k in keys:
            rows.append(run_case(k, args.limit, args.workers, args.batch_size, args.repeats, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title=f"tokkit encode vs bare tokenizer.encode (CPU, {torch.get_num_threads()} threads, "
                        f"{args.workers} workers)")  # fmt: skip
    for col in ("input / tokenizer", "bare img/s", "tokkit encode img/s", "ratio", "loop img/s", "decode-only img/s",
                "skipped", "upscaled", "runs bare/pipeline"):  # fmt: skip
        table.add_column(col, justify="left" if col.startswith("input") else "right")
    for r in rows:
        table.add_row(r["case"], f"{r['bare']:.3g}", f"{r['pipeline']:.3g}", f"{r['ratio']:.2f}", f"{r['loop']:.3g}",
                      f"{r['decode_only']:.1f}", str(r["skipped"]), str(r["upscaled"]), r["runs"])  # fmt: skip
    Console(width=180).print(table)


if __name__ == "__main__":
    main()
