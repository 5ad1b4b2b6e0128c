"""Every tab's figures to standalone HTML and PNG, its numbers to JSON, under the export directory.

A tab's last result is an :class:`Exportable` kept in the session. ``export`` writes
``<export_dir>/<tab>-<id>/`` holding ``figures.html`` (all figures, plotly.js inlined, so
it opens offline), one ``<name>.png`` per figure, and ``numbers.json``. PNG needs plotly's
kaleido and a Chromium; without them the HTML and JSON are still written and the message
says why the PNGs are missing (the camera icon on each figure also saves a PNG).
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from app.models import AppInputError
from qtg.plots import save_html

log = logging.getLogger(__name__)


@dataclass
class Exportable:
    tab: str
    figures: dict[str, Any] = field(default_factory=dict)  # name -> plotly Figure
    numbers: dict[str, Any] = field(default_factory=dict)


def to_json(obj: Any) -> Any:
    """JSON-able copy: numpy and torch become lists and floats, non-finite floats become null."""
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    return obj


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "figure"


def write_pngs(figures: list[Any], paths: list[Path]) -> str | None:
    """Write the PNGs in one Chromium session (kaleido starts one browser per call); None on success,
    else why not."""
    import plotly.io as pio

    try:
        for fig in figures:  # the page's height, a fixed width: the same picture whoever exports it
            fig.update_layout(width=fig.layout.width or 1200)
        pio.write_images(figures, [str(p) for p in paths], format="png")
        return None
    except Exception as e:  # kaleido or Chromium missing or failing: HTML and JSON still stand
        log.warning("PNG export failed: %s", e)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def export(item: Exportable | None, export_dir: Path, png: bool = True) -> tuple[list[str], str]:
    """Write the files; returns (paths, a one-paragraph message for the page)."""
    if item is None or not (item.figures or item.numbers):
        raise AppInputError("nothing to export yet: run this tab first")
    out = Path(export_dir) / f"{_safe(item.tab)}-{uuid.uuid4().hex[:10]}"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if item.figures:
        paths.append(save_html(list(item.figures.values()), out / "figures.html", title=f"QTG Explorer: {item.tab}"))
    numbers = out / "numbers.json"
    numbers.write_text(json.dumps(to_json(item.numbers), indent=2, allow_nan=False), encoding="utf-8")
    paths.append(numbers)
    why_not = None
    if png and item.figures:
        targets = [out / f"{_safe(name)}.png" for name in item.figures]
        why_not = write_pngs([go.Figure(f) for f in item.figures.values()], targets)
        paths += [] if why_not else targets
    msg = f"Wrote {len(paths)} file(s) to `{out}`."
    if why_not:
        msg += (f" PNG export failed ({why_not}); it needs `kaleido` and Chromium. Each figure's camera "
                "icon saves a PNG from the browser.")
    return [str(p) for p in paths], msg
