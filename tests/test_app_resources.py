"""What a model or a request holds in the app, and when it lets go (issue 23).

* Unload after Generate frees the model: no reference to it survives (``weakref`` + ``gc``), and the
  decoding engine's thread, which held it, has ended. The same when the cache evicts a model.
  (The real 7b figures come from ``benchmarks/bench_app_memory.py unload``: micro shows the mechanism.)
* A tier loaded with random weights takes its tokenizer's vocabulary: every token it samples decodes to text
  (``base`` here: the same 30,000 ids as 7b against the shipped tokenizer's 2,048).
* A request's memory check counts all it holds: a topology view's copies and matrices beside the states, and
  the baseline whose view the attention tabs hold beside the model's. (7b's figures:
  ``benchmarks/bench_app_memory.py topology``.)
* The Topology tab's time budget bounds all the request's topology work, both engines and H0 included, is set
  per request, and Stop ends the work on the server; refusals name the tab's controls.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import threading
import time
import weakref

import pytest

import qtg

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")

from app.config import AppConfig, Limits  # noqa: E402
from app.core import Explorer, Session  # noqa: E402
from app.models import AppInputError  # noqa: E402
from app.tabs import attention, generate, tiers, topology  # noqa: E402
from qtg.data.tokenizer import decode  # noqa: E402
from qtg.model.views import view_memory  # noqa: E402
from qtg.topology import BudgetExceeded, backends  # noqa: E402
from tests.app_fixtures import ex_fixture, nano_fixture  # noqa: E402,F401 - fixtures "ex" and "nano"

pytestmark = pytest.mark.usefixtures("one_thread")
MICRO = "tier:micro"


def load(ex: Explorer, key: str, session: Session | None = None) -> Session:
    """The Load button's handler, to its end; the session it leaves."""
    for _, update in tiers.load_model(ex, session or ex.new_session(), key, "cpu"):
        session = update if isinstance(update, Session) else session
    return session


def generate_some(ex: Explorer, session: Session, n: int = 8) -> str:
    *_, last = generate.generate(ex, session, "ROMEO:", n, 0, 0, 1, -1)
    return last[3]  # the status line


def engine_thread(ex: Explorer, session: Session):
    return ex.engine(ex.current(session))._thread


def test_unload_after_generate_lets_the_model_and_its_engine_thread_go(ex):
    session = load(ex, MICRO)
    model = weakref.ref(ex.current(session).model)
    assert "done: 8 new tokens" in generate_some(ex, session)
    thread = engine_thread(ex, session)
    assert thread.is_alive()
    tiers.unload_model(ex, session, MICRO, "cpu")
    gc.collect()
    assert not thread.is_alive(), "the engine's thread still runs after Unload"
    assert model() is None, f"the unloaded model is still referenced by {gc.get_referrers(model())!r:.300}"
    again = load(ex, MICRO)  # and a reload generates again, on a new engine
    assert "done: 8 new tokens" in generate_some(ex, again)


def test_a_model_evicted_from_the_cache_is_let_go_by_its_engine(tmp_path):
    ex = Explorer(AppConfig(export_dir=tmp_path, device="cpu", max_cached_models=1))
    session = load(ex, MICRO)
    model = weakref.ref(ex.current(session).model)
    generate_some(ex, session, 4)
    thread = engine_thread(ex, session)
    load(ex, "shipped:nano")  # one model at most: micro is evicted
    gc.collect()
    assert not thread.is_alive() and model() is None


def test_a_random_tier_samples_only_tokens_that_decode_to_text(ex):
    assert qtg.get_tier("base").vocab_size == 30_000
    session = load(ex, "tier:base")
    loaded = ex.current(session)
    size = loaded.tokenizer.get_vocab_size()
    assert loaded.model.cfg.vocab_size == size < 30_000
    assert f"vocabulary {size:,}, the tokenizer's (the tier's own 30,000" in loaded.describe()
    assert ex.registry.weights_needed("tier:base", "cpu")[0] == loaded.weight_bytes  # what Load announced
    *_, last = generate.generate(ex, session, "ROMEO:", 24, 1.0, 0, 1, 0)
    new = last[5].numbers["token_ids"]
    assert len(new) == 24 and all(decode(loaded.tokenizer, [t]) for t in new), new
    tiers.unload_model(ex, session, "tier:base", "cpu")



