"""Train a tokenizer: an explicit loop in the style of nanoGPT's ``train.py``, top to bottom.

A run folder (``out_dir``) holds::

    run.json            the configs, the data (path + fingerprint, and a history of switches), the world size, and
                        for a fine-tune the source it started from (``init_from``: path + sha256) and ``freeze``
    checkpoint/         model.safetensors + config.json: the EMA weights, loadable with ``tokkit.load``
    train_state/        raw + EMA + discriminator weights (safetensors), state.pt (optimizers, schedulers, step,
                        data position, RNG of every rank; read with ``weights_only=True``) and manifest.json (the
                        sha256 of each, checked on resume): what ``resume`` needs
    metrics.jsonl       one JSON object per logged step (training losses) or evaluation (PSNR, SSIM, usage ...)
    grids/step-N.png    held-out originals over their reconstructions
    tensorboard/        the same values as TensorBoard events, when tensorboard is installed

The two folders are saved as one commit (``tokkit.runstate``): both reflect the same step, a resume first finishes
a save that a kill interrupted (or discards one that was not committed), so a run killed at any moment resumes from
its last save with the same weights an uninterrupted run would have had.

The parts: ``tokkit.train_data`` (order, augmentation, loader), ``tokkit.train_step`` (the step), ``tokkit.train_eval``
(evaluation), ``tokkit.train_log`` (metrics.jsonl), ``tokkit.runstate`` (the run state and its save / load pair),
``tokkit.train_init`` (starting from a trained tokenizer, frozen parts).

Axis legend: B batch, H/W image size, K codebook size.
"""

from __future__ import annotations

import copy
import errno
import inspect
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tokkit.config import TokenizerConfig, TrainConfig, check_compatible
from tokkit.data import ImageDataset, ImageSource, open_source
from tokkit.distributed import DistInfo, barrier, broadcast_object, cleanup, init_distributed
from tokkit.errors import CheckpointError, ConfigError, DataError, TokkitError, TrainingDiverged
from tokkit.losses import LeCam, build_perceptual
from tokkit.models.discriminator import PatchDiscriminator
from tokkit.models.tokenizer import Tokenizer
from tokkit.progress import Reporter, resolve
from tokkit.runstate import TrainState, checkpoint_matches, has_run_state, load_run_state, recover, save_run_state
from tokkit.train_data import (
    BatchPlan,
    SeededItems,
    check_data,
    data_spec,
    load_eval_batch,
    make_loader,
    split_held_out,
    to_device,
)
from tokkit.train_eval import evaluate, save_grid
from tokkit.train_init import InitSource, check_freeze, check_init_config, freeze, parse_freeze, read_init, trainable
from tokkit.train_log import RunLog, truncate_metrics, write_atomic
from tokkit.train_step import (
    USAGE_LIMIT,
    Divergence,
    TrainStep,
    adamw,
    checkpoint_blocks,
    lr_at,
    schedule,
    use_compile,
)


@dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
        out_dir: the run folder.
        checkpoint: the final checkpoint folder (EMA weights).
        step: steps done in total.
        metrics: the last evaluation (psnr, ssim, usage, perplexity ...).
        metrics_file: the metrics.jsonl path.
        grids: reconstruction grids written by this call.
        seconds: wall time of this call.
        images_per_second: training images per second over this call (all ranks).
        bad_images: unreadable training images skipped.
        perceptual: whether the LPIPS loss was used.
        resumed_from: the step this call started from (0 for a fresh run).
        data: the training data, as recorded in run.json.
        init_from: the tokenizer the run started from (``{"source", "sha256"}``), None for a run from scratch.
        freeze: the frozen parts.
    """

    out_dir: Path
    checkpoint: Path
    step: int
    metrics: dict[str, float]
    metrics_file: Path
    grids: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    bad_images: int = 0
    perceptual: bool = False
    resumed_from: int = 0
    data: str = ""
    init_from: dict[str, str] | None = None
    freeze: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------------
# the pieces train() is made of, in the order it calls them


def _gather(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _open_run(out: Path, tokenizer_cfg: TokenizerConfig, resume: bool, info: DistInfo,
              rep: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Finish (or discard) a save that a kill interrupted, then (run.json record, saved run state or None)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: choose another --out")
    notes = recover(out) if info.is_main else []
    barrier()
    for note in notes:
        rep.message(f"{out}: {note}")
    ckpt_dir = out / "checkpoint"
    if not resume:
        if has_run_state(out) or (ckpt_dir / "config.json").exists():
            raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        return {}, None
    saved_tok, _, run_rec = read_run_config(out)
    if saved_tok != tokenizer_cfg:
        diff = [k for k, v in tokenizer_cfg.to_dict().items() if saved_tok.to_dict().get(k) != v]
        raise ConfigError(f"{out} was trained with another tokenizer config (differs in: {', '.join(diff)})")
    if run_rec.get("world_size", 1) != info.world_size:
        raise ConfigError(f"{out} ran on {run_rec.get('world_size')} processes; resume with the same number")
    if has_run_state(out):
        return run_rec, load_run_state(out)
    if (ckpt_dir / "config.json").exists():
        raise CheckpointError(f"{out} has a checkpoint/ but no train_state/ to resume from: choose another "
                              "--out (or move checkpoint/ away to train this run again from step 0)")
    if info.is_main:
        rep.message(f"{out} has no save yet: training it again from step 0")
    return run_rec, None


def _open_data(data: str | Path | None, eval_data: str | Path | None, run_rec: dict[str, Any], resume: bool,
               new_data: bool, out: Path) -> tuple[str, ImageSource, str | None, ImageSource | None]:
    """(data spec, source, eval spec, eval source): on resume, the recorded data unless told otherwise."""
    if not resume:
        spec = data_spec("sample" if data is None else data)
        eval_spec = None if eval_data is None else data_spec(eval_data)
        return spec, open_source(spec), eval_spec, None if eval_spec is None else open_source(eval_spec)
    spec, source = check_data("data", data, run_rec.get("data"), run_rec.get("data_fingerprint"), new_data)
    eval_spec, eval_source = check_data("eval data", eval_data, run_rec.get("eval_data"),
                                        run_rec.get("eval_fingerprint"), new_data)
    if source is None:  # a record without data (not written by tokkit): nothing to continue on
        raise CheckpointError(f"{out}/run.json records no data: pass --data")
    return spec, source, eval_spec, eval_source


def _build_state(tokenizer_cfg: TokenizerConfig, cfg: TrainConfig, dev: torch.device,
                 init: InitSource | None = None, frozen: Sequence[str] = ()) -> tuple[TrainState, list[str]]:
    """Fresh models (identical on every rank: seeded, or ``init``'s weights), ``frozen`` parts frozen, EMA copy,
    discriminator, optimizers and schedules; and the notes of ``freeze``."""
    torch.manual_seed(cfg.seed)
    model = Tokenizer(tokenizer_cfg)
    if init is not None:
        model.load_state_dict(init.state, strict=True)
    model.to(dev)
    notes = freeze(model, frozen)
    if not trainable(model):
        raise ConfigError(f"--freeze {','.join(frozen)} leaves no parameter to train in this tokenizer: freeze fewer "
                          "parts")
    ema = copy.deepcopy(model).requires_grad_(False).eval() if cfg.ema_decay > 0 else None
    use_gan = cfg.disc_weight > 0
    disc = PatchDiscriminator(channels=cfg.disc_channels, num_layers=cfg.disc_layers).to(dev) if use_gan else None
    opt = adamw(model, cfg.lr, cfg, no_decay=("quantizer.",))
    d_opt = adamw(disc, cfg.disc_lr or cfg.lr, cfg) if disc is not None else None
    K = model.codebook_size
    return TrainState(
        model=model, opt=opt, sched=schedule(opt, cfg), ema=ema, disc=disc, d_opt=d_opt,
        d_sched=schedule(d_opt, cfg) if d_opt is not None else None,
        lecam=LeCam(cfg.lecam_decay).to(dev) if use_gan and cfg.lecam_weight > 0 else None,
        usage_counts=torch.zeros(K if K <= USAGE_LIMIT else 1, dtype=torch.int64, device=dev),
    ), notes  # fmt: skip


def _record_run(out: Path, run_rec: dict[str, Any], step: int, tokenizer_cfg: TokenizerConfig, cfg: TrainConfig,
                data: tuple[str, ImageSource, str | None, ImageSource | None], world_size: int,
                perceptual: bool, origin: dict[str, Any]) -> None:
    """Write run.json (configs, data and its history of switches, ``origin``: init_from and freeze); start or cut
    metrics.jsonl at ``step``."""
    spec, source, eval_spec, eval_source = data
    out.mkdir(parents=True, exist_ok=True)
    if step:
        truncate_metrics(out / "metrics.jsonl", step)
    else:
        (out / "metrics.jsonl").write_text("")
    entry = {"step": step, "data": spec, "data_fingerprint": source.fingerprint(), "images": len(source),
             "eval_data": eval_spec, "eval_fingerprint": None if eval_source is None else eval_source.fingerprint()}
    history = list(run_rec.get("data_history") or []) if step else []
    if step and not history and run_rec.get("data"):  # a record from before data_history
        history = [{"step": 0, "data": run_rec["data"], "eval_data": run_rec.get("eval_data")}]
    if not history or any(history[-1].get(k) != v for k, v in entry.items() if k not in ("step", "images")):
        history.append(entry)
    record = {"tokenizer": tokenizer_cfg.to_dict(), "train": cfg.to_dict(), "data": spec,
              "data_fingerprint": entry["data_fingerprint"], "eval_data": eval_spec,
              "eval_fingerprint": entry["eval_fingerprint"], "world_size": world_size, "perceptual": perceptual,
              "data_history": history, **origin}
    write_atomic(out / "run.json", json.dumps(record, indent=2) + "\n")


def _wrap(st: TrainState, cfg: TrainConfig, info: DistInfo) -> tuple[nn.Module, nn.Module | None]:
    """What the step's forward passes run through: DDP (several processes), then ``torch.compile`` (``train.compile``);
    ``st`` keeps the plain modules, so the saved state dict keys never depend on either."""
    if cfg.grad_checkpointing:
        checkpoint_blocks(st.model)
    net: nn.Module = st.model
    disc: nn.Module | None = st.disc
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        # buffers are not synced in forward (the quantizers all-reduce what must agree); torch >= 2.14 renamed the
        # flag and warns on the old one (its init sync is harmless here: every rank starts from the same weights)
        kw = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
              else {"broadcast_buffers": False})
        net = DDP(st.model, device_ids=ids, **kw)
        disc = DDP(st.disc, device_ids=ids, **kw) if st.disc is not None else None
    if use_compile(cfg.compile, info.device):
        net = torch.compile(net)
        disc = torch.compile(disc) if disc is not None else None
    return net, disc


def _diverged(div: Divergence, info: DistInfo, last_good: Path | None) -> None:
    """Raise ``TrainingDiverged`` when a loss so far was not finite (one host sync)."""
    bad = div.read(info.distributed)
    if bad is not None:
        step, value = bad
        raise TrainingDiverged(
            f"loss became {value:.4g} at step {step}; last good checkpoint: "
            f"{last_good or 'none (no checkpoint written yet)'} (resume it with a lower --lr or a tighter "
            "train.grad_clip)"
        )


def _train_record(step: int, scalars: dict[str, torch.Tensor], lr: float, ips: float, bad: int) -> dict[str, Any]:
    """The metrics.jsonl line of a logged step: the step's scalars, read back in one transfer."""
    values = torch.stack([v.float() for v in scalars.values()]).tolist()
    rec: dict[str, Any] = {"step": step}
    rec.update(zip(scalars, values, strict=True))
    rec.update(lr=lr, img_per_s=ips)
    if bad:
        rec["bad_images"] = bad
    return rec


def _storage_error(e: OSError, out: Path, saved: int) -> TokkitError | None:
    """A full disk, a read-only or unusable run folder, as one line that says what to do; None for other errors."""
    where = e.filename or out
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(f"no space left on the device writing {where}: free some space, then run the same "
                               f"command with --resume (it continues from step {saved}, the last save)")
    if e.filename is not None and not Path(os.path.abspath(e.filename)).is_relative_to(os.path.abspath(out)):
        return None  # not the run folder: not for this message
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ConfigError(f"cannot write to {where} ({e.strerror}): choose another --out, or make it writable")
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return ConfigError(f"cannot use {out} as the run folder ({e.strerror}: {where}): choose another --out")
    return None


def _recorded_origin(
    out: Path, run_rec: dict[str, Any], init_from: str | Path | InitSource | None, frozen: tuple[str, ...],
    need_weights: bool,
) -> tuple[InitSource | None, dict[str, str] | None, tuple[str, ...]]:
    """On resume: (the init source, read only when its weights are needed, i.e. no save yet; its record; the frozen
    parts), as run.json recorded them.

    ``init_from`` / ``frozen`` given again must be the recorded ones; the source is read again only when no save holds
    the weights yet, and must still have the recorded sha256.
    """
    rec = run_rec.get("init_from") or None
    recorded = parse_freeze(run_rec.get("freeze") or ())
    if init_from is not None:
        given = init_from.source if isinstance(init_from, InitSource) else str(init_from)
        if rec is None or _same_source(given) != _same_source(rec.get("source", "")):
            was = f"started from {rec.get('source')}" if rec else "not started with --init-from"
            raise ConfigError(f"{out} was {was}: drop --init-from {given} to resume it")
    if frozen and frozen != recorded:
        raise ConfigError(f"{out} was trained with --freeze {','.join(recorded) or '(none)'}: drop --freeze to resume "
                          "it with its own")
    if rec is None or not need_weights:
        return None, rec, recorded
    init = read_init(rec["source"])
    if init.sha256 != rec.get("sha256"):
        raise CheckpointError(f"{out} has no save yet and its --init-from {rec['source']} changed since the run "
                              "started (another sha256): restore it, or start a new run (another --out)")
    return init, rec, recorded


def _same_source(text: str) -> str:
    return text if text.startswith("hf:") else str(Path(text).expanduser().resolve())


def read_run_config(out_dir: str | Path) -> tuple[TokenizerConfig, TrainConfig, dict[str, Any]]:
    """The configs recorded in a run folder's ``run.json`` (and the whole record): what ``--resume`` continues."""
    path = Path(out_dir) / "run.json"
    if not path.is_file():
        raise CheckpointError(f"nothing to resume in {out_dir}: no run.json (start a new run without --resume)")
    try:
        rec = json.loads(path.read_text())
        return TokenizerConfig.from_dict(rec["tokenizer"]), TrainConfig.from_dict(rec["train"]), rec
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}); start a new run") from None


