"""``amer plot``: the training curves of one or several runs on the same panels (e.g. STP on vs off).

Reads each run's ``log.jsonl`` (nothing else is needed: a run still training can be plotted) and writes one
PNG. An existing output file is replaced only when amer drew it (its PNG carries amer's mark: a previous
``amer plot`` or a run's own ``curves.png``); anything else needs ``--force``.
"""

from __future__ import annotations

from pathlib import Path

from amer.cli.base import ArgParser
from amer.configio import path_arg
from amer.errors import ConfigError
from amer.fileio import refuse_link
from amer.report.curves import CURVES_NAME, curves_figure, is_amer_curves, save_curves
from amer.report.runlog import read_run

__all__ = ["build_parser", "command"]


def build_parser() -> ArgParser:
    p = ArgParser(prog="amer plot", description=(
        "Training curves of one or several runs overlaid on the same panels: train/val loss, STP per family "
        "and tap with the gate marked, token and depth curvature per family, tokens/s. One line style per "
        "run; the legend names each run."))
    p.add_argument("runs", nargs="+", metavar="RUN", type=path_arg,
                   help="run directories (each holding log.jsonl), or log.jsonl files")
    p.add_argument("--out", metavar="FILE.png", default=CURVES_NAME, type=path_arg,
                   help=f"the PNG to write (default ./{CURVES_NAME}); an existing file is replaced only when amer "
                        "drew it, otherwise add --force")
    p.add_argument("--labels", metavar="A,B,...",
                   help="comma-separated run names for the legend, one per RUN (default: the directory names)")
    p.add_argument("--keys", metavar="K1,K2,...",
                   help="extra log keys to draw, one panel each (e.g. grad_norm,lr,moe/load_max)")
    p.add_argument("--force", action="store_true", help="replace --out even if amer did not write it")
    return p


def _split(text: str, flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",")]
    if not all(items):
        raise ConfigError(f"{flag} must be comma-separated non-empty names, got {text!r}")
    return items


def _labels(runs: list[str], given: str | None) -> list[str]:
    seen: dict[Path, str] = {}
    for r in runs:
        key = Path(r).resolve()
        key = key.parent if key.name == "log.jsonl" else key
        if key in seen:
            raise ConfigError(f"run {r!r} is given twice (as {seen[key]!r} too); give each run once")
        seen[key] = r
    if given is not None:
        labels = _split(given, "--labels")
        if len(labels) != len(runs):
            raise ConfigError(f"--labels names {len(labels)} run(s) but {len(runs)} RUN(s) were given; give one "
                              "label per run")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--labels must be distinct so the legend tells the runs apart, got {given!r}")
        return labels
    names = [Path(r).resolve().name if Path(r).is_dir() or Path(r).name != "log.jsonl"
             else Path(r).resolve().parent.name for r in runs]
    # two runs with the same directory name (runs/a/r, runs/b/r) are named by the path given instead
    return [n if names.count(n) == 1 else r.rstrip("/") for n, r in zip(names, runs)]


def _check_out(out: Path, force: bool) -> None:
    refuse_link(out)  # --force or not: the PNG replaces the link's target otherwise
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {out / CURVES_NAME}")
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out} must end in .png (amer plot writes a PNG image)")
    if out.exists() and not force and not is_amer_curves(out):
        raise ConfigError(f"--out {out} exists and was not drawn by amer; choose another file or add --force "
                          "to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out {out}: {out.parent} is not a directory")


def command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for path in [args.out, *args.runs]:
        if "\0" in path:  # the OS refuses a NUL in a path with a traceback: say so first
            raise ConfigError(f"path {path!r} contains a NUL character")
    out = Path(args.out)
    _check_out(out, args.force)  # before the reading: a refused output path costs nothing
    labels = _labels(args.runs, args.labels)
    keys = _split(args.keys, "--keys") if args.keys else []
    logs = [read_run(r, name) for r, name in zip(args.runs, labels)]
    for key in keys:
        if not any(log.has(key) for log in logs):
            known = sorted({k for log in logs for k in log.keys()})
            raise ConfigError(f"--keys: no run logged {key!r}; logged keys are {', '.join(known)}")
    save_curves(curves_figure(logs, keys=keys), out)
    print(f"wrote {out} ({len(logs)} run{'s' if len(logs) > 1 else ''}: {', '.join(labels)})")
    return 0
