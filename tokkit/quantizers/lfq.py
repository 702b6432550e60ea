"""Lookup-free quantization: bit tokens (MAGVIT-v2's LFQ, MaskBit, and BSQ's spherical variant).

Each of the ``bits = log2(K)`` latent channels is quantized to its sign; the token index is the bits read as a
binary number, **channel 0 being the most significant bit** (``index = sum_i bit_i * 2^(bits - 1 - i)``, bit 1 for
a positive channel). ``bit_order="lsb"`` makes channel 0 the least significant bit (``index = sum_i bit_i * 2^i``),
the order of Open-MAGVIT2's and MaskBit's published tokenizers. With ``spherical=True`` (BSQ) the latent is
l2-normalized first and the codes are ``±1/sqrt(bits)``, so they lie on the unit sphere.

Entropy loss (MAGVIT-v2): ``weight * (mean per-sample entropy - gamma * codebook entropy)``, where the soft
assignment of a latent ``z`` to a code ``c`` is ``softmax_c(2 <z, c> / T)``.

- For sign codes that distribution factorizes over bits: bit ``i`` is +1 with probability
  ``sigmoid(4 s z_i / T)`` (``s`` the code scale), so the per-sample entropy is computed *exactly* as the sum of
  per-bit binary entropies, without ever forming the 2^K probabilities.
- The codebook entropy is the entropy of the batch-mean distribution, which does not factorize. It is computed
  over groups of at most ``entropy_group_bits`` bits: the sum of the entropies of the group marginals. That sum is
  an upper bound of the joint codebook entropy, equal to it when the groups are independent, and exactly the
  joint entropy when there is one group (``bits <= entropy_group_bits``). 2^18 or 2^32 codes never materialize:
  the largest tensor is (N, 2^group_bits).
- Under torch.distributed the batch-mean probabilities are averaged over ranks before the codebook entropy.
- Entropies are in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokkit.distributed import all_reduce_mean_, dist_ready
from tokkit.errors import ConfigError
from tokkit.quantizers.base import Quantizer, QuantizerOutput, batch_usage_stats, entropy_bits, register_quantizer

DEAD_BIT = 0.01  # a bit whose rarer value has frequency below this carries < 0.081 bits: "dead"

# ----------------------------------------------------------------------------------------------------------------------
# bit <-> index helpers (channel / bit 0 is the most significant bit)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 62:
        raise ConfigError(f"bits must be in [1, 62] to fit an int64 index, got {bits}")


def indices_to_bits(indices: Tensor, bits: int) -> Tensor:
    """(...,) int -> (..., bits) int64 in {0, 1}; bit 0 is the most significant."""
    _check_bits(bits)
    if indices.is_floating_point():
        raise ConfigError(f"indices must be an integer tensor, got {indices.dtype}")
    shifts = torch.arange(bits - 1, -1, -1, device=indices.device, dtype=torch.int64)
    return (indices.long().unsqueeze(-1) >> shifts) & 1


def bits_to_indices(bits: Tensor) -> Tensor:
    """(..., bits) in {0, 1} (int or bool) -> (...,) int64; bit 0 is the most significant."""
    n = bits.shape[-1]
    _check_bits(n)
    weights = torch.ones(1, dtype=torch.int64, device=bits.device) << torch.arange(
        n - 1, -1, -1, device=bits.device, dtype=torch.int64
    )
    return ((bits != 0).long() * weights).sum(-1)


def split_indices(indices: Tensor, splits: Sequence[int]) -> Tensor:
    """Split bit-token indices into MaskBit-style group tokens.

    Args:
        indices: (...,) int indices of ``sum(splits)`` bits.
        splits: bits per group, most significant group first, e.g. ``[9, 9]`` for 2^18 codes.

    Returns:
        (..., len(splits)) int64; group ``j`` holds its bits as a number in [0, 2^splits[j]).
    """
    splits = [int(s) for s in splits]
    if not splits or any(s < 1 for s in splits):
        raise ConfigError(f"splits must be a non-empty list of positive bit counts, got {splits}")
    _check_bits(sum(splits))
    idx = indices.long()
    out = []
    shift = sum(splits)
    for s in splits:
        shift -= s
        out.append((idx >> shift) & ((1 << s) - 1))
    return torch.stack(out, -1)


def merge_indices(groups: Tensor, splits: Sequence[int]) -> Tensor:
    """Inverse of ``split_indices``: (..., len(splits)) group tokens -> (...,) int64 indices."""
    splits = [int(s) for s in splits]
    if groups.shape[-1] != len(splits):
        raise ConfigError(f"expected a last axis of {len(splits)} groups, got shape {tuple(groups.shape)}")
    idx = torch.zeros(groups.shape[:-1], dtype=torch.int64, device=groups.device)
    for j, s in enumerate(splits):
        idx = (idx << s) | groups[..., j].long()
    return idx


# ----------------------------------------------------------------------------------------------------------------------
# entropy pieces


def binary_entropy_from_logits(x: Tensor) -> Tensor:
    """Elementwise entropy (nats) of Bernoulli(sigmoid(x)): ``softplus(x) - x * sigmoid(x)``, stable for any |x|."""
    return F.softplus(x) - x * torch.sigmoid(x)


def group_sizes(bits: int, max_group_bits: int) -> list[int]:
    """Split ``bits`` into the fewest groups of at most ``max_group_bits``, as equal as possible (big first)."""
    n = math.ceil(bits / max_group_bits)
    base, extra = divmod(bits, n)
    return [base + 1] * extra + [base] * (n - extra)


def group_code_log_probs(x: Tensor) -> Tensor:
    """(N, g) per-bit logits -> (N, 2^g) log-probabilities of the group's codes (bit 0 most significant).

    ``log P(c) = sum_i log sigmoid(-x_i) + sum_i c_i x_i`` for bits ``c_i`` in {0, 1}: one (N, g) x (g, 2^g) matmul.
    """
    g = x.shape[1]
    shifts = torch.arange(g - 1, -1, -1, device=x.device)
    bits = ((torch.arange(2**g, device=x.device).unsqueeze(1) >> shifts) & 1).to(x.dtype)  # (2^g, g)
    return (x @ bits.t()) - F.softplus(x).sum(1, keepdim=True)


def lfq_entropies(logits: Tensor, group_bits: Sequence[int], distributed: bool = True) -> tuple[Tensor, Tensor]:
    """Per-sample and (grouped) codebook entropy from per-bit logits.

    Args:
        logits: (N, bits) logit of each bit being +1 (``4 s z / T`` for codes ±s and temperature T).
        group_bits: sizes of the bit groups for the codebook entropy (summing to ``bits``).
        distributed: average the batch-mean group probabilities over ranks when torch.distributed is initialized.

    Returns:
        (mean per-sample entropy, codebook entropy), scalars in nats.
    """
    per_sample = binary_entropy_from_logits(logits).sum(-1).mean()
    codebook = logits.new_zeros(())
    start = 0
    for g in group_bits:
        log_probs = group_code_log_probs(logits[:, start : start + g])  # (N, 2^g)
        # floor at e^-80 (~1e-35): keeps exp() out of float32 denormals, which are ~50x slower on x86 CPUs
        avg = log_probs.clamp_min(-80.0).exp().mean(0)  # (2^g,) batch-mean probabilities
        start += g
        if distributed and dist_ready():
            # the value is the mean over ranks; the gradient flows through this rank's share (DDP averages them)
            avg = avg + (all_reduce_mean_(avg.detach().clone()) - avg.detach())
        codebook = codebook - (avg * avg.clamp_min(1e-30).log()).sum()  # finite gradient where avg underflows to 0
    return per_sample, codebook


# ----------------------------------------------------------------------------------------------------------------------
# the quantizer


@register_quantizer("lfq")
class LFQ(Quantizer):
    """Lookup-free (sign) quantization with MAGVIT-v2's entropy loss; ``spherical=True`` gives BSQ.

    Args:
        dim: input channels D; projections D -> bits -> D are added when D != bits.
        codebook_size: K, a power of two; ``bits = log2(K)``.
        entropy_weight: weight of the entropy loss.
        gamma: weight of the codebook entropy inside the entropy loss.
        temperature: T of the soft assignment ``softmax(2 <z, c> / T)``.
        commitment_weight: weight of ``mse(z, codes.detach())``.
        spherical: BSQ: l2-normalize the latent and scale codes to ±1/sqrt(bits).
        entropy_group_bits: largest bit group for the codebook entropy (see the module docstring).
        entropy_warmup_steps: training steps over which the entropy-loss multiplier decays linearly from
            ``entropy_warmup_multiplier`` to 1 (0 disables the warm-up).
        entropy_warmup_multiplier: initial multiplier of the entropy loss.
        bit_order: ``"msb"``: channel 0 is the index's most significant bit; ``"lsb"``: its least significant bit
            (Open-MAGVIT2, MaskBit). Only the index <-> bits mapping changes; codes and losses do not.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        entropy_weight: float = 0.1,
        gamma: float = 1.0,
        temperature: float = 0.01,
        commitment_weight: float = 0.25,
        spherical: bool = False,
        entropy_group_bits: int = 10,
        entropy_warmup_steps: int = 0,
        entropy_warmup_multiplier: float = 1.0,
        bit_order: str = "msb",
    ) -> None:
        super().__init__()
        codebook_size = int(codebook_size)
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise ConfigError(f"LFQ codebook_size must be a power of two >= 2 (K = 2^bits), got {codebook_size}")
        bits = codebook_size.bit_length() - 1
        _check_bits(bits)
        if dim < 1:
            raise ConfigError(f"LFQ dim must be >= 1, got {dim}")
        if temperature <= 0:
            raise ConfigError(f"LFQ temperature must be > 0, got {temperature}")
        if entropy_group_bits < 1:
            raise ConfigError(f"entropy_group_bits must be >= 1, got {entropy_group_bits}")
        if entropy_warmup_steps < 0 or entropy_warmup_multiplier < 1:
            raise ConfigError("entropy_warmup_steps must be >= 0 and entropy_warmup_multiplier >= 1")
        if bit_order not in ("msb", "lsb"):
            raise ConfigError(f"LFQ bit_order must be 'msb' or 'lsb', got {bit_order!r}")
        self.dim = int(dim)
        self.codebook_size = codebook_size
        self.bit_order = bit_order
        self.num_groups = 1
        self.bits = bits
        self.entropy_weight = float(entropy_weight)
        self.gamma = float(gamma)
        self.temperature = float(temperature)
        self.commitment_weight = float(commitment_weight)
        self.spherical = bool(spherical)
        self.entropy_group_bits = int(entropy_group_bits)
        self.group_bits = group_sizes(bits, self.entropy_group_bits)
        self.entropy_warmup_steps = int(entropy_warmup_steps)
        self.entropy_warmup_multiplier = float(entropy_warmup_multiplier)
        self.scale = 1.0 / math.sqrt(bits) if self.spherical else 1.0
        # training forwards seen, for the warm-up (saved with the weights so that a resumed run continues it)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.project_in: nn.Module = nn.Linear(dim, bits) if dim != bits else nn.Identity()
        self.project_out: nn.Module = nn.Linear(bits, dim) if dim != bits else nn.Identity()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, bits={self.bits}, spherical={self.spherical}, entropy_weight={self.entropy_weight}, "
            f"bit_order={self.bit_order}"
        )

    def _bit_weights(self, device: torch.device) -> Tensor:
        """(bits,) int64 value of each channel's bit in the index: 2^(bits-1-i) (``msb``) or 2^i (``lsb``)."""
        powers = torch.arange(self.bits, device=device, dtype=torch.int64)
        if self.bit_order == "msb":
            powers = powers.flip(0)
        return torch.ones((), dtype=torch.int64, device=device) << powers

    def _channel_bits(self, indices: Tensor) -> Tensor:
        """(...,) int indices -> (..., bits) int64 in {0, 1}, in channel order."""
        bits = indices_to_bits(indices, self.bits)  # most significant first
        return bits.flip(-1) if self.bit_order == "lsb" else bits

    def entropy_multiplier(self) -> float:
        """Current warm-up multiplier of the entropy loss (decays linearly to 1)."""
        return float(self._entropy_multiplier())

    def _entropy_multiplier(self) -> Tensor | float:
        """The warm-up multiplier as a device scalar (no host sync in ``forward``); 1.0 without a warm-up."""
        if self.entropy_warmup_steps <= 0:
            return 1.0
        frac = (1.0 - self.step.double() / self.entropy_warmup_steps).clamp_min(0.0)
        return (1.0 + (self.entropy_warmup_multiplier - 1.0) * frac).float()

    def _project_out(self, codes: Tensor) -> Tensor:
        """(B, *S, bits) -> (B, D, *S); one code path for ``quantize`` and ``indices_to_codes``."""
        return self.project_out(codes).movedim(-1, 1)

    def quantize(self, x: Tensor) -> QuantizerOutput:
        """x: (B, D, *S) float32 -> codes (B, D, *S), indices (B, *S), entropy + commitment loss, bit stats."""
        z = self.project_in(x.movedim(1, -1))  # (B, D, *S) -> (B, *S, bits)
        if self.spherical:
            z = F.normalize(z, dim=-1)
        positive = z > 0  # (B, *S, bits) bool; a zero channel counts as bit 0
        q = torch.where(positive, self.scale, -self.scale).detach()
        codes = q + (z - z.detach())  # straight-through, exact forward value
        indices = (positive.long() * self._bit_weights(x.device)).sum(-1)  # (B, *S)

        loss = x.new_zeros(())
        flat = z.reshape(-1, self.bits)  # (N, bits)
        stats = batch_usage_stats(indices, self.codebook_size)
        if self.entropy_weight > 0:
            logits = flat * (4 * self.scale / self.temperature)  # (N, bits): P(bit = +1) = sigmoid(logits)
            per_sample, codebook = lfq_entropies(logits, self.group_bits, distributed=self.training)
            loss = loss + self.entropy_weight * self._entropy_multiplier() * (per_sample - self.gamma * codebook)
            stats["per_sample_entropy"] = per_sample
            stats["codebook_entropy"] = codebook
        if self.commitment_weight > 0:
            loss = loss + self.commitment_weight * F.mse_loss(z, q)
        if self.training:
            self.step += 1

        balance = positive.reshape(-1, self.bits).float().mean(0)  # (bits,)
        stats["bit_balance"] = balance
        stats["dead_bits"] = ((balance == 0) | (balance == 1)).sum().float()
        return QuantizerOutput(codes=self._project_out(codes), indices=indices, loss=loss, stats=stats)

    def usage_counts(self, indices: Tensor) -> dict[str, Tensor]:
        """``{"ones": (bits,), "tokens": ()}``: how often each bit is 1, and the number of tokens, on the CPU."""
        flat = indices.detach().reshape(-1)  # (N,)
        ones = self._channel_bits(flat).sum(0)  # (N, bits) -> (bits,) per channel
        return {"ones": ones.cpu(), "tokens": torch.tensor(flat.numel(), dtype=torch.int64)}

    def usage_report(self, counts: dict[str, Tensor]) -> dict[str, Any]:
        """``{"bits": ...}``: per bit its share of ones (``balance``), entropy in bits, their sum, and the ``dead``
        bits (rarer value below ``DEAD_BIT``)."""
        p = (counts["ones"].double() / max(int(counts["tokens"]), 1)).tolist()
        per_bit = [entropy_bits([q, 1 - q]) for q in p]
        return {
            "bits": {
                "balance": p,
                "dead": [i for i, q in enumerate(p) if min(q, 1 - q) < DEAD_BIT],
                "entropy_bits": per_bit,
                "sum_entropy_bits": float(sum(per_bit)),
            }
        }

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, *S) int -> (B, D, *S) float32, equal to ``forward``'s codes."""
        bits = self._channel_bits(indices)  # (B, *S, bits)
        q = torch.where(bits.bool(), self.scale, -self.scale).float()
        return self._project_out(q)
