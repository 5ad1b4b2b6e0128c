"""Intervals across works and seeds (qtg.experiments.works) and the one verdict wording, on synthetic cases
whose answer is known: no model runs here."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from qtg import experiments as ex
from qtg.experiments import works as wk


def _works(values_per_work: list[float], windows_per_work: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-window values (each window of a work equal to its work's value) and each window's work."""
    groups = np.repeat(np.arange(len(values_per_work)), windows_per_work)
    return np.asarray(values_per_work, dtype=np.float64)[groups], groups


# --- the cluster bootstrap and the t-interval ------------------------------------------------------


def test_cluster_bootstrap_resamples_whole_works_with_a_known_answer():
    """Six works of equal weight, one with value 1 and five with 0. A resample of six works holds the
    odd one k ~ Binomial(6, 1/6) times and its statistic is k / 6: P(k = 0) = 0.33 > 2.5% and
    P(k <= 2) = 0.938 < 97.5% <= P(k <= 3) = 0.991, so the 95% interval is exactly [0, 3/6], however
    many windows each work is cut into (here the odd work has 1 and another 40, each of the same total weight)."""
    value, groups = _works([1.0, 0, 0, 0, 0, 0], [1, 40, 3, 3, 3, 3])
    weight = np.array([1.0 / np.sum(groups == g) for g in groups])  # every work weighs 1 in all
    ci = ex.cluster_bootstrap(value * weight, weight, groups, resamples=4000, seed=1)
    assert (ci.low, ci.high) == (0.0, 0.5) and ci.n == 6 and ci.method == wk.CLUSTER
    assert ci.estimate == pytest.approx(1 / 6)


def test_t_interval_over_works_is_the_textbook_one():
    """The issue's four per-work differences (nano-baseline minus nano): mean -0.01665, sd 0.014221,
    t(0.975, 3) = 3.18245 -> [-0.0393, +0.0060]."""
    d = [0.0021, -0.0255, -0.0296, -0.0136]
    ci = ex.t_interval(d)
    assert ci.estimate == pytest.approx(-0.01665)
    half = 3.182446305 * np.std(d, ddof=1) / 2
    assert (ci.low, ci.high) == pytest.approx((-0.01665 - half, -0.01665 + half), abs=1e-9)
    assert round(ci.low, 3) == -0.039 and round(ci.high, 3) == 0.006 and ci.method == wk.T_WORKS
    one = ex.t_interval([0.3])
    assert one.low == -np.inf and one.high == np.inf and one.method == wk.ONE_WORK


def test_identical_windows_in_each_work_make_the_windows_interval_too_narrow_and_the_works_one_right():
    """40 works, each cut into 50 windows that all equal the work's value, values ~ N(mu, 1): the data hold
    40 independent numbers, not 2000. Over 200 such corpora the interval across works covers mu about 95%
    of the time; the windows interval, sqrt(50) times too narrow, far less."""
    mu, k, per = 0.3, 40, 50
    rng = np.random.default_rng(7)
    covered = {"windows": 0, "works": 0}
    widths = {"windows": [], "works": []}
    trials = 200
    for t in range(trials):
        value, groups = _works(list(rng.normal(mu, 1.0, size=k)), [per] * k)
        after, before = value, np.zeros_like(value)
        windows = ex.paired_bootstrap(after, before, resamples=400, seed=t)
        works = ex.across_works(after, before, np.ones_like(value), groups, [f"w{g}" for g in range(k)],
                                resamples=400, seed=t).interval
        for name, ci in (("windows", windows), ("works", works)):
            covered[name] += ci.low <= mu <= ci.high
            widths[name].append(ci.width)
    assert works.method == wk.CLUSTER and works.n == k
    assert 0.88 <= covered["works"] / trials <= 0.99, covered
    assert covered["windows"] / trials < 0.4, covered
    # the works interval has the width of 40 independent draws: 2 x 1.96 / sqrt(40) = 0.62 (a bootstrap of
    # k works is narrower by sqrt((k - 1) / k) at most); the windows one is about sqrt(50) = 7 times narrower
    assert np.mean(widths["works"]) == pytest.approx(2 * 1.96 / np.sqrt(k), rel=0.08)
    assert np.mean(widths["works"]) / np.mean(widths["windows"]) == pytest.approx(np.sqrt(per), rel=0.15)


def test_fewer_than_six_works_take_the_t_interval_and_more_the_cluster_bootstrap():
    names = [f"w{g}" for g in range(8)]
    for k, method in ((2, wk.T_WORKS), (5, wk.T_WORKS), (6, wk.CLUSTER), (8, wk.CLUSTER)):
        value, groups = _works(list(np.linspace(-1.0, 1.0, k) + 0.1), [3] * k)
        res = ex.across_works(value, np.zeros_like(value), np.ones_like(value), groups, names[:k], resamples=300)
        assert res.interval.method == method and res.n_works == k
        assert list(res.per_work) == names[:k] and res.per_work["w0"] == pytest.approx(-0.9)
    # a work without windows counts for nothing, and per-work values are ratios of that work's sums
    groups = np.array([0, 0, 2, 2, 2])
    res = ex.across_works([1.0, 3.0, 2.0, 2.0, 8.0], np.zeros(5), [1.0, 1.0, 2.0, 2.0, 2.0], groups, ["a", "b", "c"])
    assert res.per_work == {"a": 2.0, "c": 2.0} and res.n_works == 2
    d = res.to_dict()
    assert d["ci95_works"] == [2.0, 2.0] and d["n_works"] == 2 and d["verdict"] == "worse"  # both works agree


