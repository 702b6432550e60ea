"""CIFAR-10 (or Tiny ImageNet) tokenizer benchmark: tokkit's VQ / FSQ / LFQ vs vector-quantize-pytorch's VQ.

Every row trains the same convolutional autoencoder (the ``cifar10-f4-*`` presets: 32 px, 8x8 tokens, ~1024 codes,
i.e. 10 bits per token) with the same step budget, data order and seed, through ``tokkit.train.train``; only the
quantizer differs:

- ``tokkit-vq`` / ``tokkit-fsq`` / ``tokkit-lfq``: the presets as they are;
- ``peer-vq``: ``vector_quantize_pytorch.VectorQuantize`` (its defaults, with the same K, latent dim, lookup dim and
  commitment weight as tokkit-vq) wrapped in the quantizer contract;
- ``bare-ae``: no quantizer at all (identity): the throughput reference and a PSNR ceiling.

Then every row is evaluated on test images it never saw: PSNR, SSIM, FD-C10 (Frechet distance in the features of
the small CIFAR-10 classifier in ``../shared/tools/fdnet.py``; not FID), codebook usage over all test tokens, bits
per image, and the training throughput: the median of the run's logged windows (on a shared machine it moves with
the load) and a round-robin measurement of every row's training step (load hits all rows alike), which is the one
compared with the bare autoencoder. Writes ``results.md``, ``results.json`` and
``recons.png`` (originals, then each row's reconstructions) into ``--out``.

    nice -n 10 python benchmarks/cifar10.py --steps 600 --eval-images 1000
    python benchmarks/cifar10.py --dataset tinyimagenet --steps 20000     # 64 px, 16x16 tokens; meant for a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tokkit.config import apply_overrides, get_preset
from tokkit.data import ImageDataset, collate_skip_bad, make_grid, open_source, to_float, to_uint8
from tokkit.metrics import psnr, ssim
from tokkit.quantizers.base import Quantizer, QuantizerOutput, batch_usage_stats, register_quantizer
from tokkit.train import train

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATASETS = {  # name: (train spec, test spec, preset stem, fdnet name)
    "cifar10": ("assets/cifar10/cifar10_jpeg_train.zip", "assets/cifar10/cifar10_jpeg_test.zip", "cifar10-f4", "c10"),
    "tinyimagenet": (
        "assets/tinyimagenet/tinyimagenet_train_subset.zip",
        "assets/tinyimagenet/tinyimagenet_val.zip",
        "tinyimagenet-f4",
        "tin",
    ),
}
ROWS = ["tokkit-vq", "tokkit-fsq", "tokkit-lfq", "peer-vq", "bare-ae"]


# ----------------------------------------------------------------------------------------------------------------------
# the two stand-ins, registered only inside this script


@register_quantizer("peer-vq")
class PeerVQ(Quantizer):
    """vector-quantize-pytorch's ``VectorQuantize`` behind tokkit's quantizer contract."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int | None = None, **kwargs) -> None:
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.dim, self.codebook_size = dim, codebook_size
        self.vq = VectorQuantize(dim=dim, codebook_size=codebook_size, codebook_dim=codebook_dim, **kwargs)

    def quantize(self, x: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = x.shape
        q, idx, loss = self.vq(x.permute(0, 2, 3, 1).reshape(b, h * w, d))  # (B, D, H, W) -> (B, H*W, D)
        indices = idx.reshape(b, h, w).long()
        codes = q.reshape(b, h, w, d).permute(0, 3, 1, 2)  # (B, H*W, D) -> (B, D, H, W)
        return QuantizerOutput(codes, indices, loss.sum(), batch_usage_stats(indices, self.codebook_size))

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        b, h, w = indices.shape
        q = self.vq.get_output_from_indices(indices.reshape(b, h * w))  # (B, H*W, D)
        return q.reshape(b, h, w, -1).permute(0, 3, 1, 2).float()


@register_quantizer("identity")
class Identity(Quantizer):
    """No quantization (the bare autoencoder): codes are the latents, every index is 0."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.codebook_size = dim, 1

    def quantize(self, x: torch.Tensor) -> QuantizerOutput:
        idx = torch.zeros((x.shape[0], *x.shape[2:]), dtype=torch.int64, device=x.device)
        return QuantizerOutput(x, idx, x.new_zeros(()), {})

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the bare autoencoder has no discrete codes")


# ----------------------------------------------------------------------------------------------------------------------


def row_configs(row: str, stem: str, steps: int, extra: list[str]):
    """(tokenizer config, train config) of one row: the preset, the step budget, and the quantizer swap."""
    fam = {"tokkit-vq": "vq", "tokkit-fsq": "fsq", "tokkit-lfq": "lfq"}.get(row, "vq")
    p = get_preset(f"{stem}-{fam}")
    sets = [f"train.steps={steps}", "train.perceptual=none", *extra]
    if row == "peer-vq":
        vq = p.tokenizer.quantizer_kwargs
        kw = {"codebook_size": vq["codebook_size"], "codebook_dim": vq.get("codebook_dim"), "commitment_weight": 0.25}
        sets += ["tokenizer.quantizer=peer-vq", f"tokenizer.quantizer_kwargs={json.dumps(kw)}"]
    if row == "bare-ae":
        sets += ["tokenizer.quantizer=identity", "tokenizer.quantizer_kwargs={}"]
    cfgs = apply_overrides({"tokenizer": p.tokenizer, "train": p.train}, sets)
    return cfgs["tokenizer"], cfgs["train"]


def load_eval_images(spec: Path, n: int, resolution: int) -> np.ndarray:
    """``n`` test images spread evenly over the sorted file list (all classes), center-cropped: uint8 (n, r, r, 3)."""
    src = open_source(spec)
    pick = np.linspace(0, len(src) - 1, min(n, len(src))).round().astype(int)
    ds = ImageDataset(src, resolution)
    batch = collate_skip_bad([ds[int(i)] for i in pick])
    return batch["images"].permute(0, 2, 3, 1).numpy()  # (n, 3, r, r) -> (n, r, r, 3)


@torch.no_grad()
def evaluate(model, images: np.ndarray, fd_net, fd_real: np.ndarray, batch: int = 250) -> tuple[dict, np.ndarray]:
    """Metrics of one trained model on the test images; also returns its uint8 reconstructions."""
    from fdnet import features, frechet_distance

    recons, ps, ss, ids = [], [], [], []
    for i in range(0, len(images), batch):
        x = to_float(images[i : i + batch])  # (B, 3, r, r) in [-1, 1]
        rec, q = model(x)
        rec = rec.clamp(-1, 1)
        ps.append(psnr((x + 1) / 2, (rec + 1) / 2))
        ss.append(ssim((x + 1) / 2, (rec + 1) / 2))
        ids.append(q.indices.reshape(-1))
        recons.append(to_uint8(rec).numpy())
    rec_u8 = np.concatenate(recons)
    used = torch.cat(ids).unique().numel()
    quantized = model.quantizer.codebook_size > 1
    tokens = math.prod(model.token_grid)
    return {
        "psnr": float(torch.cat(ps).mean()),
        "ssim": float(torch.cat(ss).mean()),
        "fd": frechet_distance(fd_real, features(fd_net, rec_u8)),
        "usage": used / model.quantizer.codebook_size if quantized else float("nan"),
        "codebook_size": model.quantizer.codebook_size if quantized else 0,
        "bits_per_image": tokens * model.bits_per_token if quantized else float("nan"),
    }, rec_u8


def interleaved_throughput(cfgs: dict[str, tuple], batch_size: int, rounds: int = 6, steps: int = 3,
                           device: str = "auto") -> dict:
    """Training-step images/s of every row, measured round-robin so that machine load hits every row alike.

    One step is what the training loop does per batch: forward, reconstruction + quantizer loss, backward, AdamW, on
    ``device`` (bf16 autocast on CUDA, as ``tokkit train``). The median over ``rounds`` of ``steps`` timed steps
    (after one warm-up step) is reported; on CUDA each window is bracketed by a synchronize, so it times the GPU's
    work and not the queueing of kernels.
    """
    from tokkit.models.tokenizer import Tokenizer

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto"
                       else device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.rand(batch_size, 3, *([next(iter(cfgs.values()))[0].resolution] * 2), device=dev) * 2 - 1
    models = {}
    for row, (tok_cfg, _) in cfgs.items():
        torch.manual_seed(0)
        m = Tokenizer(tok_cfg).to(dev).train()
        models[row] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=dev.type == "cuda"))
    times: dict[str, list[float]] = {row: [] for row in cfgs}

    def step(row: str) -> None:
        m, opt = models[row]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            rec, q = m(x)
            loss = (rec.float() - x).abs().mean() + q.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for row in cfgs:
        step(row)  # warm-up (k-means init, allocator)
    for _ in range(rounds):
        for row in cfgs:
            sync()  # the previous row's queued kernels are not this row's time
            t0 = time.perf_counter()
            for _ in range(steps):
                step(row)
            sync()
            times[row].append(steps * batch_size / (time.perf_counter() - t0))
    return {row: statistics.median(v) for row, v in times.items()}


def markdown(results: dict[str, dict], dataset: str, steps: int, n_eval: int, fd_name: str) -> str:
    lines = [
        f"| {dataset}, {steps} steps, {n_eval} test images | PSNR dB | SSIM | {fd_name} | codebook usage | codes "
        "| bits/image | train img/s (run) | step img/s (interleaved) | vs bare AE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    bare = results.get("bare-ae", {}).get("step_img_per_s")
    for row, r in results.items():
        usage = "-" if math.isnan(r["usage"]) else f"{r['usage']:.1%}"
        bits = "-" if math.isnan(r["bits_per_image"]) else f"{r['bits_per_image']:.0f}"
        codes = r["codebook_size"] or "-"
        step_ips = r.get("step_img_per_s")
        rel = f"{step_ips / bare:.0%}" if bare and step_ips else "-"
        lines.append(
            f"| {row} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['fd']:.2f} | {usage} | {codes} | {bits} | "
            f"{r['img_per_s']:.1f} | {step_ips or float('nan'):.1f} | {rel} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10")
    ap.add_argument("--steps", type=int, default=600, help="training steps of every row (one budget for all)")
    ap.add_argument("--eval-images", type=int, default=1000, help="test images evaluated (spread over all classes)")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config override for every row")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is stable on a shared machine)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=REPO / ".bench_out")
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared folder holding assets/ and tools/")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in --out with the same step budget")
    args = ap.parse_args(argv)

    train_rel, test_rel, stem, fd_key = DATASETS[args.dataset]
    train_spec, test_spec = args.shared / train_rel, args.shared / test_rel
    sys.path.insert(0, str(args.shared / "tools"))
    from fdnet import features, load_fdnet

    torch.set_num_threads(args.threads)
    out = args.out / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    resolution = get_preset(f"{stem}-fsq").tokenizer.resolution
    images = load_eval_images(test_spec, args.eval_images, resolution)
    fd_net = load_fdnet(fd_key)
    fd_real = features(fd_net, images)
    fd_name = f"FD-{fd_key.upper()}"

    results: dict[str, dict] = {}
    previous = json.loads((out / "results.json").read_text()).get("rows", {}) if (out / "results.json").exists() else {}
    show = np.linspace(0, len(images) - 1, 10).round().astype(int)  # one image per class (the list is class-sorted)
    recon_rows = [images[show]]
    cfgs = {
        row: row_configs(row, stem, args.steps, [f"train.cpu_threads={args.threads}", *args.sets]) for row in args.rows
    }
    for row, (tok_cfg, train_cfg) in cfgs.items():
        run = out / "runs" / row
        done = run / "run.json"
        if args.reuse and done.exists() and json.loads(done.read_text())["train"]["steps"] == args.steps:
            wall = previous.get(row, {}).get("train_seconds", float("nan"))
        else:
            shutil.rmtree(run, ignore_errors=True)
            t0 = time.perf_counter()
            train(tok_cfg, train_cfg, data=train_spec, out_dir=run, device=args.device, eval_data=test_spec)
            wall = time.perf_counter() - t0
        logged = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        ips = statistics.median(r["img_per_s"] for r in logged if "img_per_s" in r)
        model = res_model(run / "checkpoint")
        metrics, rec = evaluate(model, images, fd_net, fd_real)
        results[row] = {**metrics, "img_per_s": ips, "train_seconds": wall}
        recon_rows.append(rec[show])
        print(f"{row}: {json.dumps(results[row])}", flush=True)
        (out / "results.json").write_text(
            json.dumps(
                {"dataset": args.dataset, "steps": args.steps, "eval_images": len(images), "rows": results}, indent=2
            )
        )

    batch = next(iter(cfgs.values()))[1].batch_size
    for row, ips in interleaved_throughput(cfgs, batch, device=args.device).items():
        results[row]["step_img_per_s"] = ips
    (out / "results.json").write_text(
        json.dumps(
            {"dataset": args.dataset, "steps": args.steps, "eval_images": len(images), "rows": results}, indent=2
        )
    )
    table = markdown(results, args.dataset, args.steps, len(images), fd_name)
    (out / "results.md").write_text(table)
    grid = torch.from_numpy(np.concatenate(recon_rows)).permute(0, 3, 1, 2)  # (R*10, 3, r, r) uint8
    _rows_png(grid.float() / 127.5 - 1, len(recon_rows), out / "recons.png")
    print(table)
    print(f"rows of recons.png: originals, {', '.join(results)}")
    return 0


def res_model(checkpoint: Path):
    """The trained EMA model (the registry knows peer-vq / identity in this process)."""
    import tokkit

    return tokkit.load(checkpoint)


def _rows_png(images: torch.Tensor, rows: int, path: Path) -> None:
    """Write (rows * cols) images in [-1, 1] as a PNG with one row per method, upscaled x2."""
    from PIL import Image

    u8 = to_uint8(images).numpy()  # (N, r, r, 3), row-major: method by method
    img = Image.fromarray(make_grid(u8, ncol=len(u8) // rows, pad=0))
    img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(path)


if __name__ == "__main__":
    sys.exit(main())
