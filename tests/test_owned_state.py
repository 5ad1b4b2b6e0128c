"""State shared between threads is owned and guarded (issue 25): the attention tables, the training runs.

The app runs forward passes in Gradio's worker threads beside the decoding engine's loop. The ALiBi slopes and
the score-bias matrices they share belong to :class:`qtg.model.fisher_rao.SharedTables`, whose lock makes each
table be built once however many threads ask together; the training runs belong to their Explorer.
Each check releases 8 threads at once on a build slowed down so that every thread would find the table
missing if nothing guarded it.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import qtg.model.fisher_rao as fr

THREADS = 8
HEADS, DTYPE = 7, torch.float64  # a key no model here uses: its tables are built by this test alone


def at_once(fn, args_of=lambda i: ()) -> list:
    """``fn(*args_of(i))`` in THREADS threads released together; their results, in thread order."""
    barrier = threading.Barrier(THREADS)
    out: list = [None] * THREADS

    def run(i):
        barrier.wait()
        out[i] = fn(*args_of(i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return out


def slowed(monkeypatch, name: str) -> list:
    """Replace ``fisher_rao.<name>`` by itself after a 20 ms pause; returns the list its calls are logged in."""
    real, calls = getattr(fr, name), []

    def slow(*args, **kwargs):
        calls.append(args)
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(fr, name, slow)
    return calls


def test_each_score_bias_table_is_built_once_however_many_threads_ask(monkeypatch):
    builds, slopes = slowed(monkeypatch, "build_bias"), slowed(monkeypatch, "_alibi_slopes")
    cpu = torch.device("cpu")
    got = at_once(fr.score_bias, lambda i: (HEADS, 3, 1, 100, cpu, DTYPE))  # a decoding row at position 3
    assert len(builds) == 1 and len(slopes) == 1, f"built {len(builds)} bias and {len(slopes)} slopes tables"
    want = fr.build_bias(fr._alibi_slopes(HEADS, cpu), 3, 1, 100, cpu, DTYPE)
    assert all(torch.equal(g, want) for g in got)
    assert len({g.untyped_storage().data_ptr() for g in got}) == 1  # views of the one table
    # growing: threads asking for longer and shorter rows at once each get theirs, and the table kept is the
    # largest asked, so asking again builds nothing
    lengths = [100, 300, 500, 200, 400, 120, 260, 480]
    grown = at_once(fr.score_bias, lambda i: (HEADS, 0, lengths[i], lengths[i], cpu, DTYPE))
    for n, g in zip(lengths, grown):
        assert torch.equal(g, fr.build_bias(fr._alibi_slopes(HEADS, cpu), 0, n, n, cpu, DTYPE))
    before = len(builds)
    fr.score_bias(HEADS, 0, max(lengths), max(lengths), cpu, DTYPE)
    assert len(builds) == before, "a smaller table replaced the largest one built"


def test_alibi_slopes_are_built_once_and_shared(monkeypatch):
    calls = slowed(monkeypatch, "_alibi_slopes")
    got = at_once(fr.alibi_slopes, lambda i: (HEADS + 4, "cpu"))
    assert len(calls) == 1 and all(g is got[0] for g in got)


def test_the_training_runs_belong_to_their_explorer(monkeypatch, tmp_path):
    pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")
    from app import core
    from app.config import AppConfig
    from app.tabs import training

    real, made = core.TrainingRuns, []

    def counted(*args):  # were the runs made on first use (a module dict filled lazily), threads would race here
        made.append(args)
        time.sleep(0.02)
        return real(*args)

    monkeypatch.setattr(core, "TrainingRuns", counted)
    a, b = (core.Explorer(AppConfig(export_dir=tmp_path / name, device="cpu")) for name in "ab")
    runs = at_once(training.runs_for, lambda i: (a if i % 2 else b,))
    assert len(made) == 2  # one each, made with its Explorer: the threads only read them
    assert all(r is a.training_runs for r in runs[1::2]) and all(r is b.training_runs for r in runs[::2])
    assert a.training_runs is not b.training_runs
