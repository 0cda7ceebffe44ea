"""Typed-config plumbing: fields that carry their help text, validation that names the field, and the
conversion between config dataclasses and nested dicts (TOML tables, JSON) with typo suggestions.

A config class with its own layout provides ``_from_dict(data, where)`` / ``_to_dict()`` hooks
(:class:`amer.config.ModelConfig`: one table per registered block family).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

from amer.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["suggest", "check", "opt", "from_dict", "to_dict", "coerce", "load_toml"]


def suggest(name: str, choices: typing.Iterable[str], *, cutoff: float = 0.5) -> str:
    """A ``"; did you mean 'x'?"`` suffix for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return f"; did you mean '{close[0]}'?" if close else ""


def check(cond: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``cond``."""
    if not cond:
        raise ConfigError(msg)



def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its ``--help`` text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a table, got {type(data).__name__}")
    if hasattr(cls, "_from_dict"):  # a config with its own layout (ModelConfig: one table per family)
        return cls._from_dict(data, where)  # type: ignore[attr-defined]
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in names:
            raise ConfigError(
                f"unknown key '{where}{key}'{suggest(k, names)} (accepted: {', '.join(names)})"
            )
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, where=f"{where}{k}.")
        else:
            value = coerce(value, tp, f"{where}{k}")
        kwargs[k] = value
    return cls(**kwargs)


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Light type checking for scalar fields (TOML already gives typed values)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table, got {value!r}")
        return {str(k): coerce(v, args[1], f"{name}.{k}") for k, v in value.items()}
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (JSON/TOML friendly)."""
    if hasattr(cfg, "_to_dict"):
        return cfg._to_dict()
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) or hasattr(v, "_to_dict"):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning a syntax error into a one-line :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
