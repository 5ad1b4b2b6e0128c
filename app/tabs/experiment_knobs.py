"""The Experiment tab's knobs: form fields -> a :class:`qtg.Intervention` (checked against the model), and
the components that hold them. Empty fields mean the model's own values.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import torch

from app.core import as_float
from app.models import AppInputError, Loaded
from app.tabs.common import Number, Radio
from qtg.model.intervention import POSITION_MODES, TOPO_MODES, Intervention, InterventionError

BIG = 1e6  # bound on the TopoFilter's and gamma's numbers: far beyond any meaningful value, finite


def _optional_float(value: Any, name: str, lo: float, hi: float) -> float | None:
    """Empty (None or blank) means the model's own value."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return as_float(value, name, lo, hi)


def parse_gamma(value: Any) -> float | dict[int, torch.Tensor] | None:
    """``""`` (the model's), ``"1"`` (every head of every block) or ``"0:1,1,2,2;3:0.5,0.5,0.5,0.5"``
    (per block, one value per head; blocks not named keep theirs), read by :meth:`qtg.Intervention.parse`."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or ":" not in value:
        return as_float(value, "gamma", 0.0, BIG)
    try:
        return dict(Intervention.parse(f"gamma={value.strip()}").gamma)
    except InterventionError:
        raise AppInputError(f"gamma: expected a number or block:g,g,...;block:g,... (one value per head), got "
                            f"{value.strip()[:50]!r}") from None


def parse_ablate(value: Any) -> dict[int, list[int]]:
    """``"0:1,2;3:0"`` -> ``{0: [1, 2], 3: [0]}`` (0-based blocks and heads); empty: none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if not isinstance(value, str):
        raise AppInputError(f"ablated heads: expected text like 0:1,2;3:0, got {str(value)[:50]!r}")
    try:
        heads = dict(Intervention.parse(f"ablate={value.strip()}").ablate_heads)
    except InterventionError:
        heads = {}
    if not heads or not all(heads.values()):  # the parser takes "0" as block 0 with no head: a slip, refused
        raise AppInputError(f"ablated heads: expected block:head,head;block:head (0-based), got "
                            f"{value.strip()[:50]!r}")
    return heads


def intervention_from(loaded: Loaded, topo: Any = "approx", theta: Any = None, tau: Any = None,
                      temperature: Any = None, gamma: Any = None, gamma_scale: Any = 1.0, ablate: Any = "",
                      positions: Any = "model") -> Intervention:
    """The knobs as a :class:`qtg.Intervention`, checked against the model (one line naming the field)."""
    if topo not in TOPO_MODES:
        raise AppInputError(f"TopoFilter mode: {str(topo)[:50]!r} is not one of {list(TOPO_MODES)}")
    if positions not in POSITION_MODES:
        raise AppInputError(f"positions: {str(positions)[:50]!r} is not one of {list(POSITION_MODES)}")
    scale = 1.0 if gamma_scale is None or gamma_scale == "" else as_float(gamma_scale, "gamma scale", 0.0, BIG)
    iv = Intervention(topo=topo, theta=_optional_float(theta, "theta", -BIG, BIG),
                      tau=_optional_float(tau, "tau", 1e-9, BIG),
                      temperature=_optional_float(temperature, "T", 1e-9, BIG),
                      gamma=parse_gamma(gamma), gamma_scale=scale,
                      ablate_heads=parse_ablate(ablate), positions=positions)
    iv.check(loaded.model)
    return iv


def knob_fields() -> list[Any]:
    """The knobs' components, in the order :func:`intervention_from` takes them."""
    with gr.Row():
        topo = Radio(list(TOPO_MODES), value="approx", elem_id="experiment-topo",
                     label="topo: the TopoFilter's mode (approx: the model's soft-min)")
        positions = Radio(list(POSITION_MODES), value="model", label="positions (none: no ALiBi)")
    with gr.Row():  # text boxes, not numbers: an empty number box sends 0, and empty means the model's own
        theta = gr.Textbox(value="", label="theta (empty: the model's)", max_lines=1, elem_id="experiment-theta")
        tau = gr.Textbox(value="", label="tau (empty: the model's)", max_lines=1)
        temperature = gr.Textbox(value="", label="temperature: T of the soft-min (empty: the model's)", max_lines=1)
    with gr.Row():
        gamma = gr.Textbox(value="", label="gamma: one value, or block:g,g,..;block:.. (empty: the model's)",
                           max_lines=1, elem_id="experiment-gamma")
        gamma_scale = Number(value=1.0, label="gamma scale", elem_id="experiment-gamma-scale")
        ablate = gr.Textbox(value="", label="ablate: heads as block:head,head;block:head (0-based)", max_lines=1,
                            elem_id="experiment-ablate")
    return [topo, theta, tau, temperature, gamma, gamma_scale, ablate, positions]
