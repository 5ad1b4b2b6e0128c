"""Patching tab: which activations carry the difference between a clean prompt and a corrupted one.

Every number is ``qtg.experiments.patching``'s and every figure ``qtg.plots.patching``'; form fields become token
ids in ``app.tabs.patching_fields``, and this module turns results into figures and tables. Endpoint
``/patching``, for the loaded model and, beside it, its same-size baseline when one is shipped (``nano`` has
``nano-baseline``):

* activation patching (:func:`~qtg.experiments.activation_patching`) of the residual stream by block x
  position, of each head (all positions) by block x head, and of the TopoFilter's w by position (QTG only):
  1 = the clean run's logit difference LD = logit[answer] - logit[wrong], 0 = the corrupted run's;
* direct logit attribution (:func:`~qtg.experiments.direct_logit_attribution`) of each head on the clean prompt;
* attribution patching (:func:`~qtg.experiments.attribution_patching`) of the residual stream and the heads
  against the real patching of the same units, with their agreement (:func:`~qtg.experiments.agreement_of`).

The run goes in a worker thread (``app.worker.passes_in_worker``): progress is reported after every batched
forward pass, and Stop closes the handler, after which the worker stops at its next batch.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import gradio as gr
import numpy as np

from app.core import Explorer, Session
from app.errors import user_facing
from app.exports import Exportable
from app.models import Loaded
from app.tabs.common import Radio, export_controls, fit
from app.tabs.patching_fields import CORRUPT_BY, Pair, clean_ids, corrupted_text, pair, patching_rows
from app.worker import passes_in_worker
from qtg.experiments import activation_patching, agreement_of, attribution_patching, direct_logit_attribution
from qtg.experiments.errors import ExperimentCancelled
from qtg.experiments.patching import site_units
from qtg.plots.patching import attribution_scatter, logit_attribution_heatmaps, patching_heatmaps

WHAT = "patched units"  # what the progress counts
FIGURES = ["residual_stream", "heads", "topo_w", "logit_attribution", "attribution_vs_real"]
SUMMARY_HEADERS = ["model", "LD clean", "LD corrupted", "attribution vs real: residual stream",
                   "attribution vs real: heads", "direct logit attribution: sum of terms / LD"]
CSV_HEADERS = ["model", "view", "block", "head", "position", "token", "value"]
CLEAN = "The good king and his son rode out to the town at night, and the king and his"


# --- one model's run ---------------------------------------------------------------------------------------


def _sites(loaded: Loaded) -> list[tuple[str, bool]]:
    """The sites really patched, with ``positions``: the residual stream by position, each head at every
    position, and (QTG) the TopoFilter's w by position."""
    return [("resid", True), ("heads", False), *([("topo_w", True)] if loaded.has_topofilter else [])]


def _units(loaded: Loaded, n_tokens: int) -> int:
    """How many units (patched rows) one model's run patches, as the library counts them."""
    return sum(len(site_units(loaded.model, site, n_tokens, positions)[0]) for site, positions in _sites(loaded))


def _run_model(loaded: Loaded, p: Pair, rows: int, cancel: threading.Event,
               report: Callable[[int], None]) -> dict[str, Any]:
    """Every result of one model, as ``to_dict()``; ``report`` gets the units done so far after each batch, and
    the run stops there once ``cancel`` is set."""
    model, args = loaded.model, (p.clean, p.corrupt, p.answer, p.wrong)
    done = 0

    def step(units: int, total: int) -> None:
        report(done + units)
        if cancel.is_set():
            raise ExperimentCancelled(f"patching stopped after {done + units} units")

    def real(site: str, positions: bool) -> Any:
        nonlocal done
        out = activation_patching(model, *args, site, positions, rows, p.clean_tokens, progress=step)
        done += out.values.size
        return out

    out = {site: real(site, positions) for site, positions in _sites(loaded)}
    result = {site: r.to_dict() for site, r in out.items()}
    dla = direct_logit_attribution(model, p.clean, p.answer, p.wrong)
    result["dla"] = {**dla.to_dict(), "total": dla.total()}  # the terms' sum: the logit difference again
    for site, positions in (("resid", True), ("heads", False)):
        if cancel.is_set():
            raise ExperimentCancelled("patching stopped")
        est = attribution_patching(model, *args, site, positions, token_labels=p.clean_tokens)
        est.agreement = agreement_of(est.values, out[site].values)
        result[f"attribution_{site}"] = est.to_dict()
    return result


# --- the handler -------------------------------------------------------------------------------------------


