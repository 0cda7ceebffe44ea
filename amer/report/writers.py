"""JSON, table and figure writers (see the package docstring)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amer.fileio import atomic_write_bytes, atomic_write_text, json_text

__all__ = ["atomic_write_text", "dumps_json", "write_json", "md_table", "text_table", "new_figure", "save_figure"]


def dumps_json(obj: Any, level: int = 0) -> str:
    """JSON with lists of scalars kept on one line (per-sequence rows stay readable); NaN is refused."""
    pad, end = "  " * (level + 1), "  " * level
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        return "{\n" + ",\n".join(f"{pad}{json.dumps(str(k))}: {dumps_json(v, level + 1)}" for k, v in obj.items()) \
            + "\n" + end + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return "[" + ", ".join(json.dumps(v, allow_nan=False) for v in obj) + "]"
        return "[\n" + ",\n".join(pad + dumps_json(v, level + 1) for v in obj) + "\n" + end + "]"
    return json.dumps(obj, allow_nan=False)


def write_json(path: str | Path, obj: Any, *, compact_lists: bool = True) -> Path:
    """``obj`` as JSON at ``path`` (atomically); ``compact_lists=False`` gives plain ``indent=2`` JSON. Either
    way a non-finite number is refused: NaN and Infinity are not JSON."""
    text = dumps_json(obj) if compact_lists else json_text(obj)
    return atomic_write_text(path, text + "\n")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A left-aligned terminal table with a dashed rule under the header."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None,
               layout: str | None = None, **subplots: Any) -> tuple[Any, Any]:
    """``(figure, axes)`` like ``pyplot.subplots``, but a bare Agg ``Figure``: no pyplot, so a report drawn
    from a notebook or GUI session neither switches its backend nor leaves figures open."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **subplots)


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120, **options: Any) -> Path:
    """Save ``fig`` as PNG at ``path`` (atomically); ``options`` go to ``savefig`` (e.g. ``metadata``)."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png", **options)
    return atomic_write_bytes(path, buf.getvalue())
