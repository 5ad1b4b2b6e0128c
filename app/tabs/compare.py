"""Compare tab: one text through two models side by side -- QTG vs baseline, two tiers, CPU vs GPU,
exact vs approximate TopoFilter -- with loss, perplexity, the exact diagrams of a layer's states and
the bottleneck distance between them. Endpoint ``/compare``.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import gradio as gr
import torch

import qtg
from app.controls import NO_FILTER, compare_weights
from app.core import Explorer, Session, as_int
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError
from app.tabs.common import Dropdown, Number, Radio, export_controls, fit
from qtg.data.tokenizer import EOS_TOKEN
from qtg.experiments.topo_controls import CONTROLS, mean_applied_weight
from qtg.metrics import bits_per_byte
from qtg.plots.topology import diagrams_side_by_side
from qtg.topology import bottleneck, exact_diagrams
from qtg.topology.budget import Budget
from qtg.training.evaluate import score_windows, windows

# the TopoFilter's soft-min s~, or the exact causal s (QTG only): an argument of each call, never module state
MODES = {"approximate": qtg.Intervention(), "exact": qtg.Intervention(topo="exact")}
# ...or a control's w in place of the filter's (app.controls: calibrated on the model's validation works)
CONTROL_MODES = {label: key for key, label in CONTROLS.items()}
METRICS = ["model", "device", "TopoFilter", "tokens", "loss (nats/token)", "perplexity", "bits per byte", "layer",
           "state width", "H0 bars", "H1 bars", "mean w (as applied, after token 0)",
           "w vs the filter's: r, mean |Δw|", "w variance position explains", "seconds"]


def _intervention(ex: Explorer, loaded: Any, mode: str, side: str) -> qtg.Intervention:
    """The call's intervention for a TopoFilter mode; a control on a baseline changes nothing (it has no w)."""
    if mode in CONTROL_MODES and not loaded.has_topofilter:
        return MODES["approximate"]  # the table says why: no w to replace
    if mode in CONTROL_MODES:
        return ex.calibrations.get(loaded).intervention(CONTROL_MODES[mode])
    if mode not in MODES:
        raise AppInputError(f"TopoFilter {side}: {str(mode)[:50]!r} is not one of {[*MODES, *CONTROL_MODES]}")
    if mode == "exact" and not loaded.has_topofilter:
        raise AppInputError(f"TopoFilter {side}: exact mode needs a model with a TopoFilter; "
                            f"{loaded.source.name} is a dot-product baseline")
    return MODES[mode]


def _weights(ex: Explorer, loaded: Any, mode: str, ids: torch.Tensor, applied: torch.Tensor | None) -> dict[str, Any]:
    """The w the side applied and, under a control, how it stands against the filter's own w of the same tokens."""
    if applied is None:
        return {"mean_w": None, "note": NO_FILTER, "control": None}
    out: dict[str, Any] = {"mean_w": mean_applied_weight(applied[0]), "note": "the filter's own w",
                           "control": None}
    if mode in CONTROL_MODES:
        with torch.inference_mode():
            plain = loaded.model(ids, return_internals=True, map_blocks=())
        comparison, note = compare_weights(ex.calibrations, loaded, mode, plain.topo_weights[0].tolist(),
                                           plain.topo_exact_scores[0].tolist())
        out.update(note=note, control=comparison.to_dict())
    return out


def _w_cells(w: dict[str, Any]) -> list[Any]:
    """The side's w in the table: its mean, and under a control r and mean |Δw| against the filter's w and the
    share of the filter's w's variance position alone explains (the words are in the numbers' ``note``)."""
    if w["mean_w"] is None:
        return ["— (no TopoFilter)"] * 3
    c = w["control"]
    if c is None:
        return [round(w["mean_w"], 4), "— (the filter's own w)", "—"]
    r = "—" if c["correlation"] is None else f"{c['correlation']:.2f}"
    share = "—" if c["position_share"] is None else f"{100 * c['position_share']:.0f} %"
    return [round(w["mean_w"], 4), f"{r}, {c['mean_abs_difference']:.3f}", share]


