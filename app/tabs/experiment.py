"""Experiment tab: what an intervention does, on one text and over the held-out works, and the logit lens.

Every number is ``qtg.experiments``'s; this module only turns form fields into a
:class:`qtg.Intervention` (``app.tabs.experiment_knobs``) and results into tables, HTML and
figures (``qtg.plots.experiment``).

* ``/experiment`` - one text (or the last generation) scored as ``qtg eval`` scores a document,
  ``[EOS] + text``, by the unmodified model and under the knobs' intervention
  (:func:`qtg.experiments.compare_text`): loss, perplexity and bits/byte before and after, the
  per-token change in loss coloured along the text, and the distribution of the token after the
  text before and after (:func:`qtg.experiments.heldout.next_token`). Knobs that change nothing
  are refused: before and after would be one model.
* ``/lens`` - the logit lens (:func:`qtg.experiments.logit_lens`) of the loaded model and, beside it,
  its same-size baseline when one is shipped: states down, positions across.
* ``/sweep`` and ``/heads`` - runs over the held-out works (``app.tabs.experiment_runs``).
* ``/recipes`` - retrained recipes side by side, each with its seeds (``app.tabs.experiment_recipes``).
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from app.core import Explorer, Session
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError, Loaded
from app.tabs import experiment_recipes, experiment_runs
from app.tabs.common import export_controls, fit
from app.tabs.experiment_knobs import intervention_from, knob_fields
from qtg.data.tokenizer import token_strings
from qtg.experiments import compare_text, logit_lens
from qtg.experiments.heldout import next_token
from qtg.plots.experiment import lens_heatmaps, next_token_bars

TOP_K = 10  # next-token bars: the union of each side's top k
LENS_TOP = 5  # lens hover: top tokens per cell
SUMMARY_HEADERS = ["", "before", "after", "change"]
NO_INTERVENTION = ("knobs: no intervention is set (every knob is at the model's own value), so after would be the "
                   "unmodified model again: set one, e.g. TopoFilter mode exact or ablated heads 0:1")


# --- one text ------------------------------------------------------------------------------------


def delta_html(tokens: list[str], delta: list[float], before: list[float], after: list[float],
               kl: list[float]) -> str:
    """The predicted tokens as spans coloured by their change in loss (red: the intervention costs loss, blue:
    it helps), the strongest colour at the text's largest |change|; hover shows the numbers."""
    top = max((abs(d) for d in delta), default=0.0) or 1.0
    spans = []
    for tok, d, b, a, k in zip(tokens, delta, before, after, kl):
        rgb = "214, 39, 40" if d > 0 else "31, 119, 180"
        tip = f"Δloss {d:+.4f} nats (before {b:.4f}, after {a:.4f}); KL(before‖after) {k:.4f}"
        shown = html.escape(tok).replace("\n", "⏎<br>")
        spans.append(f'<span class="qtg-delta" title="{tip}" style="background: rgba({rgb}, '
                     f'{0.85 * abs(d) / top:.3f})">{shown}</span>')
    legend = (f'<div style="font-size: 0.85em; margin-bottom: 0.4em">Each token coloured by its change in loss '
              f'under the intervention: red costs, blue helps; full colour = {top:.4f} nats (the largest here). '
              'Hover a token for its losses.</div>')
    return legend + '<div class="qtg-text" style="white-space: pre-wrap; line-height: 1.7">' + "".join(spans) \
        + "</div>"


