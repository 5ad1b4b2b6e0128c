"""Every tab's figures to standalone HTML and PNG, its numbers to JSON, in this launch's export folder.

A tab's last result is an :class:`Exportable` kept in the session. ``export`` writes
``<export folder>/<tab>-<id>/`` holding ``figures.html`` (all figures, plotly.js inlined, so
it opens offline), one ``<name>.png`` per figure, ``numbers.json`` and, for a tab with tables (Patching),
one ``<name>.csv`` per table. PNG needs plotly's
kaleido and a Chromium; without them the HTML and JSON are still written and the message
says why the PNGs are missing (the camera icon on each figure also saves a PNG).

The export folder is private to one launch (:func:`private_dir`: a fresh name, mode 0700,
created atomically, so nothing planted beforehand is followed), every file in it is
readable by its owner only, and :func:`prune` keeps it under a size and an age, oldest first.
What the page and API clients get names a file under ``exports/`` (:func:`public_path`), never by the
folder's path; the server maps the name back (:func:`real_path`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from app.models import AppInputError
from qtg.plots.topology import save_html

log = logging.getLogger(__name__)

SERVED_AS = "exports"  # the export folder's name in served files' URLs
PNG_SIZE = (1200, 600)  # width, height of a PNG whose figure sizes itself to the page
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# C0 controls (but tab and newline) and DEL: Chromium drops a figure holding one (a NUL in a token label)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass
class Exportable:
    tab: str
    figures: dict[str, Any] = field(default_factory=dict)  # name -> plotly Figure, or a function making one
    numbers: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)  # name -> {"headers": [...], "data": [[...]]}: <name>.csv


def private_dir(parent: Path | None = None) -> Path:
    """A fresh folder only this user can enter (``mkdtemp``: new name, mode 0700, atomic).

    ``parent`` (the folder a user named; default the system's temporary folder) must be a real
    folder, not a symbolic link; it is created (mode 0700) when missing.

    Raises:
        AppInputError: ``parent`` is a link or not a folder.
    """
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    if parent.is_symlink():
        raise AppInputError(f"export dir {parent} is a symbolic link: name a real folder")
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(parent).st_mode):
        raise AppInputError(f"export dir {parent} is not a folder")
    return Path(tempfile.mkdtemp(prefix="qtg-explorer-", dir=parent))


def public_path(path: str | Path, folder: Path) -> str:
    """``exports/<path relative to folder>``: how a file in the export folder is named to the page."""
    return f"{SERVED_AS}/{Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()}"


def real_path(public: str, folder: Path) -> Path | None:
    """The file in ``folder`` that :func:`public_path` named; None for a name that is not one (an empty,
    ``.`` or ``..`` part: nothing outside the folder is named)."""
    head, _, rest = public.partition("/")
    parts = rest.split("/")
    if head != SERVED_AS or any(p in ("", ".", "..") for p in parts):
        return None
    return Path(folder).joinpath(*parts)


def prune(folder: Path, max_bytes: int, max_age_s: float, keep: Path | None = None) -> int:
    """Remove files older than ``max_age_s``, then the oldest until the folder holds at most ``max_bytes``.

    Links are never followed (a link counts as its own few bytes and is removed like a file).
    Files under ``keep`` (the export just written) stay. Returns the number of files removed.
    """
    files = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, path))
    files.sort()  # oldest first
    now, total, removed = time.time(), sum(size for _, size, _ in files), 0
    for mtime, size, path in files:
        if now - mtime <= max_age_s and total <= max_bytes:
            break
        if keep is not None and path.is_relative_to(keep):
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        removed += 1
    for root, dirs, _ in os.walk(folder, topdown=False, followlinks=False):
        for d in dirs:
            try:
                os.rmdir(os.path.join(root, d))  # only empty ones go
            except OSError:
                pass
    return removed


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


def printable(obj: Any) -> Any:
    """A copy with control characters in every string shown as their Unicode pictures (NUL -> ␀, DEL -> ␡)."""
    if isinstance(obj, str):
        return _CONTROL.sub(lambda m: "␡" if m.group() == "\x7f" else chr(0x2400 + ord(m.group())), obj)
    if isinstance(obj, dict):
        return {k: printable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(printable(v) for v in obj)
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "OUS":
        return np.array([printable(v) for v in obj.ravel().tolist()], dtype=object).reshape(obj.shape)
    return obj


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "figure"


def write_pngs(figures: list[go.Figure], paths: list[Path]) -> str | None:
    """Write the PNGs in one Chromium session (kaleido starts one browser per call), each at its figure's
    own size (a figure that follows the page's width gets ``PNG_SIZE``). None on success, else why not."""
    import plotly.io as pio

    try:
        pio.write_images(figures, [str(p) for p in paths], format="png",
                         width=[f.layout.width or PNG_SIZE[0] for f in figures],
                         height=[f.layout.height or PNG_SIZE[1] for f in figures])
        return None
    except Exception as e:  # kaleido or Chromium missing or failing: HTML and JSON still stand
        log.warning("PNG export failed: %s", str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def write_csv(table: dict[str, Any], path: Path) -> Path:
    """``{"headers", "data"}`` as a CSV file (non-finite numbers as empty cells, as in the JSON's nulls)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table["headers"])
        writer.writerows(to_json(table["data"]))
    return path


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == PNG_MAGIC
    except OSError:
        return False


def export(item: Exportable | None, export_dir: Path, png: bool = True,
           max_bytes: int = 256 * 2**20, max_age_s: float = 6 * 3600.0) -> tuple[list[str], str]:
    """Write the files; returns (the paths written, a one-paragraph message for the page, naming no path).

    Before returning, the export folder is pruned to ``max_bytes`` and ``max_age_s`` (this export kept).
    """
    if item is None or not (item.figures or item.numbers):
        raise AppInputError("nothing to export yet: run this tab first")
    out = Path(export_dir) / f"{_safe(item.tab)}-{uuid.uuid4().hex[:10]}"
    out.mkdir(mode=0o700)
    made = {name: f() if callable(f) else f for name, f in item.figures.items()}  # costly ones: made on export
    figures = {name: go.Figure(printable(f.to_plotly_json())) for name, f in made.items()}
    paths = []
    if figures:
        paths.append(save_html(list(figures.values()), out / "figures.html", title=f"QTG Explorer: {item.tab}"))
    numbers = out / "numbers.json"
    numbers.write_text(json.dumps(to_json(item.numbers), indent=2, allow_nan=False), encoding="utf-8")
    paths.append(numbers)
    paths += [write_csv(table, out / f"{_safe(name)}.csv") for name, table in item.tables.items()]
    why_not = None
    if png and figures:
        targets = [out / f"{_safe(name)}.png" for name in figures]
        why_not = write_pngs(list(figures.values()), targets)
        written = [p for p in targets if _is_png(p)]
        if not why_not and len(written) < len(targets):
            why_not = f"{len(targets) - len(written)} of {len(targets)} figures were not drawn"
        paths += written
    for p in paths:
        os.chmod(p, 0o600)
    prune(Path(export_dir), max_bytes, max_age_s, keep=out)
    msg = f"Wrote {len(paths)} file(s): {', '.join(Path(p).name for p in paths)} (download them below)."
    if why_not:
        msg += (f" PNG export failed ({why_not}); it needs `kaleido` and Chromium. Each figure's camera "
                "icon saves a PNG from the browser.")
    return [str(p) for p in paths], msg
