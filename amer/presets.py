"""Presets: named configurations in ``amer/patterns/*.toml`` (shipped with the package and linked from the
repository's top-level ``patterns/``), or ``$AMER_PATTERNS``. A preset's ``[model]`` table holds its pattern;
``[train]`` and ``[stp]`` its training defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from amer.configio import parse_toml, suggest
from amer.errors import PatternError

__all__ = ["patterns_dir", "preset_names", "preset_path", "load_preset"]


def _shown(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def patterns_dir() -> Path:
    """Where presets live: ``$AMER_PATTERNS`` or the package's ``amer/patterns/`` (installed with amer)."""
    env = os.environ.get("AMER_PATTERNS")
    return Path(env) if env else Path(__file__).resolve().parent / "patterns"


def preset_names() -> list[str]:
    d = patterns_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def preset_path(name: str) -> Path | None:
    p = Path(name) if name.endswith(".toml") else patterns_dir() / f"{name}.toml"
    try:
        return p if p.is_file() else None
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL: not a preset
        return None


def load_preset(name: str) -> dict[str, Any]:
    """The parsed TOML of preset ``name`` (a name in ``patterns/`` or a path to a .toml file)."""
    p = preset_path(name)
    if p is None:
        names = preset_names()
        hint = suggest(name, names, cutoff=0.6)
        raise PatternError(f"no preset named {_shown(name)} in {patterns_dir()}{hint} "
                           f"(available: {', '.join(names) or 'none'})")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise PatternError(f"preset {p}: cannot be read ({e.strerror})") from None
    data = parse_toml(raw, f"preset {p}", PatternError)
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("pattern"), str):
        raise PatternError(f"preset {p}: missing [model] table with a 'pattern' string")
    for table in ("train", "stp"):
        if not isinstance(data.get(table, {}), dict):
            raise PatternError(f"preset {p}: '{table}' must be a [{table}] table")
    return data
