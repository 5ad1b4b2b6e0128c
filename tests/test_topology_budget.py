"""One time budget for all of a request's topology work (:class:`qtg.topology.Budget`, issue 23).

``exact_diagrams`` checks its budget at every stage: the point limit, H0 by the spanning tree and the Rips
engine; one budget shared by several calls bounds them together; its refusals name the knobs in the
caller's words.
"""

from __future__ import annotations

import multiprocessing as mp
import threading

import numpy as np
import pytest

from qtg.topology import Budget, BudgetExceeded, exact_diagrams
from qtg.topology.budget import KNOBS

APP_KNOBS = {"time_budget": "'time budget (s)'", "max_points": "'max points'", "maxdim": None,
             "max_edge": "'max edge'", "text": "the text"}


def cloud(n: int, dim: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim))


class Watched(Budget):
    """A budget that records what checked it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checked: list[str] = []

    def check(self, what: str) -> None:
        self.checked.append(what)
        super().check(what)


def spent(seconds: float = 1.0, **kwargs) -> Budget:
    budget = Budget(seconds, **kwargs)
    budget.start -= 2 * seconds  # as if the request's earlier work had used it all
    return budget


@pytest.mark.parametrize("backend", ["auto", "gudhi", "ripser", "giotto-ph"])
def test_every_stage_checks_the_budget_h0_included(backend):
    budget = Watched(60.0)
    exact_diagrams(cloud(300), maxdim=1, backend=backend, max_points=100, time_budget=budget)
    stages = set(budget.checked)
    assert "choosing 100 of 300 points" in stages  # the point limit (farthest-point sampling)
    assert any(s.endswith("H0..H1 of 100 points") for s in stages)  # the Rips engine (in a child process)
    if backend == "auto":
        assert "H0 (spanning tree) of 100 points" in stages  # H0, in this process


@pytest.mark.parametrize("backend", ["auto", "gudhi"])
def test_a_budget_spent_by_one_call_stops_the_next_before_any_work(backend):
    """Two engines overlaid, or a layer sweep, draw on one budget: what the first used is gone for the second."""
    with pytest.raises(BudgetExceeded, match=r"ran past the time budget of 1 s"):
        exact_diagrams(cloud(20), maxdim=1, backend=backend, time_budget=spent())


def test_a_small_input_in_this_process_is_bounded_too():
    """Under 64 points the engine runs in this process (milliseconds): the budget is still checked."""
    budget = Watched(60.0)
    exact_diagrams(cloud(20), maxdim=1, backend="gudhi", time_budget=budget)
    assert "gudhi H0..H1 of 20 points" in budget.checked


def test_refusals_name_the_callers_knobs():
    with pytest.raises(BudgetExceeded) as err:
        exact_diagrams(cloud(20), time_budget=spent(knobs=APP_KNOBS))
    message = str(err.value)
    assert ("raise 'time budget (s)', lower 'max points', set 'max edge' below the diameter or shorten the text"
            in message) and "--" not in message and "maxdim" not in message
    with pytest.raises(BudgetExceeded, match=r"raise time_budget \(--time-budget\), lower max_points"):
        exact_diagrams(cloud(20), time_budget=spent())  # the library's default: arguments and flags
    assert KNOBS["time_budget"] == "time_budget (--time-budget)"


def test_the_budgets_cancel_event_stops_a_rips_engine():
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(BudgetExceeded, match="was cancelled after") as err:
        exact_diagrams(cloud(300, 128, seed=5), maxdim=2, backend="gudhi", time_budget=Budget(None, cancel))
    assert err.value.cancelled and not mp.active_children()


def test_a_cancel_event_goes_in_the_budget_not_beside_it():
    with pytest.raises(Exception, match="give the cancel event in it"):
        exact_diagrams(cloud(10), time_budget=Budget(5.0), cancel=threading.Event())
