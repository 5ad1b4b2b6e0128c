"""Seeded percentile bootstrap of a ratio of sums, and its paired form.

Every corpus figure here is a ratio of sums over windows: loss per token is
sum(nll) / sum(tokens), bits per byte is sum(nll) / (ln 2 sum(bytes)). A
condition's change against the unmodified model on the *same* windows is then
sum(nll_after - nll_before) / sum(bytes): the paired bootstrap resamples
windows with replacement, the same windows for both conditions, and reads the
2.5th and 97.5th percentiles of that statistic.

Windows of one work are not independent (they share a story and its names),
so this interval is the one for "these texts": other windows of the same
works. Whether a change holds on other works is the interval across works of
:mod:`qtg.experiments.works`, much wider with few works; every verdict
(:func:`verdict`) reads that one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
WINDOWS = "windows (these texts)"
_CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once (32 MiB of int64)


@dataclass(frozen=True)
class Interval:
    """A statistic, its bootstrap confidence interval and how it was computed."""

    estimate: float  # the statistic on the windows as they are
    low: float
    high: float
    level: float  # e.g. 0.95
    n: int  # the units resampled: windows, or works for an interval across works
    resamples: int  # 0 for a t-interval
    seed: int
    method: str = WINDOWS  # how it was computed (WINDOWS, or one of qtg.experiments.works' methods)

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def half_width(self) -> float:
        return self.width / 2

    def excludes_zero(self) -> bool:
        """True when the interval lies wholly on one side of 0."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "ci": [self.low, self.high]}


def _check(numerator: np.ndarray, denominator: np.ndarray, resamples: int, level: float) -> None:
    if numerator.ndim != 1 or numerator.size == 0:
        raise ValueError(f"the bootstrap needs a non-empty 1-D sample, got shape {numerator.shape}")
    if denominator.shape != numerator.shape:
        raise ValueError(f"denominator shape {denominator.shape} differs from numerator shape {numerator.shape}")
    if not (np.all(np.isfinite(numerator)) and np.all(np.isfinite(denominator))):
        raise ValueError("the bootstrap sample holds non-finite values")
    if np.any(denominator < 0) or denominator.sum() <= 0:
        raise ValueError("the denominator must be >= 0 with a positive sum")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def bootstrap_ratio(numerator, denominator=None, *, resamples: int = DEFAULT_RESAMPLES, level: float = 0.95,
                    seed: int = 0) -> Interval:
    """Percentile bootstrap CI of ``sum(numerator) / sum(denominator)`` over resampled items.

    Args:
        numerator: ``[n]`` per-item values (e.g. a window's summed nll).
        denominator: ``[n]`` per-item weights (tokens, bytes); None: all ones (the mean).
        resamples: bootstrap resamples (each draws n items with replacement).
        level: coverage, e.g. 0.95 for the 2.5th..97.5th percentiles.
        seed: fixes the draws: the same call gives the same interval.

    Returns:
        :class:`Interval`; resamples whose denominator sums to 0 (all zero-weight items) are skipped.
    """
    num = np.asarray(numerator, dtype=np.float64)
    den = np.ones_like(num) if denominator is None else np.asarray(denominator, dtype=np.float64)
    _check(num, den, resamples, level)
    n = num.size
    rng = np.random.default_rng(seed)
    stats = []
    per_chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, per_chunk):
        idx = rng.integers(0, n, size=(min(per_chunk, resamples - start), n))  # [r, n]
        top, bottom = num[idx].sum(axis=1), den[idx].sum(axis=1)
        stats.append(top[bottom > 0] / bottom[bottom > 0])
    draws = np.concatenate(stats)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return Interval(estimate=float(num.sum() / den.sum()), low=float(low), high=float(high), level=level, n=n,
                    resamples=resamples, seed=seed)


def paired_bootstrap(after, before, denominator=None, *, resamples: int = DEFAULT_RESAMPLES, level: float = 0.95,
                     seed: int = 0) -> Interval:
    """CI of the paired change ``sum(after - before) / sum(denominator)`` over the same items.

    Args:
        after, before: ``[n]`` the same items (windows) under two conditions.
        denominator: ``[n]`` weights shared by both (tokens, bytes); None: the mean change.

    Returns:
        :class:`Interval` of the change (after minus before).
    """
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}")
    return bootstrap_ratio(a - b, denominator, resamples=resamples, level=level, seed=seed)


BELOW, ABOVE, ACROSS = "better", "worse", "no difference detected"  # a change in loss: lower is better


def side_of_zero(low: float, high: float) -> str:
    """``"below"`` (the interval lies wholly below 0), ``"above"``, or ``"across"``."""
    return "above" if low > 0 else "below" if high < 0 else "across"


def verdict(interval: Interval, below: str = BELOW, above: str = ABOVE, digits: int = 4) -> str:
    """The one wording of a change's verdict: ``below`` when the interval lies wholly below 0, ``above``
    when wholly above, else "no difference detected (± half-width)" -- never "the same": an interval
    across 0 says the data cannot tell, not that there is no change.

    Give it the interval across works (:class:`qtg.experiments.works.AcrossWorks` ``.interval``) for a
    claim about other texts; ``below``/``above`` default to a change in loss or bits per byte (lower is better).
    """
    side = side_of_zero(interval.low, interval.high)
    if side != "across":
        return below if side == "below" else above
    if not np.isfinite(interval.width):
        return f"{ACROSS} (one work: no interval across works)"
    return f"{ACROSS} (± {interval.half_width:.{digits}f})"


def format_ci(estimate: float, bounds: Sequence[float] | None, digits: int = 4, sign: bool = False) -> str:
    """``"+0.0123 [+0.0040, +0.0210]"``; ``bounds`` None (one work: no interval across works) prints ``[-]``."""
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    if bounds is None or not all(np.isfinite(bounds)):
        return f"{f.format(estimate)} [-]"
    return f"{f.format(estimate)} [{f.format(bounds[0])}, {f.format(bounds[1])}]"
