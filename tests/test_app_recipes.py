"""The Experiment tab's retrained recipes: its numbers are ``qtg.experiments.compare_models``'s on every seed of
each recipe, each bad field is refused in one line naming it before any work, Stop cancels it on the server,
and ``/recipes`` answers over HTTP. The Chromium test is in ``tests/test_app_browser_experiment.py``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace

import pytest

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")

import gradio as gr  # noqa: E402

import qtg  # noqa: E402
from app.errors import user_facing  # noqa: E402
from app.tabs import experiment_recipes as recipes  # noqa: E402
from qtg.experiments import compare_models, prepare  # noqa: E402
from qtg.experiments.heldout import heldout_documents  # noqa: E402
from qtg.model.loading import seed_groups  # noqa: E402
from tests.app_fixtures import (  # noqa: E402, F401
    close_after_first_pass,
    count_after_cancel,
    ex_fixture,
    nano_fixture,
)
from tests.test_app_server import client, server  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_recipes_are_compare_models_on_every_seed_of_each(ex, nano):
    table, fig, status, numbers, payload, state = list(recipes.run_recipes(ex, None, "nano", ["nano-notopo"], 4,
                                                                           1))[-1]
    groups = seed_groups()
    corpus = prepare(nano.model, heldout_documents(nano.model), max_windows=4, seed=1)
    ref = compare_models({r: {n: qtg.load(n).eval() for n in groups[r]} for r in ("nano", "nano-notopo")}, corpus,
                         seed=1)
    assert [s["name"] for s in numbers["recipes"]] == ["nano", "nano-notopo"]
    for mine, theirs in zip(numbers["recipes"], (s.to_dict() for s in ref)):
        assert mine["seeds"] == theirs["seeds"] and len(mine["seeds"]) == len(groups[mine["name"]]) > 1
        for key in ("bits_per_byte", "seed_bits_per_byte", "delta_bits_per_byte", "ci95", "ci95_works", "per_work"):
            assert mine[key] == (None if theirs[key] is None else pytest.approx(theirs[key], rel=1e-9)), key
    notopo = numbers["recipes"][1]
    assert notopo["n_seeds"] == [len(groups["nano-notopo"]), len(groups["nano"])] and "seeds" in notopo["works_method"]
    assert table["data"][0][-1] == "reference" and table["data"][1][0] == "nano-notopo"
    assert table["data"][1][recipes.RECIPE_HEADERS.index("verdict (across works and seeds)")] == notopo["verdict"]
    assert table["data"][1][2].startswith(f"{notopo['bits_per_byte']:.4f} (")  # the mean, then each seed
    dots = next(tr for tr in fig.data if tr.name == "each work")
    assert sorted(dots.x) == pytest.approx(sorted(notopo["per_work"].values()))
    n_checkpoints = len(groups["nano"]) + len(groups["nano-notopo"])
    assert state["done"] == state["total"] == 4 * n_checkpoints
    assert status.startswith("done: 4 windows") and f"nano-notopo {len(groups['nano-notopo'])}" in status
    assert ex.registry.loaded() == [(nano.source.key, "cpu")]  # the checkpoints were read beside the cache


@pytest.mark.parametrize("changed, message", [
    (dict(reference="nope"), r"^reference: unknown recipe 'nope'; choose one of nano, "),
    (dict(others=["nano-notopo", "x"]), r"^recipes: unknown 'x'; choose among nano, "),
    (dict(others=[]), "^recipes: nothing to compare with nano; tick at least one other recipe$"),
    (dict(others=["nano"]), "^recipes: nothing to compare with nano"),
    (dict(others=None), "^recipes: expected a list of recipe names, got 'None'$"),
    (dict(windows=0), "^windows: 0 is below the minimum 1$"),
    (dict(windows="many"), "^windows: expected a whole number, got 'many'$"),
    (dict(seed=-1), "^seed: -1 is below the minimum 0$"),
])
def test_recipes_refuse_each_bad_field_before_any_work(ex, changed, message):
    before = ex.counters.forwards
    args = {"reference": "nano", "others": ["nano-notopo"], "windows": 4, "seed": 0, **changed}
    with pytest.raises(gr.Error) as err:
        list(user_facing(recipes.run_recipes)(ex, None, **args))
    assert re.search(message, err.value.message), err.value.message
    assert ex.counters.forwards == before


def test_recipes_refuse_checkpoints_that_do_not_fit_the_memory_budget(ex):
    tight = copy.copy(ex)
    tight.limits = replace(ex.limits, memory_budget=2**20)
    with pytest.raises(gr.Error) as err:
        list(user_facing(recipes.run_recipes)(tight, None, "nano", ["nano-notopo"], 4, 0))
    n = len(seed_groups()["nano"]) + len(seed_groups()["nano-notopo"])
    assert re.search(rf"^recipes: the {n} checkpoints need [\d.]+ MiB of weights, 1\.0 MiB is available; choose "
                     "fewer recipes$", err.value.message), err.value.message


def test_closing_the_recipes_run_cancels_it_on_the_server(ex):
    run = recipes.run_recipes(ex, None, "nano", ["nano-notopo", "nano-gate"], 400, 0)
    assert close_after_first_pass(ex, run, "experiment-recipes") < 10  # 400 had it run to the end


@pytest.mark.slow
def test_recipes_endpoint_answers_equals_the_handler_and_stops(server):  # noqa: F811
    ex, url = server
    c = client(url)
    table, _, status, numbers = c.predict("nano", ["nano-gate"], 2, 0, api_name="/recipes")
    ref = list(recipes.run_recipes(ex, None, "nano", ["nano-gate"], 2, 0))[-1][3]
    assert numbers["recipes"][1]["ci95_works"] == pytest.approx(ref["recipes"][1]["ci95_works"], rel=1e-12)
    assert [r[0] for r in table["data"]] == ["nano", "nano-gate"] and status.startswith("done: 2 windows")
    files, message = c.predict(api_name="/export_recipes")
    assert message.startswith("Wrote") and any(f.endswith("numbers.json") for f in files)
    with pytest.raises(Exception) as err:
        c.predict("nano", ["nano"], 2, 0, api_name="/recipes")
    assert str(err.value).startswith("recipes: nothing to compare with nano")
    before = ex.counters.forwards
    job = c.submit("nano", ["nano-notopo", "nano-gate"], 400, 0, api_name="/recipes")
    at_stop = count_after_cancel(job, lambda: ex.counters.forwards != before, lambda: ex.counters.forwards,
                                 "the recipes run", settle_s=5.0)
    assert 0 < at_stop - before < 100  # forward passes of 8 windows: 400 had it run to the end
