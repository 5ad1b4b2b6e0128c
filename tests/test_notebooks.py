"""The companion notebooks (notebooks/*.ipynb): committed without outputs, and each runs top to bottom.

Each notebook is executed with nbclient in a fresh ``python3`` kernel of this
interpreter, with ``notebooks/`` as its working directory, on one thread per
kernel (small kernels on a shared 2-core machine spend more time waiting for a
second thread than they save). The outputs stay in memory: nothing is written
back, and a check makes sure the notebooks write nothing into the repository.
Each executed notebook is also turned into the HTML page of ``make notebooks-html``
(notebooks/export_html.py) and its figures are looked for there; every page
(executed or not) must fetch nothing from the network and show its formulas as
MathML, not raw TeX. Besides the patterns each notebook's printed summaries
must contain (numbers, with their intervals where they compare), FORBIDDEN lists
what none may print: trivial agreement reported as a result, numbers printed
wrongly, or a claim the notebooks once made and corrected (OLD_CLAIMS holds one
of each, and a test checks that the patterns catch them). Every verdict printed
by notebooks 01-07 must read the interval across works printed just before it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path

import pytest

from qtg.model.loading import shipped_models

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"
NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"

# name: (seconds allowed, plotly figures expected at least, patterns its printed summaries must contain);
# the seconds are about twice the kernel's CPU time (its forked engines included), measured on a loaded 2-core
# machine, + 10 s to start: room for CI's noise, still well short of a notebook that doubled its work
EXPECTED = {
    "01_quickstart.ipynb": (60, 4, [
        r"parameters: [\d,]+; trained weights: True",
        rf"loss {NUMBER} = CE {NUMBER} \(perplexity {NUMBER}\) \+ 0\.01 x topo {NUMBER} .*lambdas from the config",
        r"tokens repeating an earlier token: \d+, mean w 1\.000",  # a repeat has s = 0, so w = 1
        rf"takeaway: .*'seen earlier in this context' gate: repeats get w = 1\.000, first occurrences w = {NUMBER}",
        rf"head 0: ALiBi slope 0\.25, gamma {NUMBER}",  # the code's slopes: head 0 is 2^(-8/H), H = 4
        # each head's look-back beside its references: a flat slope alone gives the uniform value
        r"uniform causal attention over these 48 tokens: mean look-back 11\.75 tokens",
        rf"head 3: ALiBi slope 0\.003906, gamma {NUMBER}, mean look-back {NUMBER} tokens \(ALiBi alone {NUMBER}, "
        r"uniform 11\.75\)",
        rf"\n3\. In block 3 every head's mean look-back lies within {NUMBER} tokens of what ALiBi alone gives",
        r"5\.5q\s+1,000,000\s+10,000\s+10,000\s+80,000,220,004,000,000\s+5\.50Q\s+14\.545x",
        rf"\n2\. The TopoFilter acts as a 'seen earlier in this context' gate: \d+ repeated tokens keep w = {NUMBER}",
    ]),
    "02_topology_exact_vs_approx.ipynb": (100, 6, [
        r"H1: bars gudhi (\d+), ripser \1, auto \1; bottleneck gudhi-ripser 0 \(",  # equal diagrams print 0
        rf"bottleneck\(exact H0, filter H0\) = {NUMBER}; 1-Wasserstein = {NUMBER}",
        r"soft-min bound s - T log\(i-1\) <= s~ <= s holds for every token: True",
        rf"longest {NUMBER} = {NUMBER}% of the diameter",
        # ranks on distinct tokens only: the repeats all tie at 0
        rf"Spearman on the \d+ distinct tokens: s~ vs elder-rule p {NUMBER}; s~ vs causal s {NUMBER}; causal s vs p",
        # each score split at its own median, beside a permutation null (a shared threshold favours s~ <= s)
        rf"split at each score's own median, \[s~ > its median\] agrees with \[p > its median\] on {NUMBER}% of the "
        rf"\d+ first occurrences; shuffled p \(10,000 permutations\): {NUMBER}%, 95 % of them in \[{NUMBER}%, "
        rf"{NUMBER}%\]; one-sided permutation p = {NUMBER}",
        rf"Spearman of s - s~ with the position i: {NUMBER}",
        rf"positions 128-255: +\d+ first occurrences, mean w {NUMBER}",
        rf"\nQEmbed +{NUMBER} +{NUMBER} +{NUMBER}",  # rows named by the cloud: the filter's own s~ is on QEmbed
        rf"\nblock 3 +{NUMBER} +{NUMBER} +{NUMBER}",  # errors over the diameter, split (nano's last block is 3)
        rf"filter removed \(w = 1\) +: delta {NUMBER} nats/token \[{NUMBER}, {NUMBER}\]",
        rf"exact s \(topo=exact\) +: delta {NUMBER} nats/token \[{NUMBER}, {NUMBER}\]",
        # exact s over a sweep of theta: s >= s~, so at the model's theta part of its cost is a level shift
        rf"theta 0\.35: exact s {NUMBER} nats/token \[{NUMBER}, {NUMBER}\], across the 4 works \[{NUMBER}, "
        rf"{NUMBER}\] \([^)]*\)+, mean w {NUMBER}",
        rf"level matched: exact s at theta = {NUMBER} gives mean w {NUMBER} \(the model {NUMBER}\)",
        rf"one-bit gate \(c = {NUMBER}\) +: delta {NUMBER} nats/token \[{NUMBER}, {NUMBER}\]",
        rf"position only +: delta {NUMBER} nats/token \[{NUMBER}, {NUMBER}\]",
        r"\n6\. Controls: .*\n   Verdict: ",
    ]),
    "03_fisher_rao_attention.ipynb": (160, 8, [
        r"largest difference from the hand computation: d_FR \d\.\de-0[4-9], attention \d\.\de-(0[6-9]|1\d)",
        r"largest triangle-inequality violation over 216,000 triples (0\.0e\+00|-)",
        r"largest \|measured - A_max\(N\)\| over all N and gamma: \d\.\de-(0[5-9]|1\d)",
        r"two keys differ by at most e\^\(pi\^2/4\) = 11\.79x",
        rf"learnt gamma: min {NUMBER}, max {NUMBER}",
        rf"head 0 \(slope 0\.25\): content can beat position over a median of {NUMBER}-{NUMBER} tokens per row on "
        r"this one 128-token text",  # one text, not a corpus
        r"every window of the 4 test works: \d+ windows",  # the verdicts below read all of them
        rf"nano-baseline-alibi \(dot, ALiBi\): mean largest weight {NUMBER} \[{NUMBER}, {NUMBER}\], bits per byte",
        rf"attention form: .*: mean largest weight {NUMBER} \[{NUMBER}, {NUMBER}\], across the \d works \[{NUMBER}, "
        rf"{NUMBER}\] .*bits per byte {NUMBER} \[",
        rf"positions: ALiBi minus RoPE .*: mean largest weight {NUMBER} \[{NUMBER}, {NUMBER}\], across the \d works "
        rf"\[{NUMBER}, {NUMBER}\] .*bits per byte {NUMBER} \[",
    ]),
    "04_tiers_and_scale.ipynb": (140, 5, [
        r"5\.5q\s+100,000\s+1,000,000\s+10,000\s+10,000\s+0\s+80,000,220,004,000,000\s+True",
        r"7b\s+: attention-only\s+2\.00B \(0\.322x the claim\), with SwiGLU\s+9\.24B",
        r"5\.5q : .*; H200s to hold the bf16 training state: [\d,]+",
        rf"N =  1024: reference +{NUMBER} ms, sdpa +{NUMBER} ms, .*MiB \(formula B\*H\*N\^2\*4 bytes, not measured\)",
        r"1 x H100 \(80 GB\): 80\.0 GB = 74\.5 GiB",  # data sheets count 10^9 bytes
        r"100b: the seed claims 160 GB; inference in bf16",  # one value, not "160-160 GB"
        # repeated timings, and the exponent with its interval (a bootstrap over the repeats)
        rf"block 3: H0\+H1 CPU time grows as about N\^{NUMBER} \[{NUMBER}, {NUMBER}\] in the distinct points, fitted "
        r"to the medians of 5 runs",
        rf"\n4\. Exact H0\+H1 CPU time grows as N\^{NUMBER} \[{NUMBER}, {NUMBER}\]",
    ]),
    "05_train_and_compare.ipynb": (120, 3, [
        # training tokens/s counts the time inside training steps, not validation or the token cache
        rf"QTG micro +: [\d,]+ parameters, \d+ steps in {NUMBER} s of wall time, of which {NUMBER} s in training steps",
        r"baseline micro +: [\d,]+ parameters, \d+ steps",
        rf"QTG / baseline training speed over 3 seeds: median {NUMBER}x",
        # the stage the comparison describes: the micro models against a unigram model of the training works
        rf"unigram reference \(token frequencies of the training works\): {NUMBER} bits/byte; the micro models after "
        rf"80 steps: from {NUMBER} to {NUMBER}",
        r"greedy continuations that are only whitespace: ",
        rf"\n1\. After 80 steps the micro models sit {NUMBER} to {NUMBER} bits/byte from the unigram reference",
        # the speed line is what this run measured, each seed's ratio and their spread
        rf"\n3\. Training speed, time inside the steps only: QTG / baseline tokens/s per seed {NUMBER}x, {NUMBER}x, "
        rf"{NUMBER}x \(median {NUMBER}x, spread {NUMBER}-{NUMBER}x\)",
        rf"nano \(shipped\) +: loss {NUMBER} nats/token, perplexity +{NUMBER}, bits per byte {NUMBER} \[{NUMBER}, ",
        rf"QTG minus baseline, micro seed 2: {NUMBER} bits/byte \[{NUMBER}, {NUMBER}\]",
        rf"QTG minus baseline, bits per byte: micro after \d+ steps {NUMBER} \(mean of 3 seeds, from {NUMBER} to "
        rf"{NUMBER}, sd {NUMBER}\); shipped nano {NUMBER} \[{NUMBER}, {NUMBER}\] \(one seed\)",
    ]),
    "07_topology_over_training.ipynb": (60, 4, [
        rf"trained [\d,]+ parameters for 120 steps in {NUMBER} s",
        r"9 snapshots at steps \[0, 15, 30, 45, 60, 75, 90, 105, 120\]",
        r"float32 checkpoint: ([0-2]\.\d\de-03|3\.[0-8]\de-03|3\.90e-03|\d\.\d\de-0[4-9])",  # <= 2^-8
        r"\(9 of 9 from the cache\)",
        rf"1\. The probe's cross-entropy fell from {NUMBER} to {NUMBER} nats/token over 120 steps",
        r"probe: 300 characters of '\w+', a test work of the shipped split",  # no run here nor nano trained on it
        rf"2\. The TopoFilter's H0 against the exact H0 of the same cloud: bottleneck {NUMBER} at step 0",
        # a trend in a distance between diagrams is read over the cloud's diameter
        rf"while the cloud's diameter went {NUMBER} -> {NUMBER}: over the diameter, {NUMBER} -> {NUMBER}",
        rf"\n6\. Over the cloud's diameter, the worst bar's mismatch \(bottleneck\) (grew|shrank), {NUMBER} -> "
        rf"{NUMBER}, and the mean mismatch per token \(W1/token\) (fell|rose), {NUMBER} -> {NUMBER}",
        r"One seed, one probe, 120 steps\.",
    ]),
    # every shipped checkpoint on every test window (16-20 s of CPU each): the budget grows with the seeds that ship
    "08_what_qtgs_parts_are_worth.ipynb": (10 + 2 * 20 * len(shipped_models()), 1, [
        r"nano-exact +[1-3] seed\(s\) \(nano-exact[,)]",  # each recipe with the seeds that ship
        r"\d{3,} windows, [\d,]+ predicted tokens, [\d,]+ bytes, 4 works",  # every window, not a sample
        r"intervals across works: .*t-interval over works, widened by a bootstrap over seeds",  # seeds resampled
        rf"\nnano-gate +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER} +\d lower, \d higher",  # the change in each work
        rf"seed-to-seed sd of test bits/byte, pooled over \d recipes with several seeds: {NUMBER}",
        *[rf"\n{k}\. {q} minus nano \([1-3] seeds? against [2-3] seeds\): {NUMBER} bits/byte \[{NUMBER}, {NUMBER}\], "
          rf"across the 4 works \[{NUMBER}, {NUMBER}\] \((better|worse|no difference detected \(± [\d.]+\))\)"
          for k, q in [(1, r"Does the filter help\? nano-notopo"),
                       (2, r"Does the approximation cost or help\? nano-exact"),
                       (3, r"Is the grading by persistence worth anything\? nano-gate")]],
        rf"\n4\. The largest of the three changes across works is {NUMBER} bits/byte; the widest interval's "
        rf"half-width is {NUMBER}; the runs of one recipe differ by sd {NUMBER} bits/byte",
        rf"\n6\. Single factor among the baselines, ALiBi in place of RoPE: nano-baseline-alibi minus nano-baseline "
        rf"{NUMBER} bits/byte",
    ]),
    "06_components.ipynb": (240, 4, [
        r"nano-seed +: [\d,]+ parameters; Fisher-Rao attention, positions none, learnt gamma False",
        r"nano-notopo +: [\d,]+ parameters; Fisher-Rao attention, positions alibi, learnt gamma True, TopoFilter off",
        r"\d+ windows \(every window of the 4 test works\)",
        rf"nano-notopo +: {NUMBER} bits/byte \[{NUMBER}, {NUMBER}\]; minus nano {NUMBER} bits/byte \[{NUMBER}, "
        rf"{NUMBER}\], across the 4 works",
        rf"nano-baseline +: {NUMBER} bits/byte \[{NUMBER}, {NUMBER}\]; minus nano {NUMBER} bits/byte \[",
        # the single-factor comparison among the baselines, beside the baseline itself
        rf"nano-baseline-alibi minus nano-baseline \(single factor: ALiBi in place of RoPE in the baseline\): "
        rf"{NUMBER} bits/byte \[{NUMBER}, {NUMBER}\], across the 4 works",
        rf"positions=none +: {NUMBER} bits/byte, delta {NUMBER} bits/byte \[{NUMBER}, {NUMBER}\], across the 4 works",
        r"heads whose removal raises the loss \(CI across works above 0\): nano \d+ of 16, nano-baseline \d+ of 16",
        # every verdict reads the interval across works, in the library's one wording
        rf"nano-notopo minus nano: {NUMBER} bits/byte \[{NUMBER}, {NUMBER}\], across the 4 works \[{NUMBER}, "
        rf"{NUMBER}\] \((better|worse|no difference detected \(± [\d.]+\))\)",
        # the lens's last state is the model's own output
        r"nano +block 3 +: mean p\(true next\) [\d.]+, top-1 as the final state 100\.0%, KL to final 0\.000 nats",
        r"\n6\. Logit lens on nano: ",
    ]),
    "09_what_head_0_0_does.ipynb": (180, 4, [
        rf"nano head 0:0 removed: {NUMBER} \[{NUMBER}, {NUMBER}\] nats/token over 4 works",
        rf"ALiBi alone \(slope 0\.25, no content\): offset 0 {NUMBER}",
        rf"direct logit attribution on one passage: terms sum to ({NUMBER}), the logit is \1;",  # they add up
        rf"nano head 0:0: direct path only {NUMBER} \[{NUMBER}, {NUMBER}\] nats/token, every path",
        rf"attribution against real patching, Pearson r over the 512 units: {NUMBER} \[",
        rf"nano head 0:0 with the content-free ALiBi pattern: {NUMBER} \[{NUMBER}, {NUMBER}\]",
        r"\n4\. Hypothesis 1 \(copying from an earlier occurrence\): .*\n5\. Hypothesis 2 ",
        r"intervals are t-intervals over works",
    ]),
}

# Patterns a notebook must never print: trivial agreement reported as a result, or numbers printed wrongly.
FORBIDDEN = {
    "*": [r"\d\.\d+e-3\d\d",  # a denormal such as 1.34e-308 where a distance is exactly 0
          r"\(the same\)|\(no difference detected\)",  # a verdict without its interval's half-width
          r"\b(\d+(?:\.\d+)?)-\1 GB"],  # a range from a value to itself ("160-160 GB")
    "01_quickstart.ipynb": [r"\d GB\b",  # the tier table is in binary units (GiB)
                            r"looks back furthest"],  # a look-back read without its uniform and ALiBi references
    "02_topology_exact_vs_approx.ipynb": [
        r"agreement of \[s~ > theta\] with \[p > theta\]: 1\.000",  # theta below every first-occurrence death
        r"Spearman rank correlation of s~ with the elder-rule persistence",  # ranks inflated by the tied repeats
        r"\(the median first-occurrence death\), \[s~ > theta\] agrees",  # one threshold for s~ <= s and p
        r"\n1: TopoFilter ",  # the depth table's row for the QEmbed cloud, named after the filter
    ],
    "04_tiers_and_scale.ipynb": [r"grows as (about )?N\^[\d.]+ (?!\[)"],  # a growth exponent without its interval
    "05_train_and_compare.ipynb": [r"QTG at [\d.]+x the baseline's tokens/s"],  # one ratio, without its spread
    "07_topology_over_training.ipynb": [r"\n6\. The two distances tell different stories"],  # a trend unnormalised
}


# Lines the notebooks once printed (issue 22), each a claim that one of its FORBIDDEN patterns must catch
OLD_CLAIMS = {
    "01_quickstart.ipynb": ["3. In block 4, head 3 (slope 0.003906) looks back furthest, 11.7 tokens on average"],
    "02_topology_exact_vs_approx.ipynb": [
        "at theta = 0.735 (the median first-occurrence death), [s~ > theta] agrees with [p > theta] on 51.9% of the "
        "first occurrences (0.5 would be chance)",
        "\n1: TopoFilter         1.639        0.2050      0.0620     0.1896      0.0640   0.772"],
    "04_tiers_and_scale.ipynb": ["block 4: H0+H1 time grows as about N^1.77 in the distinct points"],
    "05_train_and_compare.ipynb": ["3. Training speed, steps only: QTG at 0.83x the baseline's tokens/s (median of 3"],
    "07_topology_over_training.ipynb": ["\n6. The two distances tell different stories: the worst bar's mismatch "
                                        "(bottleneck) grew, 0.3200 -> 0.8400"],
}

# A verdict ("better", "worse", "no difference detected (± h)"; for a quantity that is neither, "lower"/"higher")
# must read the interval across works printed just before it, never one over windows of the same works.
VERDICT = re.compile(r"\((?:QTG )?(?:better|worse|lower|higher|no difference detected \(± [\d.]+\))\)")
ACROSS_WORKS = re.compile(rf"works \[{NUMBER}, {NUMBER}\] $")
VERDICTS_READ_WORKS = [n for n in EXPECTED if not n.startswith("09_")]  # 09 words its verdicts with its own helper
# what a page would fetch: a script, style sheet, image or frame from an http(s) or protocol-relative URL,
# a CSS @import or url(), or a module imported at run time (nbconvert's mermaid loader)
NETWORK = re.compile(r"""<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*["']?(?:https?:)?//"""
                     r"""|@import\b|url\(\s*["']?(?:https?:)?//|\bimport\(\s*["'](?:https?:)?//""", re.I)


