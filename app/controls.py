"""The TopoFilter's controls beside its w in every view: the "w from" toggle and each model's calibration.

A view that shows the filter's w (Generate's colouring, Topology, Compare) also offers the two controls of
:mod:`qtg.experiments.topo_controls`: *position only* (w = the filter's mean w at that position) and the
*one-bit gate* (w = 1 for a repeat, the mean first-occurrence w otherwise). Their constants are measured once
per loaded model on its validation works (:func:`qtg.experiments.topo_controls.calibrate`), never on the
text shown, and kept by :class:`Calibrations`, which the :class:`~app.core.Explorer` owns.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from app.models import AppInputError, Loaded
from qtg.experiments import topo_controls
from qtg.experiments.topo_controls import Calibration, ControlComparison

FILTER = "the filter (s̃)"
# what the toggle offers -> the library's control (None: the filter's own w)
CHOICES = {FILTER: None, **{label: key for key, label in topo_controls.CONTROLS.items()}}
NO_FILTER = "This model has no TopoFilter (a dot-product baseline): there is no w, so no control to set beside it."


def control_of(choice: Any, field: str = "w from") -> str | None:
    """The library's control for a toggle value (None: the filter's own w).

    Raises:
        AppInputError: a value the toggle does not offer, naming ``field``.
    """
    if choice in (None, ""):
        return None
    if choice not in CHOICES:
        raise AppInputError(f"{field}: {str(choice)[:50]!r} is not one of {list(CHOICES)}")
    return CHOICES[choice]


class Calibrations:
    """Each loaded model's calibration of the controls, measured on first use and kept while it is loaded.

    One lock guards the table and the measuring, so two sessions asking for the same model measure it once.
    """

    def __init__(self, windows: int):
        self.windows = windows
        self._lock = threading.Lock()
        self._table: dict[tuple[str, str], tuple[Any, Calibration]] = {}  # (key, device) -> (model, calibration)

    def get(self, loaded: Loaded) -> Calibration:
        """The calibration of ``loaded`` (measured now on first use: a forward pass over ``windows`` windows)."""
        slot = (loaded.source.key, loaded.device)
        with self._lock:
            held = self._table.get(slot)
            if held is None or held[0] is not loaded.model:  # not yet measured, or the model was reloaded
                cal = topo_controls.calibrate(loaded.model, tokenizer=loaded.tokenizer, max_windows=self.windows)
                held = self._table[slot] = (loaded.model, cal)
            return held[1]

    def drop(self, key: str, device: str) -> None:
        """A model left the registry: its calibration goes with it (and lets its weights go)."""
        with self._lock:
            self._table.pop((key, device), None)


def compare_weights(calibrations: Calibrations, loaded: Loaded, choice: Any, weight: Sequence[float],
                    exact: Sequence[float]) -> tuple[ControlComparison | None, str]:
    """The filter's w of one text beside the chosen control's, and its figures in plain words with where the
    controls' constants came from; (None, why) for a model without a TopoFilter."""
    control = control_of(choice)
    if not loaded.has_topofilter:
        return None, NO_FILTER
    calibration = calibrations.get(loaded)
    comparison = topo_controls.against_control(calibration, control, weight, exact)
    shown = ("the filter's own w" if control is None else
             f"the {topo_controls.CONTROLS[control]} control's w (the filter's is beside it)")
    return comparison, (f"w shown: {shown}. {comparison.describe()}  \n"
                        f"The controls' constants were measured on {calibration.describe()}, not on this text.")