def tokens_html(p: Pair, answer: str, wrong: str | None) -> str:
    """Both prompts as the tokenizer cuts them (the positions that differ marked), and the metric's tokens."""
    def row(tokens: list[str], other: list[str]) -> str:
        return "".join(f'<span class="qtg-token{" qtg-differs" if t != o else ""}" title="position {i}" '
                       f'style="border: 1px solid #bbb; margin: 1px; padding: 0 2px;'
                       f'{" background: #fde2a6;" if t != o else ""}">{html.escape(t).replace(" ", "␣")}</span>'
                       for i, (t, o) in enumerate(zip(tokens, other)))
    metric = f"logit[{html.escape(repr(answer))} (#{p.answer})]" + (
        f" − logit[{html.escape(repr(wrong))} (#{p.wrong})]" if p.wrong is not None else "")
    return (f'<div><b>clean</b> ({len(p.clean_tokens)} tokens): {row(p.clean_tokens, p.corrupt_tokens)}</div>'
            f'<div><b>corrupted</b>: {row(p.corrupt_tokens, p.clean_tokens)}</div>'
            f'<div><b>LD</b> = {metric} at the last position</div>')


def patching(ex: Explorer, session: Session | None, clean: Any, corrupt_by: Any = CORRUPT_BY[0], corrupted: Any = "",
             word: Any = "", replacement: Any = "", answer: Any = "", wrong: Any = "",
             progress: Any = None) -> Iterator[tuple]:
    """Yields (tokens HTML, residual-stream, heads, TopoFilter-w, logit-attribution and scatter figures, summary
    table, numbers, payload, status, progress state): progress while it runs (the other outputs skipped), then
    the result. Closing the generator (Stop) stops the work on the server at its next batch.

    ``corrupt_by``: one of :data:`CORRUPT_BY`; with ``"replacing a word"``, the corrupted prompt is the clean one
    with every whole-word ``word`` replaced by ``replacement``. ``answer`` and ``wrong`` (optional): words the
    tokenizer cuts into one token each.
    """
    session = session or ex.new_session()
    loaded = ex.current(session)
    clean_ids(ex, loaded, clean)  # the first field is refused first
    corrupted = corrupted_text(clean, corrupt_by, corrupted, word, replacement)
    models = {f"{'QTG' if loaded.has_topofilter else 'dot-product'}: {loaded.source.name}": loaded}
    base = ex.registry.baseline_for(loaded)
    if base is not None:
        models[f"baseline: {base.source.name}"] = base
    pairs = {name: pair(ex, m, clean, corrupted, answer, wrong) for name, m in models.items()}
    for name, m in models.items():
        ex.check_memory(m, pairs[name].clean.shape[1], "patching", map_blocks=0)
    shown = tokens_html(next(iter(pairs.values())), answer, wrong)
    units = {name: _units(m, pairs[name].clean.shape[1]) for name, m in models.items()}
    state = {"done": 0, "total": sum(units.values())}
    yield (shown, *[gr.skip()] * 8, f"running: 0 of {state['total']} {WHAT}", dict(state))

    def work(cancel: threading.Event, report: Callable[[int], None]) -> dict[str, Any]:
        out, before = {}, 0
        for name, m in models.items():
            rows = patching_rows(ex, m, pairs[name].clean.shape[1])
            out[name] = _run_model(m, pairs[name], rows, cancel, lambda done, b=before: report(b + done))
            before += units[name]
        return out

    t0 = time.perf_counter()
    results = yield from passes_in_worker(work, state, progress, "patching", 9, partial(ex.counters.add, "forwards"),
                                          what=WHAT, unit="units")
    seconds = time.perf_counter() - t0
    figs = figures(results)
    numbers = {"corrupted_prompt": corrupted, "seconds": seconds,
               "models": {name: {"key": models[name].source.key, "answer_id": p.answer, "wrong_id": p.wrong,
                                 "tokens": p.clean_tokens, **results[name]} for name, p in pairs.items()}}
    payload = Exportable("patching", {n: f for n, f in zip(FIGURES, figs) if f is not None}, numbers,
                         {"patching": csv_rows(results)})
    yield (shown, *figs, summary(results), numbers, payload,
           f"done: {state['total']} {WHAT} on {', '.join(results)} in {seconds:.2f} s", dict(state))



def figures(results: dict[str, dict[str, Any]]) -> list[Any]:
    """The five figures of :data:`FIGURES` (``topo_w`` None without a QTG model), each sized to its panel."""
    topo = {name: r["topo_w"] for name, r in results.items() if "topo_w" in r}
    return [fit(patching_heatmaps({n: r["resid"] for n, r in results.items()},
                                  "Residual stream patched at one block and position (1 = clean LD, 0 = corrupted)")),
            fit(patching_heatmaps({n: r["heads"] for n, r in results.items()},
                                  "Each head patched at every position (1 = clean LD, 0 = corrupted)")),
            fit(patching_heatmaps(topo, "The TopoFilter's w patched at one position (QTG only)")) if topo else None,
            fit(logit_attribution_heatmaps({n: r["dla"] for n, r in results.items()},
                                           "Direct logit attribution of each head on the clean prompt (logit units)")),
            fit(attribution_scatter({n: [(r["resid"], r["attribution_resid"]), (r["heads"], r["attribution_heads"])]
                                     for n, r in results.items()}))]


