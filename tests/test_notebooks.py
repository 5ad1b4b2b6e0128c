"""The companion notebooks (notebooks/*.ipynb): committed without outputs, and each runs top to bottom.

Each notebook is executed with nbclient in a fresh ``python3`` kernel of this
interpreter, with ``notebooks/`` as its working directory, on one thread per
kernel (small kernels on a shared 2-core machine spend more time waiting for a
second thread than they save). The outputs stay in memory: nothing is written
back, and a check makes sure the notebooks write nothing into the repository.
Each executed notebook is also turned into the HTML page of ``make notebooks-html``
(notebooks/export_html.py) and its figures are looked for there. Besides the
patterns each notebook's printed summaries must contain (numbers, with their
intervals where they compare), FORBIDDEN lists what none may print: trivial
agreement reported as a result, or numbers printed wrongly.
"""

from __future__ import annotations

import importlib.util
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
        rf"loss {NUMBER} = CE {NUMBER} \(perplexity {NUMBER}\) \+ 0\.01 x topo {NUMBER} .*lambdas from the config",
        r"tokens repeating an earlier token: \d+, mean w 1\.000",  # a repeat has s = 0, so w = 1
        rf"takeaway: .*'seen earlier in this context' gate: repeats get w = 1\.000, first occurrences w = {NUMBER}",
        rf"head 0: ALiBi slope 0\.25, gamma {NUMBER}",  # the code's slopes: head 0 is 2^(-8/H), H = 4
        rf"head 3: ALiBi slope 0\.003906, gamma {NUMBER}, mean look-back {NUMBER} tokens",
        r"5\.5q\s+1,000,000\s+10,000\s+10,000\s+80,000,220,004,000,000\s+5\.50Q\s+14\.545x",
        rf"\n2\. The TopoFilter acts as a 'seen earlier in this context' gate: \d+ repeated tokens keep w = {NUMBER}",
    ]),
    "02_topology_exact_vs_approx.ipynb": (150, 6, [
        r"H1: bars gudhi (\d+), ripser \1, auto \1; bottleneck gudhi-ripser 0 \(",  # equal diagrams print 0
        rf"bottleneck\(exact H0, filter H0\) = {NUMBER}; 1-Wasserstein = {NUMBER}",
        r"soft-min bound s - T log\(i-1\) <= s~ <= s holds for every token: True",
        rf"longest {NUMBER} = {NUMBER}% of the diameter",
        # ranks on distinct tokens only: the repeats all tie at 0
        rf"Spearman on the \d+ distinct tokens: s~ vs elder-rule p {NUMBER}; s~ vs causal s {NUMBER}; causal s vs p",
        rf"at theta = {NUMBER} \(the median first-occurrence death\), \[s~ > theta\] agrees with \[p > theta\] on",
        rf"Spearman of s - s~ with the position i: {NUMBER}",
        rf"positions 128-255: +\d+ first occurrences, mean w {NUMBER}",
        rf"5: block 4 +{NUMBER} +{NUMBER} +{NUMBER}",  # errors over the diameter, split
        rf"filter removed \(w = 1\) +: delta {NUMBER} nats/token \[{NUMBER}, {NUMBER}\]",
        rf"exact s \(topo=exact\) +: delta {NUMBER} nats/token \[{NUMBER}, {NUMBER}\]",
        rf"one-bit gate \(c = {NUMBER}\) +: delta {NUMBER} nats/token \[{NUMBER}, {NUMBER}\]",
        rf"position only +: delta {NUMBER} nats/token \[{NUMBER}, {NUMBER}\]",
        r"\n6\. Controls: .*\n   Verdict: ",
    ]),
    "03_fisher_rao_attention.ipynb": (120, 8, [
        r"largest difference from the hand computation: d_FR \d\.\de-0[4-9], attention \d\.\de-(0[6-9]|1\d)",
        r"largest triangle-inequality violation over 216,000 triples (0\.0e\+00|-)",
        r"largest \|measured - A_max\(N\)\| over all N and gamma: \d\.\de-(0[5-9]|1\d)",
        r"two keys differ by at most e\^\(pi\^2/4\) = 11\.79x",
        rf"learnt gamma: min {NUMBER}, max {NUMBER}",
        rf"head 0 \(slope 0\.25\): content can beat position over a median of {NUMBER}-{NUMBER} tokens per row",
        rf"nano-baseline-alibi \(dot, ALiBi\): mean largest weight {NUMBER} \[{NUMBER}, {NUMBER}\], bits per byte",
        rf"attention form: .*: mean largest weight {NUMBER} \[{NUMBER}, {NUMBER}\] .*bits per byte {NUMBER} \[",
        rf"positions: ALiBi minus RoPE .*: mean largest weight {NUMBER} \[{NUMBER}, {NUMBER}\] .*bits per byte "
        rf"{NUMBER} \[",
    ]),
    "04_tiers_and_scale.ipynb": (150, 5, [
        r"5\.5q\s+100,000\s+1,000,000\s+10,000\s+10,000\s+0\s+80,000,220,004,000,000\s+True",
        r"7b\s+: attention-only\s+2\.00B \(0\.322x the claim\), with SwiGLU\s+9\.24B",
        r"5\.5q : .*; H200s to hold the bf16 training state: [\d,]+",
        rf"N =  1024: reference +{NUMBER} ms, sdpa +{NUMBER} ms, .*MiB \(formula B\*H\*N\^2\*4 bytes, not measured\)",
        r"1 x H100 \(80 GB\): 80\.0 GB = 74\.5 GiB",  # data sheets count 10^9 bytes
        r"100b: the seed claims 160 GB; inference in bf16",  # one value, not "160-160 GB"
        rf"block 4: H0\+H1 time grows as about N\^{NUMBER} in the distinct points",
        rf"\n4\. Exact H0\+H1 time grows as N\^{NUMBER}",
    ]),
    "05_train_and_compare.ipynb": (240, 3, [
        # training tokens/s counts the time inside training steps, not validation or the token cache
        rf"QTG micro +: [\d,]+ parameters, \d+ steps in {NUMBER} s of wall time, of which {NUMBER} s in training steps",
        r"baseline micro +: [\d,]+ parameters, \d+ steps",
        rf"QTG / baseline training speed over 3 seeds: median {NUMBER}x",
        rf"nano \(shipped\) +: loss {NUMBER} nats/token, perplexity +{NUMBER}, bits per byte {NUMBER} \[{NUMBER}, ",
        rf"QTG minus baseline, micro seed 2: {NUMBER} bits/byte \[{NUMBER}, {NUMBER}\]",
        rf"QTG minus baseline, bits per byte: micro after \d+ steps {NUMBER} \(mean of 3 seeds, from {NUMBER} to "
        rf"{NUMBER}, sd {NUMBER}\); shipped nano {NUMBER} \[{NUMBER}, {NUMBER}\] \(one seed\)",
    ]),
    "07_topology_over_training.ipynb": (90, 4, [
        rf"trained [\d,]+ parameters for 120 steps in {NUMBER} s",
        r"9 snapshots at steps \[0, 15, 30, 45, 60, 75, 90, 105, 120\]",
        r"float32 checkpoint: ([0-2]\.\d\de-03|3\.[0-8]\de-03|3\.90e-03|\d\.\d\de-0[4-9])",  # <= 2^-8
        r"\(9 of 9 from the cache\)",
        rf"1\. The probe's cross-entropy fell from {NUMBER} to {NUMBER} nats/token over 120 steps",
        rf"2\. The TopoFilter's H0 against the exact H0 of the same cloud: bottleneck {NUMBER} at step 0",
        r"One seed, one probe, 120 steps\.",
    ]),
    "06_components.ipynb": (150, 4, [
        r"nano-seed +: [\d,]+ parameters; Fisher-Rao attention, positions none, learnt gamma False",
        r"nano-notopo +: [\d,]+ parameters; Fisher-Rao attention, positions alibi, learnt gamma True, TopoFilter off",
        rf"nano-notopo +: {NUMBER} bits/byte \[{NUMBER}, {NUMBER}\]; minus nano {NUMBER} \[{NUMBER}, {NUMBER}\]",
        rf"nano-baseline +: {NUMBER} bits/byte \[{NUMBER}, {NUMBER}\]; minus nano {NUMBER} \[",
        rf"positions=none +: {NUMBER} bits/byte, delta {NUMBER} \[{NUMBER}, {NUMBER}\]",
        r"heads whose removal raises the loss \(CI above 0\): nano \d+ of 16, nano-baseline \d+ of 16",
        # the lens's last state is the model's own output
        r"nano +block 4 +: mean p\(true next\) [\d.]+, top-1 as the final state 100\.0%, KL to final 0\.000 nats",
        r"\n6\. Logit lens on nano: ",
    ]),
}

