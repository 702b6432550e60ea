"""Train a tokenizer: an explicit loop in the style of nanoGPT's ``train.py``, top to bottom.

A run folder (``out_dir``) holds::

    run.json            the configs, the data (path + fingerprint, and a history of switches) and the world size
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

Axis legend: B batch, H/W image size, K codebook size.
"""

from __future__ import annotations

import copy
import errno
import inspect
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from tokkit.config import TokenizerConfig, TrainConfig, check_compatible
from tokkit.data import ImageDataset, ImageSource, collate_skip_bad, open_source, to_float
from tokkit.distributed import DistInfo, barrier, broadcast_object, cleanup, init_distributed
from tokkit.errors import CheckpointError, ConfigError, DataError, TokkitError, TrainingDiverged
from tokkit.losses import LeCam, adaptive_weight, build_perceptual, hinge_d_loss, hinge_g_loss, reconstruction_loss
from tokkit.models.discriminator import PatchDiscriminator
from tokkit.models.tokenizer import Tokenizer
from tokkit.progress import Reporter, resolve
from tokkit.quantizers.base import all_reduce_sum_, entropy_bits
from tokkit.runstate import checkpoint_matches, has_run_state, load_run_state, recover, save_run_state

USAGE_LIMIT = 2**22  # codebooks up to this size get exact usage counts during training


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


# ----------------------------------------------------------------------------------------------------------------------
# data: a deterministic, resumable order; augmentation seeded by (seed, epoch, index)


class _SeededItems(Dataset):
    """Item ``(epoch, i)`` = ``ImageDataset[i]`` with its random crop/flip drawn from a seed of (seed, epoch, i)."""

    def __init__(self, dataset: ImageDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 7_919 + i) % (2**63))
            return self.dataset[i]


class _BatchPlan:
    """Batches of (epoch, index) keys for one rank: a seeded permutation per epoch, split across ranks."""

    def __init__(self, indices: list[int], batch_size: int, rank: int, world: int, seed: int) -> None:
        self.indices, self.batch_size, self.rank, self.world, self.seed = indices, batch_size, rank, world, seed
        per_rank = max(len(indices), batch_size * world) // world
        self.batches_per_epoch = max(1, per_rank // batch_size)

    def epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 7_777 + epoch)
        order = [self.indices[j] for j in torch.randperm(len(self.indices), generator=g).tolist()]
        need = self.batches_per_epoch * self.batch_size * self.world
        order = (order * math.ceil(need / len(order)))[:need]  # tiny datasets: repeat
        mine = order[self.rank :: self.world]
        return [[(epoch, i) for i in mine[b * self.batch_size : (b + 1) * self.batch_size]]
                for b in range(self.batches_per_epoch)]

    def from_position(self, consumed: int):
        """Every batch from the ``consumed``-th on, forever."""
        epoch, offset = divmod(consumed, self.batches_per_epoch)
        while True:
            yield from self.epoch(epoch)[offset:]
            epoch, offset = epoch + 1, 0


