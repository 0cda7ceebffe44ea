"""Training curves as a picture: ``curves.png`` in every run directory, and ``amer plot`` over several runs.

One figure, five panels on the step axis, read from the runs' ``log.jsonl`` (:mod:`amer.report.runlog`):

- **loss**: training cross-entropy (line) and validation loss (circles), in nats per token;
- **STP per family** (thick) and **per tap** (thin, only where a family has several selected taps), the
  held-out STP (circles) and the step where the STP gate opens (vertical line);
- **token curvature per family** (stride 1, the ``embed`` and ``final`` taps included);
- **depth curvature per boundary type** (``A->E`` ...), coloured by the block after the boundary as in the
  curvature report;
- **tokens per second**.

The curvature panels and the STP panel carry the reference levels of ``1 - cos`` (:mod:`amer.report.style`:
1.0 random walk everywhere, 1.5 i.i.d. noise only along tokens). Colours come from the family registry;
several runs are told apart by line style (and by colour where the panel has no family colours), and the
legend names each run. Drawing reads nothing but the log and costs a fraction of a second, so the training
loop redraws it at every evaluation (:func:`draw_run_curves`, which never stops a run).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amer.families import families
from amer.report.runlog import LOG_NAME, RunLog, read_run
from amer.report.style import ENDS, UNREGISTERED_COLOUR, palette, reference_lines
from amer.report.writers import new_figure, save_figure

__all__ = ["CURVES_NAME", "curves_figure", "save_curves", "is_amer_curves", "write_run_curves", "draw_run_curves"]

log = logging.getLogger(__name__)

CURVES_NAME = "curves.png"
# Written into the PNG's tEXt "Software" field: ``amer plot`` overwrites a file only when it carries this.
MARK = "amer curves"
_DPI = 90

_RUN_COLOURS = ["#111111", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22"]
_RUN_STYLES: list[Any] = ["-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (3, 1, 1, 1, 1, 1)), (0, (9, 3))]
_MARKERS = ["o", "s", "^", "v", "D", "P", "X", "<", ">"]
_TAP = re.compile(r"^[A-Z]\d+$")
_NOT_TAPS = {"coeff", "live_grad_norm"}  # stp/<name> keys that are not a loss per tap or family


def _is_family(name: str) -> bool:
    return name in ENDS or (len(name) == 1 and name.isupper())


def _stp_keys(runs: Sequence[RunLog]) -> tuple[list[str], dict[str, list[str]]]:
    """The families with an ``stp/<F>`` series and, per family, its taps with ``stp/<tap>`` (any run)."""
    fams: dict[str, None] = {}
    taps: dict[str, dict[str, None]] = {}
    for run in runs:
        for key in run.keys():
            if not key.startswith("stp/") or key[4:] in _NOT_TAPS:
                continue
            name = key[4:]
            if _is_family(name):
                fams.setdefault(name, None)
            elif _TAP.match(name):
                taps.setdefault(name[0], {}).setdefault(name, None)
    return list(fams), {f: list(t) for f, t in taps.items()}


def _prefixed(runs: Sequence[RunLog], prefix: str) -> list[str]:
    seen: dict[str, None] = {}
    for run in runs:
        for key in run.keys():
            if key.startswith(prefix):
                seen.setdefault(key[len(prefix):], None)
    return list(seen)


def _family_order(names: list[str]) -> list[str]:
    """``embed``, the registered families in registry order, unknown letters, ``final``."""
    order = ["embed"] + [s.letter for s in families()] + sorted(n for n in names if n not in ENDS) + ["final"]
    return [n for n in dict.fromkeys(order) if n in names]


def _plot(ax: Any, run: RunLog, key: str, **kw: Any) -> bool:
    x, y = run.series(key)
    if x.size == 0:
        return False
    ax.plot(x, y, **kw)
    return True


def _gate(ax: Any, run: RunLog, style: Any, colour: str) -> None:
    if run.stp_start is not None:
        ax.axvline(run.stp_start, color=colour, ls=style, lw=0.9, alpha=0.8, zorder=0.7, gid="stp-gate",
                   label=f"STP gate opens ({run.name}, step {run.stp_start})")


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in the log", transform=ax.transAxes, ha="center", va="center", color="0.5")


def curves_figure(runs: Sequence[RunLog], *, keys: Sequence[str] = ()) -> Any:
    """The curves figure of one or several runs (a bare Agg ``Figure``); ``keys`` adds one panel per extra
    log key (e.g. ``grad_norm``). Run names label the lines, so give each run a distinct ``name``."""
    from matplotlib.lines import Line2D

    runs = list(runs)
    multi = len(runs) > 1
    colours = palette()
    extra_rows = math.ceil(len(keys) / 3)
    fig, axes = new_figure(2 + extra_rows, 3, figsize=(15.0, 4.2 * (2 + extra_rows)), squeeze=False)
    ax_loss, ax_stp, ax_tps = axes[0]
    ax_tok, ax_depth, ax_leg = axes[1]
    style = {r.name: _RUN_STYLES[i % len(_RUN_STYLES)] for i, r in enumerate(runs)}
    rcol = {r.name: (_RUN_COLOURS[i % len(_RUN_COLOURS)] if multi else "0.15") for i, r in enumerate(runs)}

    # loss
    for run in runs:
        s, c = style[run.name], rcol[run.name]
        _plot(ax_loss, run, "ce" if run.has("ce") else "loss", color=c, ls=s, lw=1.1, label=f"train ({run.name})")
        _plot(ax_loss, run, "val/loss", color=c if multi else _RUN_COLOURS[1], ls=s, lw=1.4, marker="o", ms=4,
              label=f"val ({run.name})")
        if run.skipped:
            ax_loss.plot(run.skipped, [0.02] * len(run.skipped), ls="", marker="x", color="#d62728", ms=6,
                         transform=ax_loss.get_xaxis_transform(), label=f"skipped step ({run.name})")
    ax_loss.set_title("loss: train CE (line), validation (o)", fontsize=9, y=1.0)
    ax_loss.set_ylabel("nats / token")

    # STP per family and tap
    fams, taps = _stp_keys(runs)
    for run in runs:
        s = style[run.name]
        for fam in _family_order(fams):
            c = colours.get(fam, UNREGISTERED_COLOUR)
            _plot(ax_stp, run, f"stp/{fam}", color=c, ls=s, lw=1.6)
            for tap in taps.get(fam, []) if len(taps.get(fam, [])) > 1 else []:
                _plot(ax_stp, run, f"stp/{tap}", color=c, ls=s, lw=0.6, alpha=0.6)
        _plot(ax_stp, run, "val/stp", color=rcol[run.name], ls="", marker="o", ms=4, label=f"val STP ({run.name})")
    if fams:
        reference_lines(ax_stp)
    else:
        _empty(ax_stp, "STP figures")
    ax_stp.set_title("STP loss per family (thick) and tap (thin); val STP (o); | gate opens", fontsize=9, y=1.0)
    ax_stp.set_ylabel("1 - cos")

    # token curvature per family, depth curvature per boundary type
    tok = _family_order(_prefixed(runs, "curv/tok/"))
    depth = _prefixed(runs, "curv/depth/")
    marker = {b: _MARKERS[i % len(_MARKERS)] for i, b in enumerate(depth)}
    for run in runs:
        s = style[run.name]
        for fam in tok:
            _plot(ax_tok, run, f"curv/tok/{fam}", color=colours.get(fam, UNREGISTERED_COLOUR), ls=s, lw=1.3)
        for b in depth:
            n = run.series(f"curv/depth/{b}")[0].size
            _plot(ax_depth, run, f"curv/depth/{b}", color=colours.get(b.split("->")[-1], UNREGISTERED_COLOUR),
                  ls=s, lw=1.1, marker=marker[b], ms=4, markevery=max(1, n // 8))
    for ax, have, iid, what in ((ax_tok, tok, True, "token curvature"), (ax_depth, depth, False, "depth curvature")):
        if have:
            reference_lines(ax, iid=iid)  # depth: 1.0 only (see amer.report.style)
        else:
            _empty(ax, what)
        ax.set_ylabel("1 - cos")
    ax_tok.set_title("token curvature per family (stride 1)", fontsize=9, y=1.0)
    ax_depth.set_title("depth curvature per boundary type (colour: block after it)", fontsize=9, y=1.0)
    for ax in (ax_stp, ax_tok, ax_depth):
        for run in runs:
            _gate(ax, run, style[run.name], rcol[run.name] if multi else "0.3")

    # tokens per second
    for run in runs:
        _plot(ax_tps, run, "tokens_per_s", color=rcol[run.name], ls=style[run.name], lw=1.1)
    if not any(r.has("tokens_per_s") for r in runs):
        _empty(ax_tps, "tokens_per_s")
    ax_tps.set_title("training throughput", fontsize=9, y=1.0)
    ax_tps.set_ylabel("tokens / s")

    # extra keys
    extra = list(axes[2:].ravel())
    for ax, key in zip(extra, keys):
        for run in runs:
            _plot(ax, run, key, color=rcol[run.name], ls=style[run.name], lw=1.1)
        ax.set_title(key, fontsize=9, y=1.0)
    for ax in extra[len(keys):]:
        ax.set_axis_off()
    for ax in [ax_loss, ax_stp, ax_tps, ax_tok, ax_depth, *extra[:len(keys)]]:
        ax.locator_params(nbins=5)  # fewer tick labels: text is most of the drawing time
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(color="0.92", lw=0.6)

    # legends, in the sixth panel
    ax_leg.set_axis_off()
    run_handles = [Line2D([], [], color=rcol[r.name], ls=style[r.name], lw=1.5, label=r.name) for r in runs]
    run_handles += [Line2D([], [], color="0.3", lw=0.9, label="STP gate opens (vertical)"),
                    Line2D([], [], color="0.45", lw=0.8, ls=(0, (4, 3)),
                           label="1.0 random walk; 1.5 i.i.d. noise\n(along tokens only)")]
    if any(r.skipped for r in runs):
        run_handles.append(Line2D([], [], ls="", marker="x", color="#d62728", label="skipped step"))
    names = {s.letter: f"{s.letter} {s.name}" for s in families()} | {k: v[0] for k, v in ENDS.items()}
    fam_handles = [Line2D([], [], color=colours.get(f, UNREGISTERED_COLOUR), lw=3, label=names.get(f, f))
                   for f in _family_order(list(dict.fromkeys(tok + fams)))]
    depth_handles = [Line2D([], [], color=colours.get(b.split("->")[-1], UNREGISTERED_COLOUR), marker=marker[b],
                            lw=1, label=b) for b in depth]
    first = ax_leg.legend(handles=run_handles, title="runs" if multi else f"run {runs[0].name}", loc="upper left",
                          fontsize=8, title_fontsize=8, frameon=False)
    if fam_handles:
        ax_leg.add_artist(first)
        second = ax_leg.legend(handles=fam_handles, title="families", loc="upper right", fontsize=8,
                               title_fontsize=8, frameon=False)
        if depth_handles:
            ax_leg.add_artist(second)
            ax_leg.legend(handles=depth_handles, title="depth boundaries", loc="lower right", ncols=2, fontsize=7,
                          title_fontsize=8, frameon=False)
    last = max((int(r.steps[-1]) for r in runs if r.steps.size), default=0)
    fig.suptitle(("training curves: " + " vs ".join(r.name for r in runs)) if multi
                 else f"training curves: {runs[0].name} (step {last})", fontsize=11)
    height = 4.2 * (2 + extra_rows)  # inches: fixed margins for the suptitle and the step labels
    fig.subplots_adjust(left=0.05, right=0.985, top=1 - 0.7 / height, bottom=0.55 / height, wspace=0.22,
                        hspace=0.32)
    return fig


def save_curves(fig: Any, path: str | Path) -> Path:
    """``fig`` as PNG at ``path`` (atomically), marked as amer's in the PNG's ``Software`` text field."""
    # zlib level 1: a third of the encoding time for a few more kilobytes, paid at every evaluation
    return save_figure(fig, path, dpi=_DPI, metadata={"Software": MARK}, pil_kwargs={"compress_level": 1})


def is_amer_curves(path: str | Path) -> bool:
    """Whether ``path`` is a PNG that :func:`save_curves` wrote (its ``Software`` text field says so)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pos = 8
    while pos + 8 <= len(data):  # chunks: length, type, data, CRC; text chunks come before the image data
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt" and body == b"Software\x00" + MARK.encode("latin-1"):
            return True
        if kind in (b"IDAT", b"IEND"):
            return False
        pos += 12 + length
    return False