# --- one request's memory and time ------------------------------------------------------------------------

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."
LONG = " ".join([TEXT] * 5)  # ~100 tokens: block states of >= 64 distinct points, so engines run in a child process
BACKEND = "gudhi + ripser (overlaid)"


def limited(tmp_path, **limits) -> Explorer:
    return Explorer(AppConfig(export_dir=tmp_path, device="cpu", limits=Limits(**limits)))


def test_the_topology_memory_check_counts_what_its_diagrams_hold_beside_the_states(tmp_path, ex, nano):
    n = len(ex.encode(nano, TEXT, 10_000, "text")[1])
    states_only = view_memory(nano.model.cfg, n, "fp32", 0, "internals").request
    whole = view_memory(nano.model.cfg, n, "fp32", 0, "topology", max_points=256).request
    assert whole > states_only
    small = limited(tmp_path, memory_budget=(states_only + whole) // 2)
    with pytest.raises(AppInputError, match=rf"topology: {n} tokens on nano need .* beyond the weights"):
        topology.topology(small, None, TEXT, 1, BACKEND, 256, 0)


def test_the_attention_memory_check_counts_the_baseline_beside_the_model(tmp_path, ex, nano):
    n = len(ex.encode(nano, TEXT, 10_000, "text")[1])
    one = view_memory(nano.model.cfg, n, "fp32", 1, "internals").request
    small = limited(tmp_path, memory_budget=one + one // 2)  # the model's view fits, not with its baseline's
    for view in (attention.attention, attention.attention_topology):
        with pytest.raises(AppInputError, match=r"on nano and nano-baseline need"):
            view(small, None, TEXT, 0, -1, 1)


@pytest.mark.parametrize("backend", [BACKEND, "auto (spanning tree H0, giotto-ph H1)"])
def test_a_tiny_time_budget_stops_the_whole_topology_request(tmp_path, backend):
    """A small input (in-process engines, H0 by the spanning tree): the budget still bounds it, as set by the
    app's limit or by the request, and the refusal names the tab's controls."""
    tiny = limited(tmp_path, topology_time_budget=1e-3)
    with pytest.raises(BudgetExceeded, match=r"ran past the time budget of 0\.001 s") as err:
        topology.topology(tiny, None, TEXT, 1, backend, 256, 0)
    assert "raise 'time budget (s)'" in str(err.value) and "--" not in str(err.value)
    with pytest.raises(BudgetExceeded, match=r"ran past the time budget of 0\.002 s"):
        topology.topology(tiny, None, TEXT, 1, backend, 256, 0, 0.002)
    assert topology.topology(tiny, None, TEXT, 1, backend, 256, 0, 60)[3]["tokens"] > 3  # the request's own


def test_the_time_budget_control_is_checked_like_any_field(ex):
    with pytest.raises(AppInputError, match=r"time budget \(s\): 601 is above the maximum 600"):
        topology.topology(ex, None, TEXT, 1, BACKEND, 256, 0, 601)


def test_stop_ends_the_topology_work_on_the_server(ex, monkeypatch):
    backends.warm_up("gudhi")  # its first calls made before the engine is slowed down below

    def slow(*args):  # a Rips engine that would take a minute (it runs in the request's child process)
        time.sleep(60)

    monkeypatch.setattr(backends, "_dispatch", slow)
    run = topology.run_topology(ex, None, LONG, 2, "gudhi", 256, 0, 600)
    status = ""
    while "topology work" not in status:  # the forward pass, then the engine's child process
        status = next(run)[4]
    assert mp.active_children()
    run.close()  # what Stop does to the handler
    assert not mp.active_children(), "the engine's process outlived Stop"
    assert not any(t.name == "topology" for t in threading.enumerate()), "the request's work outlived Stop"