def experiment(ex: Explorer, session: Session | None, text: Any, topo: Any = "approx", theta: Any = None,
               tau: Any = None, temperature: Any = None, gamma: Any = None, gamma_scale: Any = 1.0,
               ablate: Any = "", positions: Any = "model") -> tuple:
    """Returns (summary table, next-token bars, Δloss HTML, numbers, payload) for the text or the last generation."""
    session = session or ex.new_session()
    loaded = ex.current(session)
    text = ex.text_or_last(session, text)
    iv = intervention_from(loaded, topo, theta, tau, temperature, gamma, gamma_scale, ablate, positions)
    # [EOS] + the text, and the token after it, fit the context: one less than it
    ids, _ = ex.encode(loaded, text, ex.limits.max_text_chars, "text", max_tokens=loaded.model.cfg.max_seq_len - 1)
    ex.check_memory(loaded, ids.shape[1] + 1, "experiment")
    if iv.is_default:
        raise AppInputError(NO_INTERVENTION)
    cmp = compare_text(loaded.model, text, iv, tokenizer=loaded.tokenizer)
    nxt = next_token(loaded.model, cmp.ids, iv)
    ex.counters.add("forwards", 4)
    d = cmp.to_dict(loaded.tokenizer, k=TOP_K)
    rows = [["loss (nats/token)", d["before"]["loss"], d["after"]["loss"]],
            ["perplexity", d["before"]["perplexity"], d["after"]["perplexity"]],
            ["bits per byte", d["before"]["bits_per_byte"], d["after"]["bits_per_byte"]]]
    table = [[name, round(b, 4), round(a, 4), f"{a - b:+.4f}"] for name, b, a in rows]
    top = [(token_strings(loaded.tokenizer, [i])[0], p, q) for i, p, q in nxt.top(TOP_K)]
    fig = fit(next_token_bars(top, ("before (unmodified)", f"after ({iv.name})"),
                              f"The token after the text: before and after {iv.name} (KL {nxt.kl:.4f} nats, "
                              f"TV {nxt.total_variation:.4f})"))
    predicted = d["tokens"][1:]
    page = delta_html(predicted, d["delta_loss"], cmp.before.nll.tolist(), cmp.after.nll.tolist(), d["kl"])
    numbers = {"model": loaded.source.key, "intervention": iv.name, **d,
               "next_token": {"kl": nxt.kl, "total_variation": nxt.total_variation,
                              "top": [{"token": t, "before": p, "after": q} for t, p, q in top]}}
    return ({"headers": SUMMARY_HEADERS, "data": table}, fig, page, numbers,
            Exportable("experiment", {"next_token": fig}, numbers))


# --- the logit lens ----------------------------------------------------------------------------


def _lens_of(ex: Explorer, loaded: Loaded, text: str) -> tuple[dict[str, Any], int]:
    """``Lens.to_dict`` of the first ``max_lens_tokens`` tokens (causal: cutting the text changes no earlier
    position), and how many tokens the whole text has."""
    ids, _ = ex.encode(loaded, text, ex.limits.max_text_chars, "text")
    n = ids.shape[1]
    ids = ids[:, :ex.limits.max_lens_tokens]
    ex.check_memory(loaded, ids.shape[1], "lens")
    lens = logit_lens(loaded.model, ids)
    ex.counters.add("forwards")
    return lens.to_dict(loaded.tokenizer, k=LENS_TOP), n


def lens(ex: Explorer, session: Session | None, text: Any) -> tuple:
    """Returns (heatmaps, numbers, note, payload): the loaded model's lens and its baseline's, when shipped."""
    session = session or ex.new_session()
    loaded = ex.current(session)
    text = ex.text_or_last(session, text)
    kind = "QTG" if loaded.has_topofilter else "dot-product"
    models = {f"{kind}: {loaded.source.name}": loaded}
    notes = []
    base = ex.registry.baseline_for(loaded)
    if base is not None:
        models[f"baseline: {base.source.name}"] = base
    elif loaded.has_topofilter:
        notes.append("No same-size baseline is shipped beside this model, so there is no baseline panel.")
    panels, lengths = {}, {}
    for name, m in models.items():
        panels[name], lengths[name] = _lens_of(ex, m, text)
    shown = len(next(iter(panels.values()))["input_ids"])
    if max(lengths.values()) > shown:
        notes.insert(0, f"Showing the first {shown} of {max(lengths.values())} tokens (max lens tokens).")
    fig = fit(lens_heatmaps(panels, "Logit lens: the tied head on every state (cell: top next token and its "
                                    "probability; hover: top 5, KL to the output)"))
    numbers = {"models": {name: m.source.key for name, m in models.items()}, "lens": panels, "notes": notes}
    return fig, numbers, "  \n".join(notes), Exportable("lens", {"lens": fig}, numbers)