def _split(source: ImageSource, eval_images: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): the held-out images leave the training set when the set is large enough."""
    n = len(source)
    g = torch.Generator().manual_seed(seed + 12_345)
    perm = torch.randperm(n, generator=g).tolist()
    held = sorted(perm[: min(eval_images, n)])
    if n >= 4 * eval_images:
        held_set = set(held)
        return [i for i in range(n) if i not in held_set], held
    return list(range(n)), held


def _load_eval_batch(source: ImageSource, indices: list[int], resolution: int) -> Tensor:
    ds = ImageDataset(source, resolution, train=False)
    batch = collate_skip_bad([ds[i] for i in indices])
    if batch["images"].shape[0] == 0:
        raise DataError(f"none of the {len(indices)} held-out images of {source.root} could be read")
    return to_float(batch["images"])  # (B, 3, r, r) in [-1, 1]


# ----------------------------------------------------------------------------------------------------------------------
# small pieces of the loop


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine down to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _adamw(module: nn.Module, lr: float, cfg: TrainConfig, no_decay: tuple[str, ...] = ()) -> torch.optim.AdamW:
    """AdamW with weight decay on conv/linear weights only (not biases, norms or codebooks)."""
    decay, other = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.startswith(no_decay) else other).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params, params = list(ema.parameters()), [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], *state["numpy_gauss"]))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _load_weights(module: nn.Module, weights: dict[str, Tensor] | None, where: Path) -> None:
    try:
        if weights is None:
            raise KeyError("weights missing")
        module.load_state_dict(weights, strict=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot resume from {where}: {first}; start a new run without --resume") from None


def save_grid(originals: Tensor, reconstructions: Tensor, path: Path, columns: int = 8, min_side: int = 64) -> Path:
    """Write a PNG: rows of originals, each followed by the row of their reconstructions (floats in [-1, 1])."""
    from PIL import Image

    from tokkit.data import make_grid, to_uint8

    a, b = to_uint8(originals.float().cpu()).numpy(), to_uint8(reconstructions.float().cpu()).numpy()  # (B, H, W, 3)
    n = a.shape[0]
    cols = min(columns, n)
    tiles = []
    for start in range(0, n, cols):
        for src in (a, b):
            chunk = src[start : start + cols]
            tiles += [chunk, np.zeros((cols - chunk.shape[0], *chunk.shape[1:]), np.uint8)]  # a short last row: black
    img = Image.fromarray(make_grid(np.concatenate(tiles), ncol=cols, pad=0))
    scale = max(1, math.ceil(min_side / originals.shape[-1]))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        img.save(tmp, format="PNG")
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written PNG behind
        raise
    return path


def _step_of(line: str) -> int | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None  # a line cut short by a kill or a full disk
    return rec.get("step", 0) if isinstance(rec, dict) else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (those the saved state has seen), atomically; drop any line cut short."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text(errors="replace").splitlines() if (s := _step_of(ln)) is not None and s <= step]
    _write_atomic(path, "".join(ln + "\n" for ln in keep))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _data_spec(data: str | Path) -> str:
    """``data`` as recorded in run.json: ``sample``, or an absolute path (``FILE.npz:KEY`` keeps its key)."""
    text = str(data)
    if text == "sample":
        return text
    if ".npz:" in text and not Path(text).exists():
        path, key = text.rsplit(":", 1)
        return f"{Path(path).expanduser().resolve()}:{key}"
    return str(Path(text).expanduser().resolve())


def _check_data(
    kind: str, given: str | Path | None, recorded: str | None, fingerprint: str | None, new_data: bool
) -> tuple[str | None, ImageSource | None]:
    """The data a resumed run continues on, and its source: the recorded one unless another is given (and allowed)."""
    flag = "--data" if kind == "data" else "--eval-data"
    recorded = None if recorded is None else _data_spec(recorded)  # records before absolute paths: from this folder
    if given is None:
        if recorded is None:
            return None, None
        try:
            source = open_source(recorded)
        except DataError as e:
            raise DataError(f"{e}; this run's {kind} is gone: pass {flag} with where it is now") from None
        if fingerprint and source.fingerprint() != fingerprint and not new_data:
            raise ConfigError(f"this run's {kind} {recorded} changed since it was recorded (other files): "
                              "pass --new-data to continue on it as it is now")
        return recorded, source
    spec, source = _data_spec(given), open_source(given)
    same = spec == recorded or (fingerprint is not None and source.fingerprint() == fingerprint)
    if not same and not new_data:
        was = recorded if recorded is not None else "images held out of --data"
        raise ConfigError(f"this run was trained on {kind} {was}, not {spec}: leave out {flag} to continue on the "
                          "same, or pass --new-data to switch")
    return spec, source


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


def _tensorboard(out: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` into ``out/tensorboard`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


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
    tokenizer_cfg: TokenizerConfig,
    train_cfg: TrainConfig,
    data: str | Path | None = None,
    out_dir: str | Path = "runs/sample-fsq",
    resume: bool = False,
    device: str = "auto",
    reporter: Reporter | None = None,
    weights_dir: str | Path | None = None,
    eval_data: str | Path | None = None,
    new_data: bool = False,
) -> TrainResult:
    """Train a tokenizer and write its run folder (see the module docstring).

    Args:
        tokenizer_cfg: the model.
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

    Returns:
        A ``TrainResult``.

    Raises:
        DataError: missing or empty dataset. ConfigError: bad settings, an existing run without ``resume``, other data
            on ``resume`` without ``new_data``, an unusable or read-only ``out_dir``.
        CheckpointError: nothing (or something unreadable or corrupt) to resume; a full disk (the last save is kept).
        TrainingDiverged: NaN/Inf loss.
        WeightsError: ``perceptual="lpips"`` without the weights.
    """
    rep = resolve(reporter)
    t_start = time.perf_counter()
    check_compatible(tokenizer_cfg, train_cfg)  # cross-field checks (discriminator depth vs resolution) before any work
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = init_distributed(device)
    dev, cfg = info.device, train_cfg
    out = Path(out_dir)
    threads_before = torch.get_num_threads()
    if dev.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    ckpt_dir, metrics_file = out / "checkpoint", out / "metrics.jsonl"
    saved = [0]  # the step of the last complete save, for the messages
    try:
        # ---- the run folder: finish (or discard) a save that a kill interrupted, then read the saved state ----------
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder: choose another --out")
        notes = recover(out) if info.is_main else []
        barrier()
        for note in notes:
            rep.message(f"{out}: {note}")
        run_rec: dict[str, Any] = {}
        state: dict[str, Any] | None = None
        if resume:
            saved_tok, _, run_rec = read_run_config(out)
            if saved_tok != tokenizer_cfg:
                diff = [k for k, v in tokenizer_cfg.to_dict().items() if saved_tok.to_dict().get(k) != v]
                raise ConfigError(f"{out} was trained with another tokenizer config (differs in: {', '.join(diff)})")
            if run_rec.get("world_size", 1) != info.world_size:
                raise ConfigError(f"{out} ran on {run_rec.get('world_size')} processes; resume with the same number")
            if has_run_state(out):
                state = load_run_state(out)
                saved[0] = int(state["step"])
            elif (ckpt_dir / "config.json").exists():
                raise CheckpointError(f"{out} has a checkpoint/ but no train_state/ to resume from: choose another "
                                      "--out (or move checkpoint/ away to train this run again from step 0)")
            elif info.is_main:
                rep.message(f"{out} has no save yet: training it again from step 0")
        elif has_run_state(out) or (ckpt_dir / "config.json").exists():
            raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")

        # ---- data: a resumed run continues on its recorded data unless told otherwise --------------------------------
        if resume:
            data_spec, source = _check_data("data", data, run_rec.get("data"), run_rec.get("data_fingerprint"),
                                            new_data)
            eval_spec, eval_source = _check_data("eval data", eval_data, run_rec.get("eval_data"),
                                                 run_rec.get("eval_fingerprint"), new_data)
            if source is None:  # a record without data (not written by tokkit): nothing to continue on
                raise CheckpointError(f"{out}/run.json records no data: pass --data")
        else:
            data_spec = _data_spec("sample" if data is None else data)
            source = open_source(data_spec)
            eval_spec = None if eval_data is None else _data_spec(eval_data)
            eval_source = None if eval_spec is None else open_source(eval_spec)
        res = tokenizer_cfg.resolution
        if eval_source is not None:
            train_idx, held = list(range(len(source))), _split(eval_source, cfg.eval_images, cfg.seed)[1]
        else:
            eval_source = source
            train_idx, held = _split(source, cfg.eval_images, cfg.seed)
        eval_x = _load_eval_batch(eval_source, held, res).to(dev)
        items = _SeededItems(ImageDataset(source, res, train=True, seed=cfg.seed), cfg.seed)
        plan = _BatchPlan(train_idx, cfg.batch_size, info.rank, info.world_size, cfg.seed)

        # ---- model, EMA, discriminator, optimizers -------------------------------------------------------------------
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = Tokenizer(tokenizer_cfg).to(dev)
        ema = copy.deepcopy(model).requires_grad_(False).eval() if cfg.ema_decay > 0 else None
        use_gan = cfg.disc_weight > 0
        disc = PatchDiscriminator(channels=cfg.disc_channels, num_layers=cfg.disc_layers).to(dev) if use_gan else None
        lecam = LeCam(cfg.lecam_decay).to(dev) if use_gan and cfg.lecam_weight > 0 else None
        opt = _adamw(model, cfg.lr, cfg, no_decay=("quantizer.",))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
        d_opt = _adamw(disc, cfg.disc_lr or cfg.lr, cfg) if disc is not None else None
        d_sched = torch.optim.lr_scheduler.LambdaLR(d_opt, lambda s: lr_at(s, cfg)) if d_opt is not None else None
        perceptual = build_perceptual(cfg.perceptual, cfg.lpips_net, weights_dir, dev, rep if info.is_main else None)
        torch.manual_seed(cfg.seed + 1 + info.rank)  # per-rank stream for everything random from here on
        np.random.seed((cfg.seed + 1 + info.rank) % 2**32)
        random.seed(cfg.seed + 1 + info.rank)

        step, consumed, bad = 0, 0, set()
        K = model.codebook_size
        usage_counts = torch.zeros(K if K <= USAGE_LIMIT else 1, dtype=torch.int64, device=dev)
        stale_checkpoint = False
        if state is not None:
            where = out / "train_state"
            _load_weights(model, state["model"], where)
            for module, key in ((ema, "ema"), (disc, "disc")):
                if module is not None:
                    _load_weights(module, state.get(key), where)
            try:
                opt.load_state_dict(state["opt"])
                sched.load_state_dict(state["sched"])
                if d_opt is not None and d_sched is not None:
                    d_opt.load_state_dict(state["d_opt"])
                    d_sched.load_state_dict(state["d_sched"])
                if lecam is not None:
                    lecam.load_state_dict(state["lecam"])
                step, consumed, bad = int(state["step"]), int(state["consumed"][info.rank]), set(state["bad"])
                usage_counts = state["usage_counts"].to(dev)
                _set_rng_state(state["rng"][info.rank])
            except Exception as e:
                raise CheckpointError(
                    f"cannot resume from {where} ({type(e).__name__}: a state this run cannot use): start a new run"
                ) from None
            del state
            # checkpoint/ must hold this step's EMA weights; if not (hand-edited, or an older tokkit), rewrite it
            stale_checkpoint = bool(broadcast_object(info.is_main and not checkpoint_matches(out, step)))
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if step:
                _truncate_metrics(metrics_file, step)
            else:
                metrics_file.write_text("")
            entry = {"step": step, "data": data_spec, "data_fingerprint": source.fingerprint(), "images": len(source),
                     "eval_data": eval_spec,
                     "eval_fingerprint": None if eval_spec is None else eval_source.fingerprint()}
            history = list(run_rec.get("data_history") or []) if step else []
            if step and not history and run_rec.get("data"):  # a record from before data_history
                history = [{"step": 0, "data": run_rec["data"], "eval_data": run_rec.get("eval_data")}]
            if not history or any(history[-1].get(k) != v for k, v in entry.items() if k not in ("step", "images")):
                history.append(entry)
            record = {"tokenizer": tokenizer_cfg.to_dict(), "train": cfg.to_dict(), "data": data_spec,
                      "data_fingerprint": entry["data_fingerprint"], "eval_data": eval_spec,
                      "eval_fingerprint": entry["eval_fingerprint"], "world_size": info.world_size,
                      "perceptual": perceptual is not None, "data_history": history}
            _write_atomic(out / "run.json", json.dumps(record, indent=2) + "\n")
        resumed_from = step

        ddp_model: nn.Module = model
        ddp_disc: nn.Module | None = disc
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dev.index] if dev.type == "cuda" else None
            # buffers are not synced in forward (the quantizers all-reduce what must agree); torch >= 2.14 renamed the
            # flag and warns on the old one (its init sync is harmless here: every rank starts from the same weights)
            kw = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})
            ddp_model = DDP(model, device_ids=ids, **kw)
            ddp_disc = DDP(disc, device_ids=ids, **kw) if disc is not None else None
        amp = cfg.amp == "bf16" or (cfg.amp == "auto" and dev.type == "cuda")
        loader = DataLoader(items, batch_sampler=plan.from_position(consumed), collate_fn=collate_skip_bad,
                            num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
        batches = iter(loader)

        # ---- helpers that close over the state above -----------------------------------------------------------------
        last_good: list[Path | None] = [ckpt_dir if (ckpt_dir / "config.json").exists() else None]
        grids: list[Path] = []
        last_eval: dict[str, float] = {}

        tb = _tensorboard(out) if info.is_main else None

        def log(rec: dict[str, Any]) -> None:
            if info.is_main:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            if tb is not None:
                group = "eval" if rec.get("eval") else "train"
                for k, v in rec.items():
                    if k not in ("step", "eval") and isinstance(v, (int, float)):
                        tb.add_scalar(f"{group}/{k}", v, rec["step"])

        def save_state() -> None:
            rng_all = _gather(_rng_state(), info)
            consumed_all = _gather(consumed, info)
            if info.is_main:  # the run state: one dict, written by save_run_state and read by load_run_state
                st = {"step": step, "consumed": consumed_all, "bad": sorted(bad), "rng": rng_all,
                      "opt": opt.state_dict(), "sched": sched.state_dict(), "usage_counts": usage_counts.cpu(),
                      "world_size": info.world_size, "model": model.state_dict(),
                      "ema": None if ema is None else ema.state_dict(),
                      "disc": None if disc is None else disc.state_dict()}
                if d_opt is not None and d_sched is not None:
                    st["d_opt"], st["d_sched"] = d_opt.state_dict(), d_sched.state_dict()
                if lecam is not None:
                    st["lecam"] = lecam.state_dict()
                save_run_state(out, st, tokenizer_cfg)
            saved[0] = step
            last_good[0] = ckpt_dir
            barrier()

        def evaluate() -> dict[str, float]:
            from tokkit.metrics import psnr, ssim

            net = ema if ema is not None else model
            was_training = net.training
            net.eval()
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                rec, q = net(eval_x)
            net.train(was_training)
            rec = rec.float().clamp(-1, 1)
            a, b = (eval_x + 1) / 2, (rec + 1) / 2
            counts = usage_counts.clone()
            all_reduce_sum_(counts)
            counts = counts.cpu()
            eval_ids = q.indices.reshape(-1)
            m = {
                "psnr": float(psnr(a, b).mean()),
                "ssim": float(ssim(a, b).mean()) if min(a.shape[-2:]) >= 11 else float("nan"),
                "l1": float((rec - eval_x).abs().mean()),
                "usage": float((counts > 0).sum()) / K if K <= USAGE_LIMIT else float("nan"),
                "perplexity": 2.0 ** entropy_bits(counts) if K <= USAGE_LIMIT else float("nan"),
                "eval_usage": float(eval_ids.unique().numel()) / K,
            }
            if info.is_main:
                grids.append(save_grid(eval_x, rec, out / "grids" / f"step-{step:07d}.png"))
            usage_counts.zero_()
            return m

        # ---- the loop ----------------------------------------------------------------------------------------------
        rep.start(f"train {out.name}", cfg.steps)
        rep.advance(step)
        model.train()
        last_layer = model.decoder.conv_out.weight
        t_log, img_log, img_total, t_loop = time.perf_counter(), 0, 0, time.perf_counter()
        empty_streak = 0
        while step < cfg.steps:
            batch = next(batches)
            consumed += 1
            for idx, reason in batch["errors"]:
                if idx not in bad and info.is_main and len(bad) < 3:
                    rep.message(f"skipping unreadable image {source.keys[idx]}: {reason}")
                bad.add(idx)
            if batch["images"].shape[0] == 0:
                empty_streak += 1
                if empty_streak > plan.batches_per_epoch:
                    raise DataError(f"no readable training image in {data} ({len(bad)} unreadable)")
                continue
            empty_streak = 0
            x = to_float(batch["images"]).to(dev, non_blocking=True)  # (B, 3, H, W) in [-1, 1]
            gan_on = disc is not None and step >= cfg.disc_start

            # generator (tokenizer) step
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                rec, q = ddp_model(x)
                rec_loss = reconstruction_loss(rec.float(), x, cfg.recon_loss)
                p_loss = perceptual(rec, x).mean() if perceptual is not None else torch.zeros((), device=dev)
                nll = cfg.recon_weight * rec_loss + cfg.perceptual_weight * p_loss
                loss = nll + cfg.quantizer_weight * q.loss
                g_loss, g_weight = torch.zeros((), device=dev), torch.zeros((), device=dev)
                if gan_on:
                    assert ddp_disc is not None
                    with ddp_disc.no_sync() if info.distributed else torch.enable_grad():
                        g_loss = hinge_g_loss(ddp_disc(rec))
                    g_weight = (adaptive_weight(nll, g_loss, last_layer) if cfg.disc_adaptive
                                else torch.ones((), device=dev)) * cfg.disc_weight
                    loss = loss + g_weight * g_loss
            finite = torch.isfinite(loss.detach()).float()
            if info.distributed:
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            if finite.item() < 1:
                where = last_good[0] or "none (no checkpoint written yet)"
                raise TrainingDiverged(
                    f"loss became {float(loss.detach()):.4g} at step {step + 1}; last good checkpoint: {where} "
                    "(resume it with a lower --lr or a tighter train.grad_clip)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            opt.step()
            sched.step()

            # discriminator step
            d_loss = torch.zeros((), device=dev)
            if gan_on:
                assert ddp_disc is not None and d_opt is not None and d_sched is not None
                d_opt.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    logits = ddp_disc(torch.cat([x, rec.detach()])).float()
                    real, fake = logits.chunk(2)
                    d_loss = hinge_d_loss(real, fake)
                    if lecam is not None:
                        d_loss = d_loss + cfg.lecam_weight * lecam(real, fake)
                d_loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
                d_opt.step()
                d_sched.step()  # the discriminator's own warm-up starts at disc_start

            if ema is not None:
                _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            if K <= USAGE_LIMIT:
                usage_counts += torch.bincount(q.indices.detach().reshape(-1), minlength=K)[:K]
            step += 1
            n_img = x.shape[0] * info.world_size
            img_log += n_img
            img_total += n_img

            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                ips = img_log / max(now - t_log, 1e-9)
                t_log, img_log = now, 0
                rec_ = {"step": step, "loss": float(loss.detach()), "rec_loss": float(rec_loss.detach()),
                        "quant_loss": float(q.loss.detach()),
                        "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm), "img_per_s": ips}
                if perceptual is not None:
                    rec_["lpips_loss"] = float(p_loss.detach())
                if gan_on:
                    rec_.update(g_loss=float(g_loss.detach()), g_weight=float(g_weight), d_loss=float(d_loss.detach()))
                for k, v in q.stats.items():
                    if v.numel() == 1:
                        rec_[f"q_{k}"] = float(v)
                if bad:
                    rec_["bad_images"] = len(bad)
                log(rec_)
                live = {"loss": rec_["loss"], "rec": rec_["rec_loss"], "img/s": round(ips, 1)}
                if last_eval:
                    live.update(psnr=round(last_eval["psnr"], 2), usage=round(last_eval["usage"], 3))
                rep.advance(step, **live)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                last_eval = evaluate()
                log({"step": step, "eval": True, **last_eval})
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
                save_state()
        rep.stop()
        if tb is not None:
            tb.close()
        if step == resumed_from and not last_eval:  # resumed a finished run: nothing to train, report its state
            last_eval = evaluate()
        if step == resumed_from and stale_checkpoint:
            save_state()
        if bad and info.is_main:
            rep.message(f"skipped {len(bad)} unreadable training image(s)")
        seconds = time.perf_counter() - t_start
        return TrainResult(
            out_dir=out, checkpoint=ckpt_dir, step=step, metrics=last_eval, metrics_file=metrics_file, grids=grids,
            seconds=seconds, images_per_second=img_total / max(time.perf_counter() - t_loop, 1e-9),
            bad_images=len(bad), perceptual=perceptual is not None, resumed_from=resumed_from, data=data_spec,
        )
    except OSError as e:
        err = _storage_error(e, out, saved[0])
        if err is None:
            raise
        raise err from None
    finally:
        rep.stop()
        torch.set_num_threads(threads_before)
        if owns_group:
            cleanup()


__all__ = ["TrainResult", "lr_at", "read_run_config", "save_grid", "train"]
