"""One declared model interface (issue 25): QTG, the baseline and the lockstep handle are each a
``LanguageModel``, and nothing outside ``qtg/model`` reaches into a model or sniffs one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import qtg
from qtg.distributed.lockstep import Lockstep
from qtg.distributed.world import World
from qtg.model.protocol import LanguageModel
from qtg.model.tiers import baseline_of

ROOT = Path(__file__).resolve().parents[1]
INTERNALS = {"embed", "topo", "blocks"}  # a model's modules: only qtg/model may touch them
MODEL_TYPES = {"LanguageModel", "DecoderLM", "QTG", "Baseline", "Lockstep"}


@pytest.fixture(scope="module")
def baseline(micro_cfg) -> qtg.QTG:
    return qtg.build(baseline_of(micro_cfg), seed=0).eval()


@pytest.fixture(scope="module")
def lockstep(micro) -> Lockstep:
    return Lockstep(micro, World(device=torch.device("cpu")))  # one process: every broadcast is the identity


def test_the_model_the_baseline_and_the_lockstep_handle_are_language_models(micro, baseline, lockstep):
    for model in (micro, baseline, lockstep):
        assert isinstance(model, LanguageModel), type(model).__name__
    assert not isinstance(object(), LanguageModel)
    assert micro.keeps_cache and baseline.keeps_cache and not lockstep.keeps_cache
    assert (micro.has_topofilter, baseline.has_topofilter, lockstep.has_topofilter) == (True, False, True)


def test_the_lockstep_handle_answers_as_the_model_does(micro, lockstep, ids):
    """No attribute forwarding: each member is the handle's own, and gives the model's numbers."""
    assert "__getattr__" not in vars(Lockstep)
    with torch.no_grad():
        psi = micro.embed_points(ids)
        torch.testing.assert_close(lockstep.embed_points(ids), psi, rtol=0, atol=0)
        own, theirs = micro.topo_scores(psi, ids=ids), lockstep.topo_scores(psi, ids=ids)
        for a, b in ((own.soft, theirs.soft), (own.exact, theirs.exact), (own.weights, theirs.weights)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        x = torch.randn(2, 3, micro.cfg.width)
        torch.testing.assert_close(lockstep.unembedding(), micro.unembedding(), rtol=0, atol=0)
        torch.testing.assert_close(lockstep.final_norm(x), micro.final_norm(x), rtol=0, atol=0)
        torch.testing.assert_close(lockstep.final_scale(x), micro.final_scale(x), rtol=0, atol=0)
        torch.testing.assert_close(lockstep.head_writers(1), micro.head_writers(1), rtol=0, atol=0)
        torch.testing.assert_close(lockstep.attention_projection(0, "keys", x),
                                   micro.attention_projection(0, "keys", x), rtol=0, atol=0)
        out, acts = lockstep.run_with_cache(ids, ["blocks.0.resid_post"])
        ref, ref_acts = micro.run_with_cache(ids, ["blocks.0.resid_post"])
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    assert list(acts) == ["blocks.0.resid_post"]
    torch.testing.assert_close(acts["blocks.0.resid_post"], ref_acts["blocks.0.resid_post"], rtol=0, atol=0)
    assert (lockstep.cfg, lockstep.arch, lockstep.state_names) == (micro.cfg, micro.arch, micro.state_names)
    with pytest.raises(ValueError, match="no decoding cache"):
        lockstep(ids, cache=qtg.QTGCache())


def test_a_model_without_a_topofilter_says_so(baseline, ids):
    for call in (lambda: baseline.embed_points(ids), lambda: baseline.topo_scores(torch.zeros(1, 2, 8))):
        with pytest.raises(TypeError, match="has no TopoFilter"):
            call()


# --- nothing outside qtg/model reaches into a model ------------------------------------------------------


def _names_model(node: ast.expr, typed: set[str]) -> bool:
    """Whether ``node`` names a model: ``model``, ``self.model``, ``loaded.model``, ``base_model``, ... or a
    parameter annotated with a model type."""
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
    return name is not None and ("model" in name.lower() or name in typed)


def _words(annotation: ast.expr) -> set[str]:
    """The type names an annotation mentions (``LanguageModel | None``, ``"QTG"``, ``qtg.QTG``)."""
    words = set()
    for n in ast.walk(annotation):
        if isinstance(n, ast.Name):
            words.add(n.id)
        elif isinstance(n, ast.Attribute):
            words.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            words.update(n.value.replace("|", " ").replace(".", " ").split())
    return words


def _typed_models(tree: ast.AST) -> set[str]:
    """Parameter names annotated with a model type anywhere in the module (``model: LanguageModel``, ...)."""
    return {arg.arg for arg in ast.walk(tree)
            if isinstance(arg, ast.arg) and arg.annotation is not None and MODEL_TYPES & _words(arg.annotation)}


def reaches_into_models(source: str) -> list[tuple[int, str]]:
    """(line, what) for each ``<model>.embed/.topo/.blocks`` and each ``hasattr(<model>, ...)`` /
    ``getattr(<model>, ...)`` in ``source``."""
    tree = ast.parse(source)
    typed = _typed_models(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in INTERNALS and _names_model(node.value, typed):
            found.append((node.lineno, f"{ast.unparse(node)}"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
              and node.args and _names_model(node.args[0], typed)):
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_the_checker_flags_reaching_in_and_sniffing_and_nothing_else():
    source = '''
def f(model, loaded, req, event, args, x, net: "LanguageModel", other: DecoderLM):
    a = model.embed(ids)
    b = loaded.model.topo(psi, past)
    c = hasattr(model, "topo")
    d = getattr(loaded.model, "lockstep", False)
    e = net.blocks[0]
    g = other.embed.weight
    fine = (req.topo, event.topo, self.embed, x.blocks, model.embed_points(ids), model.topo_scores(psi))
    also_fine = (getattr(args, "model", None), hasattr(x, "detach"), model.cfg.n_layers)
'''
    found = reaches_into_models(source)
    assert [line for line, _ in found] == [3, 4, 5, 6, 7, 8], found


def test_nothing_outside_the_model_package_reaches_into_a_model():
    files = [p for p in sorted((ROOT / "qtg").rglob("*.py")) if "model" not in p.relative_to(ROOT / "qtg").parts[:1]]
    files += sorted((ROOT / "app").rglob("*.py"))
    assert len(files) > 50 and not any(p.is_relative_to(ROOT / "qtg" / "model") for p in files)
    offences = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in files
                for line, what in reaches_into_models(p.read_text(encoding="utf-8"))]
    assert offences == [], "\n".join(offences)
