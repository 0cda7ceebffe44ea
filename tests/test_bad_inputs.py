"""Every bad input a user can give, as a table: each must end with exit code 2 and exactly one line on stderr
(``error: ...`` naming the problem), never a traceback; or it is accepted because the documentation (README.md,
docs/) describes it as valid. Cases run in-process through ``amer.cli.main`` (a handful as real subprocesses at
the end, for the exit code and the absence of a traceback end to end).

The numeric flags are generated from the config classes, so a new option is in the table the day it is
added; the rest are written out by kind: flags, TOML, data, resume, sample, curvature, bench, patterns,
experiments, run names, patterns and selectors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import amer.cli as cli
from amer.config import TrainConfig, options

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]  # after `amer`; {tmp}, {run}, {ckpt}, {nlrx}, {exp}, {hf} are filled in per case
    needles: tuple[str, ...] = ()  # must all appear in the error line ("a|b": one of them)
    ok: bool = False  # accepted because documented as valid
    prep: Callable[[Path], object] | None = None  # damages the case's own copies, writes files; may return a
    # function to call when the case is over (e.g. releasing a lock it holds)
    absent: tuple[str, ...] = ()  # must not appear in the error line (advice that would be wrong here)

    def filled(self, tmp: Path, ckpt: Path) -> list[str]:
        return [a.format(tmp=tmp, run=tmp / "run", ckpt=ckpt, nlrx=tmp / "nlrx", exp=tmp / "exp", hf=tmp / "hf")
                for a in self.argv]


TRAIN = ("train", "--preset", "tiny", "--out-dir", "{tmp}/out", "--no-progress", "--no-tensorboard", "--no-curves",
         "--steps", "1",
         "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1")


def T(*args: str, needles: tuple[str, ...] = (), ok: bool = False, prep=None, absent: tuple[str, ...] = ()) -> Case:
    return Case((*TRAIN, *args), needles, ok, prep, absent)


def _base(tp: object) -> object:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def numeric_flag_cases() -> dict[str, Case]:
    """Non-numbers, NaN, infinities, negatives and integers past 2^63 for every numeric option of amer train."""
    out = {}
    for o in options(TrainConfig):
        base, flag = _base(o.type), "--" + o.key.replace("_", "-")
        name = o.key.rsplit(".", 1)[-1]
        bad = ({"float": ["nan", "inf", "-inf", "-1", "abc"], "int": ["nan", "-1", "1.5", "9" * 23]}
               .get(getattr(base, "__name__", ""), []))
        for value in bad:  # argparse names the flag (--min-lr-ratio), the config check the field (min_lr_ratio)
            out[f"flag {flag} {value[:8]}"] = T(flag, value, needles=(f"{name}|{name.replace('_', '-')}",))
    return out


# ---------------------------------------------------------------- files the cases need


def _write(rel: str, data: str | bytes) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return prep


def _meta(change: Callable[[dict], object], *, replace: bool = False) -> Callable[[Path], None]:
    """Edit the latest checkpoint's meta.json in place (``replace``: write what ``change`` returns instead)."""
    def prep(tmp: Path) -> None:
        p = tmp / "run" / "step_000004" / "meta.json"
        meta = json.loads(p.read_text())
        new = change(meta)
        p.write_text(json.dumps(new if replace else meta))
    return prep


def _optim(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        p = tmp / "run" / "step_000004" / "optim.safetensors"
        t = load_file(str(p))
        change(t)
        save_file(t, str(p))
    return prep


def _shrink(t: dict) -> None:
    key = sorted(k for k in t if k.endswith(".exp_avg"))[3]
    t[key] = t[key].flatten()[:5].clone()


def _drop_checkpoints(tmp: Path) -> None:
    for ck in (tmp / "run").glob("step_*"):
        shutil.rmtree(ck)
    shutil.rmtree(tmp / "run" / "best")


def _all(*preps: Callable[[Path], None]) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        for p in preps:
            p(tmp)
    return prep


def _wordlevel(words: list[str]) -> dict:
    """A minimal Hugging Face tokenizer.json (word level) with ``words`` and an unknown token."""
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate([*words, "[UNK]"])},
                      "unk_token": "[UNK]"}}


def _nlrx(tmp: Path) -> None:
    (tmp / "nlrx").mkdir()
    for f in ("synth_train.jsonl", "synth_test.jsonl"):
        (tmp / "nlrx" / f).write_text("")


TOML = "--config", "{tmp}/c.toml"


def toml(text: str | bytes, *needles: str) -> Case:
    return T(*TOML, needles=needles, prep=_write("c.toml", text))


RESUME = ("train", "--resume", "{run}", "--no-progress")
NLRX = ("experiment", "nlrx", "--data-dir", "{nlrx}")
CURV = ("curvature", "--pattern", "tiny", "--batches", "1", "--batch-size", "2", "--seq-len", "32",
        "--n-bootstrap", "10", "--no-progress")