# Patterns a notebook must never print: trivial agreement reported as a result, or numbers printed wrongly.
FORBIDDEN = {
    "*": [r"\d\.\d+e-3\d\d",  # a denormal such as 1.34e-308 where a distance is exactly 0
          r"\b(\d+(?:\.\d+)?)-\1 GB"],  # a range from a value to itself ("160-160 GB")
    "01_quickstart.ipynb": [r"\d GB\b"],  # the tier table is in binary units (GiB)
    "02_topology_exact_vs_approx.ipynb": [
        r"agreement of \[s~ > theta\] with \[p > theta\]: 1\.000",  # theta below every first-occurrence death
        r"Spearman rank correlation of s~ with the elder-rule persistence",  # ranks inflated by the tied repeats
    ],
}


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _exporter():
    """notebooks/export_html.py, the script behind ``make notebooks-html`` (it is not a package module)."""
    pytest.importorskip("nbconvert")
    spec = importlib.util.spec_from_file_location("export_html", NOTEBOOKS / "export_html.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_html(nb, name: str, figures: int) -> None:
    """The executed notebook's HTML page: plotly.js inline once, and one drawn div per figure, each with data."""
    export = _exporter()
    html = export.to_html(nb)
    assert html.count(f'class="{export.PLOTLY_JS_CLASS}"') == 1, f"{name}: plotly.js should be inline exactly once"
    assert len(re.findall(r"\* plotly\.js v\d", html)) == 1, f"{name}: the plotly.js bundle should appear once"
    drawn = re.findall(r'Plotly\.newPlot\(\s*"(qtg-figure-\d+)",\s*\[\{"', html)  # a non-empty list of traces
    assert html.count(f'class="{export.FIGURE_CLASS}"') == figures, f"{name}: {figures} figures, divs differ"
    assert len(set(drawn)) == figures, f"{name}: {len(set(drawn))} of {figures} figures are drawn with data"
    assert PLOTLY not in html and "<script src=\"https://cdn.plot.ly" not in html  # nothing left for a live kernel


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
    reported = [p for p in FORBIDDEN.get(name, []) + FORBIDDEN["*"] if re.search(p, printed)]
    assert not reported, f"{name}: the printed summaries report {reported}\n--- printed ---\n{printed}"
    assert seconds < budget, f"{name} took {seconds:.1f} s, over its {budget} s budget"
    changed = _repo_files() ^ before
    assert not changed, f"{name} wrote into the repository: {sorted(changed)[:5]}"
    _check_html(nb, name, plotted)  # make notebooks-html: every figure drawn offline from the executed notebook