# --- the page --------------------------------------------------------------------------------------


def build(ex: Explorer, session: gr.State) -> None:
    gr.Markdown("Ask the model a causal question. The knobs below edit the forward pass of each call, never the "
                "weights: the TopoFilter exact (the exact causal H0 death s in place of the soft-min s̃) or off "
                "(w = 1), its θ, τ and T, every head's γ or a scale of it, heads ablated, or no positions. A "
                "baseline model takes only ablated heads. Leave the text empty to use the last generation.")
    text = gr.Textbox(label="text (empty: the last generation)", lines=3, max_length=ex.limits.max_text_chars,
                      elem_id="experiment-text",
                      value="Now is the winter of our discontent made glorious summer by this sun of York.")
    knobs = knob_fields()
    with gr.Row():
        run_btn = gr.Button("Run on the text", variant="primary", elem_id="experiment-btn")
        lens_btn = gr.Button("Logit lens", elem_id="lens-btn")
    _text_panels(ex, session, text, knobs, run_btn)
    _lens_panels(ex, session, text, lens_btn)
    experiment_runs.build(ex, session, knobs)
    experiment_recipes.build(ex, session)


def _text_panels(ex: Explorer, session: gr.State, text: gr.Textbox, knobs: list[Any], run_btn: gr.Button) -> None:
    """The one-text results: before and after, the next token, the per-token change in loss; ``/experiment``."""
    summary = gr.Dataframe(headers=SUMMARY_HEADERS, label="before (unmodified) and after (the intervention)",
                           interactive=False, elem_id="experiment-summary")
    bars = gr.Plot(label="next-token distribution", elem_id="experiment-bars")
    delta = gr.HTML(label="per-token change in loss", elem_id="experiment-delta")
    with gr.Accordion("numbers", open=False):
        numbers = gr.JSON(label="numbers")
    payload = gr.State(None)
    export_controls(ex, payload, "experiment")

    # named parameters (not *args): gradio_client shows a caller each as its label says
    def run(s, text, topo, theta, tau, temperature, gamma, gamma_scale, ablate, positions):
        return experiment(ex, s, text, topo, theta, tau, temperature, gamma, gamma_scale, ablate, positions)

    run_btn.click(user_facing(run, "experiment"), [session, text, *knobs],
                  [summary, bars, delta, numbers, payload], api_name="experiment", concurrency_id="heavy")


def _lens_panels(ex: Explorer, session: gr.State, text: gr.Textbox, lens_btn: gr.Button) -> None:
    """The logit lens of the loaded model and its baseline; ``/lens``."""
    gr.Markdown(f"**Logit lens.** The model's final norm and tied head read from every state (QEmbed, TopoFilter, "
                f"each block; the baseline's embedding and blocks), on the first {ex.limits.max_lens_tokens} tokens: "
                "each cell is the most likely next token and its probability.")
    lens_note = gr.Markdown(elem_id="lens-note")
    lens_fig = gr.Plot(label="logit lens", elem_id="lens-heatmap")
    with gr.Accordion("lens numbers", open=False):
        lens_numbers = gr.JSON(label="lens numbers")
    lens_payload = gr.State(None)
    export_controls(ex, lens_payload, "lens")

    def run_lens(s, text):
        return lens(ex, s, text)

    lens_btn.click(user_facing(run_lens, "lens"), [session, text],
                   [lens_fig, lens_numbers, lens_note, lens_payload], api_name="lens", concurrency_id="heavy")
