"""``qtg compare`` and ``qtg.experiments.compare_models`` with seeds: models side by side on the same windows,
each model the mean of its seeds, the difference per work and across works and seeds.

Seeds are micro checkpoints built with different seeds (random weights: their spread is run-to-run
variation at its largest), all carrying the small BPE of ``tiny_checkpoint``; the works are three short
generated ones (a few windows each).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import qtg
from qtg import experiments as ex
from qtg.cli import main
from qtg.data.documents import load_documents
from qtg.experiments import works as wk
from qtg.model.checkpoint import save_checkpoint
from qtg.model.loading import seed_groups
from qtg.training.evaluate import evaluate
from tests.conftest import write_works

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def seeds(tiny_checkpoint, tmp_path_factory):
    """{"qtg": [3 checkpoint dirs], "base": [2]}: micro QTG seeds 0 (tiny_checkpoint), 1, 2 and baseline seeds 0, 1."""
    tok = qtg.load(tiny_checkpoint).tokenizer.to_str()
    root = tmp_path_factory.mktemp("seeds")
    out = {"qtg": [tiny_checkpoint], "base": []}
    for s in (1, 2):
        out["qtg"].append(save_checkpoint(qtg.build("micro", seed=s), root / f"qtg-s{s}", tokenizer_json=tok))
    for s in (0, 1):
        out["base"].append(save_checkpoint(qtg.build(qtg.get_tier("micro").replace(arch="baseline"), seed=s),
                                           root / f"base-s{s}", tokenizer_json=tok))
    return {k: [str(p) for p in v] for k, v in out.items()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Three generated works of ~0.7 KB (``work0.txt`` ...)."""
    return write_works(tmp_path_factory.mktemp("works"), n_lines=25)


def _bpb(path: str, docs) -> float:
    return evaluate(qtg.load(path).eval(), docs).bits_per_byte


