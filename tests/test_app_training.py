"""The Training tab: its handlers in-process, and ``/training`` over HTTP through ``gradio_client``.

A micro run with snapshots is trained once (library call) and offered as a ``--checkpoint-dir`` run; "train
micro here" starts a real ``qtg train`` process, whose snapshots the tab reads while it runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")

from app.config import AppConfig  # noqa: E402
from app.core import Explorer  # noqa: E402
from app.exports import export  # noqa: E402
from app.models import AppInputError  # noqa: E402
from app.tabs import training as tab  # noqa: E402
from qtg.topology.training import analyse_snapshot  # noqa: E402
from qtg.training.snapshots import list_snapshots  # noqa: E402
from qtg.training.train import train  # noqa: E402
from tests.test_snapshots import PROBE, snap_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(data_dir, tokenizer_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("training_run")
    train(snap_config(out, data_dir, tokenizer_file, 8, every=4))
    return out.resolve()


@pytest.fixture(scope="module")
def ex(run_dir, tmp_path_factory) -> Explorer:
    ex = Explorer(AppConfig(export_dir=tmp_path_factory.mktemp("exports"), device="cpu", checkpoint_dirs=(run_dir,)))
    yield ex
    tab.runs_for(ex).close()


def test_a_checkpoint_dir_run_is_offered_and_its_views_are_the_library_numbers(ex, run_dir):
    key = f"dir:{run_dir}"
    assert (f"{run_dir.name} (checkpoint dir)", key) in tab.runs_for(ex).sources()
    curves, views, numbers, note, payload = tab.training(ex, key, PROBE, 1)
    snaps = list_snapshots(run_dir)
    assert numbers["steps"] == [0, 4, 8] and numbers["index"] == 1
    assert numbers["snapshot"] == analyse_snapshot(snaps[1], PROBE, max_tokens=tab.MAX_PROBE_TOKENS).to_dict()
    assert "step 4" in views.layout.title.text and f"{numbers['snapshot']['bottleneck_h0']:.4f}" in \
        views.layout.title.text
    assert [s.x0 for s in curves.layout.shapes] == [4] * 4  # the marked step, on every panel
    assert [f.name for f in payload.figures["animated"]().frames] == ["0", "4", "8"]  # one frame per snapshot
    again = tab.training(ex, key, PROBE, -1)  # scrubbing: every analysis now comes from the cache
    assert again[2]["index"] == 2 and again[2]["cached"] == 3 and "3 of 3 analyses read from the cache" in again[3]


def test_export_writes_the_animated_figure(ex, run_dir):
    payload = tab.training(ex, f"dir:{run_dir}", PROBE, 0)[4]
    files, msg = export(payload, ex.export_dir, png=False)
    html = next(Path(f) for f in files if f.endswith("figures.html")).read_text()
    assert "addFrames" in html and msg.startswith("Wrote")


@pytest.mark.parametrize("args, message", [(("dir:/etc", PROBE, 0), "run: unknown"),
                                           (("DIR", PROBE, 7), "snapshot"), (("DIR", " ", 0), "probe"),
                                           (("here:9", PROBE, 0), "run: unknown")])
def test_bad_requests_are_refused_naming_the_field(ex, run_dir, args, message):
    key = f"dir:{run_dir}" if args[0] == "DIR" else args[0]
    with pytest.raises(AppInputError, match=message):
        tab.training(ex, key, *args[1:])


def wait_for(fn, timeout: float = 120.0):
    t0 = time.perf_counter()
    while not (value := fn()):
        assert time.perf_counter() - t0 < timeout, "timed out"
        time.sleep(0.3)
    return value


def test_train_micro_here_shows_snapshots_as_they_are_written_and_stops(ex):
    update, msg, _ = tab.start_micro(ex, 2000, 1)
    key = update["value"]
    assert key.startswith("here:") and (update["choices"][-1][1] == key) and "2000 steps" in msg
    with pytest.raises(AppInputError, match="already training"):
        tab.start_micro(ex, 10, 5)
    wait_for(lambda: tab.progress(ex, key)[2] >= 1)  # the first snapshot is on disk
    numbers = tab.training(ex, key, PROBE, 0)[2]  # viewable while the run goes on
    assert numbers["steps"][0] == 0 and numbers["snapshot"]["arch"] == "qtg"
    job = tab.runs_for(ex).jobs[key]
    status = tab.stop_micro(ex, key)
    assert status.startswith("stopped") and job.proc.poll() is not None  # the process is gone
    bar, _, n, line, nums, _ = tab.progress(ex, key)
    assert nums["state"] == "stopped" and n == len(list_snapshots(job.out)) >= 1 and "<progress" in bar


@pytest.mark.slow
def test_training_endpoints_over_http(run_dir, tmp_path_factory):
    from gradio_client import Client

    from app.server import launch
    from tests.test_app_server import free_port

    cfg = AppConfig(export_dir=tmp_path_factory.mktemp("exports"), device="cpu", checkpoint_dirs=(run_dir,))
    demo, ex, url = launch(cfg, port=free_port(), block=False)
    try:
        c = Client(url, verbose=False)
        names = set(c.view_api(print_info=False, return_format="dict")["named_endpoints"])
        assert {"/training", "/training_start", "/training_progress", "/training_stop"} <= names
        key = f"dir:{run_dir}"
        numbers = c.predict(key, PROBE, 2, api_name="/training")[2]
        assert numbers["snapshot"] == analyse_snapshot(list_snapshots(run_dir)[2], PROBE).to_dict()
        update, msg = c.predict(10, 5, api_name="/training_start")[:2]
        run = update["value"]  # the run dropdown's update: the new run, selected
        assert run.startswith("here:") and "10 steps" in msg
        assert c.predict(run, api_name="/training_progress")[4]["state"] == "running"
        assert c.predict(run, api_name="/training_stop").startswith("stopped")
        with pytest.raises(Exception, match="snapshot"):
            c.predict(key, PROBE, 99, api_name="/training")
    finally:
        tab.runs_for(ex).close()
        demo.close()
