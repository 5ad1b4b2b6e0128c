"""One time budget and one cancel flag for all the topology work of a request.

    budget = Budget(30.0, cancel=event)                   # the clock starts now
    exact_diagrams(x, time_budget=budget)                 # every stage draws on it: the point limit, H0, H1+
    exact_diagrams(y, time_budget=budget)                 # ... and so does a second call: 30 s for both
    budget.check("the comparison with the TopoFilter")    # between stages of the caller's own

``exact_diagrams(x, time_budget=30.0)`` makes a budget of its own for that one call. A stage that runs in
this process (farthest-point sampling, the spanning tree of H0) checks it every few iterations; a Rips engine
runs in a child process that is killed when the budget runs out or the event is set
(:func:`qtg.topology.backends.run_bounded`). Either way :class:`BudgetExceeded` says what ran out and names
the knobs that would help, in the caller's words (``knobs``): the library's arguments and the command line's
flags by default; the web app names its controls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from qtg.errors import TopologyError

# How a message names each knob: the argument and the command line's flag. A caller names its own (the app: its
# controls), None for a knob it does not have; "text" (shorten it) is one a caller may add.
KNOBS: Mapping[str, str | None] = {"time_budget": "time_budget (--time-budget)",
                                   "max_points": "max_points (--max-points)", "maxdim": "maxdim",
                                   "max_edge": "max_edge (--max-edge)"}


class BudgetExceeded(TopologyError):
    """The time budget ran out, or the work was cancelled (``cancelled``)."""

    def __init__(self, message: str, cancelled: bool = False):
        super().__init__(message)
        self.cancelled = cancelled


@dataclass
class Budget:
    """``seconds`` (None: no limit) from ``start``, and a ``cancel`` event another thread may set."""

    seconds: float | None
    cancel: threading.Event | None = None
    knobs: Mapping[str, str | None] = field(default_factory=lambda: dict(KNOBS))
    start: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.seconds is not None and not self.seconds > 0:
            raise TopologyError(f"time budget: must be positive seconds or None, got {self.seconds!r}")

    @property
    def limited(self) -> bool:
        """Whether there is anything to enforce (a limit or a cancel event)."""
        return self.seconds is not None or self.cancel is not None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float | None:
        """Seconds left (may be negative once spent); None without a limit."""
        return None if self.seconds is None else self.seconds - self.elapsed()

    def check(self, what: str) -> None:
        """Raise :class:`BudgetExceeded` if the work was cancelled or the budget is spent, naming ``what``."""
        if self.cancel is not None and self.cancel.is_set():
            raise BudgetExceeded(f"{what} was cancelled after {self.elapsed():.2f} s", cancelled=True)
        if self.seconds is not None and self.elapsed() > self.seconds:
            raise BudgetExceeded(self.exceeded(what))

    def exceeded(self, what: str) -> str:
        """The message for a budget spent during ``what``: the knobs that would let the work fit (those the
        caller has: ``knobs`` maps each to its name, or to None)."""
        k = self.knobs
        fixes = [f"{verb} {k[name]}" + (" below the diameter" if name == "max_edge" else "")
                 for verb, name in (("raise", "time_budget"), ("lower", "max_points"), ("lower", "maxdim"),
                                    ("set", "max_edge"), ("shorten", "text")) if k.get(name)]
        advice = "" if not fixes else "; " + (fixes[0] if len(fixes) == 1 else
                                              f"{', '.join(fixes[:-1])} or {fixes[-1]}")
        return (f"{what} ran past the time budget of {self.seconds:g} s ({self.elapsed():.1f} s since the topology "
                f"work began) and was stopped{advice}")

    def died(self, what: str, exit_code: int | None) -> str:
        """The message for a worker process that died (most often killed for memory)."""
        k = self.knobs
        fix = " or ".join(f"{verb} {k[n]}" for verb, n in (("lower", "max_points"), ("set", "max_edge")) if k.get(n))
        return (f"{what}: the worker process died (exit code {exit_code}), probably out of memory"
                + (f"; {fix}" if fix else ""))


def as_budget(time_budget: float | Budget | None, cancel: threading.Event | None = None) -> Budget:
    """A :class:`Budget` for ``exact_diagrams``' arguments: one given (shared), else a new one for this call."""
    if isinstance(time_budget, Budget):
        if cancel is not None and cancel is not time_budget.cancel:
            raise TopologyError("with a Budget, give the cancel event in it (Budget(seconds, cancel)), not as cancel=")
        return time_budget
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))):
        raise TopologyError(f"time_budget must be positive seconds, a Budget or None, got {time_budget!r}")
    return Budget(None if time_budget is None else float(time_budget), cancel)
