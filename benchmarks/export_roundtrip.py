"""Round-trip time of `tokkit export` per format: write the export, then read every item back with the consumer's
own reader (and check it equals `open_shards`).

The shard set is encoded once from a synthetic uint8 array (N images of 32 px, a tiny random tokenizer f2 -> 16x16 =
256 tokens per image, shards of 1,000), so that no data has to travel. Readers: LlamaGen's layout (``np.load`` of
each ``imagenet32_codes/N.npy``), TiTok/RAR JSONL (``json.loads`` per line), ``webdataset.WebDataset(...).decode()``,
``pyarrow.parquet.read_table``, mosaicml-streaming's ``StreamingDataset(local=OUT, remote=None)``; plus
``tokkit.open_shards`` and ``tokkit.stream_shards("file://...")`` on the shard set itself.

    python benchmarks/export_roundtrip.py                 # N = 20,000
    python benchmarks/export_roundtrip.py -n 2000         # a quicker look
"""

from __future__ import annotations

import argparse
import glob
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import tokkit
from tokkit.checkpoint import save_checkpoint
from tokkit.config import TokenizerConfig
from tokkit.data.sources import ArraySource
from tokkit.encode import encode_dataset
from tokkit.export import export_shards
from tokkit.models.tokenizer import Tokenizer


def _shard_set(tmp: Path, n: int) -> tuple[Path, float]:
    torch.manual_seed(0)
    cfg = TokenizerConfig(resolution=32, base_channels=8, channel_mult=[1, 1], num_res_blocks=1, z_channels=4,
                          quantizer="fsq", quantizer_kwargs={"levels": [8, 5, 5, 5]})  # fmt: skip
    save_checkpoint(Tokenizer(cfg), tmp / "ck")
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    encode_dataset(tmp / "ck", ArraySource("synthetic", images, np.arange(n) % 10), tmp / "shards",
                   shard_size=1000, batch_size=256, workers=0, device="cpu")  # fmt: skip
    return tmp / "shards", time.perf_counter() - t0


def _read(fmt: str, out: Path) -> list[np.ndarray]:
    """Every item's tokens, read back by the consumer's own reader."""
    if fmt == "llamagen":
        files = sorted(glob.glob(str(out / "imagenet32_codes" / "*.npy")), key=lambda p: int(Path(p).stem))
        return [np.load(p)[0, 0] for p in files]
    if fmt == "jsonl":
        rows = []
        for p in sorted(out.glob("tokens-*.jsonl")):
            rows += [np.asarray(json.loads(line)["tokens"]) for line in p.read_text().splitlines()]
        return rows
    if fmt == "webdataset":
        import webdataset as wds

        urls = [str(p) for p in sorted(out.glob("tokens-*.tar"))]
        return [s["tokens.npy"].reshape(-1) for s in wds.WebDataset(urls, shardshuffle=False).decode()]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        col = pq.read_table(out, columns=["tokens"]).column("tokens").combine_chunks()
        return list(col.values.to_numpy().reshape(len(col), -1))
    if fmt == "mds":
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        ds = StreamingDataset(local=str(out), remote=None, shuffle=False, batch_size=1)
        return [ds[i]["tokens"].reshape(-1) for i in range(len(ds))]
    raise ValueError(fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20000, help="images in the shard set")
    args = ap.parse_args()
    torch.set_num_threads(1)
    table = Table(title=f"tokkit export round trip: {args.n:,} items x 256 tokens (CPU, 1 thread)")
    for col in ("format", "export s", "read back s", "items/s (read)", "size MiB"):
        table.add_column(col, justify="right" if col != "format" else "left")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shards, enc_s = _shard_set(tmp, args.n)
        ref = tokkit.open_shards(shards)
        want = np.stack([ref[i][0].numpy().reshape(-1) for i in range(len(ref))])
        t0 = time.perf_counter()
        got = [ref[i][0] for i in range(len(ref))]
        base = time.perf_counter() - t0
        table.add_row("open_shards (source)", "-", f"{base:.2f}", f"{len(got) / base:,.0f}", "-")
        t0 = time.perf_counter()
        streamed = list(tokkit.stream_shards(f"file://{shards}", shuffle=False))
        st = time.perf_counter() - t0
        assert np.array_equal(np.stack([t.numpy().reshape(-1) for t, _ in streamed]), want)
        table.add_row("stream_shards file://", "-", f"{st:.2f}", f"{len(streamed) / st:,.0f}", "-")
        for fmt in ("llamagen", "jsonl", "webdataset", "parquet", "mds"):
            out = tmp / fmt
            t0 = time.perf_counter()
            export_shards(shards, out, fmt)
            ex = time.perf_counter() - t0
            t0 = time.perf_counter()
            items = _read(fmt, out)
            rd = time.perf_counter() - t0
            assert np.array_equal(np.stack(items), want), fmt
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
            table.add_row(fmt, f"{ex:.2f}", f"{rd:.2f}", f"{len(items) / rd:,.0f}", f"{size:.1f}")
    Console().print(table)
    Console().print(f"(encoding the synthetic set took {enc_s:.1f} s; not part of the round trip)")


if __name__ == "__main__":
    main()
