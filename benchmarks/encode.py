"""Throughput of `tokkit encode` (the whole pipeline) against the bare `tokenizer.encode`, in one run.

Inputs (``--which``):

- ``cifar``: the CIFAR-10 test JPEGs (10,000 tiny files in a zip) with a ``cifar10-f4-fsq`` tokenizer (32 px);
- ``imagenet``: the 400 full-resolution ImageNet sample photographs (a zip) with an ``imagenet-f16-fsq`` tokenizer
  at 256 px (real JPEG decode + resize cost; 31 photos are below 256 px on one side and are upscaled);
- ``synthetic32`` / ``synthetic64`` / ``synthetic256``: ``--synthetic N`` photo-like JPEGs of about 500x375
  (deterministic smooth noise, generated here, so a GPU machine needs no data) with the 32 px ``cifar10-f4-fsq``,
  the 64 px ``tinyimagenet-f4-fsq`` or the 256 px ``imagenet-f16-fsq`` tokenizer;
- ``startup``: the wall time of ``python -m tokkit encode`` on 400 CIFAR JPEGs before its first image (whole run
  minus its encoding loop), ``--repeats`` times.

For each, the same images are first decoded and center-cropped once into a uint8 tensor; the bare number is
``tokenizer.encode(to_float(batch))`` over those tensors (inference only; on CUDA the tensors sit on the GPU and run
under bf16 autocast, as ``tokkit encode`` does). The pipeline number is one call of ``tokkit.encode.encode_dataset``:
reading, decoding (``--decode``: every mode listed gets its own run), resizing, inference, writing and hashing the
shards, including its start-up (checkpoint hash check, input fingerprint, worker start). ``--source`` reads the same
images as a zip, as webdataset tars or as parquet files (converted here first). Weights are randomly initialised
(throughput does not depend on them). The ratio pipeline / bare is the fraction of inference speed that survives the
I/O.

    nice -n 10 python benchmarks/encode.py                                       # cifar + imagenet, defaults
    python benchmarks/encode.py --which cifar --limit 3000 --workers 0 --threads 2
    python benchmarks/encode.py --which synthetic32 --decode full,auto,reduced --synthetic 2000
    python benchmarks/encode.py --which synthetic32,synthetic256 --device cuda --decode full,auto,gpu --workers 14
    python benchmarks/encode.py --which cifar --source webdataset        # or parquet
    python benchmarks/encode.py --which startup --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from tokkit.checkpoint import save_checkpoint
from tokkit.config import get_preset
from tokkit.data import ImageSource, center_crop_resize, open_source, to_float
from tokkit.encode import encode_dataset
from tokkit.models.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
CIFAR = ASSETS / "cifar10" / "cifar10_jpeg_test.zip"
IMAGENET = ASSETS / "imagenet_samples" / "imagenet_sample_400.zip"
# name -> (title, input zip or None for synthetic, preset, default count, default batch size)
CASES = {
    "cifar": ("CIFAR-10 test JPEGs", CIFAR, "cifar10-f4-fsq", 10000, 64),
    "imagenet": ("ImageNet 400 photos", IMAGENET, "imagenet-f16-fsq", 400, 8),
    "synthetic32": ("synthetic ~500x375 JPEGs", None, "cifar10-f4-fsq", 2000, 64),
    "synthetic64": ("synthetic ~500x375 JPEGs", None, "tinyimagenet-f4-fsq", 2000, 32),
    "synthetic256": ("synthetic ~500x375 JPEGs", None, "imagenet-f16-fsq", 2000, 8),
}
SIZES = [(500, 375), (500, 375), (500, 375), (375, 500), (500, 333), (480, 360)]  # a photo set's usual shapes


def synthetic_jpegs(path: Path, n: int, seed: int = 0) -> Path:
    """A zip of ``n`` photo-like JPEGs (quality 90, mostly 500x375; smooth noise: low-frequency color fields
    upsampled bicubically, plus grain), the same bytes for the same ``n`` and ``seed``, in 10 class folders."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            w, h = SIZES[int(rng.integers(len(SIZES)))]
            cells = int(rng.integers(6, 24))
            small = rng.integers(0, 256, (max(2, h * cells // w), cells, 3), dtype=np.uint8)
            big = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
            arr = np.clip(big + rng.integers(-8, 9, big.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=90)
            zf.writestr(f"c{i % 10}/{i:06d}.jpg", buf.getvalue())
    return path


def convert(zip_path: Path, n: int, kind: str, out: Path) -> str:
    """The first ``n`` images of a zip as ``kind``: the zip itself, webdataset tars (1000 samples each; ``.jpg`` +
    ``.cls``) or parquet files (``image`` binary + ``label`` int, 1000 rows each). Returns the spec to open."""
    if kind == "zip":
        return str(zip_path)
    src = open_source(zip_path)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as zf:
        rows = [(zf.read(src.keys[i]), int(src.labels[i]), Path(src.keys[i]).suffix) for i in range(min(n, len(src)))]
    for s, a in enumerate(range(0, len(rows), 1000)):
        chunk = rows[a : a + 1000]
        if kind == "webdataset":
            with tarfile.open(out / f"data-{s:06d}.tar", "w") as tf:
                for j, (data, label, ext) in enumerate(chunk):
                    for name, payload in ((f"{a + j:08d}{ext}", data), (f"{a + j:08d}.cls", str(label).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tf.addfile(info, io.BytesIO(payload))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"image": [r[0] for r in chunk], "label": [r[1] for r in chunk]})
            pq.write_table(table, out / f"data-{s:06d}.parquet")
    return str(out / "data-*.tar") if kind == "webdataset" else str(out)


class Head(ImageSource):
    """The first ``n`` inputs of a source (same keys, labels, reads)."""

    def __init__(self, source: ImageSource, n: int) -> None:
        super().__init__(source.root, source.keys[:n], source.labels[:n], source.class_to_idx)
        self.kind = source.kind
        self.inner = source

    def read(self, i: int):
        return self.inner.read(i)


def bare_encode(model: Tokenizer, images: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Images/s of ``model.encode`` over already decoded uint8 (N, 3, r, r) images (on ``device`` beforehand)."""
    images = images.to(device)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        model.encode(to_float(images[:batch_size]))  # warm-up
        _sync(device)
        t = time.perf_counter()
        for a in range(0, len(images), batch_size):
            model.encode(to_float(images[a : a + batch_size]))
        _sync(device)
        return len(images) / (time.perf_counter() - t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(key: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    title, path, preset, default_n, default_bs = CASES[key]
    n = min(args.limit or default_n, default_n) if path is not None else (args.limit or args.synthetic)
    if path is None:
        path = synthetic_jpegs(tmp / f"synthetic-{n}.zip", n)
    elif not path.is_file():
        raise SystemExit(f"{path} not found: the benchmark needs ../shared/assets")
    bs = args.batch_size or default_bs
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = Tokenizer(get_preset(preset).tokenizer).eval()
    ckpt = save_checkpoint(model, tmp / f"{key}-ckpt")
    model = model.to(dev)
    spec = convert(path, n, args.source, tmp / f"{key}-{args.source}")
    source = Head(open_source(spec), n)
    r = model.resolution
    t = time.perf_counter()
    decoded = np.stack([center_crop_resize(source.read(i), r) for i in range(len(source))])  # (N, r, r, 3)
    decode_s = time.perf_counter() - t
    images = torch.from_numpy(decoded).permute(0, 3, 1, 2).contiguous()  # (N, r, r, 3) -> (N, 3, r, r)
    rows = []
    for mode in args.decode.split(","):
        bares, pipes, loops = [], [], []
        for rep in range(args.repeats):  # alternate the two, keep the best of each: the least disturbed by others
            bares.append(bare_encode(model, images, bs, dev))
            t = time.perf_counter()
            res = encode_dataset(ckpt, source, tmp / f"{key}-{mode}-shards-{rep}", shard_size=1000, batch_size=bs,
                                 workers=args.workers, device=args.device, decode=mode)  # fmt: skip
            pipes.append(res.images / (time.perf_counter() - t))
            loops.append(res.images_per_second)
        bare, pipeline = max(bares), max(pipes)
        rows.append({
            "case": f"{title} ({n}, {args.source}) / {preset} @ {r}px",
            "decode": mode,
            "bare": bare,
            "pipeline": pipeline,
            "loop": max(loops),
            "runs": " ".join(f"{b:.3g}/{p:.3g}" for b, p in zip(bares, pipes, strict=True)),
            "decode_only": n / decode_s,
            "ratio": pipeline / bare,
            "skipped": res.skipped,
            "upscaled": res.upscaled,
        })  # fmt: skip
    return rows


def startup(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """``python -m tokkit encode`` on 400 CIFAR JPEGs: wall time before the first image (whole run - loop)."""
    torch.manual_seed(0)
    ckpt = save_checkpoint(Tokenizer(get_preset("cifar10-f4-fsq").tokenizer).eval(), tmp / "startup-ckpt")
    spec = convert(CIFAR, 400, "webdataset", tmp / "startup-tars")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rows = []
    for rep in range(args.repeats):
        cmd = [sys.executable, "-m", "tokkit", "encode", str(ckpt), spec, "--out", str(tmp / f"startup-{rep}"),
               "--device", args.device, "--workers", str(args.workers), "--decode", args.decode.split(",")[0],
               "--json", "--quiet"]  # fmt: skip
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        wall = time.perf_counter() - t
        res = json.loads(done.stdout)
        loop = res["encoded"] / res["images_per_second"]
        rows.append({"run": rep, "wall": wall, "loop": loop, "startup": wall - loop, "images": res["images"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--which", default="cifar,imagenet", help=f"comma list of {', '.join([*CASES, 'startup'])}")
    p.add_argument("--limit", type=int, default=None, help="images per case (default: all)")
    p.add_argument("--synthetic", type=int, default=2000, help="synthetic JPEGs to generate")
    p.add_argument("--source", choices=["zip", "webdataset", "parquet"], default="zip", help="how the images are read")
    p.add_argument("--decode", default="auto", help="comma list of --decode modes, each run (full, auto, reduced, gpu)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bare and pipeline on the same device)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the pipeline")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (32 px) / 32 (64 px) / 8 (256 px)")
    p.add_argument("--repeats", type=int, default=3, help="alternating bare / pipeline runs; the best of each counts")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = args.which.split(",")
    if "both" in keys:
        keys = ["cifar", "imagenet"]
    tmp = Path(tempfile.mkdtemp(prefix="tokkit-bench-encode-"))
    console = Console(width=200)
    rows, starts = [], []
    try:
        for k in keys:
            if k == "startup":
                starts = startup(args, tmp)
            elif k in CASES:
                rows += run_case(k, args, tmp)
            else:
                raise SystemExit(f"unknown case {k!r}: use {', '.join([*CASES, 'startup'])}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    where = f"{torch.cuda.get_device_name()}" if args.device.startswith("cuda") else "CPU"
    if rows:
        table = Table(title=f"tokkit encode vs bare tokenizer.encode ({where}, {torch.get_num_threads()} threads, "
                            f"{args.workers} workers)")  # fmt: skip
        for col in ("input / tokenizer", "decode", "bare img/s", "tokkit encode img/s", "ratio", "loop img/s",
                    "decode-only img/s", "skipped", "upscaled", "runs bare/pipeline"):  # fmt: skip
            table.add_column(col, justify="left" if col.startswith("input") else "right")
        for r in rows:
            table.add_row(r["case"], r["decode"], f"{r['bare']:.4g}", f"{r['pipeline']:.4g}", f"{r['ratio']:.2f}",
                          f"{r['loop']:.4g}", f"{r['decode_only']:.1f}", str(r["skipped"]), str(r["upscaled"]),
                          r["runs"])  # fmt: skip
        console.print(table)
    if starts:
        table = Table(title=f"python -m tokkit encode, 400 CIFAR JPEGs (webdataset) ({where}, {args.workers} workers)")
        for col in ("run", "wall s", "encoding loop s", "start-up + finish s"):
            table.add_column(col, justify="right")
        for s in starts:
            table.add_row(str(s["run"]), f"{s['wall']:.2f}", f"{s['loop']:.2f}", f"{s['startup']:.2f}")
        console.print(table)


if __name__ == "__main__":
    main()
