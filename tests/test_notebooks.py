"""The companion notebooks (notebooks/*.ipynb): committed without outputs, and each runs top to bottom.

Each notebook is executed with nbclient in a fresh ``python3`` kernel of this
interpreter, with ``notebooks/`` as its working directory, on one thread per
kernel (small kernels on a shared 2-core machine spend more time waiting for a
second thread than they save). The outputs stay in memory: nothing is written
back, and a check makes sure the notebooks write nothing into the repository.
The budgets add up to less than 10 minutes; on this 2-core machine the five
took 66-75 s together while other jobs were loading it.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"
NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"

# name: (seconds allowed, plotly figures expected at least, patterns its printed summaries must contain)
EXPECTED = {
    "01_quickstart.ipynb": (90, 4, [
        r"parameters: [\d,]+; trained weights: True",
        rf"loss {NUMBER} = CE {NUMBER} \(perplexity {NUMBER}\)",
        r"tokens repeating an earlier token: \d+, mean w 1\.000",  # a repeat has s = 0, so w = 1
        rf"head 3: gamma {NUMBER}, mean look-back {NUMBER} tokens",
        r"5\.5q\s+1,000,000\s+10,000\s+10,000\s+80,000,220,004,000,000\s+5\.50Q\s+14\.545x",
    ]),
    "02_topology_exact_vs_approx.ipynb": (90, 5, [
        rf"H1: bars gudhi (\d+), ripser \1, auto \1; bottleneck gudhi-ripser {NUMBER}",
        rf"bottleneck\(exact H0, filter H0\) = {NUMBER}; 1-Wasserstein = {NUMBER}",
        r"soft-min bound s - T log\(i-1\) <= s~ <= s holds for every token: True",
        rf"5: block 4 +256 +{NUMBER}",
        rf"perplexity: soft-min {NUMBER}, exact {NUMBER} \(ratio {NUMBER}\)",
    ]),
    "03_fisher_rao_attention.ipynb": (60, 7, [
        r"largest difference from the hand computation: d_FR \d\.\de-0[4-9], attention \d\.\de-(0[6-9]|1\d)",
        r"largest triangle-inequality violation over 216,000 triples (0\.0e\+00|-)",
        r"largest \|measured - A_max\(N\)\| over all N and gamma: \d\.\de-(0[5-9]|1\d)",
        r"two keys differ by at most e\^\(pi\^2/4\) = 11\.79x",
        rf"learnt gamma: min {NUMBER}, max {NUMBER}",
        rf"baseline \(dot product\)\s+: mean largest weight {NUMBER}",
    ]),
    "04_tiers_and_scale.ipynb": (120, 5, [
        r"5\.5q\s+100,000\s+1,000,000\s+10,000\s+10,000\s+0\s+80,000,220,004,000,000\s+True",
        r"7b\s+: attention-only\s+2\.00B \(0\.322x the claim\), with SwiGLU\s+9\.24B",
        r"5\.5q : .*; H200s to hold the bf16 training state: [\d,]+",
        rf"N =  1024: reference +{NUMBER} ms, sdpa +{NUMBER} ms",
        rf"block 4: H0\+H1 time grows as about N\^{NUMBER}",
    ]),
    "05_train_and_compare.ipynb": (180, 2, [
        rf"QTG micro +: [\d,]+ parameters, 160 steps in {NUMBER} s",
        r"baseline micro +: [\d,]+ parameters, 160 steps",
        rf"nano \(shipped\) +: loss {NUMBER} nats/token, perplexity +{NUMBER}, bits per byte {NUMBER}",
        rf"QTG minus baseline, bits per byte: micro after 160 steps {NUMBER}; shipped nano {NUMBER}",
    ]),
}


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _repo_files() -> set[tuple[str, int, int]]:
    """What a notebook must not change: the top level of the repository, and notebooks/ and assets/ in full."""
    seen = {(p.name, 0, 0) for p in ROOT.iterdir()}
    for folder in (NOTEBOOKS, ROOT / "assets"):
        for p in folder.rglob("*"):
            if "__pycache__" not in p.parts:
                st = p.stat()
                seen.add((str(p.relative_to(ROOT)), st.st_mtime_ns, st.st_size))
    return seen


def test_the_five_notebooks_are_there():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_is_committed_without_outputs(name):
    nb = _read(NOTEBOOKS / name)
    nbformat.validate(nb)
    dirty = [f"cell {i}" for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{name} carries outputs or execution counts ({', '.join(dirty)}): clear them before "
                       "committing (JupyterLab: Edit > Clear Outputs of All Cells, then save)")
    assert "widgets" not in nb.metadata, f"{name} stores widget state in its metadata"


def test_notebook_kernel_is_this_interpreter():
    from jupyter_client.manager import KernelManager

    assert KernelManager(kernel_name="python3").format_kernel_cmd()[0] == sys.executable


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.timeout(EXPECTED[n][0] + 120))
                                  for n in sorted(EXPECTED)])
def test_notebook_runs_top_to_bottom(name, monkeypatch):
    budget, figures, patterns = EXPECTED[name]
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits the environment
    nb = _read(NOTEBOOKS / name)
    before = _repo_files()
    client = nbclient.NotebookClient(nb, timeout=budget, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute()  # a cell that raises fails the test with its traceback
    seconds = time.perf_counter() - start

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    plotted = sum(1 for o in outputs if PLOTLY in o.get("data", {}))
    printed = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert plotted >= figures, f"{name}: {plotted} plotly figures, expected at least {figures}"
    missing = [p for p in patterns if not re.search(p, printed)]
    assert not missing, f"{name}: the printed summaries lack {missing}\n--- printed ---\n{printed}"
    assert seconds < budget, f"{name} took {seconds:.1f} s, over its {budget} s budget"
    changed = _repo_files() ^ before
    assert not changed, f"{name} wrote into the repository: {sorted(changed)[:5]}"
