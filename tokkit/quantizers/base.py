"""The quantizer contract: ``QuantizerOutput``, the ``Quantizer`` base class, the registry and shared stats helpers.

Axis legend used across the quantizers:
    B batch, D channels (latent dim), S spatial axes (T,) / (H, W) / (T, H, W), N = B * prod(S) flattened tokens,
    K codebook size, G index groups (grouped VQ heads / residual stages).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from tokkit.distributed import all_reduce_sum_, dist_ready
from tokkit.errors import ConfigError


@dataclass
class QuantizerOutput:
    """What every quantizer returns.

    Attributes:
        codes: (B, D, *S) quantized latents, same dtype as the input; gradients flow to the input
            (straight-through or rotation trick).
        indices: (B, *S) int64 token ids in [0, codebook_size); (B, *S, G) for grouped / residual quantizers.
        loss: scalar auxiliary loss, already weighted (commitment, codebook, entropy ...).
        stats: detached scalars or small vectors (perplexity, batch usage, entropy terms, per-bit balance ...).
    """

    codes: Tensor
    indices: Tensor
    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator: make a quantizer buildable by ``name`` (``@register_quantizer("fsq")``)."""

    def wrap(cls: type[Quantizer]) -> type[Quantizer]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"quantizer name {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def list_quantizers() -> list[str]:
    """Registered quantizer names, sorted."""
    return sorted(_REGISTRY)


def get_quantizer_class(name: str) -> type[Quantizer]:
    """The class registered as ``name``; a ``ConfigError`` listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown quantizer {name!r}; choose one of: {', '.join(list_quantizers())}") from None


def build_quantizer(name: str, **kwargs) -> Quantizer:
    """Build a registered quantizer by name; bad keyword arguments become a one-line ``ConfigError``."""
    cls = get_quantizer_class(name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # unexpected / missing keyword
        raise ConfigError(f"bad arguments for quantizer {name!r}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# the base class


def index_dtype_for(codebook_size: int) -> np.dtype:
    """Smallest numpy dtype that holds every index in [0, codebook_size)."""
    if codebook_size <= 2**8:
        return np.dtype(np.uint8)
    if codebook_size <= 2**16:
        return np.dtype(np.uint16)
    if codebook_size <= 2**31:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


class Quantizer(nn.Module):
    """Base class of every quantizer.

    Subclasses set ``dim`` (input channels D), ``codebook_size`` (K) and ``num_groups`` (G, the size of the last index
    axis; 1 means no extra axis), and implement ``quantize`` and ``indices_to_codes``. ``forward`` enforces the
    contract: input rank and width checks, float32 math even under autocast, output codes cast back to the input
    dtype, int64 indices. A family with statistics of its own over a whole evaluation set (LFQ's per-bit balance, FSQ's
    level usage) overrides ``usage_counts`` and ``usage_report``, so that callers never ask which family it is.

    Non-finite input (a diverging run) must not raise, in training or eval mode: every index stays in
    [0, codebook_size), the codes and loss of those tokens may be non-finite (so the training loop sees the
    divergence and stops with its one-line message), and training-time statistics skip the non-finite rows.
    """

    registry_name: str = ""
    dim: int
    codebook_size: int
    num_groups: int = 1

    @property
    def bits_per_token(self) -> float:
        """Bits carried by one spatial token position (all its groups / stages)."""
        return math.log2(self.codebook_size) * self.num_groups

    @property
    def index_dtype(self) -> np.dtype:
        """Smallest numpy dtype that holds every index."""
        return index_dtype_for(self.codebook_size)

    def quantize(self, x: Tensor) -> QuantizerOutput:
        """Quantize float32 ``x`` of shape (B, D, *S); the subclass's algorithm."""
        raise NotImplementedError

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Exact inverse of the lookup: (B, *S[, G]) int -> (B, D, *S) float32 codes equal to ``forward``'s."""
        raise NotImplementedError

    def check_input(self, x: Tensor) -> None:
        """Raise ``ConfigError`` unless ``x`` is channel-first (B, D, *S) with 1 to 3 spatial axes and D == dim."""
        if x.dim() < 3 or x.dim() > 5:
            raise ConfigError(
                f"{type(self).__name__} expects channel-first input (B, D, *S) with 1-3 spatial axes, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.dim:
            raise ConfigError(
                f"{type(self).__name__} expects {self.dim} channels on axis 1, got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ConfigError(f"{type(self).__name__} expects a floating-point tensor, got {x.dtype}")

    def usage_counts(self, indices: Tensor) -> dict[str, Tensor]:
        """Family-specific counts of one batch of indices (any shape), summed over a whole set by the caller.

        ``bench`` sums the returned CPU tensors key by key over every batch and hands the totals to ``usage_report``;
        called on an empty tensor it gives the zeros to start from. The code counts themselves are
        ``CodebookUsage``'s; the base class counts nothing more.
        """
        return {}

    def usage_report(self, counts: dict[str, Tensor]) -> dict[str, Any]:
        """JSON-able summary of ``usage_counts`` summed over a set, merged into bench's usage record; {} here."""
        return {}

    def forward(self, x: Tensor) -> QuantizerOutput:
        """(B, D, *S) -> QuantizerOutput; see ``QuantizerOutput`` for the shapes."""
        self.check_input(x)
        in_dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.quantize(x.float())
        if out.indices.dtype != torch.int64:
            raise TypeError(f"{type(self).__name__}.quantize returned {out.indices.dtype} indices; must be int64")
        out.codes = out.codes.to(in_dtype)
        out.stats = {k: v.detach() for k, v in out.stats.items()}
        return out


# ----------------------------------------------------------------------------------------------------------------------
# statistics


def entropy_bits(counts: Tensor | np.ndarray) -> float:
    """Shannon entropy in bits of the empirical distribution given by ``counts``."""
    c = torch.as_tensor(np.ascontiguousarray(counts), dtype=torch.float64).flatten()  # counts() is a reversed view
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * p.log2()).sum())