def write_run_curves(run_dir: str | Path) -> Path | None:
    """Draw ``run_dir/log.jsonl`` into ``run_dir/curves.png``; None (nothing written) while the log holds no
    record yet. Raises what reading or drawing raises."""
    run_dir = Path(run_dir)
    log = read_run(run_dir, allow_empty=True)
    if not log.records and not log.skipped:
        return None
    return save_curves(curves_figure([log]), run_dir / CURVES_NAME)


# run directory -> (size, mtime) of the log the last picture drew: the end of a run, right after its last
# evaluation, does not draw the same log twice
_DRAWN: dict[str, tuple[int, int]] = {}


def draw_run_curves(run_dir: str | Path) -> Path | None:
    """:func:`write_run_curves` for the training loop, called at every evaluation and at the end of a run.

    Nothing to draw (no log yet) and a log unchanged since this process last drew it are no-ops. A picture
    that cannot be drawn (a full disk, a broken matplotlib) costs a warning line, never the run; under
    pytest (``PYTEST_CURRENT_TEST`` is set) the error is raised instead, so a test never passes over a
    drawing bug."""
    run_dir = Path(run_dir)
    out = run_dir / CURVES_NAME
    try:
        st = (run_dir / LOG_NAME).stat()
    except OSError:
        return None
    sig = (st.st_size, st.st_mtime_ns)
    if _DRAWN.get(str(run_dir)) == sig and out.is_file():
        return out
    try:
        path = write_run_curves(run_dir)
    except Exception as e:  # noqa: BLE001  (a figure is never worth a training run)
        if os.environ.get("PYTEST_CURRENT_TEST"):
            raise
        log.warning(f"warning: {CURVES_NAME} not drawn ({type(e).__name__}: {e}); training goes on")
        return None
    _DRAWN[str(run_dir)] = sig
    return path
