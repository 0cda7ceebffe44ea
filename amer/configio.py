"""Typed-config plumbing: fields that carry their help text, validation that names the field, and the
conversion between config dataclasses and nested dicts (TOML tables, JSON) with typo suggestions.

A config class with its own layout provides ``_from_dict(data, where)`` / ``_to_dict()`` hooks
(:class:`amer.config.ModelConfig`: one table per registered block family).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

from amer.errors import ConfigError
from amer.fileread import read_regular

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["suggest", "check", "opt", "from_dict", "to_dict", "coerce", "load_toml", "number", "number_arg", "path_arg",
           "check_fields", "parse_toml", "INT_MAX"]

INT_MAX = 2**63 - 1  # what a seed, a count or a size can hold once it reaches torch


def suggest(name: str, choices: typing.Iterable[str], *, cutoff: float = 0.5) -> str:
    """A ``"; did you mean 'x'?"`` suffix for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return f"; did you mean '{close[0]}'?" if close else ""


def check(cond: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``cond``."""
    if not cond:
        raise ConfigError(msg)



def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _fmt(x: float) -> str:
    return "2^63-1" if x == INT_MAX else f"{x:g}"


def _describe(integer: bool, ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    kind = "an integer" if integer else "a finite number"
    lo = ("[", ge) if ge is not None else ("(", gt) if gt is not None else None
    hi = ("]", le) if le is not None else (")", lt) if lt is not None else None
    if lo and hi:
        return f"{kind} in {lo[0]}{_fmt(lo[1])}, {_fmt(hi[1])}{hi[0]}"
    if lo:
        return f"{kind} {'>=' if lo[0] == '[' else '>'} {_fmt(lo[1])}"
    if hi:
        return f"{kind} {'<=' if hi[0] == ']' else '<'} {_fmt(hi[1])}"
    return kind


def number(value: Any, name: str, *, integer: bool = False, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
    """The one check of a number that came from outside (flag, TOML, JSON, constructor argument): of the
    right kind, finite, inside its range, and for integers no larger than torch can hold. Returns it
    (an int as an int, a float as a float); anything else is a :class:`ConfigError` naming ``name``, the
    value and what is accepted."""
    what = _describe(integer, ge, gt, le, lt)
    if integer and le is None and lt is None:  # said only to whoever passes it: torch holds no larger integer
        le = INT_MAX
        if isinstance(value, int) and value > INT_MAX:
            what += " and at most 2^63-1"
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if ok and not integer:
        value = float(value)
        ok = math.isfinite(value)
    ok = ok and (ge is None or value >= ge) and (gt is None or value > gt) \
        and (le is None or value <= le) and (lt is None or value < lt)
    if not ok:
        raise ConfigError(f"{name} must be {what}, got {_show(value)}")
    return value


def number_arg(integer: bool = False, **bounds: float) -> Callable[[str], Any]:
    """An argparse ``type=`` for a numeric flag checked by :func:`number` (argparse names the flag)."""
    def parse(text: str) -> Any:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = text
        try:
            return number(value, "value", integer=integer, **bounds)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).replace("value must be", "must be", 1)) from None

    parse.__name__ = "integer" if integer else "number"  # what argparse says when it cannot convert
    return parse


def path_arg(text: str) -> str:
    """An argparse ``type=`` for a path: the empty string (which would quietly mean the working directory) and a
    NUL (which the OS refuses with a traceback) are errors naming the argument."""
    if text == "":
        raise argparse.ArgumentTypeError("must be a path, got an empty string")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"must be a path, got {text!r:.60} (a NUL character)")
    return text


path_arg.__name__ = "path"


def opt(default: Any, help: str, *, ge: float | None = 0, gt: float | None = None, le: float | None = None,
        lt: float | None = None, **kw: Any) -> Any:
    """A dataclass field carrying its ``--help`` text and, for a number, its accepted range (checked by
    :func:`check_fields`): finite, and ``>= 0`` unless the field says otherwise."""
    if gt is not None:
        ge = None
    kw["bounds"] = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(value: Any, tp: Any, name: str, bounds: dict[str, Any]) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (int, float):
        number(value, name, integer=tp is int, **bounds)
    elif origin is tuple and isinstance(value, tuple):
        for i, (v, t) in enumerate(zip(value, args)):
            _check_value(v, t, f"{name}[{i}]", bounds)
    elif origin is dict and isinstance(value, dict) and args:
        for k, v in value.items():
            _check_value(v, args[1], f"{name}[{k!r}]", bounds)


_DEFAULT_BOUNDS = {"ge": 0, "gt": None, "le": None, "lt": None}  # a field whose opt() predates ranges


def check_fields(cfg: Any, prefix: str) -> None:
    """Check every numeric field of dataclass ``cfg`` against its declared range (see :func:`opt`);
    errors name the field as ``prefix + name``."""
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        bounds = f.metadata.get("bounds", _DEFAULT_BOUNDS)
        _check_value(getattr(cfg, f.name), hints[f.name], f"{prefix}{f.name}", bounds)


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with a suggestion."""
    if not isinstance(data, dict):
        table = where.rstrip(".")
        hint = f" (in TOML a [{table}] section with keys)" if table else ""
        raise ConfigError(f"{table or cls.__name__} must be a table{hint}, got {type(data).__name__} {_show(data)}")
    if where and not where.endswith("."):
        where += "."
    if hasattr(cls, "_from_dict"):  # a config with its own layout (ModelConfig: one table per family)
        return cls._from_dict(data, where)  # type: ignore[attr-defined]
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    names = list(fields)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in names:
            raise ConfigError(
                f"unknown key '{where}{key}'{suggest(k, names)} (accepted: {', '.join(names)})"
            )
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and not isinstance(value, tp):  # a scalar here is a mistake, not a value
            value = from_dict(tp, value, where=f"{where}{k}")
        else:
            value = coerce(value, tp, f"{where}{k}")
            if where:  # a nested config (a block family's) may use a value in its own checks before its owner
                _check_value(value, tp, f"{where}{k}", fields[k].metadata.get("bounds", _DEFAULT_BOUNDS))
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
        if isinstance(value, bool) and {"on", "off"} <= set(args):  # a switch that also has 'auto': true is 'on'
            value = "on" if value else "off"
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
        fixed = [a for a in args if a is not Ellipsis]
        if not isinstance(value, (list, tuple)) or (Ellipsis not in args and len(value) != len(fixed)):
            n = f"{len(fixed)} " if Ellipsis not in args else ""
            raise ConfigError(f"{name} must be a list of {n}values, got {_show(value)}")
        kinds = fixed * len(value) if Ellipsis in args else fixed
        return tuple(coerce(v, t, f"{name}[{i}]") for i, (v, t) in enumerate(zip(value, kinds)))
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
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; give a TOML file")
    if not p.exists() and not p.is_symlink():
        raise ConfigError(f"config file not found: {p}")
    raw = read_regular(p, lambda why: ConfigError(f"config file {p} {why}; give a TOML file"))
    return parse_toml(raw, str(p), ConfigError)


def parse_toml(raw: bytes, source: str, error: type[Exception]) -> dict[str, Any]:
    """TOML from bytes; a file that is not UTF-8 or not TOML raises ``error`` naming ``source`` and where."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}); TOML files are "
                    "UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"{source}: invalid TOML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise error(f"{source}: nested too deeply to read (thousands of levels of brackets)") from None
