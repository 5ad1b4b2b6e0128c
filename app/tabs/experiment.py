"""Experiment tab: what an intervention does, on one text and over the held-out works, and the logit lens.

Every number is ``qtg.experiments``'s; this module only turns form fields into a
:class:`qtg.Intervention` and results into tables, HTML and figures (``qtg.experiment_plots``).

* ``/experiment`` - one text (or the last generation) scored as ``qtg eval`` scores a document,
  ``[EOS] + text``, by the unmodified model and under the knobs' intervention
  (:func:`qtg.experiments.compare_text`): loss, perplexity and bits/byte before and after, the
  per-token change in loss coloured along the text, and the distribution of the token after the
  text before and after (:func:`qtg.experiments.heldout.next_token`).
* ``/sweep`` - the held-out works (the test split of the bundled corpus, split as the model's
  training split it: :func:`qtg.experiments.heldout.heldout_documents`), a seeded draw of windows,
  scored under each condition (:func:`qtg.experiments.sweep`): a paired-bootstrap 95% CI per
  condition, as a table and a forest plot. The sweep runs in a worker thread; the handler is a
  generator that reports progress, and when Stop closes it, it sets the sweep's cancel event, so
  the server stops at the next forward pass.
* ``/lens`` - the logit lens (:func:`qtg.experiments.logit_lens`) of the loaded model and, beside it,
  its same-size baseline when one is shipped: states down, positions across.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr
import torch

from app.core import Explorer, Session, as_float, as_int
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError, Loaded
from app.tabs.common import Number, Radio, export_controls, fit
from qtg.experiment_plots import forest_plot, lens_heatmaps, next_token_bars
from qtg.experiments import compare_text, logit_lens, prepare, sweep
from qtg.experiments.heldout import heldout_documents, next_token
from qtg.intervention import POSITION_MODES, TOPO_MODES, Intervention, InterventionError
from qtg.memory import human_bytes
from qtg.tokenizer import token_strings
from qtg.views import view_memory

TOP_K = 10  # next-token bars: the union of each side's top k
LENS_TOP = 5  # lens hover: top tokens per cell
POLL_S = 0.25  # a running sweep reports its progress this often
SWEEP_BATCH = 8  # windows per forward pass, as qtg experiment (fewer when the memory budget is short)
MAX_SEED = 2**32 - 1
BIG = 1e6  # bound on the TopoFilter's and gamma's numbers: far beyond any meaningful value, finite
SUMMARY_HEADERS = ["", "before", "after", "change"]
SWEEP_HEADERS = ["condition", "loss", "bits/byte [95% CI]", "Δ bits/byte [95% CI]", "Δ loss [95% CI]", "mean w",
                 "H0 bottleneck"]  # tokens/s and per-head attention: in the numbers
DEFAULT_CONDITIONS = "topo=exact\ntopo=off\npositions=none\ngamma=1"


# --- form fields -> an Intervention ------------------------------------------------------------


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


# --- the sweep over the held-out works -------------------------------------------------------------


def conditions_from(knobs: Intervention, lines: Any, loaded: Loaded, limit: int) -> list[Intervention]:
    """The knobs' intervention (unless it changes nothing) and one per non-empty line of ``lines``, each once."""
    if lines is not None and not isinstance(lines, str):
        raise AppInputError(f"conditions: expected text, one intervention per line, got {str(lines)[:50]!r}")
    out = [] if knobs.is_default else [knobs]
    for n, line in enumerate((lines or "").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            iv = Intervention.parse(line.strip())
            iv.check(loaded.model)
        except InterventionError as e:
            raise AppInputError(f"conditions line {n}: {e}") from None
        if not iv.is_default and iv.name not in {c.name for c in out}:
            out.append(iv)
    if not out:
        raise AppInputError("conditions: nothing to compare; set a knob or give a line such as topo=exact")
    if len(out) > limit:
        raise AppInputError(f"conditions: {len(out)} is above the maximum {limit} (max sweep conditions)")
    return out


def sweep_table(result: dict[str, Any]) -> dict[str, Any]:
    """``SweepResult.to_dict()`` as the table's rows."""
    def ci(est, lo_hi, sign=False):
        f = "{:+.4f}" if sign else "{:.4f}"
        return f"{f.format(est)} [{f.format(lo_hi[0])}, {f.format(lo_hi[1])}]"

    rows = [[c["name"], round(c["loss"], 4), ci(c["bits_per_byte"], c["bits_per_byte_ci95"]),
             ci(c["delta_bits_per_byte"], c["ci95"], True), ci(c["delta_loss"], c["delta_loss_ci95"], True),
             "-" if c["mean_topo_weight"] is None else round(c["mean_topo_weight"], 3),
             "-" if c["bottleneck_h0_mean"] is None else round(c["bottleneck_h0_mean"], 4)]
            for c in result["conditions"]]
    return {"headers": SWEEP_HEADERS, "data": rows}


def _sweep_args(ex: Explorer, loaded: Loaded, knobs: Intervention, lines: Any, windows: Any, sample: Any,
                seed: Any) -> tuple[list[Intervention], int, int, int]:
    lim = ex.limits
    conds = conditions_from(knobs, lines, loaded, lim.max_sweep_conditions)
    n = as_int(windows if windows not in (None, "") else lim.sweep_windows, "windows", 1, lim.max_sweep_windows)
    s = as_int(sample if sample not in (None, "") else 2, "sampled windows", 0, min(n, lim.max_sweep_sample))
    sd = as_int(seed if seed not in (None, "") else 0, "seed", 0, MAX_SEED)
    return conds, n, s, sd


def sweep_batch(ex: Explorer, loaded: Loaded) -> int:
    """Windows per forward pass: ``SWEEP_BATCH``, or as many full-context windows as the memory budget holds
    (``qtg.views.view_memory`` of one window with every block's maps, as a sampled window keeps them).

    Raises:
        AppInputError: not even one window fits, with needed against available.
    """
    cfg = loaded.model.cfg
    dtype = next(loaded.model.parameters()).dtype
    one = view_memory(cfg, cfg.max_seq_len, dtype, cfg.n_layers, "internals", loaded.device).request
    budget = ex.memory_budget(loaded.device)
    if one > budget:
        raise AppInputError(f"sweep: one window of {cfg.max_seq_len:,} tokens on {loaded.source.name} needs "
                            f"{human_bytes(one)} beyond the weights, {human_bytes(budget)} is available; free memory "
                            "or use a smaller model")
    return int(min(SWEEP_BATCH, budget // one))


def run_sweep(ex: Explorer, session: Session | None, topo: Any = "approx", theta: Any = None, tau: Any = None,
              temperature: Any = None, gamma: Any = None, gamma_scale: Any = 1.0, ablate: Any = "",
              positions: Any = "model", lines: Any = DEFAULT_CONDITIONS, windows: Any = None, sample: Any = 2,
              seed: Any = 0, progress: Any = None) -> Iterator[tuple]:
    """Yields (table, forest plot, status, numbers, payload, progress state): progress while the sweep runs
    (the other outputs skipped), then the result. Closing the generator (Stop) cancels the sweep on the server.

    ``windows``: windows of the held-out works drawn with ``seed`` (default ``Limits.sweep_windows``);
    ``sample``: those with attention statistics and exact H0; ``lines``: more conditions, one per line.
    """
    session = session or ex.new_session()
    loaded = ex.current(session)
    knobs = intervention_from(loaded, topo, theta, tau, temperature, gamma, gamma_scale, ablate, positions)
    conds, n, s, sd = _sweep_args(ex, loaded, knobs, lines, windows, sample, seed)
    batch = sweep_batch(ex, loaded)
    docs = heldout_documents(loaded.model, "test")
    corpus = prepare(loaded.model, docs, tokenizer=loaded.tokenizer, max_windows=n, seed=sd)
    state = {"done": 0, "total": len(corpus.windows) * (len(conds) + 1)}
    box: dict[str, Any] = {}
    cancel = threading.Event()

    def on_progress(done: int, total: int) -> None:
        state.update(done=done, total=total)
        ex.counters.add("forwards")

    def work() -> None:
        try:
            box["result"] = sweep(loaded.model, corpus, conds, tokenizer=loaded.tokenizer, batch_size=batch,
                                  sample=s, seed=sd, cancel=cancel, on_progress=on_progress)
        except BaseException as e:  # handed to the handler's thread, which raises it
            box["error"] = e

    skip = gr.skip()
    worker = threading.Thread(target=work, name="experiment-sweep")
    worker.start()
    try:
        while worker.is_alive():
            worker.join(POLL_S)
            if progress is not None:
                progress((state["done"], state["total"]), desc="window passes", unit="windows")
            yield skip, skip, f"running: {state['done']} of {state['total']} window passes", skip, skip, dict(state)
    finally:
        cancel.set()  # Stop closed the generator: the sweep stops before its next forward pass
        worker.join()
    if "error" in box:
        raise box["error"]
    result = box["result"].to_dict()
    result["split"] = {"name": "test", "documents": [d.name for d in docs]}
    rows = [{"name": c["name"], "estimate": c["delta_bits_per_byte"], "low": c["ci95"][0], "high": c["ci95"][1]}
            for c in result["conditions"][1:]]
    c = result["corpus"]
    fig = fit(forest_plot(rows, "Δ bits/byte against the unmodified model",
                          f"{loaded.source.name} on {c['windows']} windows of the held-out works: Δ bits/byte, "
                          "paired bootstrap 95% CI"))
    status = (f"done: {c['windows']} windows ({c['tokens']:,} tokens, {c['bytes']:,} bytes) of the held-out works "
              f"({', '.join(result['split']['documents'])}), {len(conds) + 1} conditions; paired bootstrap 95% CI "
              f"over windows ({result['resamples']} resamples, seed {sd}); attention and H0 on {s} sampled windows.")
    yield (sweep_table(result), fig, status, result, Exportable("sweep", {"forest": fig}, result),
           dict(state))


def stopped(state: dict[str, Any] | None) -> str:
    """The status line after Stop, with the last progress the server reported."""
    done, total = (state or {}).get("done", 0), (state or {}).get("total", 0)
    return f"stopped after {done} of {total} window passes (Stop pressed; the server computes no more)"


# --- the page --------------------------------------------------------------------------------------


def _knobs() -> list[Any]:
    with gr.Row():
        topo = Radio(list(TOPO_MODES), value="approx", label="TopoFilter mode (approx: the model's soft-min)",
                     elem_id="experiment-topo")
        positions = Radio(list(POSITION_MODES), value="model", label="positions (none: no ALiBi)")
    with gr.Row():  # text boxes, not numbers: an empty number box sends 0, and empty means the model's own
        theta = gr.Textbox(value="", label="theta (empty: the model's)", max_lines=1, elem_id="experiment-theta")
        tau = gr.Textbox(value="", label="tau (empty: the model's)", max_lines=1)
        temperature = gr.Textbox(value="", label="T, soft-min temperature (empty: the model's)", max_lines=1)
    with gr.Row():
        gamma = gr.Textbox(value="", label="gamma: one value, or block:g,g,..;block:.. (empty: the model's)",
                           max_lines=1, elem_id="experiment-gamma")
        gamma_scale = Number(value=1.0, label="gamma scale", elem_id="experiment-gamma-scale")
        ablate = gr.Textbox(value="", label="ablated heads, block:head,head;block:head (0-based)", max_lines=1,
                            elem_id="experiment-ablate")
    return [topo, theta, tau, temperature, gamma, gamma_scale, ablate, positions]


def build(ex: Explorer, session: gr.State) -> None:
    lim = ex.limits
    gr.Markdown("Ask the model a causal question. The knobs below edit the forward pass of each call, never the "
                "weights: the TopoFilter exact (the exact causal H0 death s in place of the soft-min s̃) or off "
                "(w = 1), its θ, τ and T, every head's γ or a scale of it, heads ablated, or no positions. A "
                "baseline model takes only ablated heads. Leave the text empty to use the last generation.")
    text = gr.Textbox(label="text (empty: the last generation)", lines=3, max_length=lim.max_text_chars,
                      elem_id="experiment-text",
                      value="Now is the winter of our discontent made glorious summer by this sun of York.")
    knobs = _knobs()
    with gr.Row():
        run_btn = gr.Button("Run on the text", variant="primary", elem_id="experiment-btn")
        lens_btn = gr.Button("Logit lens", elem_id="lens-btn")
    summary = gr.Dataframe(headers=SUMMARY_HEADERS, label="before (unmodified) and after (the intervention)",
                           interactive=False, elem_id="experiment-summary")
    bars = gr.Plot(label="next-token distribution", elem_id="experiment-bars")
    delta = gr.HTML(label="per-token change in loss", elem_id="experiment-delta")
    with gr.Accordion("numbers", open=False):
        numbers = gr.JSON(label="numbers")
    payload = gr.State(None)
    export_controls(ex, payload, "experiment")
    run_btn.click(user_facing(lambda *a: experiment(ex, *a), "experiment"), [session, text, *knobs],
                  [summary, bars, delta, numbers, payload], api_name="experiment", concurrency_id="heavy")

    gr.Markdown(f"**Logit lens.** The model's final norm and tied head read from every state (QEmbed, TopoFilter, "
                f"each block; the baseline's embedding and blocks), on the first {lim.max_lens_tokens} tokens: "
                "each cell is the most likely next token and its probability.")
    lens_note = gr.Markdown(elem_id="lens-note")
    lens_fig = gr.Plot(label="logit lens", elem_id="lens-heatmap")
    with gr.Accordion("lens numbers", open=False):
        lens_numbers = gr.JSON(label="lens numbers")
    lens_payload = gr.State(None)
    export_controls(ex, lens_payload, "lens")
    lens_btn.click(user_facing(lambda *a: lens(ex, *a), "lens"), [session, text],
                   [lens_fig, lens_numbers, lens_note, lens_payload], api_name="lens", concurrency_id="heavy")

    gr.Markdown("**Run over the held-out works.** The test split of the bundled corpus (works the model never "
                "trained on), a seeded draw of windows, each scored by the unmodified model and under the knobs' "
                "intervention and each condition below; the change in bits/byte with a paired bootstrap 95% CI "
                "over windows. An interval that excludes 0 is larger than this corpus's window-to-window noise.")
    with gr.Row():
        lines = gr.Textbox(value=DEFAULT_CONDITIONS, lines=4, label="more conditions, one a line (as `qtg "
                           "experiment --intervene`; topo_weight=gate:0.45 is the TopoFilter reduced to one "
                           "bit: w = 1 for a repeat, 0.45 otherwise)", elem_id="sweep-conditions", scale=2)
        with gr.Column(scale=1):
            windows = Number(value=lim.sweep_windows, precision=0, elem_id="sweep-windows",
                             label=f"windows (up to {lim.max_sweep_windows}; more: narrower CIs, longer)")
            sample = Number(value=2, precision=0, label="windows with attention and exact H0")
            seed = Number(value=0, precision=0, label="seed (window draw and bootstrap)")
    with gr.Row():
        sweep_btn = gr.Button("Run over the held-out works", variant="primary", elem_id="sweep-btn")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="sweep-stop")
    status = gr.Markdown(elem_id="sweep-status")
    table = gr.Dataframe(headers=SWEEP_HEADERS, label="conditions, the unmodified model first", interactive=False,
                         elem_id="sweep-table", wrap=True)
    forest = gr.Plot(label="forest plot", elem_id="sweep-forest")
    with gr.Accordion("sweep numbers (every condition's figures, attention per head)", open=False):
        sweep_numbers = gr.JSON(label="sweep numbers")
    sweep_payload, state = gr.State(None), gr.State(None)
    export_controls(ex, sweep_payload, "sweep")

    # explicit parameters: Gradio finds gr.Progress by its place in the signature
    def go(s, topo, theta, tau, temperature, gamma, gamma_scale, ablate, positions, lines, windows, sample, seed,
           progress=gr.Progress()):  # noqa: B008 - how Gradio asks for a progress bar
        yield from run_sweep(ex, s, topo, theta, tau, temperature, gamma, gamma_scale, ablate, positions, lines,
                             windows, sample, seed, progress=progress)

    evt = sweep_btn.click(user_facing(go, "sweep"), [session, *knobs, lines, windows, sample, seed],
                          [table, forest, status, sweep_numbers, sweep_payload, state], api_name="sweep",
                          concurrency_id="heavy")
    # Cancelling closes the generator on the server, which cancels the sweep; then the status says so.
    stop_btn.click(None, None, None, cancels=[evt], api_visibility="private").then(
        stopped, [state], [status], api_visibility="private", queue=False)
