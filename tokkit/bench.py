"""``bench``: reconstruction quality and codebook usage of tokenizer checkpoints under a named, recorded protocol.

For each checkpoint the images are read the protocol's way (``tokkit.protocols``: resize + center crop, resolution,
uint8), tokenized, decoded, and the reconstructions made uint8 before any metric; the FID reference is the same
preprocessed inputs, or statistics from ``ref_stats``. Everything is accumulated batch by batch (FID running sums,
metric sums, code counts), so memory does not grow with the number of images; only 8 images, spread over the set,
are kept for the reconstruction grid. Under torchrun the images are split over the ranks and the sums all-reduced.

    from tokkit.bench import bench
    result = bench(["runs/a/checkpoint"], "photos/", out="bench_out", num_images=1000, protocol="llamagen")
    result.results[0].metrics["psnr"]
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from tokkit import distributed as tdist
from tokkit import metrics as M
from tokkit.bench_types import BenchResult, CheckpointResult  # re-exported: tokkit.bench.BenchResult
from tokkit.distributed import owns_process_group
from tokkit.errors import ConfigError, DataError, OutputError, TokkitError, WeightsError
from tokkit.progress import Reporter, resolve
from tokkit.protocols import RESIZE_DESCRIPTIONS, RESIZES, Protocol, get_protocol
from tokkit.quantizers.base import CodebookUsage, Quantizer
from tokkit.report import write_outputs

METRICS = ("rfid", "lpips", "psnr", "ssim", "usage")
GRID_IMAGES = 8
LPIPS_MIN_SIDE = {"alex": 32, "vgg": 16}  # smaller images shrink to nothing inside the backbone


# ----------------------------------------------------------------------------------------------------------------------
# codebook usage


class TokenUsage:
    """Code counts over a whole set, plus whatever the quantizer counts of its own (``Quantizer.usage_counts``).

    Args:
        quantizer: the tokenizer's quantizer (its ``codebook_size``, ``usage_counts`` and ``usage_report``).
    """

    def __init__(self, quantizer: Quantizer) -> None:
        self.quantizer = quantizer
        self.codes = CodebookUsage(int(quantizer.codebook_size))
        self._own = quantizer.usage_counts(torch.zeros(0, dtype=torch.int64))  # the zeros of each family count

    def update(self, indices: Tensor) -> None:
        """Add a batch of indices (B, h, w[, G])."""
        flat = indices.detach().reshape(-1)  # (N,)
        self.codes.update(flat)
        for key, value in self.quantizer.usage_counts(flat).items():
            self._own[key] = self._own[key] + value

    def all_reduce(self) -> None:
        """Sum the code counts and the quantizer's own counts over ranks (no-op in one process)."""
        if not tdist.dist_ready():
            return
        self.codes.all_reduce()
        for key, value in self._own.items():
            t = torch.as_tensor(value).clone()
            on = t.device
            if torch.distributed.get_backend() == "nccl":
                t = t.cuda()
            self._own[key] = tdist.all_reduce_sum_(t).to(on)

    def compute(self) -> dict[str, Any]:
        """The usage summary (see ``CheckpointResult.usage``), with the quantizer's own report merged in."""
        out: dict[str, Any] = dict(self.codes.compute())
        out["codebook_size"] = self.codes.codebook_size
        out["max_entropy_bits"] = math.log2(self.codes.codebook_size)
        out.update(self.quantizer.usage_report(self._own))
        return out


