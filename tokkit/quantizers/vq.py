"""Vector quantization with a learned codebook (VQ-VAE, VQGAN, MaskGIT, LlamaGen, MoVQ).

Features: the nearest code by l2 distance, by cosine similarity (l2-normalized latents and codes, LlamaGen) or by the
largest raw dot product (``metric="dot"``, IBQ's ``IndexPropagationQuantize``); a low-dimensional lookup with in/out
projections (LlamaGen's ``codebook_dim=8`` with ``K=16384``); a codebook learned by loss or by EMA with Laplace
smoothing; k-means initialisation from the first training batch; dead-code restart from the current encoder outputs;
the straight-through or the rotation-trick gradient estimator; MoVQ-style multichannel quantization (``groups=G`` heads
sharing one codebook). The nearest-code search runs in chunks of at most ``search_chunk`` scores, so its memory stays
bounded whatever K and the batch size.

Under torch.distributed the k-means statistics, the EMA statistics and the dead-code replacements are all-reduced or
broadcast, so every rank holds the same codebook. Non-finite rows (a diverging run) still get valid indices but are
masked out of all three, so one bad batch does not poison the codebook.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokkit.distributed import all_reduce_sum_, broadcast_
from tokkit.errors import ConfigError
from tokkit.quantizers.base import Quantizer, QuantizerOutput, batch_usage_stats, register_quantizer

_BLOCK = 128  # codes per block of the two-level argmax
METRICS = ("l2", "cosine", "dot")  # how VQ picks the code (see VQ's docstring)


@torch.no_grad()
def _eager(fn: Callable) -> Callable:
    """``torch.compiler.disable``, applied when first called: the decorator imports ``torch._dynamo`` (about 1 s, most
    of a small ``tokkit encode``'s start-up). Without ``torch._dynamo`` imported nothing is compiling: plain call."""
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch._dynamo.disable(fn))
        return disabled[0](*args, **kwargs)

    return call


