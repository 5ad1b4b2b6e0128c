"""The Experiment tab's retrained recipes: shipped checkpoints side by side, each with all its seeds.

* ``/recipes`` - each chosen recipe (a shipped checkpoint and its other training seeds, ``nano``, ``nano-s1``,
  ``nano-s2``: :func:`qtg.model.loading.seed_groups`) scored on the same seeded draw of windows of the
  reference's held-out works (:func:`qtg.experiments.compare_models`), the reference first: each recipe's
  bits/byte (the mean over its seeds, and each seed's), its change against the reference paired over windows
  (these texts), its change in each work, and its interval across works and seeds, the one the verdict
  reads; a table and a forest plot with a dot per work.

The checkpoints are read for the run and let go after it, beside the model cache the other tabs share (a
comparison of seven recipes would evict every loaded model). The run goes in a worker thread, as the sweep's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import gradio as gr

from app.core import Explorer, Session, as_int
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError
from app.tabs.common import Number, fit
from app.tabs.experiment_runs import MAX_SEED, section_outputs, wire
from app.worker import passes_in_worker
from qtg.experiments import compare_models, prepare
from qtg.experiments.bootstrap import format_ci
from qtg.experiments.heldout import heldout_documents
from qtg.model.loading import load, locate, seed_groups
from qtg.model.memory import human_bytes, memory_estimate
from qtg.plots.experiment import forest_plot, forest_rows

RECIPE_HEADERS = ["recipe", "seeds", "bits/byte (each seed)", "Δ bits/byte, these texts [95% CI]",
                  "Δ bits/byte across works and seeds [95% CI]", "verdict (across works and seeds)"]
RECIPE_WIDTHS = ["14%", "6%", "22%", "19%", "21%", "18%"]
# the questions the shipped recipes were trained to answer, against nano
DEFAULT_REFERENCE = "nano"
DEFAULT_OTHERS = ("nano-notopo", "nano-exact", "nano-gate")
DEFAULT_WINDOWS = 24


def recipe_label(recipe: str, seeds: list[str]) -> str:
    return f"{recipe} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"


def chosen_recipes(reference: Any, others: Any, groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """``{recipe: its seeds}``, the reference first, each other recipe once (the reference among them is
    dropped); anything not shipped is refused by name."""
    if not isinstance(reference, str) or reference not in groups:
        raise AppInputError(f"reference: unknown recipe {str(reference)[:100]!r}; choose one of "
                            f"{', '.join(groups)}")
    if isinstance(others, str):
        others = [others]
    if others is None or not isinstance(others, (list, tuple)) or not all(isinstance(o, str) for o in others):
        raise AppInputError(f"recipes: expected a list of recipe names, got {str(others)[:100]!r}")
    unknown = [o for o in others if o not in groups]
    if unknown:
        raise AppInputError(f"recipes: unknown {', '.join(repr(o[:100]) for o in unknown[:3])}; choose among "
                            f"{', '.join(groups)}")
    rest = [o for o in dict.fromkeys(others) if o != reference]
    if not rest:
        raise AppInputError(f"recipes: nothing to compare with {reference}; tick at least one other recipe")
    return {r: groups[r] for r in [reference, *rest]}


def check_weights_fit(ex: Explorer, recipes: dict[str, list[str]], device: str) -> None:
    """Every checkpoint of the run is held at once: refuse, with needed against available, what does not fit."""
    need = sum(memory_estimate(locate(name).cfg, "fp32", "inference").weights
               for seeds in recipes.values() for name in seeds)
    budget = ex.memory_budget(device)
    if need > budget:
        n = sum(map(len, recipes.values()))
        raise AppInputError(f"recipes: the {n} checkpoints need {human_bytes(need)} of weights, "
                            f"{human_bytes(budget)} is available; choose fewer recipes")


def recipes_table(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """``ModelScore.to_dict()`` of each recipe as rows, the reference first."""
    rows = []
    for i, s in enumerate(scores):
        each = ", ".join(f"{v:.4f}" for v in s["seed_bits_per_byte"])
        bpb = f"{s['bits_per_byte']:.4f} ({each})" if len(s["seeds"]) > 1 else f"{s['bits_per_byte']:.4f}"
        if i == 0:
            rows.append([s["name"], len(s["seeds"]), bpb, "-", "-", "reference"])
        else:
            rows.append([s["name"], len(s["seeds"]), bpb, format_ci(s["delta_bits_per_byte"], s["ci95"], sign=True),
                         format_ci(s["works_estimate"], s["ci95_works"], sign=True), s["verdict"]])
    return {"headers": RECIPE_HEADERS, "data": rows}


def run_recipes(ex: Explorer, session: Session | None, reference: Any = DEFAULT_REFERENCE,
                others: Any = DEFAULT_OTHERS, windows: Any = DEFAULT_WINDOWS, seed: Any = 0,
                progress: Any = None) -> Iterator[tuple]:
    """Yields (table, forest plot, status, numbers, payload, progress state), as the sweep: progress while the
    checkpoints are scored, then the result. Closing the generator (Stop) cancels the run on the server."""
    session = session or ex.new_session()
    if ex.registry.pinned is not None:
        raise AppInputError("recipes: this server holds one sharded model only (torchrun); run `qtg compare` instead")
    recipes = chosen_recipes(reference, others, seed_groups())
    lim = ex.limits
    n = as_int(windows if windows not in (None, "") else DEFAULT_WINDOWS, "windows", 1, lim.max_sweep_windows)
    sd = as_int(seed if seed not in (None, "") else 0, "seed", 0, MAX_SEED)
    check_weights_fit(ex, recipes, session.device)
    first = load(recipes[reference][0], device=session.device).eval()
    docs = heldout_documents(first, "test")
    corpus = prepare(first, docs, max_windows=n, seed=sd)
    state = {"done": 0, "total": len(corpus.windows) * sum(map(len, recipes.values()))}

    def work(cancel: threading.Event, report: Callable[[int], None]) -> Any:
        models = {r: {name: first if name == recipes[reference][0] else load(name, device=session.device).eval()
                      for name in seeds} for r, seeds in recipes.items()}
        return compare_models(models, corpus, seed=sd, cancel=cancel, on_progress=lambda done, _: report(done))

    found = yield from passes_in_worker(work, state, progress, "experiment-recipes", 2,
                                        partial(ex.counters.add, "forwards"), after=2)
    scores = [s.to_dict() for s in found]
    rest = scores[1:]
    numbers = {"split": {"name": "test", "documents": [d.name for d in docs]}, "corpus": corpus.summary(),
               "seed": sd, "reference": reference, "recipes": scores}
    fig = fit(forest_plot(forest_rows(rest), f"Δ bits/byte against {reference}",
                          f"Retrained recipes against {reference} on {len(corpus.windows)} windows of the held-out "
                          "works: Δ bits/byte, 95% CI"))
    seeds = ", ".join(f"{s['name']} {len(s['seeds'])}" for s in scores)
    status = (f"done: {len(corpus.windows)} windows of the held-out works ({', '.join(d.name for d in docs)}), "
              f"scored by every seed of each recipe (seeds: {seeds}); a recipe's figure is the mean over its seeds. "
              f"Paired bootstrap 95% CI over windows (these texts) and a 95% interval across the {rest[0]['n_works']} "
              f"works and the seeds ({rest[0]['works_method']}), which the verdict reads.")
    yield recipes_table(scores), fig, status, numbers, Exportable("recipes", {"forest": fig}, numbers), dict(state)


def build(ex: Explorer, session: gr.State) -> None:
    """The retrained-recipes section of the Experiment tab."""
    groups = seed_groups()
    if ex.registry.pinned is not None or len(groups) < 2:
        return  # nothing to put side by side
    choices = [(recipe_label(r, seeds), r) for r, seeds in groups.items()]
    gr.Markdown("**Retrained recipes.** Shipped checkpoints trained like nano with one thing changed, each recipe "
                "with all its training seeds (`nano`, `nano-s1`, `nano-s2`), on the same windows of the held-out "
                "works. A recipe's figure is the mean over its seeds; its interval across works also resamples the "
                "seeds, since a retrained model is one draw among runs. The verdict reads that interval.")
    with gr.Row():
        reference = gr.Dropdown(choices=choices, value=DEFAULT_REFERENCE if DEFAULT_REFERENCE in groups else
                                choices[0][1], label="reference (a recipe)", elem_id="recipes-reference", scale=1)
        others = gr.CheckboxGroup(choices=choices, value=[r for r in DEFAULT_OTHERS if r in groups],
                                  label="recipes (against the reference)", elem_id="recipes-others", scale=3)
    with gr.Row():
        windows = Number(value=DEFAULT_WINDOWS, precision=0, elem_id="recipes-windows",
                         label=f"windows (up to {ex.limits.max_sweep_windows}; each seed scores every one)")
        seed = Number(value=0, precision=0, label="seed (window draw and bootstrap)", elem_id="recipes-seed")
        go_btn = gr.Button("Compare recipes", variant="primary", elem_id="recipes-btn")
        stop = gr.Button("Stop", variant="stop", elem_id="recipes-stop")
    outputs = section_outputs(ex, "recipes", RECIPE_HEADERS, "recipes, the reference first", RECIPE_WIDTHS)

    def compare(s, reference, recipes, windows, seed, progress=gr.Progress()):  # noqa: B008
        yield from run_recipes(ex, s, reference, recipes, windows, seed, progress=progress)

    wire(go_btn, stop, user_facing(compare, "recipes"), [session, reference, others, windows, seed], outputs,
         "recipes")