def _side(ex: Explorer, text: str, key: str, device: str, mode: str, layer_arg: Any, side: str,
          budget: Budget) -> dict[str, Any]:
    """Loss and exact diagrams of one model on ``text`` (the diagrams within the request's ``budget``)."""
    if device not in ex.devices():
        raise AppInputError(f"device {side}: {str(device)[:50]!r} is not one of {ex.devices()}")
    loaded = ex.registry.get(key, device)
    model = loaded.model
    intervene = _intervention(ex, loaded, mode, side)
    names = loaded.model.state_names
    layer = as_int(layer_arg, "layer", -1, len(names) - 1)
    layer = len(names) - 1 if layer < 0 else layer
    ids, tokens = ex.encode(loaded, text, ex.limits.max_text_chars, "text", min_tokens=3)
    ex.check_memory(loaded, ids.shape[1], f"compare ({side})")
    t0 = _now(device)
    eos = loaded.tokenizer.token_to_id(EOS_TOKEN)
    seq = ([eos] if eos is not None else []) + ids[0].tolist()
    nll, count = score_windows(model, windows(seq, model.cfg.max_seq_len), intervene=intervene)
    with torch.inference_mode():
        out = model(ids, return_internals=True, map_blocks=(), intervene=intervene)
    states = out.states[layer][0]
    ex.counters.add("forwards")
    dgms = exact_diagrams(states, maxdim=1, max_points=min(256, ex.limits.max_topology_points),
                          time_budget=budget, metric_input="points")
    seconds = _now(device) - t0
    w = _weights(ex, loaded, mode, ids, out.topo_weights if loaded.has_topofilter else None)
    loss = nll / count
    return {"model": loaded.source.label, "key": key, "device": loaded.device,
            "TopoFilter": mode if loaded.has_topofilter else "none (baseline)", "tokens": count, "loss": loss,
            "perplexity": math.exp(loss), "bits_per_byte": bits_per_byte(nll, len(text.encode("utf-8"))),
            "layer": layer, "layer_name": names[layer], "width": int(states.shape[-1]), "exact": dgms,
            "seconds": seconds, "w": w}


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def compare_models(ex: Explorer, session: Session | None, text: Any, model_a: str, device_a: str, topofilter_a: str,
                   model_b: str, device_b: str, topofilter_b: str, layer: Any = -1) -> tuple:
    """Returns (metrics rows, figure, numbers, payload). ``model_*`` are source keys, ``topofilter_*`` a mode
    of :data:`MODES`; ``layer`` -1 is each model's last layer."""
    session = session or ex.new_session()
    text = ex.text_or_last(session, text)
    budget = ex.topology_budget(text="the text")  # both sides' diagrams together (the forwards not counted)
    a = _side(ex, text, model_a, device_a, topofilter_a, layer, "A", budget)
    b = _side(ex, text, model_b, device_b, topofilter_b, layer, "B", budget)
    dist = {f"H{k}": bottleneck(a["exact"].dgms[k], b["exact"].dgms[k]) for k in range(2)}
    same_space = a["width"] == b["width"]
    spaces = ("the two clouds lie in the same space" if same_space else
              f"the two clouds lie in different spaces ({a['width']}-D and {b['width']}-D): the bottleneck "
              "compares the shapes of their diagrams (edge lengths), not the points")
    values = {side: [s["model"], s["device"], s["TopoFilter"], s["tokens"], round(s["loss"], 4),
                     round(s["perplexity"], 3), round(s["bits_per_byte"], 4), f"{s['layer']} ({s['layer_name']})",
                     s["width"], len(s["exact"].dgms[0]), len(s["exact"].dgms[1]),
                     *_w_cells(s["w"]), round(s["seconds"], 3)]
              for side, s in (("A", a), ("B", b))}
    rows = [[metric, values["A"][i], values["B"][i]] for i, metric in enumerate(METRICS)]  # metrics down, A | B
    numbers = {"A": {k: v for k, v in a.items() if k != "exact"} | {"exact": a["exact"].to_dict()},
               "B": {k: v for k, v in b.items() if k != "exact"} | {"exact": b["exact"].to_dict()},
               "bottleneck_A_vs_B": dist, "same_space": same_space, "spaces": spaces,
               "loss_ratio_B_over_A": b["loss"] / a["loss"]}
    fig = fit(diagrams_side_by_side(
        {f"{side}: {s['model']} ({s['device']}, {s['TopoFilter']}, layer {s['layer']})": s["exact"]
         for side, s in (("A", a), ("B", b))},
        title=f"Exact H0/H1 on the same text; bottleneck A vs B: H0 {dist['H0']:.4g}, H1 {dist['H1']:.4g}"
              + ("" if same_space else f" ({a['width']}-D vs {b['width']}-D states)")))
    headline = {"bottleneck_A_vs_B": dist, "spaces": spaces,
                "perplexity": {"A": a["perplexity"], "B": b["perplexity"]},
                "loss_ratio_B_over_A": numbers["loss_ratio_B_over_A"]}
    return rows, fig, headline, Exportable("compare", {"diagrams": fig}, numbers)


def build(ex: Explorer, session: gr.State) -> None:
    choices = [(s.label, s.key) for s in ex.registry.sources()]
    keys = [s.key for s in ex.registry.sources()]
    default_b = next((k for k in keys if k.endswith("-baseline")), ex.default_key)
    gr.Markdown("The same text through two models: QTG vs its baseline, two tiers, CPU vs GPU, or the "
                "TopoFilter's approximation vs its exact mode (s in place of s̃, an argument of the call: the shared "
                "weights are never switched), or vs a control of its w (position only, or a one-bit gate: constants "
                "measured on the model's validation works), with how much of w position alone explains. Leave the "
                "text empty to use the last generation.")
    text = gr.Textbox(label="text", lines=3, elem_id="compare-text", max_length=ex.limits.max_text_chars,
                      value="Now is the winter of our discontent made glorious summer by this sun of York.")
    with gr.Row():
        with gr.Column():
            key_a = Dropdown(choices, value=ex.default_key, label="model A")
            dev_a = Dropdown(ex.devices(), value=ex.device, label="device A")
            mode_a = Radio([*MODES, *CONTROL_MODES], value="approximate", label="TopoFilter A (w from)",
                           elem_id="compare-mode-a")
        with gr.Column():
            key_b = Dropdown(choices, value=default_b, label="model B")
            dev_b = Dropdown(ex.devices(), value=ex.device, label="device B")
            mode_b = Radio([*MODES, *CONTROL_MODES], value="approximate", label="TopoFilter B (w from)",
                           elem_id="compare-mode-b")
    with gr.Row():
        layer = Number(value=-1, precision=0, label="layer (-1 = the last), for the diagrams", minimum=-1)
        run_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
    table = gr.Dataframe(headers=["", "A", "B"], label="side by side", interactive=False, elem_id="compare-table",
                         wrap=True)
    fig = gr.Plot(label="diagrams", elem_id="compare-diagrams")
    numbers = gr.JSON(label="numbers")
    payload = gr.State(None)
    export_controls(ex, payload, "compare")
    run_btn.click(user_facing(functools.partial(compare_models, ex), "compare"),
                  [session, text, key_a, dev_a, mode_a, key_b, dev_b, mode_b, layer],
                  [table, fig, numbers, payload], api_name="compare", concurrency_id="heavy")
