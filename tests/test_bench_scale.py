"""benchmarks/bench_scale.py runs end to end: on CPU as a smoke run here, on the largest fitting tier on a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_scale.py"


def run(*args: str) -> str:
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_bench_scale_trains_and_generates_both_architectures_on_cpu():
    out = run("--tier", "micro", "--device", "cpu", "--steps", "1", "--warmup", "0", "--new-tokens", "4",
              "--prompt-len", "8")
    rows = [line.split() for line in out.splitlines() if line.startswith(("train ", "generate "))]
    assert [(r[0], r[1]) for r in rows] == [("train", "micro"), ("train", "micro-baseline"),
                                            ("generate", "micro"), ("generate", "micro-baseline")]
    assert all(float(r[4].replace(",", "")) > 0 for r in rows)  # tokens/s
    assert "train: baseline tokens/s / QTG tokens/s = " in out


@pytest.mark.gpu
def test_bench_scale_on_the_largest_tier_that_fits_the_gpu():
    assert torch.cuda.is_available()
    out = run("--steps", "2", "--warmup", "1", "--new-tokens", "32")
    assert "%" in out  # MFU / MBU from the device's known peaks (H100, H200, A100)