# ----------------------------------------------------------------------------------------------------------------------
# protocol


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers."""
    import tokkit

    out = {"tokkit": tokkit.__version__, "python": platform.python_version()}
    for dist in ("torch", "torchvision", "torchmetrics", "torch-fidelity", "lpips", "numpy", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def subset_indices(total: int, n: int) -> list[int]:
    """``n`` indices evenly spaced over ``range(total)`` (``i * total // n``): deterministic, every class covered."""
    return [i * total // n for i in range(n)] if n < total else list(range(total))


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        base = p.parent.name if p.name == "checkpoint" and p.parent.name else p.name
        base = "".join(c if c.isalnum() or c in "-_." else "-" for c in base) or "checkpoint"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------------------------------------
# the entry point


@owns_process_group
def bench(
    checkpoints: Sequence[str | Path],
    data: str | Path,
    *,
    out: str | Path | None = None,
    protocol: str | Protocol = "tokkit",
    ref_stats: str | Path | None = None,
    num_images: int | None = None,
    batch_size: int = 32,
    metrics: Sequence[str] = METRICS,
    weights_dir: str | Path | None = None,
    lpips_net: str = "alex",
    device: str = "auto",
    workers: int = 0,
    reporter: Reporter | None = None,
) -> BenchResult:
    """Measure reconstruction quality and codebook usage of each checkpoint on the same images.

    Under torchrun (``tokkit bench --nproc-per-node N``) the images are split over the ranks, the Inception feature
    sums, metric sums and code counts are summed over ranks, and only rank 0 writes files; every rank returns the
    same result, equal to a single process's up to float summation order.

    Args:
        checkpoints: checkpoint folders (or run folders holding ``checkpoint/``).
        data: anything ``tokkit.data.open_source`` opens (folder, .zip, .txt list, .npy/.npz, "sample").
        out: folder for results.json, report.md and the PNGs; nothing is written when None. results.json is written
            last and atomically: a folder without it holds no complete result.
        protocol: a name in ``tokkit.protocols.PROTOCOLS`` (or a ``Protocol``): resize, crop, resolution, uint8
            conversion and FID reference. Its resolution wins over a checkpoint's own (the result says so).
        ref_stats: an ``.npz`` of FID reference statistics. Read when it exists (tokkit's own file is checked
            against this protocol, resolution, data and Inception weights; a foreign ``mu``/``sigma`` file becomes an
            external reference); otherwise the reference statistics computed here are written to it, atomically,
            so the next run does not recompute them.
        num_images: use N images evenly spaced over the sorted source (``subset_indices``), so that a subset of a
            class-sorted folder or zip still covers every class; all when None.
        batch_size: images per batch (per rank).
        metrics: a subset of ``METRICS``; bits per token, tokens per image and bits per pixel are always reported.
        weights_dir: folder with the InceptionV3 / AlexNet / VGG16 files (see ``tokkit.metrics``);
            default ``$TOKKIT_WEIGHTS_DIR``.
        lpips_net: "alex" or "vgg".
        device: "auto", "cpu", "cuda" or "cuda:N" (under torchrun on CUDA each rank takes its local GPU).
        workers: DataLoader worker processes.
        reporter: receives a progress bar per checkpoint and one-line notes (unavailable metrics).

    Returns:
        A ``BenchResult`` (one ``CheckpointResult`` per checkpoint, in order).

    Raises:
        ConfigError: unknown metric or protocol, empty checkpoint list, bad sizes, a protocol resolution a checkpoint
            cannot run at, a ``--ref-stats`` file that is corrupt or was computed under other conditions.
        CheckpointError / DataError: unreadable inputs.
        OutputError: ``out`` is a file, read-only or full (checked before any slow work, and when writing).
    """
    from tokkit.checkpoint import read_checkpoint_meta, resolve_checkpoint_dir
    from tokkit.data import open_source
    from tokkit.models.tokenizer import load

    rep = resolve(reporter)
    proto = get_protocol(protocol) if isinstance(protocol, str) else protocol
    if isinstance(metrics, str):
        metrics = metrics.split(",")
    wanted = [m.strip().lower() for m in metrics if m.strip()]
    bad = sorted(set(wanted) - set(METRICS))
    if bad or not wanted:
        raise ConfigError(f"unknown metrics {', '.join(bad) or '(none)'}; choose from: {', '.join(METRICS)}")
    if not checkpoints:
        raise ConfigError("give at least one checkpoint folder")
    if num_images is not None:
        _check_count("num_images", "--num-images", num_images, 1)
    _check_count("batch_size", "--batch-size", batch_size, 1)
    _check_count("workers", "--workers", workers, 0)
    if lpips_net not in M.LPIPS_NETS:
        raise ConfigError(f"unknown LPIPS net {lpips_net!r}; choose one of: {', '.join(M.LPIPS_NETS)}")
    info = tdist.init_distributed(device)
    dev = info.device
    ckpt_dirs = [resolve_checkpoint_dir(c) for c in checkpoints]
    metas = [read_checkpoint_meta(c) for c in ckpt_dirs]  # fail early, before any slow work
    plans = [run_plan(meta["tokenizer"], proto, c) for meta, c in zip(metas, ckpt_dirs, strict=True)]
    source = open_source(data)
    n_total = len(source)
    n_use = min(n_total, num_images) if num_images else n_total
    fingerprint = source.fingerprint()
    selection = "all images" if n_use == n_total else f"{n_use} evenly spaced of {n_total}: i * {n_total} // {n_use}"
    ref: M.RefStats | None = None
    ref_path = Path(ref_stats) if ref_stats is not None else None
    if ref_path is not None:
        sides = sorted({p["resolution"] for p in plans})
        if len(sides) > 1:
            raise ConfigError(
                f"--ref-stats holds one resolution, but these checkpoints run at {', '.join(map(str, sides))} px: "
                "bench them separately, or pick a protocol with a fixed resolution"
            )
        if ref_path.is_dir():
            raise ConfigError(f"--ref-stats {ref_path} is a folder: give an .npz file path")
        if ref_path.exists():
            ref = M.read_ref_stats(ref_path)
    cautions = [training_data_warning(c, data, fingerprint) for c in ckpt_dirs]
    for line in cautions:
        if line:
            rep.message(line)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        prepare_out_dir(out_dir)  # a file in the way or a read-only folder: now, not after the whole run

    stats_meta = {
        "protocol": proto.name,
        "resolution": plans[0]["resolution"],
        "resize": proto.resize,
        "to_uint8": proto.to_uint8,
        "data_fingerprint": fingerprint,
        "data_spec": str(data),
        "images_in_source": n_total,
        "selection": selection,
        "inception_sha256": None,
    }
    if ref is not None:
        check_ref_stats(ref, ref_path, stats_meta, n_use)  # before any slow work (the weights' hash comes below)

    # metric networks, loaded once and shared by every checkpoint
    unavailable: dict[str, str] = {}
    fid = lp = None
    if "rfid" in wanted:
        try:
            fid = M.load_fid(weights_dir, dev)
        except WeightsError as e:
            unavailable["rfid"] = f"rFID unavailable: {e}"
    if "lpips" in wanted:
        try:
            lp = M.load_lpips(lpips_net, weights_dir, dev)
        except WeightsError as e:
            unavailable["lpips"] = f"LPIPS unavailable: {e}"
    for reason in unavailable.values():
        rep.message(reason)
    stats_meta["inception_sha256"] = fid.weights[0]["sha256"] if fid is not None else None
    real_cache: dict[int, dict[str, Tensor]] = {}  # resolution -> FID reference sums (global over ranks)
    reference = None
    if ref is not None:
        reference = check_ref_stats(ref, ref_path, stats_meta, n_use)  # now with the Inception weights' hash too
        real_cache[plans[0]["resolution"]] = {k: v.to(dev) for k, v in ref.fid_state().items()}

    environment = {
        "versions": library_versions(),
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "processes": info.world_size,
        "data": {
            "spec": str(data),
            "root": source.root,
            "images_in_source": n_total,
            "fingerprint": fingerprint,
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics": wanted,
        "protocol": proto.to_dict(),
        "ref_stats": str(ref_path) if ref_path is not None else None,
    }
    results = []
    for ckpt, meta, plan, name, caution in zip(
        ckpt_dirs, metas, plans, _unique_names(ckpt_dirs), cautions, strict=True
    ):
        model = load(ckpt, device=dev)
        res = _bench_one(
            model, plan, proto, source, n_use, batch_size, wanted, fid, lp, lpips_net, dev, workers, rep, name,
            real_cache,
        )  # fmt: skip
        res.checkpoint = str(ckpt)
        res.protocol["checkpoint_sha256"] = meta["weights_sha256"]
        res.protocol["selection"] = selection
        if reference is not None and "rfid" in res.protocol:
            res.protocol["reference"] = reference
            res.protocol["reference_external"] = not ref.meta
        prov = (meta.get("extra") or {}).get("provenance") if isinstance(meta.get("extra"), dict) else None
        if isinstance(prov, dict):
            res.tokenizer["provenance"] = {k: prov.get(k) for k in ("peer", "variant", "source", "license", "url")}
        for m, reason in unavailable.items():
            res.unavailable.setdefault(m, reason)
        res.warnings += [caution] if caution else []
        results.append(res)
        if ref_path is not None and ref is None and plan["resolution"] in real_cache:
            # the reference computed from these inputs: written once, by rank 0, before the next checkpoint
            state = {k: v.cpu() for k, v in real_cache[plan["resolution"]].items()}
            ref = M.RefStats.from_fid_state(state, {**stats_meta, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            _on_rank0(lambda r=ref: M.write_ref_stats(ref_path, r))
            res.protocol["ref_stats_written"] = str(ref_path)
        del model
    if ref_path is not None and ref is None:
        line = f"--ref-stats {ref_path} was not written: rFID was not measured (see the notes), so no reference exists"
        results[0].warnings.append(line)
        rep.message(line)
    result = BenchResult(results, environment)
    if out_dir is not None:
        if info.is_main:
            _on_rank0(lambda: write_outputs(result, out_dir))
        else:
            _on_rank0(lambda: None)
            result.files.update({"results": str(out_dir / "results.json"), "report": str(out_dir / "report.md")})
    return result


def _on_rank0(fn: Any) -> None:
    """Run ``fn`` on rank 0 only; a ``TokkitError`` there is raised on every rank (no rank waits for a dead one)."""
    error: str | None = None
    if tdist.is_main():
        try:
            fn()
        except TokkitError as e:
            if not tdist.dist_ready():
                raise
            error = f"{type(e).__name__}:{e}"
    error = tdist.broadcast_object(error)  # type: ignore[assignment]
    if error is not None:
        kind, _, msg = error.partition(":")
        raise {"OutputError": OutputError, "ConfigError": ConfigError}.get(kind, TokkitError)(msg)


def run_plan(config: dict[str, Any], proto: Protocol, where: Path | str = "") -> dict[str, Any]:
    """The resolution and token grid a checkpoint is measured at under ``proto``.

    The protocol's resolution wins over the tokenizer's; it must be a multiple of the tokenizer's downsampling
    factor (every tokkit architecture is convolutional, so it runs at any such size).

    Returns:
        ``dict(resolution, tokenizer_resolution, token_grid, note)``; ``note`` is None when nothing changed.

    Raises:
        ConfigError: the protocol's resolution is not a multiple of the downsampling factor.
    """
    from tokkit.config import TokenizerConfig

    cfg = TokenizerConfig.from_dict(config)
    own = int(cfg.resolution)
    h, w = cfg.token_grid
    r = int(proto.resolution or own)
    note = None
    if r != own:
        f = own // h
        if r % f or own % h or h != w:
            raise ConfigError(
                f"protocol {proto.name} measures at {r} px, but {where} (built for {own} px, {h}x{w} tokens) "
                f"downsamples by {own / h:g}: {r} px is not a multiple; use --protocol tokkit"
            )
        h = w = r // f
        note = (
            f"protocol {proto.name} measures at {r} px; the tokenizer was built for {own} px: it ran at {r} px "
            f"({h}x{w} tokens) - the protocol's resolution wins"
        )
    return {"resolution": r, "tokenizer_resolution": own, "token_grid": [h, w], "note": note}


def check_ref_stats(ref: M.RefStats, path: Path | None, expected: dict[str, Any], n_use: int) -> str:
    """What a ``--ref-stats`` file stands for as the FID reference, after checking it fits this run.

    A tokkit-written file must have been computed under the same protocol, resolution, data (fingerprint and
    selection) and Inception weights; a foreign file (no tokkit metadata) is an external reference.

    Raises:
        ConfigError: the file was computed under other conditions (one line, naming the first difference).
    """
    if not ref.meta:
        digest = M.sha256_file(path) if path is not None else "?"
        return (
            f"external FID statistics {path} (mu/sigma, sha256 {digest[:16]}): not the inputs, so the numbers follow "
            "that reference, not this protocol's"
        )
    checks = [
        ("protocol", "--protocol"),
        ("resolution", "the resolution"),
        ("resize", "the resize"),
        ("to_uint8", "the uint8 conversion"),
        ("data_fingerprint", "--data"),
        ("selection", "--num-images"),
        ("inception_sha256", "the Inception weights"),
    ]
    for key, what in checks:
        have, want = ref.meta.get(key), expected.get(key)
        if key == "inception_sha256" and want is None:
            continue
        if have != want:
            raise ConfigError(
                f"--ref-stats {path} was computed with another {what} ({key} {str(have)[:24]!r}, this run "
                f"{str(want)[:24]!r}): delete it to recompute, or give the matching file"
            )
    return (
        f"the same preprocessed input images; statistics read from {path} ({ref.num_images} images, written "
        f"{ref.meta.get('written', '?')})"
    )


def training_data_warning(checkpoint: str | Path, data: str | Path, fingerprint: str) -> str | None:
    """A warning when the run that produced ``checkpoint`` recorded ``data`` as its training data, else None.

    The run's ``run.json`` (in the checkpoint folder's run folder: ``RUN/checkpoint`` -> ``RUN/run.json``) records
    the training data and its source fingerprint, also for each switch (``data_history``). The bench data is the
    training data when its path (resolved as ``tokkit train`` records it) or its fingerprint equals a recorded one:
    the same images under another path, such as a moved folder, are recognized too. A checkpoint without a readable
    run.json gets no warning.
    """
    from tokkit.train_data import data_spec  # the one spelling run.json records

    ckpt = Path(checkpoint)
    records = [ckpt / "run.json"] + ([ckpt.parent / "run.json"] if ckpt.name == "checkpoint" else [])
    run_json = next((p for p in records if p.is_file()), None)
    if run_json is None:
        return None
    try:
        rec = json.loads(run_json.read_text())
        trained = [rec] + [h for h in rec.get("data_history") or [] if isinstance(h, dict)]
        specs = {data_spec(t["data"]) for t in trained if isinstance(t.get("data"), str)}
        prints = {t["data_fingerprint"] for t in trained if isinstance(t.get("data_fingerprint"), str)}
    except (OSError, ValueError, TypeError, AttributeError):  # unreadable or not a run record: nothing to say
        return None
    spec = data_spec(data)
    if spec not in specs and fingerprint not in prints:
        return None
    return (
        f"{ckpt} was trained on these images ({spec}, per {run_json}): its numbers measure reconstruction of "
        "training images, not of unseen ones; bench on held-out images to compare tokenizers"
    )


def _check_count(name: str, flag: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} ({flag}) must be an integer >= {minimum}, got {value!r}")


def prepare_out_dir(out: Path) -> None:
    """Create ``out`` and check that a file can be written in it; an ``OutputError`` in one line otherwise."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder: choose another --out (or remove the file)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the --out folder {out}: {_reason(e)}; choose another --out") from None
    probe = out / f".tokkit-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:  # a probe left by a killed run with the same pid: writable all the same
        with contextlib.suppress(OSError):
            probe.unlink()
    except OSError as e:
        what = "is full" if e.errno == errno.ENOSPC else "is not writable"
        raise OutputError(f"the --out folder {out} {what} ({_reason(e)}): choose another --out") from None


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def to_uint8(images01: Tensor, mode: str) -> Tensor:
    """float images in [0, 1] (B, 3, H, W) -> uint8: "round" (round(255 x)) or "truncate" ((255 x).to(uint8))."""
    x = images01.float().clamp(0.0, 1.0) * 255.0
    return (x.round() if mode == "round" else x).to(torch.uint8)


def _bench_one(
    model: torch.nn.Module,
    plan: dict[str, Any],
    proto: Protocol,
    source: Any,
    n_use: int,
    batch_size: int,
    wanted: list[str],
    fid: Any,
    lp: Any,
    lpips_net: str,
    dev: torch.device,
    workers: int,
    rep: Reporter,
    name: str,
    real_cache: dict[int, dict[str, Tensor]],
) -> CheckpointResult:
    from tokkit.data import ImageDataset, collate_skip_bad, to_float

    r = int(plan["resolution"])
    h, w = plan["token_grid"]
    groups = int(getattr(model.quantizer, "num_groups", 1))
    tokens = h * w
    tok_info = {
        "quantizer": model.config.quantizer,
        "quantizer_kwargs": model.config.quantizer_kwargs,
        "codebook_size": int(model.codebook_size),
        "resolution": r,
        "tokenizer_resolution": plan["tokenizer_resolution"],
        "token_grid": [h, w],
        "index_shape": [h, w, groups] if groups > 1 else [h, w],
        "groups": groups,
        "tokens_per_image": tokens,
        "bits_per_token": float(model.bits_per_token),
        "bits_per_image": float(model.bits_per_token) * tokens,
        "bits_per_pixel": float(model.bits_per_token) * tokens / (r * r),
    }
    unavailable: dict[str, str] = {}
    use_fid = fid is not None and "rfid" in wanted
    if use_fid and n_use < 2:
        use_fid, unavailable["rfid"] = False, "rFID unavailable: needs at least 2 images"
    use_lpips = lp is not None and "lpips" in wanted
    if use_lpips and r < LPIPS_MIN_SIDE[lpips_net]:
        use_lpips = False
        unavailable["lpips"] = f"LPIPS unavailable: {lpips_net} needs images of at least {LPIPS_MIN_SIDE[lpips_net]} px"
    use_ssim = "ssim" in wanted
    if use_ssim and r < 11:
        use_ssim, unavailable["ssim"] = False, "SSIM unavailable: needs images of at least 11 px"
    cached_real = real_cache.get(r) if use_fid else None
    if use_fid:
        fid.reset()
        fid._to_sync = fid.sync_on_compute = False  # the sums are all-reduced here, once
        if cached_real is not None:
            for k, v in cached_real.items():
                setattr(fid, k, v.clone().to(getattr(fid, k).device))
    usage = TokenUsage(model.quantizer) if "usage" in wanted else None

    chosen = subset_indices(len(source), n_use)
    rank, world = tdist.get_rank(), tdist.get_world_size()
    mine = chosen[rank::world]  # this rank's share; one process: all
    ds = Subset(ImageDataset(source, r, resize=RESIZES[proto.resize]), mine)
    grid_keep = {chosen[i] for i in subset_indices(n_use, GRID_IMAGES)}  # a few images, spread over the set
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip_bad)
    sums = {k: 0.0 for k in ("psnr", "psnr_sq", "ssim", "ssim_sq", "lpips")}
    n_inf = 0
    count, upscaled, errors = 0, 0, []
    grid: list[tuple[int, np.ndarray, np.ndarray]] = []
    rep.start(f"bench {name}", len(mine))
    seen = 0
    t0 = time.perf_counter()
    for batch in loader:
        seen += len(batch["indices"]) + len(batch["errors"])
        errors += batch["errors"]
        upscaled += int(batch["upscaled"])
        x = batch["images"]  # (B, 3, r, r) uint8
        if x.shape[0] == 0:
            rep.advance(seen)
            continue
        x = x.to(dev)
        with torch.no_grad():
            indices = model.encode(to_float(x))  # (B, h, w[, G])
            out01 = (model.decode(indices).float() + 1.0) / 2.0  # (B, 3, r, r) in [0, 1]
        y = to_uint8(out01, "round")  # what every metric but rFID sees
        count += x.shape[0]
        if usage is not None:
            usage.update(indices)
        a, b = x.float() / 255.0, y.float() / 255.0
        if "psnr" in wanted:
            p = M.psnr(b, a).double()
            finite = torch.isfinite(p)
            n_inf += int((~finite).sum())
            sums["psnr"] += float(p[finite].sum())
            sums["psnr_sq"] += float(p[finite].pow(2).sum())
        if use_ssim:
            s = M.ssim(b, a).double()
            sums["ssim"] += float(s.sum())
            sums["ssim_sq"] += float(s.pow(2).sum())
        if use_lpips:
            with torch.no_grad():
                sums["lpips"] += float(lp(b * 2 - 1, a * 2 - 1).double().sum())
        if use_fid:
            with torch.no_grad():
                if cached_real is None:
                    fid.update(x if proto.to_uint8 == "round" else to_uint8(a, proto.to_uint8), real=True)
                fid.update(y if proto.to_uint8 == "round" else to_uint8(out01, proto.to_uint8), real=False)
        for j, i in enumerate(batch["indices"].tolist()):
            if i in grid_keep:
                grid.append((i, x[j].cpu().permute(1, 2, 0).numpy(), y[j].cpu().permute(1, 2, 0).numpy()))
        fields: dict[str, float | int | str] = {"img/s": count / max(time.perf_counter() - t0, 1e-9)}
        if "psnr" in wanted and count > n_inf:
            fields["psnr"] = sums["psnr"] / (count - n_inf)
        rep.advance(seen, **fields)
    rep.stop()
    seconds = time.perf_counter() - t0

    # sum over ranks (no-ops in one process): counts and sums, code counts, FID running sums, the grid images
    local = {"sums": sums, "n_inf": n_inf, "count": count, "upscaled": upscaled, "errors": errors, "grid": grid}
    parts = _gather(local)
    sums = {k: sum(p["sums"][k] for p in parts) for k in sums}
    n_inf, count, upscaled = (sum(p[k] for p in parts) for k in ("n_inf", "count", "upscaled"))
    errors = sorted(e for p in parts for e in p["errors"])
    grid = sorted((g for p in parts for g in p["grid"]), key=lambda g: g[0])
    if usage is not None:
        usage.all_reduce()
    if use_fid:
        for k in _FID_FAKE + (() if cached_real is not None else _FID_REAL):
            tdist.all_reduce_sum_(getattr(fid, k))
    if count == 0:
        raise DataError(f"none of the {n_use} images could be read (first error: {errors[0][1] if errors else '?'})")

    values: dict[str, float | None] = {}
    if "psnr" in wanted:
        values["psnr"], values["psnr_std"] = _mean_std(sums["psnr"], sums["psnr_sq"], count - n_inf)
        if n_inf:
            unavailable.setdefault("psnr_note", f"{n_inf} images reconstructed exactly (PSNR inf) are left out")
    if use_ssim:
        values["ssim"], values["ssim_std"] = _mean_std(sums["ssim"], sums["ssim_sq"], count)
    if "lpips" in wanted:
        values["lpips"] = sums["lpips"] / count if use_lpips else None
    if "rfid" in wanted:
        values["rfid"] = None
        if use_fid:
            if cached_real is None and int(fid.real_features_num_samples) == count:
                real_cache[r] = {k: getattr(fid, k).clone() for k in _FID_REAL}
            values["rfid"] = float(fid.compute()) if count >= 2 else None
    if "ssim" in wanted and not use_ssim:
        values["ssim"] = None

    usage_out = usage.compute() if usage is not None else {}
    warnings = [plan["note"]] if plan["note"] else []
    protocol = {
        "name": proto.name,
        "num_images": count,
        "images_requested": n_use,
        "paper_num_images": proto.num_images,
        "paper_dataset": proto.dataset,
        "processes": world,
        "seconds": seconds,
        "unreadable_images": [{"index": i, "reason": why} for i, why in errors],
        "upscaled_images": upscaled,
        "resolution": r,
        "resolution_note": plan["note"],
        "preprocessing": f"{RESIZE_DESCRIPTIONS[proto.resize]}, r = {r}, uint8",
        "reference": "the same preprocessed input images (not a generation reference set)",
        "reconstruction": "decode(encode(x)) clamped to [-1, 1]; rounded to uint8 for PSNR/SSIM/LPIPS; for rFID "
        + ("rounded to uint8" if proto.to_uint8 == "round" else "inputs and reconstructions (255 x).to(uint8)"),
        "psnr_ssim": "per image on [0, 1], data range 1, then averaged; SSIM Gaussian window 11, sigma 1.5, "
        "valid positions (as scikit-image)",
        "rfid": "torchmetrics FrechetInceptionDistance, 2048 features, torch-fidelity InceptionV3, "
        "TF1-compatible bilinear resize to 299 (antialias=False), uint8 input",
        "lpips": f"lpips v0.1, net={lpips_net}, inputs in [-1, 1], mean over images",
        "deviations": list(proto.deviations),
        "source": proto.source,
        "weights": (fid.weights if use_fid else []) + (lp.weights if use_lpips else []),
    }
    grid_arrays = None
    if grid:
        grid_arrays = (np.stack([g[1] for g in grid[:GRID_IMAGES]]), np.stack([g[2] for g in grid[:GRID_IMAGES]]))
    return CheckpointResult(
        checkpoint="",
        name=name,
        tokenizer=tok_info,
        metrics=values,
        unavailable=unavailable,
        usage=usage_out,
        protocol=protocol,
        grid=grid_arrays,
        code_counts=usage.codes.counts() if usage is not None else None,
        warnings=warnings,
    )


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if not tdist.dist_ready():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_FID_REAL = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
_FID_FAKE = ("fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples")


def _mean_std(total: float, total_sq: float, n: int) -> tuple[float | None, float | None]:
    if n <= 0:
        return None, None
    mean = total / n
    return mean, math.sqrt(max(total_sq / n - mean * mean, 0.0))


__all__ = [
    "METRICS",
    "BenchResult",
    "CheckpointResult",
    "TokenUsage",
    "bench",
    "check_ref_stats",
    "library_versions",
    "prepare_out_dir",
    "run_plan",
    "subset_indices",
    "to_uint8",
    "training_data_warning",
]
