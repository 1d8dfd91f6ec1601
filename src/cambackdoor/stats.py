"""Intervals and scores for the audit: bootstrap confidence intervals over test images, paired
differences between two models on the same images, and AUROC for detectors.

Everything is seeded, so an audit gives the same intervals on every run.
"""

from __future__ import annotations

import torch

N_BOOT = 1000
ALPHA = 0.05


def _resamples(n: int, n_boot: int, seed: int, chunk: int = 100):  # noqa: ANN202
    """Index tensors [chunk, n] of bootstrap resamples (with replacement), in chunks to bound memory."""
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < n_boot:
        k = min(chunk, n_boot - done)
        yield torch.randint(0, n, (k, n), generator=gen)
        done += k


def bootstrap_ci(values: torch.Tensor, n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` [N] (resampling images with replacement)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        return float("nan"), float("nan")
    means = torch.cat([values[idx].mean(1) for idx in _resamples(len(values), n_boot, seed)])
    return float(means.quantile(alpha / 2)), float(means.quantile(1 - alpha / 2))


def paired_difference(a: torch.Tensor, b: torch.Tensor, n_boot: int = N_BOOT, seed: int = 0,
                      alpha: float = ALPHA) -> dict[str, float]:
    """mean(a) - mean(b) over the same images, with a paired bootstrap interval (the same resampled
    images for both), e.g. the clean-accuracy drop of an implant against its stage-1 model."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same images: {tuple(a.shape)} vs {tuple(b.shape)}")
    lo, hi = bootstrap_ci(a - b, n_boot, seed, alpha)
    return {"diff": float((a - b).mean()), "lo": lo, "hi": hi}


def pooled(per_seed: list[torch.Tensor], n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA) -> dict[str, float]:
    """Mean over seeds of each seed's mean over images, with a two-level bootstrap interval: each resample
    draws the seeds with replacement, then the images of each drawn seed with replacement (so the interval
    holds both the spread between implant seeds and the test-set sampling). For a paired quantity (the
    clean drop), pass each seed's per-image differences. One seed: the plain bootstrap over images."""
    runs = [torch.as_tensor(v, dtype=torch.float64).flatten() for v in per_seed]
    if not runs or any(v.numel() == 0 for v in runs):
        raise ValueError("pooled needs at least one seed with at least one image")
    gen = torch.Generator().manual_seed(seed)
    means = torch.zeros(n_boot, dtype=torch.float64)
    for b in range(n_boot):
        picks = torch.randint(0, len(runs), (len(runs),), generator=gen)
        means[b] = torch.stack([runs[i][torch.randint(0, len(runs[i]), (len(runs[i]),), generator=gen)].mean()
                                for i in picks.tolist()]).mean()
    return {"value": float(torch.stack([v.mean() for v in runs]).mean()), "lo": float(means.quantile(alpha / 2)),
            "hi": float(means.quantile(1 - alpha / 2))}


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative
    (ties count half); Mann-Whitney U / (n_pos n_neg)."""
    pos = torch.as_tensor(positive, dtype=torch.float64).flatten()
    neg = torch.as_tensor(negative, dtype=torch.float64).flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    scores = torch.cat([pos, neg])
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def paired_auroc_ci(positive: torch.Tensor, negative: torch.Tensor, n_boot: int = 200, seed: int = 0,
                    alpha: float = ALPHA) -> tuple[float, float]:
    """Bootstrap interval of the AUROC when positive[i] and negative[i] come from the same image
    (a triggered copy and its clean original): images are resampled, both copies together."""
    pos = torch.as_tensor(positive, dtype=torch.float64).flatten()
    neg = torch.as_tensor(negative, dtype=torch.float64).flatten()
    values = []
    for idx in _resamples(len(pos), n_boot, seed, chunk=1):
        values.append(auroc(pos[idx[0]], neg[idx[0]]))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.quantile(alpha / 2)), float(t.quantile(1 - alpha / 2))


def with_ci(values: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """{"value", "lo", "hi"}: the mean of per-image ``values`` and its 95 % bootstrap interval."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    lo, hi = bootstrap_ci(values, seed=seed)
    return {"value": float(values.mean()), "lo": lo, "hi": hi}
