"""The OpenAI-compatible API fuzzed from its own schema (/openapi.json) with schemathesis.

Every operation gets requests that fit the schema, and those with a body requests that break it too
(schemathesis's positive and negative modes): none may be answered 5xx or hang, a stream must end with
``[DONE]``, and every 4xx must be OpenAI's error body whose message starts with the field it names.
Bounded: a fixed number of examples per operation and mode, derandomized (every run sends the same
requests), on the micro model. The counts (requests per operation, statuses seen) are printed
(``pytest -s``) and asserted to reach both sides: answers (200) and refusals (400).
"""

from __future__ import annotations

from collections import Counter

import pytest

pytest.importorskip("fastapi", reason="the app extra is not installed: pip install -e '.[app]'")
schemathesis = pytest.importorskip("schemathesis", reason="the test extra is not installed: pip install -e '.[test]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from tests.serve_fixtures import model_fixture, server_fixture  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLES = 25  # per operation and mode: 2 GETs x 1 mode + 2 POSTs x 2 modes = at most 150 requests
TIMEOUT_S = 30  # a request not answered by then hangs: the micro model's longest completion takes well under 1 s
MAX_EVENTS = 1000  # read streams to their end (schemathesis stops at 20 events unless told): micro's context is 128


def check(response) -> None:
    """No 5xx; a stream ends with [DONE]; a 4xx is OpenAI's error body naming its field."""
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:300]} for {response.request.body!r:.2000}"
    content_type = {k.lower(): v for k, v in response.headers.items()}.get("content-type", [""])[0]
    if status == 200 and content_type.startswith("text/event-stream"):  # read to its end, or until TIMEOUT_S
        assert not response.stream_cut_short and response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
    elif status >= 400:
        error = response.json()["error"]
        assert error["code"] == status and isinstance(error["message"], str), error
        if status == 400:
            assert error["param"] and error["message"].startswith(error["param"]), error


def fuzz(operation, mode: GenerationMode, url: str, seen: Counter) -> None:
    """``EXAMPLES`` requests to one operation in one mode, each checked; ``seen`` counts (operation, status)."""

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        response = case.call(base_url=url, timeout=TIMEOUT_S)
        seen[operation.label, response.status_code] += 1
        check(response)

    run()


def test_the_api_fuzzed_from_its_schema_never_fails_or_hangs(server, capsys):
    url, _ = server
    config = schemathesis.config.SchemathesisConfig.from_dict({"max-stream-events": MAX_EVENTS})
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=TIMEOUT_S, config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == {"GET /v1/models", "GET /v1/models/{name}", "POST /v1/completions",
                                                "POST /v1/chat/completions"}
    seen: Counter = Counter()
    for operation in operations:
        fuzz(operation, GenerationMode.POSITIVE, url, seen)
        if operation.get_request_payload_content_types():  # a body: there is something to break
            fuzz(operation, GenerationMode.NEGATIVE, url, seen)
    with capsys.disabled():
        print(f"\nfuzz: {sum(seen.values())} requests; statuses per operation:")
        for label in sorted({label for label, _ in seen}):
            print(f"  {label}: " + ", ".join(f"{s} x{n}" for (op, s), n in sorted(seen.items()) if op == label))
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert seen[label, 200] and seen[label, 400], seen  # the fuzz reached both answers and refusals
