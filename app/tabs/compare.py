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
from app.core import Explorer, Session, as_int
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError
from app.tabs.common import Dropdown, Number, Radio, export_controls, fit
from qtg.evaluate import score_windows, windows
from qtg.metrics import bits_per_byte
from qtg.plots import diagrams_side_by_side
from qtg.tokenizer import EOS_TOKEN
from qtg.topology import bottleneck, exact_diagrams
from qtg.topology.budget import Budget

# the TopoFilter's soft-min s~, or the exact causal s (QTG only): an argument of each call, never module state
MODES = {"approximate": qtg.Intervention(), "exact": qtg.Intervention(topo="exact")}
METRICS = ["model", "device", "TopoFilter", "tokens", "loss (nats/token)", "perplexity", "bits per byte", "layer",
           "state width", "H0 bars", "H1 bars", "seconds"]


def _side(ex: Explorer, text: str, key: str, device: str, mode: str, layer_arg: Any, side: str,
          budget: Budget) -> dict[str, Any]:
    """Loss and exact diagrams of one model on ``text`` (the diagrams within the request's ``budget``)."""
    if mode not in MODES:
        raise AppInputError(f"TopoFilter {side}: {str(mode)[:50]!r} is not one of {list(MODES)}")
    if device not in ex.devices():
        raise AppInputError(f"device {side}: {str(device)[:50]!r} is not one of {ex.devices()}")
    loaded = ex.registry.get(key, device)
    model = loaded.model
    if mode == "exact" and not loaded.has_topofilter:
        raise AppInputError(f"TopoFilter {side}: exact mode needs a model with a TopoFilter; "
                            f"{loaded.source.name} is a dot-product baseline")
    intervene = MODES[mode]
    names = loaded.state_names
    layer = as_int(layer_arg, "layer", -1, len(names) - 1)
    layer = len(names) - 1 if layer < 0 else layer
    ids, tokens = ex.encode(loaded, text, ex.limits.max_text_chars, "text", min_tokens=3)
    ex.check_memory(loaded, ids.shape[1], f"compare ({side})")
    t0 = _now(device)
    eos = loaded.tokenizer.token_to_id(EOS_TOKEN)
    seq = ([eos] if eos is not None else []) + ids[0].tolist()
    nll, count = score_windows(model, windows(seq, model.cfg.max_seq_len), intervene=intervene)
    with torch.inference_mode():
        states = model(ids, return_internals=True, map_blocks=(), intervene=intervene).states[layer][0]
    ex.counters.add("forwards")
    dgms = exact_diagrams(states, maxdim=1, max_points=min(256, ex.limits.max_topology_points),
                          time_budget=budget, metric_input="points")
    seconds = _now(device) - t0
    loss = nll / count
    return {"model": loaded.source.label, "key": key, "device": loaded.device,
            "TopoFilter": mode if loaded.has_topofilter else "none (baseline)", "tokens": count, "loss": loss,
            "perplexity": math.exp(loss), "bits_per_byte": bits_per_byte(nll, len(text.encode("utf-8"))),
            "layer": layer, "layer_name": names[layer], "width": int(states.shape[-1]), "exact": dgms,
            "seconds": seconds}
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
                     s["width"], len(s["exact"].dgms[0]), len(s["exact"].dgms[1]), round(s["seconds"], 3)]
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
                "weights are never switched). Leave the text empty to use the last generation.")
    text = gr.Textbox(label="text", lines=3, elem_id="compare-text", max_length=ex.limits.max_text_chars,
                      value="Now is the winter of our discontent made glorious summer by this sun of York.")
    with gr.Row():
        with gr.Column():
            key_a = Dropdown(choices, value=ex.default_key, label="model A")
            dev_a = Dropdown(ex.devices(), value=ex.device, label="device A")
            mode_a = Radio(list(MODES), value="approximate", label="TopoFilter A")
        with gr.Column():
            key_b = Dropdown(choices, value=default_b, label="model B")
            dev_b = Dropdown(ex.devices(), value=ex.device, label="device B")
            mode_b = Radio(list(MODES), value="approximate", label="TopoFilter B")
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