# --- seeds and works ----------------------------------------------------------------------------------


def _seeded(offsets_after: list[float], offsets_before: list[float], work_values: list[float], per: int = 4):
    """[S, W] per-window values: each seed adds its offset to every window; each work's windows are equal."""
    value, groups = _works(work_values, [per] * len(work_values))
    after = np.stack([value + o for o in offsets_after])
    before = np.stack([np.zeros_like(value) + o for o in offsets_before])
    return after, before, groups


def test_seeds_and_works_bootstrap_has_the_known_answer_when_only_the_seeds_vary():
    """Eight identical works; the compared model's two seeds sit at +d and -d around 0.1, the reference has
    one. Drawing two seeds with replacement gives the mean 0.1 - d, 0.1 or 0.1 + d with probabilities
    1/4, 1/2, 1/4, so the 95% interval is exactly [0.1 - d, 0.1 + d], and the works add nothing."""
    d = 0.05
    after, before, groups = _seeded([0.1 + d, 0.1 - d], [0.0], [0.2] * 8)
    res = ex.across_works(after, before + 0.2, np.ones(after.shape[1]), groups, [f"w{g}" for g in range(8)],
                          resamples=4000, seed=3)
    assert res.interval.method == wk.SEEDS_WORKS and res.seeds == (2, 1)
    assert (res.interval.low, res.interval.high) == pytest.approx((0.1 - d, 0.1 + d), abs=1e-12)
    assert res.interval.estimate == pytest.approx(0.1) and res.per_work["w3"] == pytest.approx(0.1)
    # one seed each: the same data show no spread at all (a single run cannot see run-to-run variation)
    alone = ex.across_works(after[0], before[0] + 0.2, np.ones(after.shape[1]), groups, [f"w{g}" for g in range(8)])
    assert alone.interval.width == pytest.approx(0.0, abs=1e-12)


def test_seeds_and_works_bootstrap_width_follows_the_known_seed_and_work_variances():
    """Seeds crossed with works: offsets +-a for each of 20 seeds per model (population variance a^2 each,
    exactly), and 60 works with values of population variance v. The bootstrap's variance of the statistic
    is a^2 / 20 + a^2 / 20 + v / 60, so the 95% interval is 2 x 1.96 x sqrt of that wide."""
    a, seeds, k = 0.03, 20, 60
    works = np.random.default_rng(5).normal(0.0, 0.02, size=k)
    v = works.var()
    after, before, groups = _seeded([0.01 + a * (-1) ** i for i in range(seeds)], [a * (-1) ** i for i in range(seeds)],
                                    list(works))
    res = ex.across_works(after, before, np.ones(after.shape[1]), groups, [f"w{g}" for g in range(k)],
                          resamples=6000, seed=11)
    expected = 2 * 1.96 * np.sqrt(2 * a**2 / seeds + v / k)
    assert res.interval.method == wk.SEEDS_WORKS and res.interval.width == pytest.approx(expected, rel=0.06)
    works_only = ex.across_works(after.mean(0), before.mean(0), np.ones(after.shape[1]), groups,
                                 [f"w{g}" for g in range(k)], resamples=6000, seed=11)
    assert works_only.interval.width == pytest.approx(2 * 1.96 * np.sqrt(v / k), rel=0.08)  # seeds left out


def test_few_works_with_seeds_widen_the_t_interval_by_the_seeds_variance():
    """Three identical works (no spread between works) and two seeds at +-d: the interval is
    t(0.975, 2) x sqrt(var of a two-seed bootstrap mean = d^2 / 2) on each side."""
    d = 0.04
    after, before, groups = _seeded([d, -d], [0.0], [0.5] * 3)
    res = ex.across_works(after, before + 0.5, np.ones(after.shape[1]), groups, ["a", "b", "c"], resamples=20000)
    assert res.interval.method == wk.T_WORKS_SEEDS and res.n_works == 3
    assert res.interval.half_width == pytest.approx(stats.t.ppf(0.975, 2) * d / np.sqrt(2), rel=0.03)


# --- the verdict's words ----------------------------------------------------------------------------------


def test_verdict_words_follow_the_interval_and_never_say_the_same():
    def iv(low, high):
        return ex.Interval((low + high) / 2, low, high, 0.95, 4, 0, 0)
    assert ex.verdict(iv(0.01, 0.03)) == "worse" and ex.verdict(iv(-0.03, -0.01)) == "better"
    assert ex.verdict(iv(-0.0392, 0.0060)) == "no difference detected (± 0.0226)"
    assert ex.verdict(iv(-0.02, 0.04), below="lower", above="higher") == "no difference detected (± 0.0300)"
    assert ex.verdict(iv(0.2, 0.4), below="lower", above="higher") == "higher"
    assert ex.verdict(ex.t_interval([0.1])) == "no difference detected (one work: no interval across works)"
    assert "same" not in ex.verdict(iv(0.0, 0.0))


def test_bad_input_is_refused_with_what_was_wrong():
    with pytest.raises(ValueError, match="after: expected"):
        ex.across_works(np.zeros((2, 3)), np.zeros(4), np.ones(4), [0, 0, 1, 1], ["a", "b"])
    with pytest.raises(ValueError, match="indices into the 2 names"):
        ex.across_works(np.zeros(4), np.zeros(4), np.ones(4), [0, 0, 1, 2], ["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        ex.across_works([np.nan, 0.0], np.zeros(2), np.ones(2), [0, 1], ["a", "b"])