def _verdicts_not_across_works(printed: str) -> list[str]:
    """Each printed verdict whose text just before is not an interval across works, with its context."""
    return [printed[max(0, m.start() - 80):m.end()] for m in VERDICT.finditer(printed)
            if not ACROSS_WORKS.search(printed[max(0, m.start() - 80):m.start()])]


def _network_references(html: str) -> list[str]:
    """Everything in ``html`` that a browser would fetch from the network."""
    return [html[m.start():m.start() + 120] for m in NETWORK.finditer(html)]


def _raw_maths(html: str) -> list[str]:
    """Formulas left as ``$...$`` text in the rendered markdown cells (code spans aside)."""
    cells = re.findall(r'<div class="[^"]*\bjp-RenderedMarkdown\b[^"]*"[^>]*>(.*?)</div>', html, re.S)
    prose = [re.sub(r"<code>.*?</code>|<pre>.*?</pre>", "", c, flags=re.S) for c in cells]
    return [c[max(0, c.index("$") - 40):c.index("$") + 40] for c in prose if "$" in c]


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _exporter():
    """notebooks/export_html.py, the script behind ``make notebooks-html`` (it is not a package module)."""
    pytest.importorskip("nbconvert")
    pytest.importorskip("latex2mathml")  # the page's formulas, rendered when it is written
    spec = importlib.util.spec_from_file_location("export_html", NOTEBOOKS / "export_html.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_offline(html: str, name: str, nb) -> None:
    """Nothing on the page comes from the network, and every formula is MathML, not raw ``$...$``."""
    assert not _network_references(html), f"{name}: the page fetches {_network_references(html)[:3]}"
    has_maths = any("$" in c.source for c in nb.cells if c.cell_type == "markdown")
    assert not has_maths or 'class="qtg-math"' in html, f"{name}: the page renders no formula"
    assert not _raw_maths(html), f"{name}: formulas left as raw TeX: {_raw_maths(html)[:3]}"


def _check_html(nb, name: str, figures: int) -> None:
    """The executed notebook's HTML page: offline, plotly.js inline once, and one drawn div per figure, with data."""
    export = _exporter()
    html = export.to_html(nb)
    _check_offline(html, name, nb)
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


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_page_needs_no_network(name):
    """The page of each notebook (here unexecuted: the template and the markdown are what fetch things)."""
    nb = _read(NOTEBOOKS / name)
    _check_offline(_exporter().to_html(nb), name, nb)


def test_the_page_checks_catch_what_they_look_for():
    """A CDN script, a style sheet, a run-time import and raw TeX are each reported; a MathML page is not."""
    for fetched in ('<script src="https://cdnjs.cloudflare.com/ajax/libs/require.js/2.1.10/require.min.js">',
                    '<script type="text/javascript" src="//cdn.example.org/mathjax.js">',
                    '<link rel="stylesheet" href="http://fonts.example.org/a.css">',
                    '<style>@import url(https://fonts.example.org/b.css);</style>',
                    'const { default: mermaid } = await import("https://cdnjs.cloudflare.com/mermaid.esm.min.mjs");'):
        assert _network_references(f"<html><head>{fetched}</head></html>"), fetched
    assert not _network_references('<a href="https://example.org">a link</a><math class="qtg-math"><mi>x</mi></math>')
    raw = '<div class="jp-RenderedHTMLCommon jp-RenderedMarkdown"><p>with $\\gamma = 1$ here</p></div>'
    assert _raw_maths(raw) and not _raw_maths(raw.replace("$\\gamma = 1$", "<code>$HOME</code>"))


def test_forbidden_patterns_catch_the_old_claims():
    for name, lines in OLD_CLAIMS.items():
        for line in lines:
            assert any(re.search(p, line) for p in FORBIDDEN[name]), (name, line)


def test_the_verdict_check_catches_a_windows_interval():
    works = "filter off +0.0220 [+0.0150, +0.0290], across the 4 works [+0.0010, +0.0400] (worse)"
    windows = "position only -0.0057 [-0.0093, -0.0020] (better)"
    unsure = "across the 4 works [-0.0300, +0.0200] (no difference detected (± 0.0250))"
    assert not _verdicts_not_across_works(f"{works}\n{unsure}")
    caught = _verdicts_not_across_works(f"{works}\n{windows}")
    assert len(caught) == 1 and caught[0].endswith(windows)


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
    if name in VERDICTS_READ_WORKS:
        windows = _verdicts_not_across_works(printed)
        assert not windows, f"{name}: verdicts that do not read an interval across works: {windows}"
    assert seconds < budget, f"{name} took {seconds:.1f} s, over its {budget} s budget"
    changed = _repo_files() ^ before
    assert not changed, f"{name} wrote into the repository: {sorted(changed)[:5]}"
    _check_html(nb, name, plotted)  # make notebooks-html: every figure drawn offline from the executed notebook
