"""Fixtures shared by the API's test modules (tests/test_serve_api.py, tests/test_serve_fuzz.py).

A module uses a fixture by importing its function (``from tests.serve_fixtures import server_fixture``;
the fixture is named ``server``): pytest registers it for that module, so each module runs its own
server (module scope). Import this after ``pytest.importorskip("fastapi")``: the API needs the app extra.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

import qtg
from qtg.serve.api import create_api
from qtg.serve.engine import Engine
from qtg.serve.params import Served


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", name="model")
def model_fixture(tiny_checkpoint):
    """micro with a BPE tokenizer; init_std 0.3 weights so that sampled and greedy text varies."""
    m = qtg.load(tiny_checkpoint).eval()
    lively = qtg.build(m.cfg.replace(init_std=0.3), seed=0).eval()
    lively.tokenizer = m.tokenizer
    return lively


@pytest.fixture(scope="module", name="server")
def server_fixture(model):
    """``(base URL, engine)`` of the API on ``model`` (named ``micro``), served by uvicorn in a thread."""
    engine = Engine(model)
    app = create_api({"micro": Served("micro", engine, model.tokenizer)})
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()
