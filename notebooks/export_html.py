"""Execute the notebooks and write HTML pages that need no network: ``make notebooks-html``.

An executed notebook stores each figure as ``application/vnd.plotly.v1+json``, which only a
live JupyterLab renders: ``nbconvert --to html`` drops it and a hosted viewer shows nothing.
This script runs each notebook (nbclient, one thread, ``notebooks/`` as working directory),
turns every plotly output into a ``text/html`` output (a ``<div>`` and the script that draws
it), puts plotly.js itself inline once per page, before the first figure, and writes the
page with nbconvert's HTML exporter. The committed notebooks are read, never written.

Nothing on a page comes from the network. nbconvert's lab template loads require.js, MathJax
and mermaid from a CDN, so offline its equations stay raw ``$...$``: :class:`OfflineHTMLExporter`
leaves those three scripts out and renders every formula of the markdown cells to MathML on
this machine (latex2mathml), which browsers draw natively. Its styles are nbconvert's own,
inlined in the page.

    python notebooks/export_html.py                      # every notebook -> build/notebooks-html/
    python notebooks/export_html.py 02_topology_exact_vs_approx.ipynb --out /tmp/html
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import plotly.io as pio
from jinja2 import DictLoader, pass_context
from latex2mathml.converter import convert as latex_to_mathml
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbconvert import HTMLExporter
from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath
from plotly.offline import get_plotlyjs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PLOTLY = "application/vnd.plotly.v1+json"
DEFAULT_OUT = ROOT / "build" / "notebooks-html"
PLOTLY_JS_CLASS = "qtg-plotly-js"  # the one script that carries plotly.js
FIGURE_CLASS = "qtg-plotly-figure"  # every figure's div carries it, so a reader (or a test) can count them
MATH_CLASS = "qtg-math"  # every formula rendered to MathML carries it
# nbconvert's lab page without the three scripts it would fetch from a CDN (require.js, MathJax, mermaid)
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}<style type="text/css">math.qtg-math { font-size: 1.15em; }</style>{%- endblock extra_css -%}
"""


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    """Run ``nb`` top to bottom in a fresh ``python3`` kernel on one thread; outputs stay in ``nb``."""
    os.environ["OMP_NUM_THREADS"] = "1"  # the kernel inherits it: small kernels on 2 cores wait more than they gain
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    return nb


def plotly_outputs(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """Every output of ``nb`` that holds a plotly figure, in reading order."""
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if PLOTLY in o.get("data", {})]


def plotly_js() -> str:
    """plotly.js inline, as a global ``Plotly`` even where require.js is on the page.

    The offline page has no require.js, but a page built with nbconvert's own template loads it
    (when online), and plotly.js's UMD wrapper would then register itself as an AMD module instead
    of ``window.Plotly``; hiding ``define`` from it keeps the global that every figure's script calls.
    """
    return ('<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: "local"};</script>\n'
            f'<script type="text/javascript" class="{PLOTLY_JS_CLASS}">(function (define) {{\n'
            f"{get_plotlyjs()}\n}})(undefined);</script>\n")


def inline_figures(nb: nbformat.NotebookNode) -> int:
    """Give each plotly output a ``text/html`` form that draws it; the first also carries plotly.js.

    Returns:
        the number of figures converted.
    """
    figures = plotly_outputs(nb)
    for k, out in enumerate(figures):
        fig = out["data"].pop(PLOTLY)
        html = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"qtg-figure-{k}",
                           config={"responsive": True}, validate=False)
        out["data"]["text/html"] = (plotly_js() if k == 0 else "") + f'<div class="{FIGURE_CLASS}">{html}</div>'
        out["data"].pop("text/plain", None)  # "Figure({...})": the drawing replaces it
    return len(figures)


def mathml(tex: str, display: bool) -> str:
    """One formula as MathML (no namespace attribute: HTML5 knows ``<math>``)."""
    markup = latex_to_mathml(tex, display="block" if display else "inline")
    return markup.replace(' xmlns="http://www.w3.org/1998/Math/MathML"', f' class="{MATH_CLASS}"', 1)


class MathMLRenderer(IPythonRenderer):
    """nbconvert's markdown renderer with every ``$...$``, ``$$...$$`` and LaTeX environment drawn as MathML."""

    def block_math(self, body: str) -> str:
        return mathml(body, display=True)

    def inline_math(self, body: str) -> str:
        return mathml(body, display=False)

    def latex_environment(self, name: str, body: str) -> str:
        return mathml(f"\\begin{{{name}}}{body}\\end{{{name}}}", display=True)


class OfflineHTMLExporter(HTMLExporter):
    """The lab page with no script from the network, its maths rendered here (module docstring)."""

    def __init__(self, **kw):
        super().__init__(template_name="lab", extra_loaders=[DictLoader({"offline.html.j2": OFFLINE_TEMPLATE})],
                         template_file="offline.html.j2", **kw)

    @pass_context  # the filter reads the cell (attachments) and the path from the template's context
    def markdown2html(self, context, source):
        cell = context.get("cell", {})
        path = context.get("resources", {}).get("metadata", {}).get("path", "")
        renderer = MathMLRenderer(escape=False, attachments=cell.get("attachments", {}), embed_images=self.embed_images,
                                  path=path, anchor_link_text=self.anchor_link_text,
                                  exclude_anchor_links=self.exclude_anchor_links, **self.lexer_options)
        return MarkdownWithMath(renderer=renderer).render(source)


def to_html(nb: nbformat.NotebookNode) -> str:
    """The page for an executed notebook (its plotly outputs are converted in place)."""
    inline_figures(nb)
    body, _ = OfflineHTMLExporter().from_notebook_node(nb)
    return body


def export(path: Path, out_dir: Path, timeout: int = 600) -> tuple[Path, str | None]:
    """Execute the notebook at ``path`` and write ``out_dir/<name>.html``.

    Returns:
        (the page, None) or, when a cell raised, (the page up to and with the error, the error's last line).
    """
    nb = nbformat.read(path, as_version=4)
    error = None
    try:
        execute(nb, timeout=timeout)
    except CellExecutionError as e:  # the page still shows every output up to the failing cell, and its traceback
        error = re.sub(r"\x1b\[[0-9;]*m", "", str(e).strip().splitlines()[-1])  # without the terminal colours
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / (path.stem + ".html")
    target.write_text(to_html(nb), encoding="utf-8")
    return target, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebook files or names in notebooks/ (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    args = parser.parse_args(argv)
    paths = [Path(n) if Path(n).is_file() else HERE / n for n in args.notebooks] or sorted(HERE.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"export_html: no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    failed = []
    for path in paths:
        start = time.perf_counter()
        target, error = export(path, args.out, args.timeout)
        failure = f" (FAILED: {error})" if error else ""
        print(f"{path.name}: {time.perf_counter() - start:.1f} s -> {target}{failure}")
        if error:
            failed.append(path.name)
    if failed:
        print(f"export_html: {len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
