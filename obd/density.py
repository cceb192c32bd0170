"""State-density weights for SDW: w(s) proportional to p(s)^(-alpha), mean 1.

Density: a Gaussian kernel density estimate over the k nearest reference states (faiss),

    log p(s) = logsumexp_j( -||s - r_j||^2 / (2 h^2) ) + const,   j over the k nearest r_j != s,

on normalized states (zero mean, unit variance per dimension). Bandwidth rule: Scott's,
h = n_ref^(-1 / (d + 4)) for unit-variance data, so wider kernels for smaller reference sets
(or a fixed ``bandwidth``).
Truncating the kernel sum to k neighbours drops terms that are negligible at that bandwidth.

Search: exact (``IndexFlatL2``) when queries x references is small; otherwise an IVF index
(``IndexIVFFlat``, nlist ~ 4 sqrt(n_ref), ``nprobe`` lists searched) over at most
``max_reference`` randomly chosen reference states. Approximate neighbour distances suffice here:
the weights are a smooth function of them and are clipped.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

from obd.config import DensityConfig
from obd.seeding import derive_seed


def knn_sq_distances(
    queries: np.ndarray,
    reference: np.ndarray,
    k: int,
    exact_limit: float = 2e10,
    nprobe: int = 8,
    exclude_self: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """Squared L2 distances to the k nearest reference points, (n, k) float32 (ascending).

    ``exclude_self``: ``queries`` is ``reference``; each point's zero distance to itself is dropped.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    r = np.ascontiguousarray(reference, dtype=np.float32)
    d = r.shape[1]
    kk = min(k + int(exclude_self), r.shape[0])
    if float(q.shape[0]) * r.shape[0] <= exact_limit:
        index: faiss.Index = faiss.IndexFlatL2(d)
    else:
        nlist = int(min(max(16, 4 * math.sqrt(r.shape[0])), r.shape[0] // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        pick = np.random.default_rng(derive_seed(seed, "ivf-train")).choice(
            r.shape[0], min(r.shape[0], 64 * nlist), False
        )
        train = r if r.shape[0] <= 64 * nlist else r[pick]
        index.train(train)
        index.nprobe = nprobe
    index.add(r)
    dist, idx = index.search(q, kk)
    if exclude_self:
        # Drop each row's own index where found, else its farthest neighbour.
        own = idx == np.arange(q.shape[0])[:, None]
        own[~own.any(1), -1] = True
        dist = dist[~own].reshape(q.shape[0], kk - 1)
    missing = dist < 0  # IVF returns -1 ids / huge distances when a probe finds too few points
    if missing.any():
        dist = np.where(missing | (dist > 3e38), np.nan, dist)
        dist = np.where(np.isnan(dist), np.nanmax(dist, axis=1, keepdims=True), dist)
    return np.maximum(dist, 0.0)


def log_density(states: np.ndarray, cfg: DensityConfig) -> np.ndarray:
    """log p(s) up to an additive constant for each row of ``states`` (N, d) -> (N,) float64.

    ``knn-kde`` truncates the kernel sum to the k nearest reference states; ``kde`` sums over every
    reference state (exact for the reference set; O(N x n_ref), so keep ``max_reference`` modest), the
    untruncated ablation of the same estimator. A query's own copy in the reference set is left out."""
    if cfg.estimator == "kde":
        return _full_kde_log_density(states, cfg)
    n, d = states.shape
    rng = np.random.default_rng(derive_seed(cfg.seed, "density-reference"))
    if n > cfg.max_reference:
        ref_idx = np.sort(rng.choice(n, cfg.max_reference, replace=False))
        ref = states[ref_idx]
        # Queries that are in the reference set would see themselves at distance 0: search one more
        # neighbour for everyone and drop the self-match where it occurs.
        dist = knn_sq_distances(states, ref, cfg.k + 1, cfg.exact_limit, cfg.nprobe, seed=cfg.seed)
        in_ref = np.zeros(n, bool)
        in_ref[ref_idx] = True
        dist = np.where(in_ref[:, None], dist[:, 1:], dist[:, :-1])
    else:
        ref = states
        dist = knn_sq_distances(states, ref, cfg.k, cfg.exact_limit, cfg.nprobe, exclude_self=True, seed=cfg.seed)
    h = cfg.bandwidth or ref.shape[0] ** (-1.0 / (d + 4))
    z = -dist.astype(np.float64) / (2 * h * h)
    zmax = z.max(1, keepdims=True)
    return (zmax + np.log(np.exp(z - zmax).sum(1, keepdims=True)))[:, 0]


def _full_kde_log_density(states: np.ndarray, cfg: DensityConfig, chunk: int = 2048) -> np.ndarray:
    n, d = states.shape
    rng = np.random.default_rng(derive_seed(cfg.seed, "density-reference"))
    ref_idx = np.sort(rng.choice(n, cfg.max_reference, replace=False)) if n > cfg.max_reference else np.arange(n)
    x = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float64))
    ref = x[ref_idx]
    h = cfg.bandwidth or ref.shape[0] ** (-1.0 / (d + 4))
    pos = torch.full((n,), -1, dtype=torch.long)
    pos[torch.from_numpy(ref_idx)] = torch.arange(len(ref_idx))
    out = np.empty(n)
    for start in range(0, n, chunk):
        q = x[start : start + chunk]
        z = -torch.cdist(q, ref).square_() / (2 * h * h)
        own = pos[start : start + chunk]
        rows = torch.nonzero(own >= 0).squeeze(1)
        z[rows, own[rows]] = -torch.inf  # leave each query's own copy out, as the k-NN estimate does
        out[start : start + len(q)] = torch.logsumexp(z, dim=1).numpy()
    return out


