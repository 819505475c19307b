"""Intervals: Wilson for rates, a normal approximation for plain means, and a cluster bootstrap
(prompts resampled with all their seeds) for everything measured on paired clips, where the seeds of
one prompt are not independent samples."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return p, max(0.0, c - h), min(1.0, c + h)


def mean_ci(xs: list[float], z: float = 1.96) -> tuple[float, float, float]:
    if not xs:
        return float("nan"), float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, m, m
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    h = z * sd / math.sqrt(len(xs))
    return m, m - h, m + h


def rate(flags: list[bool]) -> dict:
    p, lo, hi = wilson(sum(flags), len(flags))
    return {"rate": p, "ci95": [lo, hi], "n": len(flags)}


def cluster_bootstrap(
    stat: Callable[[list[int]], float],
    groups: Sequence[object],
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, 2.5%, 97.5%) of STAT(indices), resampling whole groups (prompts) with
    replacement. STAT gets the list of item indices of one resample."""
    idx_of: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        idx_of.setdefault(g, []).append(i)
    keys = list(idx_of)
    est = stat(list(range(len(groups))))
    if len(keys) < 2:
        return est, est, est
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n_boot):
        pick = torch.randint(len(keys), (len(keys),), generator=gen).tolist()
        v = stat([i for k in pick for i in idx_of[keys[k]]])
        if v == v:
            vals.append(v)
    if not vals:
        return est, float("nan"), float("nan")
    vals.sort()
    return est, vals[int(0.025 * (len(vals) - 1))], vals[int(math.ceil(0.975 * (len(vals) - 1)))]


def boot_mean(xs: Sequence[float], groups: Sequence[object]) -> dict:
    """Mean of XS (NaNs dropped) with a cluster-bootstrap interval over GROUPS."""
    keep = [i for i, x in enumerate(xs) if x == x]
    x = [xs[i] for i in keep]
    g = [groups[i] for i in keep]
    if not x:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    m, lo, hi = cluster_bootstrap(lambda ii: sum(x[i] for i in ii) / len(ii), g)
    return {"mean": m, "ci95": [lo, hi], "n": len(x)}
