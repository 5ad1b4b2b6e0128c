"""The ``qtg`` command line, run as a user runs it: the installed entry point in a subprocess."""

import json

import pytest

import qtg
from tests.conftest import run_qtg  # test_evaluate, test_topology and the app tests import it from here


def test_info_json_counts_every_tier_on_the_meta_device():
    r = run_qtg("info", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["tier"] for row in rows] == list(qtg.TIERS)
    by_name = {row["tier"]: row for row in rows}
    assert by_name["7b"]["params"] == qtg.count_params("7b")
    assert by_name["7b"]["claimed_params"] == 6.2e9
    assert by_name["micro"]["fits_inference"] and not by_name["5.5q"]["fits_inference"]
    assert by_name["nano"]["memory_bytes"]["train_fp32"] > by_name["nano"]["memory_bytes"]["inference_fp32"]


def test_info_table_for_one_tier():
    r = run_qtg("info", "--tier", "7b")
    assert r.returncode == 0, r.stderr
    assert "2.00B" in r.stdout and "6.20B" in r.stdout and "micro" not in r.stdout.splitlines()[2]
    # memory in binary units, labelled as such: 7b's bf16 weights alone are 2 x 1,996,419,072 bytes = 3.7 GiB
    ours = r.stdout.split("Seed claims")[0]  # the seed's own notes ("12-15 GB VRAM") are quoted as written
    assert "GiB" in ours and " GB" not in ours


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--tier", "13b"], "unknown tier '13b'; valid tiers: micro, nano"),
        (["info", "--device", "cuda"] if not __import__("torch").cuda.is_available() else ["info", "--device", "tpu"],
         "device"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message):
    r = run_qtg(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--help"], ["info", "--help"]])
def test_help_teaches_with_examples(args):
    r = run_qtg(*args)
    assert r.returncode == 0 and "examples:" in r.stdout


def test_unknown_command_exits_nonzero():
    r = run_qtg("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
