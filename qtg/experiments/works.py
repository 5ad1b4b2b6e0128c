"""Intervals across works (and seeds): the unit a claim about other texts is resampled by.

Windows of one work share its story, its names and its style, so they are not
independent draws: the windows interval of :mod:`qtg.experiments.bootstrap` is
the one for "these texts". A change that should hold on *other* works is
resampled by work. For a paired change with per-window values ``after_w`` and
``before_w`` and weights ``b_w`` (bytes or tokens), work g's estimate is

    d_g = sum_{w in g} (after_w - before_w) / sum_{w in g} b_w

and the interval across its k works is

* k >= MIN_BOOTSTRAP_WORKS: a cluster bootstrap by work: k works drawn with
  replacement, each with all its windows, the statistic the pooled ratio
  sum_g num_g / sum_g b_g; its estimate is the pooled change, the windows
  interval's own estimate;
* 2 <= k < MIN_BOOTSTRAP_WORKS: a t-interval over the per-work estimates
  (a bootstrap over so few works is too narrow by about sqrt((k-1)/k) and takes
  a handful of values): mean(d_g) +- t_{k-1} s_d / sqrt(k), its estimate the mean
  over works, each work counting once;
* k = 1: no interval across works (low -inf, high +inf).

A model trained with several seeds (each a whole run, scored on every window)
adds a second level. A seed is crossed with the works (one run is better or
worse on every work), so each resample draws each model's seeds with
replacement *and* the works with replacement, and the change is that of the
seed means. With fewer works than MIN_BOOTSTRAP_WORKS the t-interval over works
is widened by the variance of the seeds-only bootstrap of the same statistic:
half-width t_{k-1} sqrt(s_d^2 / k + var_seeds). Drawing S seeds with
replacement estimates a seed mean's variance as (S-1)/S of the unbiased one:
with two or three seeds the interval is still on the narrow side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import stats

from qtg.experiments.bootstrap import _CHUNK_ELEMENTS, ABOVE, BELOW, DEFAULT_RESAMPLES, Interval, verdict

MIN_BOOTSTRAP_WORKS = 6
CLUSTER = "cluster bootstrap by work"
T_WORKS = "t-interval over works"
SEEDS_WORKS = "bootstrap over seeds and works"
T_WORKS_SEEDS = "t-interval over works, widened by a bootstrap over seeds"
ONE_WORK = "one work: no interval across works"


@dataclass(frozen=True)
class AcrossWorks:
    """A paired change per work, and its interval across works (and seeds)."""

    per_work: dict[str, float]  # work name -> its change (of the seed means)
    interval: Interval  # across works; ``interval.method`` says how, ``interval.n`` is the number of works
    seeds: tuple[int, int] = (1, 1)  # seeds of the compared model and of the reference

    @property
    def n_works(self) -> int:
        return self.interval.n

    def verdict(self, below: str = BELOW, above: str = ABOVE, digits: int = 4) -> str:
        return verdict(self.interval, below, above, digits)

    def to_dict(self, prefix: str = "") -> dict[str, Any]:
        """``per_work``, ``ci95_works`` ([low, high]; None with one work), ``works_estimate``, ``n_works``,
        ``works_method``, ``n_seeds`` ([compared, reference]) and the ``verdict``, each key after ``prefix``."""
        iv = self.interval
        bounded = bool(np.isfinite(iv.low) and np.isfinite(iv.high))
        d = {"per_work": dict(self.per_work), "ci95_works": [iv.low, iv.high] if bounded else None,
             "works_estimate": iv.estimate, "n_works": iv.n, "works_method": iv.method,
             "n_seeds": list(self.seeds), "verdict": self.verdict()}
        return {prefix + k: v for k, v in d.items()}


def _as_seeds(values: Any, n: int, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    a = a[None, :] if a.ndim == 1 else a
    if a.ndim != 2 or a.shape[1] != n or a.shape[0] < 1:
        raise ValueError(f"{what}: expected [windows] or [seeds, windows] with {n} windows, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} holds non-finite values")
    return a


def work_sums(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """``[S, W]`` per-window values -> ``[S, G]`` sums per work (group ``g`` of window ``w`` is ``groups[w]``)."""
    return np.stack([np.bincount(groups, weights=row, minlength=n_groups) for row in np.atleast_2d(values)])


def t_interval(estimates: Sequence[float], level: float = 0.95, extra_variance: float = 0.0,
               method: str = T_WORKS) -> Interval:
    """``mean +- t_{k-1} sqrt(s^2 / k + extra_variance)`` over k per-work estimates (k = 1: unbounded)."""
    x = np.asarray(estimates, dtype=np.float64)
    k = x.size
    if k < 1:
        raise ValueError("a t-interval needs at least one estimate")
    mean = float(x.mean())
    if k == 1:
        return Interval(mean, -np.inf, np.inf, level, 1, 0, 0, ONE_WORK)
    half = float(stats.t.ppf(0.5 + level / 2, k - 1) * np.sqrt(x.var(ddof=1) / k + extra_variance))
    return Interval(mean, mean - half, mean + half, level, k, 0, 0, method)


def cluster_bootstrap(numerator, denominator, groups, *, resamples: int = DEFAULT_RESAMPLES, level: float = 0.95,
                      seed: int = 0) -> Interval:
    """Percentile bootstrap of ``sum(numerator) / sum(denominator)`` drawing whole groups (works) with replacement.

    Args:
        numerator, denominator: ``[W]`` per-window values and weights (denominator >= 0).
        groups: ``[W]`` the group (work) of each window, any labels.

    Returns:
        :class:`Interval` over the groups that hold a positive weight (``n`` = their number).
    """
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(inverse.max()) + 1
    num_g, den_g = work_sums(num, inverse, n_groups), work_sums(den, inverse, n_groups)[0]
    keep = den_g > 0
    return _percentile(num_g[:, keep], np.zeros((1, int(keep.sum()))), den_g[keep], resamples, level, seed, CLUSTER)


def _draws(after: np.ndarray, before: np.ndarray, den: np.ndarray, resamples: int, seed: int,
           works: bool = True) -> np.ndarray:
    """``[resamples]`` bootstrap draws of the change of seed means, from ``[S_a, G]`` and ``[S_b, G]`` sums per
    work: each draw takes each side's seeds with replacement and, when ``works``, the G works with replacement
    (the pooled ratio); without ``works`` the statistic is the mean of the per-work changes (the t-interval's)."""
    rng = np.random.default_rng(seed)
    k = den.size
    chunk = max(1, _CHUNK_ELEMENTS // (k * (after.shape[0] + before.shape[0] + 1)))
    out = []
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        a = after[rng.integers(0, after.shape[0], size=(r, after.shape[0]))].mean(axis=1)  # [r, G]
        b = before[rng.integers(0, before.shape[0], size=(r, before.shape[0]))].mean(axis=1)
        if works:
            idx = rng.integers(0, k, size=(r, k))
            out.append(np.take_along_axis(a - b, idx, axis=1).sum(axis=1) / den[idx].sum(axis=1))
        else:
            out.append(((a - b) / den).mean(axis=1))
    return np.concatenate(out)


def _percentile(after: np.ndarray, before: np.ndarray, den: np.ndarray, resamples: int, level: float, seed: int,
                method: str) -> Interval:
    """The percentile interval of :func:`_draws` over seeds and works, around the pooled change."""
    _check(resamples, level)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(_draws(after, before, den, resamples, seed), [alpha, 1.0 - alpha])
    estimate = float((after.mean(0) - before.mean(0)).sum() / den.sum())
    return Interval(estimate, float(low), float(high), level, den.size, resamples, seed, method)


def _check(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def across_works(after, before, denominator, groups, names: Sequence[str], *, resamples: int = DEFAULT_RESAMPLES,
                 level: float = 0.95, seed: int = 0) -> AcrossWorks:
    """The paired change ``after - before`` per work and its interval across works (and seeds).

    Args:
        after, before: ``[W]`` per-window values (e.g. nll in bits), or ``[S, W]`` for S seeds of a model
            (each seed scored on the same windows).
        denominator: ``[W]`` per-window weights (bytes, tokens).
        groups: ``[W]`` int, each window's work: an index into ``names``.
        names: the works' names; a work without windows (or weight) is left out.

    Returns:
        :class:`AcrossWorks`; the method (module docstring) follows the number of works and of seeds.
    """
    _check(resamples, level)
    den = np.asarray(denominator, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    a, b = _as_seeds(after, den.size, "after"), _as_seeds(before, den.size, "before")
    if groups.shape != den.shape or (groups.size and (groups.min() < 0 or groups.max() >= len(names))):
        raise ValueError(f"groups must be [W] indices into the {len(names)} names")
    sums = [work_sums(x, groups, len(names)) for x in (a, b, den)]
    keep = np.flatnonzero(sums[2][0] > 0)
    if not keep.size:
        raise ValueError("no work holds a window with a positive weight")
    a_g, b_g, den_g = (x[:, keep] for x in sums)
    den_g = den_g[0]
    per_work = (a_g.mean(0) - b_g.mean(0)) / den_g
    seeded = a.shape[0] > 1 or b.shape[0] > 1
    if keep.size >= MIN_BOOTSTRAP_WORKS:
        interval = _percentile(a_g, b_g, den_g, resamples, level, seed, SEEDS_WORKS if seeded else CLUSTER)
    elif seeded and keep.size > 1:
        spread = float(_draws(a_g, b_g, den_g, resamples, seed, works=False).var())
        interval = replace(t_interval(per_work, level, spread, T_WORKS_SEEDS), resamples=resamples, seed=seed)
    else:
        interval = t_interval(per_work, level)
    return AcrossWorks({names[g]: float(d) for g, d in zip(keep, per_work)}, interval, (a.shape[0], b.shape[0]))
