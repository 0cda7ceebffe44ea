"""What every experiment's grid of arms shares: arm records on disk, a pool of worker processes that runs the
unfinished arms, and the fixed-length training loop of one arm.

An arm is anything with an ``id``; its record is ``OUT/arms/<id>.json``, written by the process that ran it as
soon as it finishes, so an interrupted grid keeps every finished arm and the same command continues it. A
record carries the settings fingerprint it was produced with; reading it back under other settings is refused
(results are never mixed across settings). Strict JSON has no NaN, so a diverged arm's non-finite figures are
stored as null and read back as NaN: the trained arm is kept and reported as diverged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from amer.errors import ExperimentError, TrainingError
from amer.experiments.workers import imap_unordered
from amer.fileread import json_loads
from amer.report import write_json
from amer.runtime import tune_malloc

__all__ = ["Say", "say", "ArmLike", "GridSettings", "arm_path", "refuse_stale", "read_record", "write_record",
           "run_arms", "fit"]

log = logging.getLogger(__name__)

Say = Callable[..., None]


def say(*args: Any) -> None:
    """An experiment's progress line, to the ``amer`` loggers (see :mod:`amer.logs`)."""
    log.info(" ".join(str(a) for a in args))


class ArmLike(Protocol):
    @property
    def id(self) -> str: ...


@dataclass(kw_only=True)
class GridSettings:
    """What every chat-task grid's settings hold besides its own: the results directory, the data slice, the
    held-out evaluation's budget and the worker processes. Subclasses add their grid and :meth:`fingerprint`."""

    out: str
    eval_spans: int = 16  # STP spans per held-out example (fixed draws: comparable across arms)
    train_rows: int | None = None
    test_rows: int | None = None
    system_prompt: bool = False
    max_new_tokens: int = 64
    decode_batch: int = 256
    eval_batch: int = 128
    erank_tokens: int = 8192
    threads: int | None = None
    workers: int = 1
    device: str = "cpu"  # where arms train and are evaluated (cpu, cuda, cuda:N)
    dtype: str = "float32"  # float32, or bfloat16 autocast (training, evaluation and decoding; STP math in fp32)
    data_sha: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change an arm's result; a record made under another fingerprint is refused."""
        raise NotImplementedError


def arm_path(s: GridSettings, arm: ArmLike) -> Path:
    return Path(s.out) / "arms" / f"{arm.id}.json"


def refuse_stale(path: Path, old: Any, s: GridSettings) -> None:
    """Raise when ``old`` (a stored fingerprint) differs from the one of ``s``, naming every changed setting."""
    new = json_loads(json.dumps(s.fingerprint()))  # as JSON would read it back: tuples become lists
    old = old or {}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ExperimentError(f"{path} was produced with different settings ({changes}); use another --out, "
                              "or delete that directory to start over")


def read_record(path: Path, s: GridSettings, figures: Sequence[str]) -> dict[str, Any]:
    """The arm record at ``path`` (refused when stale), its null ``figures`` back as NaN."""
    rec = json_loads(path.read_text())
    refuse_stale(path, rec.get("settings"), s)
    return {k: math.nan if k in figures and v is None else v for k, v in rec.items()}


def write_record(path: Path, rec: dict[str, Any], figures: Sequence[str]) -> None:
    """Write ``rec`` atomically, its non-finite ``figures`` as null."""
    stored = {k: None if k in figures and isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}
    write_json(path, stored, compact_lists=False)


# One job kind per pool: (run, figures) travel with each job; the data is loaded once per worker process.
RunFn = Callable[[Any, Any, Any], dict[str, Any]]
_WORKER_DATA: Any = None


def _worker_init(load_data: Callable[[Any], Any], s: GridSettings) -> None:
    global _WORKER_DATA
    tune_malloc()
    torch.set_num_threads(s.threads or 1)
    _WORKER_DATA = load_data(s)