WRITTEN: dict[str, Case] = {
    # ------------------------------------------------ train: values that look like numbers, choices, names
    "flag --dtype float16": T("--dtype", "float16", needles=("--dtype", "bfloat16")),
    "flag --packing bogus": T("--packing", "bogus", needles=("--packing",)),
    "flag --compile bogus": T("--compile", "sometimes", needles=("--compile", "'auto', 'on', 'off'")),
    "flag --stepz": T("--stepz", "3", needles=("did you mean '--steps'",)),
    "flag --step (abbreviation)": T("--step", "3", needles=("unknown option --step",)),
    "flag stray word": T("stray", needles=("unexpected argument 'stray'",)),
    "flag --progress=yes": T("--progress=yes", needles=("--progress",)),
    "flag --steps empty": T("--steps", "", needles=("--steps",)),
    "flag --steps 1e3": T("--steps", "1e3", needles=("--steps",)),
    "flag --lr 1e400": T("--lr", "1e400", needles=("lr", "finite")),
    "flag --beta1 1.5": T("--beta1", "1.5", needles=("beta1", "[0, 1)")),
    "flag --beta2 1": T("--beta2", "1", needles=("beta2", "[0, 1)")),
    "flag --val-fraction 1": T("--val-fraction", "1", needles=("val_fraction", "(0, 1)")),
    "flag --val-fraction 0": T("--val-fraction", "0", needles=("val_fraction",)),
    "flag --min-lr-ratio 2": T("--min-lr-ratio", "2", needles=("min_lr_ratio", "[0, 1]")),
    "flag --seq-len 2": T("--seq-len", "2", needles=("seq_len", ">= 3")),
    "flag --seq-len over max": T("--seq-len", "100000", needles=("seq_len", "max_seq_len")),
    "flag --stp.weight inf": T("--stp.weight", "inf", needles=("stp.weight", "finite")),
    "flag --weight-decay -1": T("--weight-decay", "-1", needles=("weight_decay", ">= 0")),
    "flag --model.mamba.dt-init-floor -1": T("--model.mamba.dt-init-floor", "-1", needles=("dt_init_floor",)),
    "flag --model.init-std nan": T("--model.init-std", "nan", needles=("init_std", "finite")),
    "flag --model.init-std -1": T("--model.init-std", "-1", needles=("init_std", ">= 0")),
    "flag --seed 10^23": T("--seed", "99999999999999999999999", needles=("seed", "2^63-1")),
    "flag --model.mamba.a-init-range 1": T("--model.mamba.a-init-range", "1", needles=("a_init_range", "2 values")),
    "flag --model.mamba.a-init-range 1,x": T("--model.mamba.a-init-range", "1,x", needles=("comma-separated",)),
    "flag --model.mamba.a-init-range 2,1": T("--model.mamba.a-init-range", "2,1", needles=("a_init_range",)),
    "flag --model.mamba.a-init-range 1,inf": T("--model.mamba.a-init-range", "1,inf", needles=("a_init_range[1]",)),
    "flag --model.attention.n-heads 3": T("--model.attention.n-heads", "3", needles=("n_heads",)),
    "flag --model.moe.top-k 99": T("--model.moe.top-k", "99", needles=("top_k",)),
    "flag --model.vocab-size 100": T("--model.vocab-size", "100", ok=True),  # the tokenizer sets it (260)
    "flag --stop-at 0": T("--stop-at", "0", needles=("--stop-at",)),
    "flag --stop-at 99": T("--stop-at", "99", needles=("--stop-at", "between 1 and --steps")),
    "flag --device tpu": T("--device", "tpu", needles=("--device", "cpu")),
    "flag --device cuda:x": T("--device", "cuda:x", needles=("--device",)),
    "flag --stp.family-weights A=x": T("--stp.family-weights", "A=x", needles=("KEY=VALUE",)),
    "flag --stp.family-weights Q=1": T("--stp.family-weights", "Q=1", needles=("family_weights key 'Q'",)),
    "flag --stp.family-weights A=-1": T("--stp.family-weights", "A=-1", needles=("family_weights['A']",)),
    "flag --stp.family-weights A=nan": T("--stp.family-weights", "A=nan", needles=("family_weights['A']",)),
    "flag --stp.family-weights A=inf": T("--stp.family-weights", "A=inf", needles=("family_weights['A']",)),
    "flag --stp.family-weights A": T("--stp.family-weights", "A", needles=("KEY=VALUE",)),
    "flag --stp.enabled without layers": T("--stp.enabled", "--stp.layers", "", needles=("stp.layers",)),
    "flag --preset tinny": T("--preset", "tinny", needles=("no preset named 'tinny'", "did you mean 'tiny'")),
    "flag --preset empty": T("--preset", "", needles=("no preset",)),
    "flag --preset 5000 chars": T("--preset", "x" * 5000, needles=("no preset",)),
    "flag --data missing": T("--data", "{tmp}/nope.txt", needles=("nope.txt",)),
    "flag --data empty file": T("--data", "{tmp}/empty.txt", needles=("empty.txt",), prep=_write("empty.txt", "")),
    "flag --data empty dir": T("--data", "{tmp}/d", needles=("d",), prep=_write("d/x.bin", b"\x00")),
    "flag --data bad jsonl": T("--data", "{tmp}/x.jsonl", needles=("x.jsonl",), prep=_write("x.jsonl", "{nope\n")),
    "flag --tokenizer bpe:0": T("--tokenizer", "bpe:0", needles=("bpe:N", "262")),
    "flag --tokenizer bpe:abc": T("--tokenizer", "bpe:abc", needles=("bpe:N",)),
    "flag --tokenizer bpe:1e3": T("--tokenizer", "bpe:1e3", needles=("bpe:N",)),
    "flag --tokenizer missing": T("--tokenizer", "{tmp}/nope.json", needles=("nope.json", "bpe:N")),
    "flag --tokenizer NUL": T("--tokenizer", "a\x00b", needles=("--tokenizer",)),
    "flag --tokenizer garbage": T("--tokenizer", "{tmp}/t.json", needles=("t.json",), prep=_write("t.json", "{no")),
    "flag --tokenizer no specials": T("--tokenizer", "{tmp}/t.json", needles=("end-of-text", "</s>"),
                                      prep=_write("t.json", json.dumps(_wordlevel(["a", "b"])))),
    "flag --tokenizer bpe:512": T("--tokenizer", "bpe:512", ok=True),
    # ------------------------------------------------ run names and output places
    "run name ../escape": T("--run-name", "../escape", needles=("run_name", "plain directory name")),
    "run name /abs/path": T("--run-name", "/abs/path", needles=("run_name",)),
    "run name .": T("--run-name", ".", needles=("run_name",)),
    "run name ..": T("--run-name", "..", needles=("run_name",)),
    "run name a/b": T("--run-name", "a/b", needles=("run_name",)),
    "run name .hidden": T("--run-name", ".hidden", needles=("run_name",)),
    "run name empty": T("--run-name", "", needles=("run_name",)),
    "run name NUL": T("--run-name", "a\x00b", needles=("run_name",)),
    "run name newline": T("--run-name", "a\nb", needles=("run_name",)),
    "run name 300 chars": T("--run-name", "r" * 300, needles=("run_name",)),
    "run name plain": T("--run-name", "exp-2.v3+x_1", ok=True),
    "out dir /proc/nope": T("--out-dir", "/proc/nope", needles=("cannot create run directory",)),
    "out dir is a file": T("--out-dir", "{tmp}/f", needles=("is a file",), prep=_write("f", "x")),
    "run dir exists, not amer's": T("--run-name", "x", needles=("not created by amer train",),
                                    prep=_write("out/x/mine.txt", "x")),
    "overwrite a foreign dir": T("--run-name", "x", "--overwrite", needles=("not created by amer train",),
                                 prep=_write("out/x/mine.txt", "x")),
    "run dir exists, amer's": T("--run-name", "x", needles=("already exists", "--resume", "--overwrite"),
                                prep=_write("out/x/amer-run.json", "{}")),
    "overwrite an amer run": T("--run-name", "x", "--overwrite", ok=True, prep=_write("out/x/amer-run.json", "{}")),
    # ------------------------------------------------ patterns (as --pattern; the grammar is fuzzed separately)
    "pattern AXM": T("--pattern", "AXM", needles=("'X'", "position 1")),
    "pattern memory bomb with bars": T("--pattern", "A((|)*99999)*99999", needles=("stage boundaries", "position 2")),
    "pattern 10^8 bars": T("--pattern", "A(|)*100000000", needles=("position 1",)),
    "pattern 10^9 layers": T("--pattern", "(AEME)*999999999", needles=("4096 layers", "position 0")),
    "pattern nested 1200": T("--pattern", "(" * 1200 + "A" + ")*1" * 1200, needles=("nested", "position 64")),
    "pattern superscript count": T("--pattern", "(A)*²", needles=("'²'", "position 4", "0-9")),
    "pattern arabic digit": T("--pattern", "(A)*٣", needles=("position 4",)),
    "pattern 5000-digit count": T("--pattern", "(A)*" + "9" * 5000, needles=("too large", "position 4")),
    "pattern @0": T("--pattern", "AEMR@0", needles=("at least 1",)),
    "pattern @ with bars": T("--pattern", "AE|MR@8", needles=("conflicts",)),
    "pattern empty stage": T("--pattern", "AE||MR", needles=("empty pipeline stage",)),
    "pattern empty group": T("--pattern", "()*2", needles=("empty group",)),
    "pattern unbalanced": T("--pattern", "(AE)*2)", needles=("unbalanced ')'", "position 6")),
    "pattern star without group": T("--pattern", "(AE*2", needles=("'*' without a group at position 3",)),
    "pattern lower case": T("--pattern", "aemr", needles=("did you mean 'A'",)),
    "pattern whitespace only": T("--pattern", "   ", needles=("empty",)),
    "pattern long preset-like name": T("--pattern", "a" * 5000, needles=("position 0",)),
    "pattern with spaces": T("--pattern", "A E M R", ok=True),
    # ------------------------------------------------ tap selectors (as --stp.layers)
    "selector A:-": T("--stp.layers", "A:-", needles=("'A:-'", "position 0")),
    "selector L3:-": T("--stp.layers", "L3:-", needles=("'L3:-'", "position 0")),
    "selector 5000 digits": T("--stp.layers", "A" + "9" * 5000, needles=("selects nothing", "position 0")),
    "selector Final": T("--stp.layers", "Final", needles=("did you mean 'final'",)),
    "selector emb": T("--stp.layers", "emb", needles=("did you mean 'embed'",)),
    "selector R:": T("--stp.layers", "R:", needles=("slice without bounds",)),
    "selector position": T("--stp.layers", "A-1, Q1", needles=("'Q1' at position 5",)),
    "selector stray comma": T("--stp.layers", "A-1,,M-1", needles=("empty item at position 4",)),
    "selector duplicate": T("--stp.layers", "A,A0", needles=("twice",)),
    "selector arabic digit": T("--stp.layers", "A٣", needles=("position 0",)),
    "selector absent family": T("--pattern", "AE", "--stp.layers", "M-1", needles=("no mamba",)),
    "selector L (every block)": T("--stp.layers", "L", ok=True),
    "selector A1: (open slice)": T("--pattern", "AAE", "--stp.layers", "A1:,E", ok=True),
    # ------------------------------------------------ TOML
    "toml missing": T("--config", "{tmp}/none.toml", needles=("config file not found",)),
    "toml is a directory": T("--config", "{tmp}", needles=("is a directory",)),
    "toml not UTF-8": toml(b"steps = 3\n\xff\xfe\n", "not UTF-8", "byte 10"),
    "toml syntax": toml("steps = = 3\n", "invalid TOML"),
    "toml model.attention = 5": toml("[model]\nattention = 5\n", "model.attention", "table"),
    "toml stp = 3": toml("stp = 3\n", "stp must be a table"),
    "toml model = 3": toml("model = 3\n", "model must be a table"),
    "toml model = []": toml("model = []\n", "model must be a table"),
    "toml unknown key": toml("stepz = 5\n", "did you mean 'steps'"),
    "toml unknown nested": toml("[stp]\nstart_stepp = 5\n", "did you mean 'start_step'"),
    "toml wrong type": toml('warmup_steps = "many"\n', "warmup_steps must be an integer"),
    "toml bool for int": toml("keep_last = true\n", "keep_last must be an integer"),
    "toml compile text": toml('compile = "always"\n', "compile must be one of ['auto', 'on', 'off']"),
    "toml nan": toml("lr = nan\n", "lr", "finite"),
    "toml inf": toml("[stp]\nweight = inf\n", "stp.weight"),
    "toml pattern number": toml("[model]\npattern = 5\n", "pattern must be a string"),
    "toml bad pattern": toml('[model]\npattern = "AX"\n', "'X'"),
    "toml tuple too long": toml("[model.mamba]\na_init_range = [1, 2, 3]\n", "a_init_range", "2 values"),
    "toml family weights text": toml('[stp]\nfamily_weights = {A = "x"}\n', "family_weights.A"),
    "toml NUL in a path": toml('data = "a\\u0000b"\n', "train.data", "NUL"),
    "toml NUL in resume": toml('resume = "a\\u0000b"\n', "resume", "NUL"),
    # ------------------------------------------------ resume
    "resume missing": Case(("train", "--resume", "{tmp}/nope", "--no-progress"), ("checkpoint not found",)),
    "resume a foreign dir": Case(("train", "--resume", "{tmp}", "--no-progress"), ("not a run directory",)),
    "resume checkpoint outside a run": Case(("train", "--resume", "{tmp}/lone", "--no-progress"), ("amer-run.json",),
                                            prep=lambda t: shutil.copytree(t / "run" / "step_000004", t / "lone")),
    "resume meta is a list": Case(RESUME, ("expected a JSON object", "list"), prep=_meta(lambda m: [m], replace=True)),
    "resume meta lacks config": Case(RESUME, ("config must be an object",), prep=_meta(lambda m: m.pop("config"))),
    "resume --tokenizer changed": Case((*RESUME, "--tokenizer", "bpe:300"), ("keeps its tokenizer",)),
    "resume meta corrupt": Case(RESUME, ("corrupt",), prep=_write("run/step_000004/meta.json", '{"step": 4,')),
    "resume step abc": Case(RESUME, ("step must be a whole number", "'abc'"),
                            prep=_meta(lambda m: m.update(step="abc"))),
    "resume step -1": Case(RESUME, ("step must be",), prep=_meta(lambda m: m.update(step=-1))),
    "resume step true": Case(RESUME, ("step must be",), prep=_meta(lambda m: m.update(step=True))),
    "resume rng wrong size": Case(RESUME, ("rng.torch holds 10 bytes",),
                                  prep=_meta(lambda m: m["rng"].update(torch="00" * 10))),
    "resume rng not hex": Case(RESUME, ("rng.stp",), prep=_meta(lambda m: m["rng"].update(stp="zz"))),
    "resume rng missing": Case(RESUME, ("rng must hold",), prep=_meta(lambda m: m.update(rng={}))),
    "resume data state wrong": Case(RESUME, ("data_state",), prep=_meta(lambda m: m.update(data_state={"epoch": "x"}))),
    "resume data state list": Case(RESUME, ("data_state",), prep=_meta(lambda m: m.update(data_state=[1, 2]))),
    "resume best_val text": Case(RESUME, ("best_val",), prep=_meta(lambda m: m.update(best_val="low"))),
    "resume missing param group": Case(RESUME, ("1 optimizer parameter groups",),
                                       prep=_meta(lambda m: m["optimizer"]["param_groups"].pop())),
    "resume maximize": Case(RESUME, ("maximize is True",),
                            prep=_meta(lambda m: m["optimizer"]["param_groups"][0].update(maximize=True))),
    "resume group lr nan": Case(RESUME, ("lr must be a finite number",),
                                prep=_meta(lambda m: m["optimizer"]["param_groups"][0].update(lr=float("nan")))),
    "resume negative step tensor": Case(RESUME, ("is step -3.0",),
                                        prep=_optim(lambda t: t.update({"0.step": torch.tensor(-3.0)}))),
    "resume shrunk exp_avg": Case(RESUME, ("optim.safetensors", "of shape (5,)"), prep=_optim(_shrink)),
    "resume truncated weights": Case(RESUME, ("model.safetensors", "corrupt or truncated"),
                                     prep=_write("run/step_000004/model.safetensors", b"\x08\x00")),
    "resume model of another width": Case(RESUME, ("has shape", "model expects"),
                                          prep=_meta(lambda m: m["config"]["model"].update(d_model=64))),
    "resume config nan": Case(RESUME, ("lr", "finite"), prep=_meta(lambda m: m["config"].update(lr=float("nan")))),
    "resume --steps below": Case((*RESUME, "--steps", "3"), ("--steps 3 is below", "(4)")),
    "resume --stop-at below": Case((*RESUME, "--stop-at", "2"), ("--stop-at 2 is below",)),
    "resume --pattern": Case((*RESUME, "--pattern", "AEM"), ("--pattern cannot be combined with --resume",)),
    "resume --preset": Case((*RESUME, "--preset", "small"), ("--preset cannot be combined",)),
    "resume --run-name other": Case((*RESUME, "--run-name", "other"), ("--run-name cannot be combined",)),
    "resume --overwrite": Case((*RESUME, "--overwrite"), ("--overwrite cannot be combined",)),
    "resume toml with pattern": Case((*RESUME, *TOML), ("--pattern cannot be combined",),
                                     prep=_write("c.toml", 'pattern = "AEM"\n')),
    "resume nothing to resume": Case(RESUME, ("no checkpoint and no config.json",),
                                     prep=_all(_drop_checkpoints, lambda t: (t / "run" / "config.json").unlink())),
    "resume corrupt config.json": Case(RESUME, ("config.json",),
                                       prep=_all(_drop_checkpoints, _write("run/config.json", "[1, 2"))),
    "resume to the checkpoint's step": Case((*RESUME, "--steps", "4"), ok=True),
    "resume a run without checkpoint": Case(RESUME, ok=True, prep=_drop_checkpoints),
    "resume best/": Case(("train", "--resume", "{run}/best", "--no-progress", "--steps", "5"), ok=True),
    # ------------------------------------------------ sample
    "sample --temperature nan": Case(("sample", "--checkpoint", "{ckpt}", "--temperature", "nan"), ("--temperature",)),
    "sample --temperature -1": Case(("sample", "--checkpoint", "{ckpt}", "--temperature", "-1"), ("--temperature",)),
    "sample --temperature inf": Case(("sample", "--checkpoint", "{ckpt}", "--temperature", "inf"), ("--temperature",)),
    "sample --temperature -inf": Case(("sample", "--checkpoint", "{ckpt}", "--temperature=-inf"), ("finite",)),
    "sample --temperature abc": Case(("sample", "--checkpoint", "{ckpt}", "--temperature", "abc"), ("--temperature",)),
    "sample --top-k 0": Case(("sample", "--checkpoint", "{ckpt}", "--top-k", "0"), ("--top-k",)),
    "sample --top-k -1": Case(("sample", "--checkpoint", "{ckpt}", "--top-k", "-1"), ("--top-k",)),
    "sample --max-new-tokens 0": Case(("sample", "--checkpoint", "{ckpt}", "--max-new-tokens", "0"), ("--max-new",)),
    "sample --max-new-tokens 1.5": Case(("sample", "--checkpoint", "{ckpt}", "--max-new-tokens", "1.5"), ("integer",)),
    "sample --seed 10^23": Case(("sample", "--checkpoint", "{ckpt}", "--seed", "9" * 23), ("--seed", "2^63-1")),
    "sample --seed -1": Case(("sample", "--checkpoint", "{ckpt}", "--seed", "-1"), ("--seed",)),
    "sample missing checkpoint": Case(("sample", "--checkpoint", "{tmp}/nope"), ("checkpoint not found",)),
    "sample empty dir": Case(("sample", "--checkpoint", "{tmp}"), ("no checkpoint in",)),
    "sample meta list": Case(("sample", "--checkpoint", "{run}"), ("JSON object",),
                             prep=_meta(lambda m: [m], replace=True)),
    "sample meta lacks model": Case(("sample", "--checkpoint", "{run}"), ("config.model",),
                                    prep=_meta(lambda m: m["config"].pop("model"))),
    "sample --device tpu": Case(("sample", "--checkpoint", "{ckpt}", "--device", "tpu"), ("--device",)),
    "sample no --checkpoint": Case(("sample", "--prompt", "x"), ("--checkpoint",)),
    "sample --bogus": Case(("sample", "--checkpoint", "{ckpt}", "--bogus"), ("--bogus",)),
    "sample greedy": Case(("sample", "--checkpoint", "{ckpt}", "--temperature", "0", "--max-new-tokens", "3"), ok=True),
    "sample tokenizer garbage": Case(("sample", "--checkpoint", "{run}"), ("tokenizer.json",),
                                     prep=_write("run/step_000004/tokenizer.json", "{no")),
    "sample tokenizer too big": Case(("sample", "--checkpoint", "{run}"), ("not this model's",),
                                     prep=_write("run/step_000004/tokenizer.json",
                                                 json.dumps(_wordlevel([f"w{i}" for i in range(400)] + ["</s>"])))),
    # ------------------------------------------------ curvature
    "curvature --batches 0": Case((*CURV, "--batches", "0"), ("--batches",)),
    "curvature --batch-size -1": Case((*CURV, "--batch-size", "-1"), ("--batch-size",)),
    "curvature --seq-len 2": Case((*CURV, "--seq-len", "2"), ("--seq-len must be an integer >= 3",)),
    "curvature --seq-len huge": Case((*CURV, "--seq-len", "100000"), ("max_seq_len",)),
    "curvature --strides 0": Case((*CURV, "--strides", "0"), ("stride",)),
    "curvature --strides x": Case((*CURV, "--strides", "x"), ("--strides",)),
    "curvature --strides empty": Case((*CURV, "--strides", ","), ("--strides",)),
    "curvature --seed -1": Case((*CURV, "--seed", "-1"), ("--seed",)),
    "curvature --n-bootstrap 0": Case((*CURV, "--n-bootstrap", "0"), ("--n-bootstrap",)),
    "curvature --stp-spans nan": Case((*CURV, "--stp-spans", "nan"), ("--stp-spans",)),
    "curvature neither source": Case(("curvature",), ("--checkpoint",)),
    "curvature both sources": Case(("curvature", "--checkpoint", "{ckpt}", "--pattern", "tiny"), ("not both",)),
    "curvature --preset alone": Case(("curvature", "--checkpoint", "{ckpt}", "--preset", "tiny"), ("--preset",)),
    "curvature bad pattern": Case(("curvature", "--pattern", "AX"), ("'X'",)),
    "curvature compare other pattern": Case(("curvature", "--pattern", "AEM", "--compare", "{ckpt}"), ("pattern",)),
    "curvature --out /proc/nope": Case((*CURV, "--out", "/proc/nope/x"), ("/proc/nope",)),
    # ------------------------------------------------ bench, patterns, the command itself
    "bench unknown suite": Case(("bench", "blokcs"), ("did you mean 'blocks'",)),
    "bench --repeats 0": Case(("bench", "blocks", "--repeats", "0"), ("--repeats must be an integer >= 1",)),
    "bench --threads 0": Case(("bench", "blocks", "--threads", "0"), ("--threads",)),
    "bench --threads huge": Case(("bench", "blocks", "--threads", "99999"), ("--threads",)),
    "bench --warmup -1": Case(("bench", "blocks", "--warmup", "-1"), ("--warmup",)),
    "bench --seed nan": Case(("bench", "blocks", "--seed", "nan"), ("--seed",)),
    "bench --out missing dir": Case(("bench", "blocks", "--out", "{tmp}/no/b.json"), ("does not exist",)),
    "bench --out is a dir": Case(("bench", "blocks", "--out", "{tmp}"), ("is a directory",)),
    "bench --malloc bogus": Case(("bench", "blocks", "--malloc", "bogus"), ("--malloc",)),
    "patterns bomb": Case(("patterns", "A((|)*99999)*99999"), ("position 2",)),
    "patterns superscript": Case(("patterns", "(A)*²"), ("position 4",)),
    "patterns nesting": Case(("patterns", "(" * 1200 + "A" + ")*1" * 1200), ("nested",)),
    "patterns unknown": Case(("patterns", "AQ"), ("'Q'",)),
    "patterns empty": Case(("patterns", ""), ("empty",)),
    "patterns two args": Case(("patterns", "A", "B"), ("unrecognized",)),
    "command unknown": Case(("trian",), ("did you mean 'train'",)),
    "experiment unknown": Case(("experiment", "nlrxx"), ("did you mean 'nlrx'",)),
    # ------------------------------------------------ experiment nlrx (fails before any training)
    "nlrx --lr inf": Case((*NLRX, "--lr", "inf"), ("--lr",), prep=_nlrx),
    "nlrx --lr nan": Case((*NLRX, "--lr", "nan"), ("--lr",), prep=_nlrx),
    "nlrx --steps 0": Case((*NLRX, "--steps", "0"), ("--steps",), prep=_nlrx),
    "nlrx --d-model 8": Case((*NLRX, "--d-model", "8"), ("--d-model",), prep=_nlrx),
    "nlrx --workers 0": Case((*NLRX, "--workers", "0"), ("--workers",), prep=_nlrx),
    "nlrx --seeds 0": Case((*NLRX, "--seeds", "0"), ("--seeds",), prep=_nlrx),
    "nlrx --seeds 10^11": Case((*NLRX, "--seeds", "99999999999"), ("--seeds",), prep=_nlrx),
    "nlrx --seeds -1,2": Case((*NLRX, "--seeds", "-1,2"), ("--seeds",), prep=_nlrx),
    "nlrx --fractions 2": Case((*NLRX, "--fractions", "2"), ("--fractions",), prep=_nlrx),
    "nlrx --fractions 1/0": Case((*NLRX, "--fractions", "1/0"), ("--fractions",), prep=_nlrx),
    "nlrx --lambdas nan": Case((*NLRX, "--lambdas", "nan"), ("--lambdas",), prep=_nlrx),
    "nlrx --lambdas 1e400": Case((*NLRX, "--lambdas", "1e400"), ("--lambdas",), prep=_nlrx),
    "nlrx --taps bogus": Case((*NLRX, "--taps", "bogus"), ("--taps",), prep=_nlrx),
    "nlrx --models bad": Case((*NLRX, "--models", "x"), ("--models",), prep=_nlrx),
    "nlrx --models bad pattern": Case((*NLRX, "--models", "x=(A)*²"), ("position",), prep=_nlrx),
    "nlrx --data-dir missing": Case(("experiment", "nlrx", "--data-dir", "{tmp}/none"), ("lacks",)),
}

