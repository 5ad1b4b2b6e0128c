"""A plain-text table for terminal output (no dependency, aligned columns)."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list[object]], right: set[int] | None = None) -> str:
    """Columns padded to their widest cell; indices in ``right`` are right-aligned."""
    right = right or set()
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
