"""The pretrained checkpoints that ship in assets/checkpoints/: present, small, offline, good.

These are not skipped when the files are missing: a missing shipped model is a bug."""

import json
from pathlib import Path

import pytest
import torch

import qtg
from qtg.data.pipeline import default_corpus_path, load_documents
from qtg.generate import generate
from qtg.model.checkpoint import SHIPPED_DIR
from qtg.model.loading import seed_groups, shipped_models
from qtg.training.evaluate import evaluate

# Held out of training by the default whole-work split (seed 0, 10% of bytes); see the model card.
HELD_OUT = "two_gentlemen_of_verona"


@pytest.fixture(scope="module")
def nano():
    return qtg.load("nano")


def test_nano_and_its_baseline_ship(nano):
    assert {"nano", "nano-baseline"} <= set(shipped_models())
    for name in ("nano", "nano-baseline"):
        size = (SHIPPED_DIR / name / "model.safetensors").stat().st_size
        assert size < 25 * 2**20, f"{name} is {size / 2**20:.1f} MB"
    assert (SHIPPED_DIR / "README.md").is_file()  # the model card


def test_tier_nano_means_the_shipped_weights(nano):
    assert nano.random_weights is False and nano.tokenizer is not None
    assert nano.cfg == qtg.get_tier("nano")
    assert all(torch.isfinite(p).all() for p in nano.parameters())
    base = qtg.load("nano-baseline")
    assert base.cfg.arch == "baseline" and base.tokenizer.to_str() == nano.tokenizer.to_str()


def test_the_held_out_work_was_not_trained_on():
    """The shipped run's split (configs/nano.yaml): HELD_OUT is a test work, neither trained nor chosen on."""
    from qtg.data.pipeline import split_documents
    from qtg.training.train_config import load_config

    data = load_config(Path(__file__).resolve().parents[1] / "configs" / "nano.yaml").data
    works = split_documents(load_documents(default_corpus_path()), val_fraction=data.val_fraction,
                            test_fraction=data.test_fraction, seed=data.split_seed)
    assert HELD_OUT in {d.name for d in works.test}


@pytest.mark.slow
def test_nano_is_well_under_three_bits_per_byte_on_a_held_out_work(nano):
    doc = next(d for d in load_documents(default_corpus_path()) if d.name == HELD_OUT)
    doc = type(doc)(doc.name, doc.text[:30_000])  # a slice keeps the test fast
    result = evaluate(nano, [doc], batch_size=16)
    assert result.bits_per_byte < 2.8, result


def test_shipped_nano_generates_the_same_greedy_text_with_and_without_cache(nano):
    from qtg.data.tokenizer import encode

    ids = torch.tensor([encode(nano.tokenizer, "ROMEO:\n")])
    a = generate(nano, ids, 30, temperature=0, use_cache=True)
    b = generate(nano, ids, 30, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    assert len(set(a[0, ids.shape[1]:].tolist())) > 3  # a trained model does not repeat one token


ABLATIONS = {  # name: what differs from nano's config (docs: the model card's ablation table)
    "nano-seed": dict(pos="none", learn_gamma=False, gamma_init=1.0),
    "nano-notopo": dict(topo_filter="off", lambda_topo=0.0),
    "nano-baseline-alibi": dict(arch="baseline", baseline_pos="alibi"),
    "nano-exact": dict(topo_filter="exact", topo_threshold=0.35),  # w from the exact causal s, trained so
    "nano-gate": dict(topo_filter="gate"),  # the one-bit "seen earlier" gate with a learnt weight, trained so
}


SEEDS = {  # a second draw of a recipe: only the name and the training seed differ (the split keeps seed 0)
    "nano-s1": ({}, 1),
    "nano-s2": ({}, 2),
    "nano-notopo-s1": (ABLATIONS["nano-notopo"], 1),
    "nano-notopo-s2": (ABLATIONS["nano-notopo"], 2),
    "nano-exact-s1": (ABLATIONS["nano-exact"], 1),
    "nano-exact-s2": (ABLATIONS["nano-exact"], 2),
    "nano-gate-s1": (ABLATIONS["nano-gate"], 1),
    "nano-gate-s2": (ABLATIONS["nano-gate"], 2),
    "nano-baseline-alibi-s1": (ABLATIONS["nano-baseline-alibi"], 1),
    "nano-baseline-alibi-s2": (ABLATIONS["nano-baseline-alibi"], 2),
}


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_the_seed_checkpoints_differ_from_their_recipe_only_in_the_seed(nano, name):
    changes, seed = SEEDS[name]
    model = qtg.load(name)
    assert model.cfg == qtg.get_tier("nano").replace(name=name, **changes)
    assert model.tokenizer.to_str() == nano.tokenizer.to_str()
    training = json.loads((SHIPPED_DIR / name / "state.json").read_text())["train_config"]
    assert training["training"]["seed"] == seed and training["data"]["split_seed"] == 0
    assert training["training"]["steps"] == 2400 and training["data"]["tokenizer"].endswith("nano/tokenizer.json")
    other = next(p for p in qtg.load(name.rsplit("-s", 1)[0]).parameters())
    assert not torch.equal(next(model.parameters()), other)  # another run, not a copy


def test_seed_groups_put_each_shipped_seed_under_its_recipe():
    groups = seed_groups()
    for name in SEEDS:
        recipe = name.rsplit("-s", 1)[0]
        assert name in groups[recipe] and groups[recipe][0] == recipe and name not in groups
    assert all(len(g) == 1 for r, g in groups.items() if r not in {n.rsplit("-s", 1)[0] for n in SEEDS})
    # a suffix is a seed only under a recipe that is there; seeds in numeric order
    assert seed_groups(["a-s10", "a", "a-s2", "b-s1", "a-s0"]) == {"a": ["a", "a-s2", "a-s10"], "a-s0": ["a-s0"],
                                                                   "b-s1": ["b-s1"]}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_the_ablation_checkpoints_ship_and_differ_from_nano_only_where_named(nano, name):
    model = qtg.load(name)
    assert model.random_weights is False and model.checkpoint_dir == SHIPPED_DIR / name
    assert model.cfg == qtg.get_tier("nano").replace(name=name, **ABLATIONS[name])
    assert model.tokenizer.to_str() == nano.tokenizer.to_str()  # same tokens: windows pair up
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # stored in bf16, computed in float32
    assert (SHIPPED_DIR / name / "model.safetensors").stat().st_size < 4 * 2**20


def test_nano_notopo_weights_every_token_one(nano):
    """nano-notopo's own TopoFilter weight is 1 everywhere; topo=exact still applies the exact filter to it."""
    model = qtg.load("nano-notopo")
    ids = torch.tensor([[5, 6, 7, 5, 9, 10, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).topo_weights, torch.ones(1, 7))
        exact = model(ids, intervene=qtg.Intervention(topo="exact")).topo_weights
    assert exact[0, 3] == 1.0 and bool((exact < 1).any())  # a repeat keeps w = 1, novel tokens are filtered
