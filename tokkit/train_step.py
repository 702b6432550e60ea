"""One training step (tokenizer, then discriminator), and what it needs: optimizers, schedule, EMA, compilation.

The step never waits for the device: every value it reports is a 0-dim tensor (read once per log interval by the
loop), the usage counts are added with ``scatter_add_`` (``bincount`` reads the largest index back), and a non-finite
loss is recorded on the device by ``Divergence`` (the first bad step and its value), read back when the loop checks.

Axis legend: B batch, H/W image size, K codebook size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tokkit.config import TrainConfig
from tokkit.losses import adaptive_weight, hinge_d_loss, hinge_g_loss, reconstruction_loss
from tokkit.models.layers import AttnBlock, ResBlock
from tokkit.runstate import TrainState

USAGE_LIMIT = 2**22  # codebooks up to this size get exact usage counts during training


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine down to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(module: nn.Module, lr: float, cfg: TrainConfig, no_decay: tuple[str, ...] = ()) -> torch.optim.AdamW:
    """AdamW with weight decay on conv/linear weights only (not biases, norms or codebooks); fused on CUDA."""
    decay, other = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.startswith(no_decay) else other).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + other) and bool(decay + other)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def schedule(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine (``lr_at``) as a scheduler stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, cfg))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- lerp(ema, model, 1 - decay)`` for the parameters; the buffers are copied."""
    ema_params, params = list(ema.parameters()), [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute the activations of every residual / attention block in backward instead of keeping them.

    The blocks' ``forward`` is wrapped on the instances (the models are not changed, and the state dict keys stay
    the same); returns the number of blocks wrapped.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, (ResBlock, AttnBlock)) and "forward" not in vars(module):
            plain = module.forward

            def wrapped(*args: Any, _plain: Any = plain, **kwargs: Any) -> Tensor:
                if not torch.is_grad_enabled():
                    return _plain(*args, **kwargs)
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

            module.forward = wrapped
            n += 1
    return n


def use_compile(setting: str, device: torch.device) -> bool:
    """``train.compile``: ``auto`` compiles on CUDA only (on the CPU the compile time outweighs a short run)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


class Divergence:
    """The first step whose loss was not finite, and that loss, recorded on the device (no host sync per step)."""

    NEVER = 2**62

    def __init__(self, step: int, device: torch.device) -> None:
        self.step = torch.full((), step, dtype=torch.int64, device=device)  # the step being taken (1-based)
        self.first = torch.full((), self.NEVER, dtype=torch.int64, device=device)
        self.value = torch.zeros((), dtype=torch.float32, device=device)

    def record(self, loss: Tensor) -> None:
        """Count one step; remember it (and its loss) when the loss is the first non-finite one."""
        self.step += 1
        new = ~torch.isfinite(loss.detach()) & (self.first == self.NEVER)
        self.first = torch.where(new, self.step, self.first)
        self.value = torch.where(new, loss.detach().float(), self.value)

    def read(self, distributed: bool) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss on any rank, or None; one host sync (and an all-reduce)."""
        first = self.first.clone()
        if distributed:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        step, mine, value = (int(v) if i < 2 else v for i, v in enumerate(
            torch.stack([first.double(), self.first.double(), self.value.double()]).tolist()))
        if step >= self.NEVER:
            return None
        return step, value if mine == step else float("nan")  # another rank's loss: not known here


class TrainStep:
    """The tokenizer step, then the discriminator step, on the modules of a ``TrainState``.

    Args:
        state: the run state (its modules, optimizers, usage counts); updated in place.
        cfg: the training knobs.
        net, disc_net: what the forward passes run through: ``state.model`` / ``state.disc``, or their DDP /
            compiled wrappers (same parameters).
        perceptual: the LPIPS distance, or None.
        amp: bf16 autocast.
        distributed: DDP is on (the discriminator's generator-side pass then skips the gradient sync).
    """

    def __init__(self, state: TrainState, cfg: TrainConfig, net: nn.Module, disc_net: nn.Module | None,
                 perceptual: nn.Module | None, amp: bool, distributed: bool) -> None:
        self.s, self.cfg, self.net, self.disc_net = state, cfg, net, disc_net
        self.perceptual, self.amp, self.distributed = perceptual, amp, distributed
        self.last_layer = state.model.decoder.conv_out.weight
        self.K = state.model.codebook_size

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        """One optimizer step on the batch ``x`` (B, 3, H, W) in [-1, 1]; returns the step's scalars (0-dim tensors)."""
        s, cfg, dev = self.s, self.cfg, x.device
        gan_on = s.disc is not None and s.step >= cfg.disc_start
        zero = torch.zeros((), device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            rec, q = self.net(x)
            rec_loss = reconstruction_loss(rec.float(), x, cfg.recon_loss)
            p_loss = self.perceptual(rec, x).mean() if self.perceptual is not None else zero
            nll = cfg.recon_weight * rec_loss + cfg.perceptual_weight * p_loss
            loss = nll + cfg.quantizer_weight * q.loss
            g_loss, g_weight = zero, zero
            if gan_on:
                assert self.disc_net is not None
                with self.disc_net.no_sync() if self.distributed else torch.enable_grad():
                    g_loss = hinge_g_loss(self.disc_net(rec))
                g_weight = (adaptive_weight(nll, g_loss, self.last_layer) if cfg.disc_adaptive
                            else torch.ones((), device=dev)) * cfg.disc_weight
                loss = loss + g_weight * g_loss
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip or float("inf"))
        s.opt.step()
        s.sched.step()

        d_loss = zero
        if gan_on:
            d_loss = self._discriminator_step(x, rec.detach())
        if s.ema is not None:
            ema_update(s.ema, s.model, min(cfg.ema_decay, (1 + s.step) / (10 + s.step)))
        if self.K <= USAGE_LIMIT:
            ids = q.indices.detach().reshape(-1)  # (B*h*w[*G],)
            s.usage_counts.scatter_add_(0, ids, torch.ones_like(ids))
        s.step += 1
        out = {"loss": loss.detach(), "rec_loss": rec_loss.detach(), "quant_loss": q.loss.detach(),
               "grad_norm": grad_norm.detach()}
        if self.perceptual is not None:
            out["lpips_loss"] = p_loss.detach()
        if gan_on:
            out.update(g_loss=g_loss.detach(), g_weight=g_weight.detach(), d_loss=d_loss.detach())
        out.update({f"q_{k}": v.detach() for k, v in q.stats.items() if v.numel() == 1})
        return out

    def _discriminator_step(self, x: Tensor, fake: Tensor) -> Tensor:
        s, cfg = self.s, self.cfg
        assert self.disc_net is not None and s.disc is not None and s.d_opt is not None and s.d_sched is not None
        s.d_opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.disc_net(torch.cat([x, fake])).float()
            real, fake_logits = logits.chunk(2)
            d_loss = hinge_d_loss(real, fake_logits)
            if s.lecam is not None:
                d_loss = d_loss + cfg.lecam_weight * s.lecam(real, fake_logits)
        d_loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(s.disc.parameters(), cfg.grad_clip)
        s.d_opt.step()
        s.d_sched.step()  # the discriminator's own warm-up starts at disc_start
        return d_loss


__all__ = ["USAGE_LIMIT", "Divergence", "TrainStep", "adamw", "checkpoint_blocks", "ema_update", "lr_at", "schedule",
           "use_compile"]