def _agreement(d: dict[str, Any]) -> str:
    a = d["agreement"]
    return f"r {a['pearson']:.3f}, top-{a['k']} overlap {a['top_k_overlap']:.0%}"


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row per model: LD clean and corrupted, attribution's agreement with real patching, and the direct
    logit attribution's terms summed against the model's own LD (equal: the decomposition is exact)."""
    rows = [[name, round(r["resid"]["clean_metric"], 4), round(r["resid"]["corrupt_metric"], 4),
             _agreement(r["attribution_resid"]), _agreement(r["attribution_heads"]),
             f"{r['dla']['total']:+.4f} / {r['dla']['logit']:+.4f}"] for name, r in results.items()]
    return {"headers": SUMMARY_HEADERS, "data": rows}


def csv_rows(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every value of every view, one row each (:data:`CSV_HEADERS`), for the CSV export."""
    rows = []
    for name, r in results.items():
        views = {k: v for k, v in r.items() if k != "dla"}
        views["dla"] = {"values": r["dla"]["heads"], "axes": ["block", "head"],
                        "labels": [list(map(str, range(len(r["dla"]["heads"])))),
                                   list(map(str, range(len(r["dla"]["heads"][0]))))]}
        for view, d in views.items():
            values = np.asarray(d["values"])
            for idx in np.ndindex(*values.shape):
                at = {axis: d["labels"][k][i] for k, (axis, i) in enumerate(zip(d["axes"], idx))}
                pos, _, token = at.get("position", "").partition(":")
                rows.append([name, view, at.get("block", ""), at.get("head", ""), pos, token, float(values[idx])])
    return {"headers": CSV_HEADERS, "data": rows}


def stopped(state: dict[str, Any] | None) -> str:
    done, total = (state or {}).get("done", 0), (state or {}).get("total", 0)
    return f"stopped after {done} of {total} {WHAT} (Stop pressed; the server computes no more)"


# --- the page ------------------------------------------------------------------------------------------------


def build(ex: Explorer, session: gr.State) -> None:
    lim = ex.limits
    gr.Markdown("Which activations carry the difference between a clean prompt and a corrupted one? Each unit (a "
                "block's residual stream at one position, a head, the TopoFilter's w at one position) is taken "
                "from the clean run into the corrupted one, and the logit difference LD = logit[answer] − "
                "logit[wrong] at the last position is read: 1 = the clean LD, 0 = the corrupted one. The loaded "
                "model and, beside it, its same-size baseline (when shipped), on one colour scale.")
    clean = gr.Textbox(label="clean prompt", lines=2, max_length=lim.max_text_chars, value=CLEAN,
                       elem_id="patching-clean")
    with gr.Row():
        corrupt_by = Radio(CORRUPT_BY, value=CORRUPT_BY[1], label="corrupt by", elem_id="patching-corrupt-by")
        word = gr.Textbox(label="word to replace (every whole-word occurrence)", value="son",
                          elem_id="patching-word")
        replacement = gr.Textbox(label="replacement", value="daughter", elem_id="patching-replacement")
    corrupted = gr.Textbox(label="corrupted prompt (corrupt by: corrupted prompt); as many tokens as the clean one",
                           lines=2, max_length=lim.max_text_chars, elem_id="patching-corrupted")
    with gr.Row():
        answer = gr.Textbox(label="answer: one token, as typed (mind the leading space)", value=" son",
                            elem_id="patching-answer")
        wrong = gr.Textbox(label="wrong token (optional): one token", value=" daughter", elem_id="patching-wrong")
        run_btn = gr.Button("Patch", variant="primary", elem_id="patching-btn")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="patching-stop")
    status = gr.Markdown(elem_id="patching-status")
    cut = gr.HTML(label="the prompts as the tokenizer cuts them", elem_id="patching-tokens")
    plots = [gr.Plot(label=name.replace("_", " "), elem_id=f"patching-{name.replace('_', '-')}") for name in FIGURES]
    table = gr.Dataframe(headers=SUMMARY_HEADERS, label="per model", interactive=False, elem_id="patching-table",
                         wrap=True)
    with gr.Accordion("numbers (every value, as the library gives them)", open=False):
        numbers = gr.JSON(label="numbers")
    payload, state = gr.State(None), gr.State(None)
    export_controls(ex, payload, "patching")

    def go(s, clean_prompt, corrupt_by, corrupted_prompt, word_to_replace, replacement, answer, wrong_token,
           progress=gr.Progress()):  # noqa: B008 - how Gradio asks for a progress bar
        # parameters named as their labels: what gradio_client shows a caller
        yield from patching(ex, s, clean_prompt, corrupt_by, corrupted_prompt, word_to_replace, replacement, answer,
                            wrong_token, progress=progress)

    evt = run_btn.click(user_facing(go, "patching"),
                        [session, clean, corrupt_by, corrupted, word, replacement, answer, wrong],
                        [cut, *plots, table, numbers, payload, status, state], api_name="patching",
                        concurrency_id="heavy")
    # Cancelling closes the generator on the server, which stops the worker; then the status says so.
    stop_btn.click(None, None, None, cancels=[evt], api_visibility="private").then(
        stopped, [state], [status], api_visibility="private", queue=False)