def _run_and_write(run: RunFn, figures: Sequence[str], arm: ArmLike, s: GridSettings, data: Any) -> dict[str, Any]:
    rec = run(arm, s, data)
    write_record(arm_path(s, arm), rec, figures)  # by the worker: a crash elsewhere keeps it
    return rec


def _worker_run(job: tuple[RunFn, Sequence[str], ArmLike, GridSettings]) -> dict[str, Any]:
    return _run_and_write(*job, _WORKER_DATA)


def run_arms(arms: Sequence[ArmLike], s: GridSettings, *, run: RunFn, load_data: Callable[[Any], Any],
             figures: Sequence[str], describe: Callable[[dict[str, Any]], str], label: str, data: Any = None,
             say: Say = say) -> list[dict[str, Any]]:
    """Run (or read back, when already written) every arm; returns their records in the order of ``arms``.

    ``run(arm, s, data)`` trains and evaluates one arm; ``load_data(s)`` gives its ``data`` (loaded here only
    when needed); ``describe(record)`` is its progress line. With ``s.workers > 1`` arms run in that many
    processes of ``s.threads or 1`` torch threads each: these models are too small for intra-op threads to pay,
    so two single-threaded arms at once on two cores nearly double the throughput of one two-threaded arm.
    ``run`` and ``load_data`` must be module-level functions (worker processes import them by name).
    """
    (Path(s.out) / "arms").mkdir(parents=True, exist_ok=True)
    have = {a.id: read_record(arm_path(s, a), s, figures) for a in arms if arm_path(s, a).is_file()}
    todo = [a for a in arms if a.id not in have]
    say(f"{label}: {len(arms)} arms ({len(have)} already done, {len(todo)} to run)")
    results: Iterable[dict[str, Any]]
    if min(s.workers, len(todo)) > 1:
        results = imap_unordered(_worker_run, [(run, figures, a, s) for a in todo], s.workers,
                                 init=_worker_init, initargs=(load_data, s))
    elif todo:
        loaded = data if data is not None else load_data(s)
        results = (_run_and_write(run, figures, a, s, loaded) for a in todo)
    else:
        results = ()
    t0 = time.perf_counter()
    for k, rec in enumerate(results, 1):
        have[rec["id"]] = rec
        eta = (time.perf_counter() - t0) / k * (len(todo) - k) / 60
        say(f"[{k}/{len(todo)}] {rec['id']}: {describe(rec)}; eta {eta:.1f} min")
    return [have[a.id] for a in arms]


def fit(step_fn: Callable[..., Any], batches: Iterator[Any], steps: int, lr_of: Callable[[int], float], *,
        name: str, log_every: int = 0) -> dict[str, Any]:
    """``steps`` calls of a :class:`~amer.training.TrainStep` on successive batches; returns the CE and STP means
    of the last 10% of applied steps, the skipped-step count and the wall and process seconds.

    A step the shared step skips (non-finite loss or gradient) applies nothing and is counted; the tail means
    are over applied steps only, and a tail with none left raises.
    """
    tail = max(1, steps // 10)
    ce_tail: list[float] = []
    stp_tail: list[float] = []
    skipped = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        res = step_fn((next(batches),), step, lr=lr_of(step))
        if not res.applied:
            skipped += 1
        elif step >= steps - tail:
            ce_tail.append(float(res.loss.ce.detach()))
            stp_tail.append(float(res.loss.stp.detach()))
        if log_every and (step + 1) % log_every == 0:
            say(f"    step {step + 1}/{steps} ce {float(res.loss.ce):.4f} stp {float(res.loss.stp):.4f}")
    if not ce_tail:
        raise TrainingError(f"arm {name}: every one of the last {tail} steps was non-finite and skipped "
                            f"({skipped} of {steps} in all); lower the learning rate (--lr)")
    return {"ce": sum(ce_tail) / len(ce_tail), "stp": sum(stp_tail) / len(stp_tail), "skipped": skipped,
            "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0}  # = dedicated-core seconds with 1 thread, even on a busy machine