def nearest_code(z: Tensor, table: Tensor, cosine: bool, chunk: int | None = None) -> Tensor:
    """Index of the nearest row of ``table`` for every row of ``z``, in bounded memory.

    Scores are computed for ``chunk // K`` rows at a time. When every score fits one chunk on an accelerator, or inside
    a ``torch.compile`` graph, the search is one ``addmm`` and one ``argmax`` (the fastest there, and fusable). On CPU
    (eager) the scores go into one reused cache-sized buffer and the argmax is two-level when K is a multiple of 128
    (the best block by a vectorized ``amax``, then the best code inside it): the same answer as ``argmax``, several
    times faster there.

    Args:
        z: (N, d) float vectors (unit-norm for the cosine metric, raw for the dot metric).
        table: (K, d) codes (likewise).
        cosine: largest dot product ``z . e`` instead of smallest euclidean distance (the search of both the
            ``"cosine"`` metric, on unit vectors, and the ``"dot"`` metric, on raw ones).
        chunk: most scores materialized at once (rows per chunk = chunk // K, at least 1); default 2^18 on CPU
            (cache-sized) and 2^26 on accelerators and under ``torch.compile``.

    Returns:
        (N,) int64; ties go to the lowest index.
    """
    n, k = z.shape[0], table.shape[0]
    compiling = torch.compiler.is_compiling()
    cpu_eager = z.device.type == "cpu" and not compiling
    if chunk is None:
        chunk = 2**18 if cpu_eager else 2**26
    rows = max(1, min(n, chunk // k))
    # argmin |z - e|^2 = argmax (2 z.e - |e|^2); |z|^2 is constant per row
    neg_sq = None if cosine else -(table * table).sum(1)  # (K,)
    if not cpu_eager:  # plain chunks of one addmm + argmax each; a single chunk when N * K <= chunk
        table_t = table.t()  # (d, K)
        parts = []
        for start in range(0, n, rows):
            zc = z[start : start + rows]  # (r, d)
            scores = zc @ table_t if cosine else torch.addmm(neg_sq, zc, table_t, alpha=2.0)  # (r, K)
            parts.append(scores.argmax(1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    out = torch.empty(n, dtype=torch.int64, device=z.device)
    table_t = table.t().contiguous()  # (d, K)
    blocks = k // _BLOCK if k % _BLOCK == 0 and k >= 2 * _BLOCK else 0
    scores_buf = z.new_empty(rows, k)
    if blocks:
        block_max = z.new_empty(rows, blocks)
        row_offsets = torch.arange(rows, device=z.device) * blocks
    for start in range(0, n, rows):
        zc = z[start : start + rows]  # (r, d)
        r = zc.shape[0]
        scores = scores_buf[:r]  # (r, K)
        if cosine:
            torch.mm(zc, table_t, out=scores)
        else:
            torch.addmm(neg_sq, zc, table_t, alpha=2.0, out=scores)
        if blocks:
            by_block = scores.view(r, blocks, _BLOCK)  # (r, K) -> (r, K/128, 128)
            torch.amax(by_block, 2, out=block_max[:r])
            best_block = block_max[:r].argmax(1)  # (r,) first block holding the row's max
            inside = by_block.view(r * blocks, _BLOCK).index_select(0, row_offsets[:r] + best_block)  # (r, 128)
            out[start : start + r] = best_block * _BLOCK + inside.argmax(1)
        else:
            out[start : start + r] = scores.max(1).indices
    return out


def rotation_trick(e: Tensor, q: Tensor) -> Tensor:
    """Rotation-trick estimator (Fifty et al., 2024): value ``q``, gradient through a rotation of ``e`` onto ``q``.

    Args:
        e: (N, d) encoder outputs (with gradient).
        q: (N, d) selected codes.

    Returns:
        (N, d) equal to ``q`` exactly in value; its gradient w.r.t. ``e`` is ``(|q| / |e|) R`` with ``R`` the rotation
        taking ``e``'s direction onto ``q``'s, treated as a constant.
    """
    e_norm = e.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    q_norm = q.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    u = e.detach() / e_norm
    qh = q.detach() / q_norm
    w = F.normalize(u + qh, dim=-1)
    # R = I - 2 w w^T + 2 q^ u^T: the rotation in the (u, q^) plane taking u onto q^; applied to e with R constant
    rotated = e - 2 * (e * w).sum(-1, keepdim=True) * w + 2 * (e * u).sum(-1, keepdim=True) * qh
    rotated = rotated * (q_norm / e_norm)
    return q.detach() + (rotated - rotated.detach())


@register_quantizer("vq")
class VQ(Quantizer):
    """Vector quantizer with a learned codebook.

    Args:
        dim: input channels D.
        codebook_size: number of codes K.
        codebook_dim: dimension of the codes; projections map each head's D/G channels to it and back when it differs
            (default: D/G, no projection).
        metric: how the code is picked: ``"l2"`` (smallest euclidean distance; the default), ``"cosine"``
            (l2-normalize latents and codes, largest cosine similarity) or ``"dot"`` (largest raw dot product
            ``z . e``, nothing normalized: IBQ). Training is the same for all three: commitment (+ codebook) mse and
            the straight-through (or rotation-trick) estimator; IBQ's softmax index-backpropagation estimator is not
            reproduced. Codes start as N(0, 1) samples (normalized for ``"cosine"``) unless ``kmeans_init``.
        cosine: the older spelling of ``metric="cosine"`` (``True``); ``False`` leaves ``metric`` as given.
        ema: learn the codebook by exponential moving averages of the assigned latents instead of by loss.
        decay: EMA decay.
        eps: Laplace smoothing of the EMA cluster sizes.
        commitment_weight: weight of ``mse(z, code.detach())``.
        codebook_weight: weight of ``mse(code, z.detach())`` (loss-learned codebooks only).
        kmeans_init: initialise the codebook by k-means on the first training batch (all ranks' data).
        kmeans_iters: k-means iterations.
        dead_code_threshold: in training, codes whose EMA usage count falls under this are replaced by random current
            encoder outputs and their EMA statistics reset (0 disables).
        rotation_trick: use the rotation trick instead of the straight-through estimator.
        groups: G heads sharing one codebook (MoVQ); indices gain a last axis of size G when G > 1.
        search_chunk: most distance scores materialized at once by the nearest-code search (default: 2^18 on
            CPU, 2^26 on accelerators).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        cosine: bool = False,
        metric: str | None = None,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        rotation_trick: bool = False,
        groups: int = 1,
        search_chunk: int | None = None,
    ) -> None:
        super().__init__()
        if codebook_size < 1:
            raise ConfigError(f"VQ codebook_size must be >= 1, got {codebook_size}")
        if groups < 1 or dim % groups:
            raise ConfigError(f"VQ groups={groups} must be >= 1 and divide dim={dim}")
        head_dim = dim // groups
        codebook_dim = head_dim if codebook_dim is None else int(codebook_dim)
        if codebook_dim < 1:
            raise ConfigError(f"VQ codebook_dim must be >= 1, got {codebook_dim}")
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"VQ decay must be in (0, 1), got {decay}")
        if kmeans_iters < 1 or (search_chunk is not None and search_chunk < 1) or dead_code_threshold < 0:
            raise ConfigError("VQ kmeans_iters and search_chunk must be >= 1, dead_code_threshold >= 0")
        self.dim = int(dim)
        self.codebook_size = int(codebook_size)
        self.num_groups = int(groups)
        self.head_dim = head_dim
        self.codebook_dim = codebook_dim
        if metric is None:
            metric = "cosine" if cosine else "l2"
        if metric not in METRICS:
            raise ConfigError(f"VQ metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if cosine and metric != "cosine":
            raise ConfigError(f"VQ cosine=True contradicts metric={metric!r}: pass only metric")
        self.metric = str(metric)
        self.cosine = self.metric == "cosine"  # normalize latents and codes
        self._dot_search = self.metric != "l2"  # search by the largest dot product
        self.ema = bool(ema)
        self.decay = float(decay)
        self.eps = float(eps)
        self.commitment_weight = float(commitment_weight)
        self.codebook_weight = float(codebook_weight)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = int(kmeans_iters)
        self.dead_code_threshold = float(dead_code_threshold)
        self.rotation_trick = bool(rotation_trick)
        self.search_chunk = None if search_chunk is None else int(search_chunk)

        table = torch.randn(self.codebook_size, codebook_dim)
        if self.cosine:
            table = F.normalize(table, dim=-1)
        if self.ema:
            self.register_buffer("codebook", table)
            self.register_buffer("embed_avg", table.clone())
        else:
            self.codebook = nn.Parameter(table)
        # EMA usage per code (both modes: it drives dead-code restart and the stats)
        self.register_buffer("cluster_size", torch.ones(self.codebook_size))
        self.register_buffer("initialized", torch.tensor(not self.kmeans_init))
        # Python mirror of ``not initialized``: the training hot path reads this, never the buffer (no host sync, no
        # data-dependent branch under torch.compile); refreshed after each k-means attempt and on load_state_dict
        self._needs_kmeans = self.kmeans_init
        self.project_in: nn.Module = nn.Linear(head_dim, codebook_dim) if head_dim != codebook_dim else nn.Identity()
        self.project_out: nn.Module = nn.Linear(codebook_dim, head_dim) if head_dim != codebook_dim else nn.Identity()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"metric={self.metric}, ema={self.ema}, groups={self.num_groups}, rotation_trick={self.rotation_trick}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.initialized.device.type != "meta":
            self._needs_kmeans = not bool(self.initialized)

    def table(self) -> Tensor:
        """(K, codebook_dim) the codes actually looked up (unit-norm when ``cosine``)."""
        if self.cosine and not self.ema:
            return F.normalize(self.codebook, dim=-1)
        return self.codebook

    def _project_out(self, q: Tensor) -> Tensor:
        """(B, *S, G, codebook_dim) -> (B, D, *S); one code path for ``quantize`` and ``indices_to_codes``."""
        h = self.project_out(q)  # (B, *S, G, D/G)
        return h.flatten(-2).movedim(-1, 1)  # (B, *S, D) -> (B, D, *S)

    # -- training-time codebook updates --------------------------------------------------------------------------------

    @torch.no_grad()
    def _counts_and_sums(self, z: Tensor, idx: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
        """(N, d), (N,), (N,) bool -> per-code counts (K,) and sums (K, d) of the ``ok`` rows, summed over ranks.

        Rows that are not ``ok`` (non-finite: a diverging run) are left out by masking, without a host sync (static
        shapes: ``index_add_`` rather than ``bincount``, which syncs on CUDA to size its output).
        """
        k = self.codebook_size
        counts = z.new_zeros(k).index_add_(0, idx, ok.to(z.dtype))  # (K,) a left-out row adds 0
        sums = z.new_zeros(k, z.shape[1]).index_add_(0, idx, torch.where(ok.unsqueeze(1), z, 0.0))
        return all_reduce_sum_(counts), all_reduce_sum_(sums)

    @_eager  # a one-time eager path (at most one graph break, on the first training step)
    @torch.no_grad()
    def _kmeans(self, z: Tensor, ok: Tensor) -> None:
        """Initialise the codebook by k-means on the finite rows of ``z`` (N, d) (every rank's rows).

        Seeds are distinct rows of rank 0 (broadcast); with fewer rows than codes, and for a non-finite seed row, a
        code keeps its initial value, so no two seeds tie. When no rank has a finite row, the codebook is left as it
        was and the next training batch initialises it.
        """
        n, k = z.shape[0], self.codebook_size
        m = min(n, k)
        pick = torch.randperm(n, device=z.device)[:m]  # without replacement
        centroids = self.table().detach().clone()  # (K, d)
        centroids[:m] = torch.where(ok[pick].unsqueeze(1), z[pick], centroids[:m])
        broadcast_(centroids)
        counts = centroids.new_zeros(k)
        for _ in range(self.kmeans_iters):
            idx = nearest_code(z, centroids, self._dot_search, self.search_chunk)
            counts, sums = self._counts_and_sums(z, idx, ok)
            means = sums / counts.clamp_min(1).unsqueeze(1)
            if self.cosine:
                means = F.normalize(means, dim=-1)
            centroids = torch.where(counts.unsqueeze(1) > 0, means, centroids)  # empty clusters keep their seed
        self.codebook.data.copy_(centroids)
        if self.ema:
            self.embed_avg.copy_(centroids)
        self.cluster_size.fill_(1.0)
        self.initialized.copy_(counts.sum() > 0)  # summed over ranks, so every rank agrees
        self._needs_kmeans = not bool(self.initialized)  # the one host sync, once per k-means attempt

    @torch.no_grad()
    def _ema_update(self, z: Tensor, idx: Tensor, ok: Tensor) -> None:
        """Update usage (and, with ``ema``, the codebook) from this batch's assignments of its finite rows."""
        counts, sums = self._counts_and_sums(z, idx, ok)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if not self.ema:
            return
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n  # Laplace smoothing
        table = self.embed_avg / smoothed.unsqueeze(1)
        self.codebook.copy_(F.normalize(table, dim=-1) if self.cosine else table)

    @torch.no_grad()
    def _restart_dead(self, z: Tensor, ok: Tensor) -> None:
        """Replace codes whose EMA usage is under the threshold by distinct finite rows of ``z`` (rank 0's, broadcast).

        Rows are drawn without replacement (duplicate codes would tie exactly, leaving the winner to float rounding),
        so at most one code per finite row is restarted per step, the least used dead codes first; the others stay
        dead and are restarted by the next batches. Fixed shapes and masks, no host sync: every step draws
        ``min(K, N)`` candidate rows and restarts those of them that land on a dead code.
        """
        k, n, d = self.codebook_size, z.shape[0], z.shape[1]
        m = min(k, n)
        thr = self.dead_code_threshold
        dead = self.cluster_size < thr  # (K,) identical on every rank
        perm = torch.randperm(n, device=z.device)  # (N,) random rows (the same draw as before when all are finite)
        perm = perm[torch.argsort((~ok[perm]).to(torch.int32), stable=True)[:m]]  # (m,) distinct, finite ones first
        # (K, d + 1): candidate row j, then a 1 when it is finite; every rank broadcasts the same shape, whatever its N
        packed = z.new_zeros(k, d + 1)
        packed[:m, :-1] = z[perm]
        packed[:m, -1] = (torch.arange(m, device=z.device) < ok.sum()).to(z.dtype)
        broadcast_(packed)  # rank 0's candidates
        codes = self.cluster_size.argsort(stable=True)  # (K,) least used first, so the dead codes lead; same everywhere
        slot_ok = (packed[:, -1] > 0) & dead[codes]  # (K,) slot j restarts code codes[j] from candidate j
        hit = torch.zeros_like(dead).scatter_(0, codes, slot_ok)  # (K,) per code
        fresh = torch.empty_like(packed[:, :-1]).index_copy_(0, codes, packed[:, :-1])  # (K, d) per code
        self.codebook.data.copy_(torch.where(hit.unsqueeze(1), fresh, self.codebook.data))
        self.cluster_size.copy_(torch.where(hit, thr, self.cluster_size))
        if self.ema:
            self.embed_avg.copy_(torch.where(hit.unsqueeze(1), fresh * thr, self.embed_avg))

    # -- contract ------------------------------------------------------------------------------------------------------

    def quantize(self, x: Tensor) -> QuantizerOutput:
        """x: (B, D, *S) float32 -> codes (B, D, *S), indices (B, *S[, G]), commitment (+ codebook) loss, stats."""
        lead = (x.shape[0], *x.shape[2:])
        h = x.movedim(1, -1).reshape(*lead, self.num_groups, self.head_dim)  # (B, D, *S) -> (B, *S, G, D/G)
        z = self.project_in(h).reshape(-1, self.codebook_dim)  # (N*G, d)
        if self.cosine:
            z = F.normalize(z, dim=-1)

        ok = torch.isfinite(z.detach()).all(1) if self.training else None  # (N*G,) rows the statistics may use
        if ok is not None and self._needs_kmeans:
            self._kmeans(z.detach(), ok)
        table = self.table()
        idx = nearest_code(z.detach(), table.detach(), self._dot_search, self.search_chunk)  # (N*G,)
        q = F.embedding(idx, table)  # (N*G, d); gradient reaches a loss-learned codebook

        loss = self.commitment_weight * F.mse_loss(z, q.detach())
        if not self.ema:
            loss = loss + self.codebook_weight * F.mse_loss(q, z.detach())
        st = rotation_trick(z, q) if self.rotation_trick else q.detach() + (z - z.detach())

        if ok is not None:
            self._ema_update(z.detach(), idx, ok)
            if self.dead_code_threshold > 0:
                self._restart_dead(z.detach(), ok)

        indices = idx.view(*lead, self.num_groups)  # (B, *S, G)
        codes = self._project_out(st.reshape(*lead, self.num_groups, self.codebook_dim))
        stats = batch_usage_stats(indices, self.codebook_size)
        if self.dead_code_threshold > 0:
            stats["dead_codes"] = (self.cluster_size < self.dead_code_threshold).sum().float()
        return QuantizerOutput(
            codes=codes,
            indices=indices if self.num_groups > 1 else indices.squeeze(-1),
            loss=loss,
            stats=stats,
        )

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, *S[, G]) int -> (B, D, *S) float32, equal to ``forward``'s codes (in eval mode)."""
        if indices.is_floating_point():
            raise ConfigError(f"VQ indices must be an integer tensor, got {indices.dtype}")
        idx = indices.long()
        if self.num_groups == 1:
            idx = idx.unsqueeze(-1)  # (B, *S) -> (B, *S, 1)
        elif idx.shape[-1] != self.num_groups:
            raise ConfigError(f"VQ with groups={self.num_groups} expects indices (B, *S, G), got {tuple(idx.shape)}")
        q = F.embedding(idx, self.table())  # (B, *S, G, d)
        return self._project_out(q)