# ---------------------------------------------------------------- files, links, locks, depth, special files


def _link(rel: str, to: str | None) -> Callable[[Path], None]:
    """``rel`` becomes a symbolic link to ``to`` (None: to a path that does not exist)."""
    def prep(tmp: Path) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).symlink_to(tmp / to if to else tmp / "nowhere" / "x")
    return prep


def _moved_behind_a_link(rel: str) -> Callable[[Path], None]:
    """``rel`` moved out of the run, a link to it left in its place."""
    def prep(tmp: Path) -> None:
        shutil.move(tmp / rel, tmp / "elsewhere")
        (tmp / rel).symlink_to(tmp / "elsewhere")
    return prep


def _append(rel: str, text: str) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        with (tmp / rel).open("a") as f:
            f.write(text)
    return prep


def _fifo(rel: str) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(tmp / rel)
    return prep


def _held(rel: str) -> Callable[[Path], Callable[[], None]]:
    """Another trainer holds the run directory ``rel`` (a lock this process takes on a second descriptor, which
    conflicts with amer train's as another process's would)."""
    def prep(tmp: Path) -> Callable[[], None]:
        from amer.training.runlock import acquire

        return acquire(tmp / rel).release
    return prep


def _edit_json(rel: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        data = json.loads((tmp / rel).read_text())
        change(data)
        (tmp / rel).write_text(json.dumps(data))
    return prep


def _set_weight(rel: str, value: float) -> Callable[[Path], None]:
    """One element of the first floating weight in safetensors file ``rel`` set to ``value`` (NaN, inf)."""
    def prep(tmp: Path) -> None:
        t = load_file(str(tmp / rel))
        name = sorted(k for k in t if t[k].is_floating_point())[0]
        t[name].view(-1)[0] = value
        save_file(t, str(tmp / rel), metadata={"format": "pt"})
    return prep


def _index(weight_map: object, shard: tuple[str, bytes] | None = None) -> Callable[[Path], None]:
    """A shard index in the transformers folder (``weight_map`` as given), and optionally a shard file."""
    def prep(tmp: Path) -> None:
        real = sorted(load_file(str(tmp / "hf" / "model.safetensors")))
        wm = weight_map(real) if callable(weight_map) else weight_map
        (tmp / "hf" / "model.safetensors.index.json").write_text(json.dumps(wm))
        if shard is not None:
            (tmp / "hf" / shard[0]).write_bytes(shard[1])
        shutil.copy(tmp / "hf" / "model.safetensors", tmp / "x.safetensors")  # outside: must never be opened
    return prep


DEEP = "[" * 50_000 + "]" * 50_000  # nested past any recursion limit
IMPORT = ("import", "{hf}", "{tmp}/imported")
SAMPLE_EXP = ("sample", "--checkpoint", "{exp}", "--max-new-tokens", "2")

FILES: dict[str, Case] = {
    # ------------------------------------------------ symbolic links: never written, replaced or deleted through
    "link export onto a link": Case(("export", "{run}", "{tmp}/link", "--overwrite"), ("is a symbolic link",),
                                    prep=_link("link", "exp")),
    "link export onto a dangling link": Case(("export", "{run}", "{tmp}/link"), ("symbolic link", "does not exist"),
                                             prep=_link("link", None)),
    "link import onto a link": Case((*IMPORT[:2], "{tmp}/link"), ("is a symbolic link",), prep=_link("link", "exp")),
    "link resume through a linked log": Case(RESUME, ("log.jsonl is a symbolic link",),
                                             prep=_moved_behind_a_link("run/log.jsonl")),
    "link resume through a linked config": Case(RESUME, ("config.json is a symbolic link",),
                                                prep=_moved_behind_a_link("run/config.json")),
    "link resume with best/ a link": Case(RESUME, ("best is a symbolic link",), prep=_moved_behind_a_link("run/best")),
    "link plot --out a link": Case(("plot", "{run}", "--out", "{tmp}/c.png", "--force"), ("is a symbolic link",),
                                   prep=_all(_write("mine.png", "x"), _link("c.png", "mine.png"))),
    "link run name a dangling link": T("--run-name", "x", needles=("symbolic link", "does not exist"),
                                       prep=_link("out/x", None)),
    "link out dir a link (scratch space)": T("--out-dir", "{tmp}/scratch", ok=True,
                                             prep=_all(lambda t: (t / "real").mkdir(), _link("scratch", "real"))),
    # ------------------------------------------------ one amer train per run directory
    "lock resume a run still training": Case(RESUME, ("is in use by process",), prep=_held("run")),
    "lock overwrite a run still training": T("--out-dir", "{tmp}", "--run-name", "run", "--overwrite",
                                             needles=("is in use by process",), prep=_held("run")),
    "lock a new run where one is training": T("--out-dir", "{tmp}", "--run-name", "run",
                                              needles=("is in use by process",), prep=_held("run")),
    "lock a stale lock file": Case(RESUME, ok=True, prep=_write("run/amer-run.lock", '{"pid": 999999}')),
    # ------------------------------------------------ odd targets
    "target export to an empty path": Case(("export", "{run}", ""), ("out must be a path", "empty")),
    "target export from an empty path": Case(("export", "", "{tmp}/o"), ("checkpoint must be a path", "empty")),
    "target export onto a file": Case(("export", "{run}", "{tmp}/f"), ("is not a directory",),
                                      prep=_write("f", "x"), absent=("--overwrite",)),
    "target export onto a folder of mine": Case(("export", "{run}", "{tmp}/d"), ("amer did not write",),
                                                prep=_write("d/notes.txt", "x"), absent=("--overwrite",)),
    "target import to an empty path": Case((*IMPORT[:2], ""), ("out must be a path", "empty")),
    "target plot --out empty": Case(("plot", "{run}", "--out", ""), ("--out must be a path", "empty")),
    "target sample --checkpoint empty": Case(("sample", "--checkpoint", ""), ("--checkpoint must be a path",)),
    "target --out-dir empty": T("--out-dir", "", needles=("out_dir must not be empty",)),
    "target --data empty": T("--data", "", needles=("data must not be empty",)),
    "target --init empty": T("--init", "", needles=("init must not be empty",)),
    "target --resume empty": Case(("train", "--resume", "", "--no-progress"), ("resume must not be empty",)),
    # ------------------------------------------------ hostile amer import folders
    "import index path ../x": Case(IMPORT, ("'../x.safetensors'", "inside"),
                                   prep=_index({"weight_map": {"lm_head.weight": "../x.safetensors"}})),
    "import index path /etc/passwd": Case(IMPORT, ("'/etc/passwd'", "absolute"),
                                          prep=_index({"weight_map": {"lm_head.weight": "/etc/passwd"}})),
    "import weight_map a list": Case(IMPORT, ("weight_map",), prep=_index({"weight_map": [1, 2]})),
    "import index a list": Case(IMPORT, ("weight_map",), prep=_index([1, 2])),
    "import index nested deep": Case(IMPORT, ("index.json", "nested too deeply"),
                                     prep=_write("hf/model.safetensors.index.json", DEEP)),
    "import index names a tensor its shard lacks": Case(
        IMPORT, ("'model.extra.weight'", "does not hold it"),
        prep=_index(lambda real: {"weight_map": {**dict.fromkeys(real, "model.safetensors"),
                                                 "model.extra.weight": "model.safetensors"}})),
    "import corrupt shard": Case(
        IMPORT, ("s1.safetensors", "not a readable safetensors file"),
        prep=_index(lambda real: {"weight_map": dict.fromkeys(real, "s1.safetensors")},
                    ("s1.safetensors", b"\x08\x00\x00garbage"))),
    "import missing shard": Case(IMPORT, ("nope.safetensors", "does not exist"),
                                 prep=_index(lambda real: {"weight_map": dict.fromkeys(real, "nope.safetensors")})),
    "import corrupt single file": Case(IMPORT, ("model.safetensors", "not a readable safetensors file"),
                                       prep=_write("hf/model.safetensors", b"\xff" * 20)),
    "import config a list": Case(IMPORT, ("config.json", "JSON object"), prep=_write("hf/config.json", "[1, 2]")),
    "import config nested deep": Case(IMPORT, ("config.json", "nested too deeply"),
                                      prep=_write("hf/config.json", DEEP)),
    "import config rope_parameters a number": Case(
        IMPORT, ("config.json holds a value amer cannot read",),
        prep=_edit_json("hf/config.json", lambda c: c.update(rope_parameters=5))),
    "import config num_hidden_layers -1": Case(IMPORT, ("num_hidden_layers must be a whole number >= 1", "-1"),
                                               prep=_edit_json("hf/config.json",
                                                               lambda c: c.update(num_hidden_layers=-1)),
                                               absent=("(AE)",)),
    "import config hidden_size text": Case(IMPORT, ("hidden_size", "'x'"),
                                           prep=_edit_json("hf/config.json", lambda c: c.update(hidden_size="x"))),
    "import config architectures a dict": Case(IMPORT, ("architectures",), prep=_edit_json(
        "hf/config.json", lambda c: c.update(architectures={"a": 1}))),
    # ------------------------------------------------ depth and size
    "deep toml": toml("a = " + DEEP + "\n", "c.toml", "nested too deeply"),
    "deep data line": T("--data", "{tmp}/deep.jsonl", needles=("deep.jsonl line 1", "nested too deeply"),
                        prep=_write("deep.jsonl", '{"text": ' + DEEP + "}\n")),
    "deep resume meta.json": Case(RESUME, ("meta.json", "nested too deeply"),
                                  prep=_write("run/step_000004/meta.json", DEEP)),
    "deep resume config.json": Case(RESUME, ("config.json", "nested too deeply"),
                                    prep=_all(_drop_checkpoints, _write("run/config.json", DEEP))),
    "deep sample config.json": Case(SAMPLE_EXP, ("config.json", "nested too deeply"),
                                    prep=_write("exp/config.json", DEEP)),
    "deep tokenizer.json": T("--tokenizer", "{tmp}/t.json", needles=("t.json",), prep=_write("t.json", DEEP)),
    "deep plot log line (skipped, as any unreadable line)": Case(("plot", "{run}", "--out", "{tmp}/c.png"), ok=True,
                                                                 prep=_append("run/log.jsonl", DEEP + "\n")),
    "size init d_model 10^9": T("--init", "{exp}", needles=("out of memory",),
                                prep=_edit_json("exp/config.json", lambda c: c["model"].update(d_model=10**9))),
    "size sample d_model 10^9": Case(SAMPLE_EXP, ("out of memory",),
                                     prep=_edit_json("exp/config.json", lambda c: c["model"].update(d_model=10**9))),
    # ------------------------------------------------ special files (the FIFOs run as subprocesses, below)
    "special --data /dev/zero": T("--data", "/dev/zero", needles=("/dev/zero", "character device")),
    "special --config /dev/zero": T("--config", "/dev/zero", needles=("character device",)),
    "special --tokenizer a link to /dev/urandom": T("--tokenizer", "{tmp}/t.json", needles=("character device",),
                                                    prep=lambda t: (t / "t.json").symlink_to("/dev/urandom")),
    "special --data a dangling link": T("--data", "{tmp}/d.txt", needles=("symbolic link", "does not exist"),
                                        prep=_link("d.txt", None)),
    # ------------------------------------------------ non-finite weights are refused on load, by name
    "nonfinite sample NaN weight": Case(("sample", "--checkpoint", "{run}"), ("model.safetensors|step_000004",
                                        "holds NaN values"), prep=_set_weight("run/step_000004/model.safetensors",
                                                                              float("nan"))),
    "nonfinite resume inf weight": Case(RESUME, ("holds infinite values",),
                                        prep=_set_weight("run/step_000004/model.safetensors", float("inf"))),
    "nonfinite init NaN weight": T("--init", "{exp}", needles=("--init", "holds NaN values"), absent=("--lr",),
                                   prep=_set_weight("exp/model.safetensors", float("nan"))),
    "nonfinite export NaN weight": Case(("export", "{run}", "{tmp}/o"), ("holds NaN values",),
                                        prep=_set_weight("run/step_000004/model.safetensors", float("nan"))),
    "nonfinite import NaN weight": Case(IMPORT, ("holds NaN values",),
                                        prep=_set_weight("hf/model.safetensors", float("nan"))),
    # ------------------------------------------------ messages that must not mislead
    "message exported folder without a model": Case(SAMPLE_EXP, ("config.json", "model section"),
                                                    absent=("meta.json", "amer import"),
                                                    prep=_edit_json("exp/config.json", lambda c: c.pop("model"))),
    "message exported folder with a bad value": Case(SAMPLE_EXP, ("config.json", "d_model"), absent=("meta.json",),
                                                     prep=_edit_json("exp/config.json",
                                                                     lambda c: c["model"].update(d_model="x"))),
    "message resume at step 2^63-1": Case((*RESUME, "--steps", "5"), ("2^63-1",), absent=("9223372036854775808",),
                                          prep=_meta(lambda m: m.update(step=2**63 - 1))),
    "message resume at step 2^63": Case(RESUME, ("step must be a whole number in [0, 2^63-1]",),
                                        prep=_meta(lambda m: m.update(step=2**63))),
}

CASES: dict[str, Case] = {**numeric_flag_cases(), **WRITTEN, **FILES}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run with checkpoints at steps 2 and 4 (each case damages its own copy)."""
    out = tmp_path_factory.mktemp("finished")
    argv = [*TRAIN[1:], "--steps", "4", "--eval-interval", "2", "--out-dir", str(out), "--run-name", "run"]
    assert cli.main(["train", *argv]) == 0
    assert cli.main(["export", str(out / "run"), str(out / "exp")]) == 0  # a pretrained folder
    from amer import HybridLM, ModelConfig
    from amer.interop import export_transformers

    torch.manual_seed(0)  # a transformers (Llama) folder to import
    llama = HybridLM(ModelConfig(pattern="AE", d_model=16, vocab_size=64, attention={"n_heads": 2},
                                 moe={"n_experts": 1, "top_k": 1, "d_ff": 32}))
    export_transformers(llama, llama.cfg, out / "hf")
    return out / "run"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, finished: Path, capsys: pytest.CaptureFixture) -> None:
    case = CASES[name]
    shutil.copytree(finished, tmp_path / "run")
    for folder in ("exp", "hf"):
        shutil.copytree(finished.parent / folder, tmp_path / folder)
    done = case.prep(tmp_path) if case.prep is not None else None
    capsys.readouterr()
    try:
        rc = cli.main(case.filled(tmp_path, finished))
    finally:
        if callable(done):
            done()
    err = capsys.readouterr().err
    if case.ok:
        assert rc == 0, f"{name}: documented as valid, got exit {rc}: {err}"
        return
    lines = err.strip().splitlines()
    assert rc == 2, f"{name}: exit {rc}, stderr {err[-2000:]!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: stderr {err[-2000:]!r}"
    assert "Traceback" not in err
    for needle in case.needles:  # "a|b": either
        assert any(n in lines[0] for n in needle.split("|")), f"{name}: {needle!r} not in {lines[0]!r}"
    for wrong in case.absent:
        assert wrong not in lines[0], f"{name}: {wrong!r} in {lines[0]!r}"


def test_the_table_covers_enough() -> None:
    bad = [c for c in CASES.values() if not c.ok]
    assert len(CASES) >= 150 and len(bad) >= 150
    kinds = {name.split()[0] for name in CASES}
    assert {"flag", "toml", "resume", "sample", "curvature", "bench", "patterns", "pattern", "selector", "run",
            "nlrx", "link", "lock", "target", "import", "deep", "size", "special", "nonfinite", "message"} <= kinds


TRAIN_TMP = ["-m", "amer.cli", "train", "--preset", "tiny", "--out-dir", "TMP/out", "--no-progress"]
SUBPROCESS = [
    (["-m", "amer.cli", "train", "--beta1", "1.5"], "beta1", None),
    (["train.py", "--stp.layers", "A:-"], "position 0", None),
    (["-m", "amer.cli", "patterns", "(A)*²"], "position 4", None),
    (["-m", "amer.cli", "train", "--preset", "tiny", "--pattern", "(" * 1200 + "A" + ")*1" * 1200], "nested", None),
    (["-m", "amer.cli", "sample", "--checkpoint", "CKPT", "--temperature", "nan"], "--temperature", None),
    # a FIFO would block a reader forever: refused by kind, never opened for a blocking read (hence a subprocess
    # with a timeout, not the in-process table)
    ([*TRAIN_TMP, "--data", "TMP/fifo"], "named pipe (FIFO)", _fifo("fifo")),
    ([*TRAIN_TMP, "--data", "TMP/d"], "named pipe (FIFO)", _all(_write("d/a.txt", "text " * 2000), _fifo("d/b.txt"))),
    ([*TRAIN_TMP, "--data", "TMP/f.jsonl"], "named pipe (FIFO)", _fifo("f.jsonl")),
    ([*TRAIN_TMP, "--config", "TMP/fifo"], "named pipe (FIFO)", _fifo("fifo")),
    ([*TRAIN_TMP, "--tokenizer", "TMP/fifo"], "named pipe (FIFO)", _fifo("fifo")),
    (["-m", "amer.cli", "plot", "TMP/run", "--out", "TMP/c.png"], "named pipe (FIFO)", _fifo("run/log.jsonl")),
    (["-m", "amer.cli", "import", "TMP/hf", "TMP/o"], "named pipe (FIFO)", _fifo("hf/config.json")),
    (["-m", "amer.cli", "sample", "--checkpoint", "TMP/ck"], "named pipe (FIFO)", _fifo("ck/meta.json")),
]


@pytest.mark.parametrize("argv, needle, prep", SUBPROCESS, ids=[" ".join(a[:6])[:60] for a, _, _ in SUBPROCESS])
def test_bad_input_end_to_end(argv: list[str], needle: str, prep, finished: Path, tmp_path: Path) -> None:
    if prep is not None:
        prep(tmp_path)
    argv = [str(finished) if a == "CKPT" else a.replace("TMP", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