def weights_from_log_density(logp: np.ndarray, alpha: float, clip: float | None) -> np.ndarray:
    """w = p^-alpha / mean, capped at ``clip`` x mean: the exact fixed point w_i = min(s p_i^-alpha, clip)
    with mean 1 (water-filling on the sorted log-weights, all in log space so that no state underflows
    to zero); alpha = 0 gives exactly 1."""
    if alpha == 0:
        return np.ones_like(logp, dtype=np.float32)
    lw = -alpha * np.asarray(logp, dtype=np.float64)
    n = len(lw)
    if clip is None or clip >= n:  # no cap, or a cap that a mean of 1 can never reach
        w = np.exp(lw - lw.max())
        return (w / w.mean()).astype(np.float32)
    if clip <= 1:
        raise ValueError(f"density.clip must exceed 1 (x the mean weight), got {clip}")
    order = np.sort(lw)[::-1]
    tail = np.logaddexp.accumulate(order[::-1])[::-1]  # tail[k] = log sum_{i >= k} exp(order[i])
    k = np.arange(n)
    room = n - k * clip  # what the uncapped states must add up to when the k largest are capped
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s = np.where(room > 0, np.log(np.maximum(room, 1e-300)) - tail, np.inf)
    ok = (room > 0) & (log_s + order <= np.log(clip))
    first = int(np.argmax(ok))  # the fewest capped states that make the rest consistent
    w = np.minimum(np.exp(np.minimum(log_s[first] + lw, np.log(clip))), clip)
    return w.astype(np.float32)


def density_weights(states: np.ndarray | torch.Tensor, cfg: DensityConfig) -> np.ndarray:
    """SDW weights for normalized states (N, d): (N,) float32, mean 1."""
    s = states.numpy() if isinstance(states, torch.Tensor) else np.asarray(states)
    if cfg.alpha == 0:
        return np.ones(s.shape[0], np.float32)
    return weights_from_log_density(log_density(s, cfg), cfg.alpha, cfg.clip)


def weight_stats(w: np.ndarray | torch.Tensor) -> dict[str, float]:
    """How concentrated per-state weights are: effective sample size / N (1 = uniform), the share of the
    total weight on the top 1% of states, and max / mean."""
    x = np.asarray(w.numpy() if isinstance(w, torch.Tensor) else w, dtype=np.float64)
    total = x.sum()
    if total <= 0:
        return {"ess_fraction": 0.0, "top1pct_share": 0.0, "max_over_mean": 0.0}
    top = np.sort(x)[::-1][: max(1, len(x) // 100)].sum()
    return {
        "ess_fraction": float(total**2 / (x**2).sum() / len(x)),
        "top1pct_share": float(top / total),
        "max_over_mean": float(x.max() / x.mean()),
    }


def state_diversity(obs_norm, k: int = 10, sample: int = 20_000, seed: int = 0) -> float:
    """Mean Euclidean distance to the k-th nearest other state (normalized space) over a random sample."""
    from obd.seeding import numpy_rng

    x = obs_norm.numpy() if hasattr(obs_norm, "numpy") else np.asarray(obs_norm)
    pick = numpy_rng(seed, "diversity").choice(len(x), min(sample, len(x)), replace=False)
    d = knn_sq_distances(x[pick], x[pick], k, exclude_self=True)
    return float(np.sqrt(d[:, -1]).mean())