def test_compare_json_holds_each_model_its_seeds_and_the_difference_per_work(seeds, data_dir, capsys):
    code = main(["compare", "--model", ",".join(seeds["qtg"]), "--model", ",".join(seeds["base"]), "--data",
                 str(data_dir), "--device", "cpu", "--resamples", "500", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and len(out.strip().splitlines()) == 1
    ref, base = json.loads(out)["models"]
    assert [ref["name"], base["name"]] == [seeds["qtg"][0], seeds["base"][0]]
    assert ref["seeds"] == seeds["qtg"] and base["seeds"] == seeds["base"]
    docs = load_documents(data_dir)
    # each seed's own figure is qtg eval's; a model's is the mean over its seeds
    for m, paths in ((ref, seeds["qtg"]), (base, seeds["base"])):
        assert m["seed_bits_per_byte"] == pytest.approx([_bpb(p, docs) for p in paths], abs=1e-6)
        assert m["bits_per_byte"] == pytest.approx(np.mean(m["seed_bits_per_byte"]), abs=1e-9)
        assert m["n_works"] == 3
    assert ref["delta_bits_per_byte"] is None and ref["ci95"] is None and ref["ci95_works"] is None
    assert base["delta_bits_per_byte"] == pytest.approx(base["bits_per_byte"] - ref["bits_per_byte"], abs=1e-9)
    # per work: the seed means' difference on that work alone
    for doc in docs:
        expected = (np.mean([_bpb(p, [doc]) for p in seeds["base"]]) - np.mean([_bpb(p, [doc]) for p in seeds["qtg"]]))
        assert base["per_work"][doc.name] == pytest.approx(expected, abs=1e-6)
    # three works and several seeds: the t-interval over works, widened by the seeds' spread
    assert base["works_method"] == wk.T_WORKS_SEEDS and base["n_seeds"] == [2, 3]
    assert base["works_estimate"] == pytest.approx(np.mean(list(base["per_work"].values())))
    low, high = base["ci95_works"]
    assert low < base["works_estimate"] < high
    # run-to-run variation (random seeds) dwarfs the window-to-window noise of one pair of runs
    assert high - low > 3 * (base["ci95"][1] - base["ci95"][0])
    assert base["verdict"] == ex.verdict(ex.Interval(0.0, low, high, 0.95, 3, 0, 0))


def test_compare_table_names_the_reference_the_intervals_and_each_work(seeds, data_dir, capsys):
    code = main(["compare", "--model", seeds["qtg"][0], "--model", seeds["qtg"][1], "--model", seeds["base"][0],
                 "--data", str(data_dir), "--device", "cpu", "--resamples", "300", "--max-windows", "12"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"Reference {seeds['qtg'][0]}; 3 works;" in out and "across the 3 works (t-interval over works)" in out
    table, per_work = out.split("minus " + seeds["qtg"][0] + " in each work:")
    rows = {line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0] in seeds["qtg"]
            + seeds["base"]}
    assert rows[seeds["qtg"][0]].rstrip().endswith("reference")
    for name in (seeds["qtg"][1], seeds["base"][0]):
        assert rows[name].rstrip().endswith(("better", "worse")) or "no difference detected (± " in rows[name]
    assert per_work.split()[:3] == ["work0", "work1", "work2"] and "the same" not in out


def test_compare_models_takes_seeds_as_a_list_or_a_mapping(seeds, data_dir):
    models = [qtg.load(p).eval() for p in seeds["qtg"][:2]]
    docs = load_documents(data_dir)
    by_list = ex.compare_models({"a": models[0], "b": models}, docs, max_windows=12, resamples=200)
    by_map = ex.compare_models({"a": models[0], "b": {"s0": models[0], "s1": models[1]}}, docs, max_windows=12,
                               resamples=200)
    assert by_list[1].seeds == ("b[0]", "b[1]") and by_map[1].seeds == ("s0", "s1")
    assert by_list[1].to_dict()["per_work"] == by_map[1].to_dict()["per_work"]
    # b's first seed is a itself: the seed mean's difference is half the second seed's
    alone = ex.compare_models({"a": models[0], "s1": models[1]}, docs, max_windows=12, resamples=200)[1]
    assert by_map[1].delta_bits_per_byte.estimate == pytest.approx(alone.delta_bits_per_byte.estimate / 2)


def test_compare_models_counts_every_pass_and_stops_at_the_next_one_when_cancelled(seeds, data_dir):
    models = {"a": [qtg.load(p).eval() for p in seeds["qtg"]], "b": qtg.load(seeds["base"][0]).eval()}
    docs = load_documents(data_dir)
    total = 4 * len(ex.prepare(models["b"], docs, max_windows=6).windows)  # windows x 4 checkpoints
    seen = []
    ex.compare_models(models, docs, max_windows=6, batch_size=2, resamples=50, on_progress=lambda *a: seen.append(a))
    assert seen[-1] == (total, total) and all(later[0] > earlier[0] for earlier, later in zip(seen, seen[1:]))
    cancel, passes = threading.Event(), []

    def first_pass_then_stop(done: int, _: int) -> None:
        passes.append(done)
        cancel.set()

    with pytest.raises(ex.ExperimentCancelled):
        ex.compare_models(models, docs, max_windows=6, batch_size=2, resamples=50, cancel=cancel,
                          on_progress=first_pass_then_stop)
    assert passes == [2]  # the pass under way finished, no other started


def test_compare_models_on_a_corpus_already_cut_checks_each_model_cuts_it_alike(seeds, data_dir):
    first, second = (qtg.load(p).eval() for p in seeds["qtg"][:2])
    docs = load_documents(data_dir)
    corpus = ex.prepare(first, docs, max_windows=6)
    on_corpus = ex.compare_models({"a": first, "b": second}, corpus, resamples=50)[1].to_dict()
    on_texts = ex.compare_models({"a": first, "b": second}, docs, max_windows=6, resamples=50)[1].to_dict()
    assert on_corpus["per_work"] == on_texts["per_work"] and on_corpus["ci95"] == on_texts["ci95"]
    longer = qtg.build(qtg.get_tier("micro").replace(max_seq_len=64), seed=0)
    longer.tokenizer = first.tokenizer
    other_tokens = qtg.build("micro", seed=0)  # no tokenizer: another cut of the text
    for model in (longer, other_tokens):
        with pytest.raises(ex.ExperimentError, match="cuts the text into other windows"):
            ex.compare_models({"a": first, "b": model.eval()}, corpus, resamples=50)


def test_compare_with_seeds_brings_each_shipped_recipe_s_seeds(data_dir, capsys):
    code = main(["compare", "--model", "nano", "--model", "nano-notopo", "--model", "nano-s1", "--seeds", "--data",
                 str(data_dir), "--max-windows", "2", "--resamples", "50", "--device", "cpu", "--json"])
    out = json.loads(capsys.readouterr().out)
    groups = seed_groups()
    assert code == 0
    assert [m["seeds"] for m in out["models"]] == [groups["nano"], groups["nano-notopo"], ["nano-s1"]]
    assert len(groups["nano"]) > 1  # a seed named alone stays alone: it is no recipe


@pytest.mark.parametrize("models, message", [
    (["no-such-model"], "--model 'no-such-model' is neither a shipped model"),
    (["nano,,nano-baseline"], "--model 'nano,,nano-baseline': an empty name in the list"),
    (["nano", "nano"], "--model 'nano' is given twice"),
    (["nano,nano"], "--model 'nano,nano': a seed is named twice"),
])
def test_compare_refuses_bad_models_in_one_line_before_loading(data_dir, capsys, models, message):
    args = [a for m in models for a in ("--model", m)]
    code = main(["compare", *args, "--data", str(data_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_compare_refuses_models_that_cut_other_windows(seeds, tmp_path, data_dir, capsys):
    tok = qtg.load(seeds["qtg"][0]).tokenizer.to_str()
    longer = save_checkpoint(qtg.build(qtg.get_tier("micro").replace(max_seq_len=64), seed=0), tmp_path / "short",
                             tokenizer_json=tok)
    code = main(["compare", "--model", seeds["qtg"][0], "--model", str(longer), "--data", str(data_dir),
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cuts the text into other windows" in err and len(err.splitlines()) == 1