def batch_usage_stats(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Perplexity and used fraction of one batch of indices (any shape).

    Cheap: a dense count when K is small next to the batch, a sort otherwise (never allocates a large K); the entropy
    is ``log N - mean over tokens of log count(token)``, so no K-sized transcendental is evaluated. Static shapes and
    no host sync (no ``bincount`` / ``unique``), so that it runs inside a ``torch.compile`` graph without a break.
    """
    flat = indices.detach().reshape(-1)
    n = flat.numel()
    if codebook_size <= max(4 * n, 2**16):  # a dense count is cheaper than a sort here
        counts = flat.new_zeros(codebook_size).index_add_(0, flat, torch.ones_like(flat))  # (K,)
        used = counts.count_nonzero()
        per_token = counts[flat]  # (N,) count of each token's code
    else:
        s = flat.sort().values  # (N,)
        per_token = torch.searchsorted(s, s, right=True) - torch.searchsorted(s, s)  # (N,) run length of each code
        used = (s[1:] != s[:-1]).sum() + 1
    ent = math.log(n) - per_token.float().log().mean()
    return {"perplexity": ent.exp().float(), "batch_usage": used.float() / codebook_size}


class CodebookUsage:
    """Accumulates code counts over many batches: used fraction, perplexity, entropy in bits.

    Dense counts for K <= 2**24; a sparse counter beyond that (LFQ with 2**32 codes never allocates K).
    Indices with a group axis (grouped VQ, residual stages) are counted as tokens of one K-sized codebook.
    """

    DENSE_LIMIT = 2**24

    def __init__(self, codebook_size: int) -> None:
        if codebook_size < 1:
            raise ConfigError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = codebook_size
        self.total = 0
        self._dense = np.zeros(codebook_size, dtype=np.int64) if codebook_size <= self.DENSE_LIMIT else None
        self._sparse: Counter[int] = Counter()

    def update(self, indices: Tensor | np.ndarray) -> None:
        """Add a batch of indices of any shape."""
        flat = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices)
        flat = flat.detach().reshape(-1).to("cpu", torch.int64)
        if flat.numel() == 0:
            return
        if int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size:
            raise ValueError(f"indices outside [0, {self.codebook_size})")
        self.total += flat.numel()
        if self._dense is not None:
            self._dense += torch.bincount(flat, minlength=self.codebook_size).numpy()
        else:
            values, counts = torch.unique(flat, return_counts=True)
            self._sparse.update(dict(zip(values.tolist(), counts.tolist(), strict=True)))

    def all_reduce(self) -> None:
        """Sum the counts over ranks (dense counts only; no-op single-process)."""
        if not dist_ready():
            return
        if self._dense is None:
            raise NotImplementedError("distributed reduction of sparse usage counts (K > 2**24) is not supported")
        t = torch.from_numpy(self._dense.copy())
        if dist.get_backend() == "nccl":
            t = t.cuda()
        all_reduce_sum_(t)
        self._dense = t.cpu().numpy()
        self.total = int(self._dense.sum())

    def counts(self) -> np.ndarray:
        """Counts of the codes that were used at least once, sorted from most to least frequent."""
        c = self._dense[self._dense > 0] if self._dense is not None else np.fromiter(self._sparse.values(), np.int64)
        return np.sort(c)[::-1]

    def compute(self) -> dict[str, float]:
        """``used`` codes, ``usage`` (fraction of K), ``perplexity``, ``entropy_bits`` and ``total`` tokens."""
        c = self.counts()
        ent = entropy_bits(c)
        return {
            "used": int(c.size),
            "usage": float(c.size / self.codebook_size),
            "perplexity": float(2.0**ent),
            "entropy_bits": ent,
            "total": int(self.total),
        }