# ----------------------------------------------------------------------------------------------------------------------
# the loop


def train(
    tokenizer_cfg: TokenizerConfig | None,
    train_cfg: TrainConfig,
    data: str | Path | None = None,
    out_dir: str | Path = "runs/sample-fsq",
    resume: bool = False,
    device: str = "auto",
    reporter: Reporter | None = None,
    weights_dir: str | Path | None = None,
    eval_data: str | Path | None = None,
    new_data: bool = False,
    init_from: str | Path | InitSource | None = None,
    freeze: Sequence[str] | None = None,
) -> TrainResult:
    """Train a tokenizer and write its run folder (see the module docstring).

    Args:
        tokenizer_cfg: the model; None: ``init_from``'s (or, on ``resume``, the recorded one).
        train_cfg: the training knobs.
        data: ``open_source`` spec: image folder, zip, .txt list, .npy/.npz, or ``sample``. None: ``sample`` for a new
            run, the run's recorded data on ``resume``.
        out_dir: the run folder.
        resume: continue the run in ``out_dir`` from its last save (same world size); the tokenizer config must
            match the recorded one; ``train_cfg.steps`` may be larger to extend the run. A save that a kill
            interrupted is finished first; with no save yet, the run starts again from step 0.
        device: ``auto``, ``cpu``, ``cuda``; under torchrun each rank takes its local GPU.
        reporter: progress and one-line notices (silent by default).
        weights_dir: folder with the LPIPS weights (else ``$TOKKIT_WEIGHTS_DIR`` / caches / download).
        eval_data: a separate source for the held-out batch (default: images held out of ``data``; on ``resume``,
            the recorded one).
        new_data: on ``resume``, allow ``data`` / ``eval_data`` other than the recorded ones (or changed files); the
            switch is recorded in run.json's ``data_history``.
        init_from: start from this trained tokenizer (anything ``tokkit.load`` reads, or an ``InitSource`` already
            read): its config is the architecture (``tokenizer_cfg`` must equal it) and its weights the start. Recorded
            in run.json (source + sha256); ``resume`` never reads it again (given there, it must be the recorded one).
        freeze: parts kept fixed (``encoder`` (+ quant_conv), ``quantizer``, ``decoder`` (+ post_quant_conv); see
            ``tokkit.train_init``); needs ``init_from``; on ``resume`` the recorded ones (given there, the same).

    Returns:
        A ``TrainResult``.

    Raises:
        DataError: missing or empty dataset. ConfigError: bad settings, an existing run without ``resume``, other data
            on ``resume`` without ``new_data``, an unusable or read-only ``out_dir``.
        CheckpointError: nothing (or something unreadable or corrupt) to resume; a full disk (the last save is kept).
        TrainingDiverged: NaN/Inf loss (named with its step and the last good checkpoint; on CUDA it is read back at
            each log, evaluation and save, so a few more steps may run before the stop).
        WeightsError: ``perceptual="lpips"`` without the weights.
    """
    rep = resolve(reporter)
    t_start = time.perf_counter()
    frozen = parse_freeze(freeze)
    init: InitSource | None = None
    if resume:
        if tokenizer_cfg is None:
            tokenizer_cfg = read_run_config(out_dir)[0]
    else:
        if frozen and init_from is None:
            raise ConfigError("--freeze needs --init-from CHECKPOINT: a part frozen at its random start never learns")
        if init_from is not None:
            init = init_from if isinstance(init_from, InitSource) else read_init(init_from)
            tokenizer_cfg = tokenizer_cfg or init.config
            check_init_config(tokenizer_cfg, init)
        if tokenizer_cfg is None:
            raise ConfigError("train needs a tokenizer config, or init_from to take it from")
    check_freeze(frozen, train_cfg)
    check_compatible(tokenizer_cfg, train_cfg)  # cross-field checks (discriminator depth vs resolution) before any work
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = init_distributed(device)
    dev, cfg = info.device, train_cfg
    out = Path(out_dir)
    threads_before = torch.get_num_threads()
    if dev.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    ckpt_dir = out / "checkpoint"
    saved = 0  # the step of the last complete save, for the messages
    log = None
    try:
        # ---- the run folder, the data, the held-out batch ---------------------------------------------------------
        run_rec, state = _open_run(out, tokenizer_cfg, resume, info, rep)
        saved = 0 if state is None else int(state["step"])
        init_record = None if init is None else init.record()
        if resume:
            init, init_record, frozen = _recorded_origin(out, run_rec, init_from, frozen, need_weights=state is None)
            check_freeze(frozen, cfg)
        # what a fine-tune records (run.json, and each checkpoint's extra); a run from scratch records neither
        origin = {} if init_record is None and not frozen else {"init_from": init_record, "freeze": list(frozen)}
        data_spec_, source, eval_spec, eval_source = _open_data(data, eval_data, run_rec, resume, new_data, out)
        if eval_source is not None:
            train_idx, held = list(range(len(source))), split_held_out(eval_source, cfg.eval_images, cfg.seed)[1]
        else:
            train_idx, held = split_held_out(source, cfg.eval_images, cfg.seed)
        eval_x = load_eval_batch(eval_source or source, held, tokenizer_cfg.resolution).to(dev)
        items = SeededItems(ImageDataset(source, tokenizer_cfg.resolution, train=True, seed=cfg.seed), cfg.seed)
        plan = BatchPlan(train_idx, cfg.batch_size, info.rank, info.world_size, cfg.seed)

        # ---- the run state: built fresh, then (on resume) loaded ---------------------------------------------------
        st, notes = _build_state(tokenizer_cfg, cfg, dev, init if state is None else None, frozen)
        del init  # its weights are in the model now
        if info.is_main:
            for note in notes:
                rep.message(note)
        perceptual = build_perceptual(cfg.perceptual, cfg.lpips_net, weights_dir, dev, rep if info.is_main else None)
        torch.manual_seed(cfg.seed + 1 + info.rank)  # per-rank stream for everything random from here on
        np.random.seed((cfg.seed + 1 + info.rank) % 2**32)
        random.seed(cfg.seed + 1 + info.rank)
        stale_checkpoint = False
        if state is not None:
            st.load_state_dict(state, info.rank, out / "train_state")
            del state
            # checkpoint/ must hold this step's EMA weights; if not (hand-edited, or an older tokkit), rewrite it
            stale_checkpoint = bool(broadcast_object(info.is_main and not checkpoint_matches(out, st.step)))
        if info.is_main:
            _record_run(out, run_rec, st.step, tokenizer_cfg, cfg, (data_spec_, source, eval_spec, eval_source),
                        info.world_size, perceptual is not None, origin)
        resumed_from = st.step

        def save() -> None:
            if info.is_main:
                save_run_state(out, st.state_dict(lambda v: _gather(v, info)), tokenizer_cfg, extra=origin or None)
            else:
                st.state_dict(lambda v: _gather(v, info))  # the gathers are collective
            barrier()

        net, disc_net = _wrap(st, cfg, info)
        compiled = use_compile(cfg.compile, dev)
        amp = cfg.amp == "bf16" or (cfg.amp == "auto" and dev.type == "cuda")
        step_fn = TrainStep(st, cfg, net, disc_net, perceptual, amp, info.distributed)
        batches = iter(make_loader(items, plan, st.consumed, cfg.num_workers, dev))
        div = Divergence(st.step, dev)
        check_every = 1 if dev.type == "cpu" else cfg.log_every  # reading it back is free on the CPU, a sync on CUDA
        log = RunLog(out, info.is_main)
        last_good = ckpt_dir if (ckpt_dir / "config.json").exists() else None
        grids: list[Path] = []
        last_eval: dict[str, float] = {}

        # ---- the loop ----------------------------------------------------------------------------------------------
        rep.start(f"train {out.name}", cfg.steps)
        rep.advance(st.step)
        st.model.train()
        t_log, img_log, img_total, t_loop = time.perf_counter(), 0, 0, time.perf_counter()
        empty_streak, first = 0, True
        while st.step < cfg.steps:
            batch = next(batches)
            st.consumed += 1
            for idx, reason in batch["errors"]:
                if idx not in st.bad and info.is_main and len(st.bad) < 3:
                    rep.message(f"skipping unreadable image {source.keys[idx]}: {reason}")
                st.bad.add(idx)
            if batch["images"].shape[0] == 0:
                empty_streak += 1
                if empty_streak > plan.batches_per_epoch:
                    raise DataError(f"no readable training image in {data_spec_} ({len(st.bad)} unreadable)")
                continue
            empty_streak = 0
            x = to_device(batch["images"], dev)  # (B, 3, H, W) in [-1, 1]
            scalars = step_fn(x)
            div.record(scalars["loss"])
            step = st.step
            n_img = x.shape[0] * info.world_size
            img_log, img_total = img_log + n_img, img_total + n_img
            if first and compiled:
                _diverged(div, info, last_good)  # waits for the first (compiling) step
                rep.message(f"compiled the training step in {time.perf_counter() - t_loop:.1f} s")
                t_log, img_log = time.perf_counter(), 0
            first = False

            do_log = step % cfg.log_every == 0 or step == cfg.steps
            do_eval = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
            do_save = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps
            if do_log or do_eval or do_save or step % check_every == 0:
                _diverged(div, info, last_good)  # before anything is logged or saved from a diverged step
            if do_log:
                now = time.perf_counter()
                ips = img_log / max(now - t_log, 1e-9)
                t_log, img_log = now, 0
                rec = _train_record(step, scalars, st.sched.get_last_lr()[0], ips, len(st.bad))
                log.write(rec)
                live = {"loss": rec["loss"], "rec": rec["rec_loss"], "img/s": round(ips, 1)}
                if last_eval:
                    live.update(psnr=round(last_eval["psnr"], 2), usage=round(last_eval["usage"], 3))
                rep.advance(step, **live)
            if do_eval:
                last_eval, rec_x = evaluate(st.ema or st.model, eval_x, st.usage_counts, amp)
                st.usage_counts.zero_()  # usage is counted per evaluation interval
                if info.is_main:
                    grids.append(save_grid(eval_x, rec_x, out / "grids" / f"step-{step:07d}.png"))
                log.write({"step": step, "eval": True, **last_eval})
            if do_save:
                save()
                saved, last_good = step, ckpt_dir
        rep.stop()
        if st.step == resumed_from and not last_eval:  # resumed a finished run: nothing to train, report its state
            last_eval, rec_x = evaluate(st.ema or st.model, eval_x, st.usage_counts, amp)
            if info.is_main:
                grids.append(save_grid(eval_x, rec_x, out / "grids" / f"step-{st.step:07d}.png"))
        if st.step == resumed_from and stale_checkpoint:
            save()
        if st.bad and info.is_main:
            rep.message(f"skipped {len(st.bad)} unreadable training image(s)")
        return TrainResult(
            out_dir=out, checkpoint=ckpt_dir, step=st.step, metrics=last_eval, metrics_file=out / "metrics.jsonl",
            grids=grids, seconds=time.perf_counter() - t_start,
            images_per_second=img_total / max(time.perf_counter() - t_loop, 1e-9), bad_images=len(st.bad),
            perceptual=perceptual is not None, resumed_from=resumed_from, data=data_spec_,
            init_from=origin.get("init_from"), freeze=list(frozen),
        )  # fmt: skip
    except OSError as e:
        err = _storage_error(e, out, saved)
        if err is None:
            raise
        raise err from None
    finally:
        rep.stop()
        if log is not None:
            log.close()
        torch.set_num_threads(threads_before)
        if owns_group:
            cleanup()


__all__ = ["TrainResult", "lr_at", "read_run_config", "save_grid", "train"]
