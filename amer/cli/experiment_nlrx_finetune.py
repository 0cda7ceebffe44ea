"""``amer experiment nlrx-finetune``: flags, their defaults (the full experiment and ``--quick``), validation into
:class:`~amer.experiments.nlrx_finetune.grid.Settings`, and the command itself."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from amer.cli.base import ArgParser, run
from amer.cli.experiment import run_resumable
from amer.configio import number_arg
from amer.errors import ExperimentError
from amer.experiments import options
from amer.experiments.nlrx.data import ENV_DIR, TEST_FILE, TRAIN_FILE, default_data_dir
from amer.experiments.nlrx.grid import model_config
from amer.experiments.nlrx_finetune.data import NTP_TARGETS
from amer.experiments.nlrx_finetune.estimate import GPUS, estimate, project
from amer.experiments.nlrx_finetune.grid import INITS, Settings, build_grid, pick_arms
from amer.experiments.nlrx_finetune.init import TEMPLATES, chat_format, describe
from amer.experiments.nlrx_finetune.report import summarize, write_report
from amer.experiments.nlrx_finetune.runner import arm_path, read_all, run_all
from amer.runtime import resolve_device, warn_slow_bfloat16

__all__ = ["FULL", "QUICK", "PAPER", "REGIMES", "build_parser", "settings_from_args", "command", "main"]

FULL: dict[str, Any] = {
    "models": "hybrid=AMER,dense=(AE)*2", "lambdas": "0,0.005,0.02,0.04", "fractions": "1,1/4,1/16", "seeds": "3",
    "out": "checkpoints/nlrx-finetune", "d_model": 128, "pretrain_epochs": 1.0, "pretrain_seq_len": 256,
    "pretrain_batch": 16, "pretrain_max_bytes": None, "pretrain_every": 200, "pretrain_warmup": 100,
    "lrs": "1e-4,3e-4,1e-3", "lr": None, "epochs": 4.0, "train_rows": None, "test_rows": None, "batch_size": 16,
    "triple_lambda": 0.02, "inits": "pretrained,scratch", "system_prompt": False, "gate": True, "device": "cpu",
}
QUICK: dict[str, Any] = {
    "models": "hybrid=AMER", "lambdas": "0,0.02", "fractions": "1,1/4", "seeds": "2",
    "out": "checkpoints/nlrx-finetune-quick", "d_model": 32, "pretrain_epochs": 1.0, "pretrain_seq_len": 128,
    "pretrain_batch": 8, "pretrain_max_bytes": 12_000, "pretrain_every": 10, "pretrain_warmup": 5,
    "lrs": "1e-3,3e-3", "epochs": 2.0, "train_rows": 128, "test_rows": 48,
}
# The STP paper's own setup (Huang, LeCun, Balestriero, arXiv 2602.22617, and its released fine-tuning script):
# full fine-tuning of a pretrained instruction-tuned model at lr 2e-5, linear decay without warm-up, AdamW without
# weight decay, 4 epochs, batch 16 (4 per device x 4 accumulation steps), bf16, the system turn kept, lambda
# {0.005, 0.02, 0.04} against NTP, data fractions 1, 1/4, 1/16, five seeds. No from-scratch control and no gate:
# the model is pretrained at scale.
PAPER: dict[str, Any] = {
    **FULL, "lambdas": "0,0.005,0.02,0.04", "fractions": "1,1/4,1/16", "seeds": "5", "out": "checkpoints/nlrx-paper",
    "lr": 2e-5, "epochs": 4.0, "batch_size": 16, "triple_lambda": 0.0, "inits": "pretrained", "system_prompt": True,
    "gate": False, "device": "auto",
}
PAPER_QUICK: dict[str, Any] = {  # the paper's regime on a slice: a smoke run of the pipeline, not a result
    "lambdas": "0,0.02", "fractions": "1,1/4", "seeds": "2", "out": "checkpoints/nlrx-paper-quick", "epochs": 1.0,
    "train_rows": 64, "test_rows": 16,
}
REGIMES = {"cpu": (FULL, QUICK), "paper": (PAPER, PAPER_QUICK)}


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="amer experiment nlrx-finetune",
                  description="Pretrain small hybrid and dense models on the bundled corpora, fine-tune them on "
                              "NL-RX with and without the span form of STP (and from scratch as the control), and "
                              "report whether the STP paper's data-efficiency claim reproduces.")
    a = p.add_argument
    a("--data-dir", help=f"folder with {TRAIN_FILE} and {TEST_FILE}; default ${ENV_DIR}, else "
                         "../shared/data/nl-rx-synth next to the repository")
    a("--train-file", help=f"training chat JSONL (default DATA_DIR/{TRAIN_FILE}); any file of the same chat format")
    a("--test-file", help=f"test chat JSONL (default DATA_DIR/{TEST_FILE})")
    a("--out", help="results directory (pretrain/, arms/, gate.json, results.*); default checkpoints/nlrx-finetune")
    a("--quick", action="store_true", help="a tiny pretraining and grid on a slice of the data (about 1-2 minutes)")
    a("--init", help="fine-tune this model instead of pretraining: an amer checkpoint, run directory or pretrained "
                     "folder, or a transformers model folder (weights, model config, tokenizer.json and chat "
                     "template come from it)")
    a("--regime", choices=sorted(REGIMES), default="cpu",
      help="named defaults: cpu (small models pretrained here, lr pick, from-scratch control) or paper (the STP "
           "paper's fine-tuning of an --init model: lr 2e-5, 4 epochs, batch 16, bf16 on a GPU, 5 seeds)")
    a("--device", help="cpu, cuda, cuda:N or auto (default cpu; --regime paper: auto)")
    a("--dtype", choices=("float32", "bfloat16"),
      help="float32, or bfloat16 autocast for training, evaluation and decoding (STP math stays fp32); default "
           "float32, --regime paper: bfloat16 on CUDA")
    a("--chat-template", choices=TEMPLATES, default="auto",
      help="with --init: the folder's own chat template where it has one (auto), or amer's (amer)")
    a("--inits", help="which grids to run: pretrained,scratch (default both, scratch being the control; "
                      "--regime paper: pretrained)")
    a("--models", help="NAME=PATTERN list; default 'hybrid=AMER,dense=(AE)*2' (ignored with --init)")
    a("--d-model", type=number_arg(True, ge=16), help="model width (default 128; --quick 32)")
    a("--pretrain-epochs", type=number_arg(gt=0), help="epochs over kjv + stdlib (default 1)")
    a("--pretrain-max-bytes", type=number_arg(True, ge=1), help="bytes kept per corpus (default all)")
    a("--pretrain-lr", type=number_arg(gt=0), default=3e-3, help="pretraining peak lr (cosine, default 3e-3)")
    a("--lrs", help="fine-tuning lr candidates, picked with NTP on one seed (default 1e-4,3e-4,1e-3)")
    a("--lr", type=number_arg(gt=0), help="a fixed fine-tuning lr (skips the pick)")
    a("--lambdas", help="span-form STP weights; 0 is the NTP baseline (default 0,0.005,0.02,0.04)")
    a("--triple-lambda", type=number_arg(ge=0), help="lambda of the triple-form bridge arm (0: none; default 0.02)")
    a("--fractions", help="training-data fractions (default 1,1/4,1/16)")
    a("--seeds", help="a count N (seeds 0..N-1) or a list like 0,1,2 (default 3)")
    a("--epochs", type=number_arg(gt=0), help="fine-tuning epochs of each arm's subset (default 4, as the paper)")
    a("--batch-size", type=number_arg(True, ge=1), help="examples per step (default 16)")
    a("--weight-decay", type=number_arg(ge=0), default=0.0)
    a("--ntp-targets", choices=NTP_TARGETS, default="all",
      help="next-token CE on every token (all, as the released code) or on the answer only (assistant)")
    a("--n-spans", type=number_arg(True, ge=1), default=1, help="span-form patches per example per step")
    a("--gate-margin", type=number_arg(ge=0), default=0.1,
      help="how far below the from-scratch level the pretrained held-out span STP must be (default 0.1)")
    a("--train-rows", type=number_arg(True, ge=1), help="use only the first N training rows")
    a("--test-rows", type=number_arg(True, ge=1), help="evaluate on the first N test rows")
    a("--system-prompt", action=argparse.BooleanOptionalAction,
      help="keep the system turn in every example (default: no; --regime paper: yes)")
    a("--workers", type=number_arg(True, ge=1, le=1024), help="processes (default: the CPU cores available)")
    a("--threads", type=number_arg(True, ge=1, le=4096), help="torch threads per worker (default 1 with workers)")
    a("--dry-run", action="store_true", help="list the arms and which are done, run nothing")
    a("--estimate", action="store_true", help="time a few steps of each kind; print how long the rest should take")
    a("--gpu", choices=sorted(GPUS), help="with --estimate: project the time on this GPU from the FLOP count "
                                          "instead of timing steps here (an estimate, not a measurement)")
    a("--report-only", action="store_true", help="rebuild results.* from what is finished, run nothing")
    return p


def _data_files(args: argparse.Namespace) -> tuple[Path, Path, str]:
    d = Path(args.data_dir) if args.data_dir else default_data_dir()
    if (args.train_file is None or args.test_file is None) and d is None:
        raise ExperimentError(f"no NL-RX-SYNTH data: pass --data-dir DIR (with {TRAIN_FILE} and {TEST_FILE}), "
                              f"--train-file and --test-file, or set ${ENV_DIR}")
    train = Path(args.train_file) if args.train_file else d / TRAIN_FILE  # type: ignore[operator]
    test = Path(args.test_file) if args.test_file else d / TEST_FILE  # type: ignore[operator]
    for f in (train, test):
        if not f.is_file():
            raise ExperimentError(f"data file {f} not found; pass --data-dir, or --train-file and --test-file "
                                  f"(chat JSONL), or set ${ENV_DIR}")
    synth = train.name == TRAIN_FILE and test.name == TEST_FILE
    return train, test, "NL-RX-SYNTH" if synth else f"{train.name} / {test.name}"


def _device(args: argparse.Namespace, default: str) -> tuple[str, str]:
    """``(device, dtype)``: the device resolved on this machine (``auto``: CUDA when present), and the dtype
    (given, else bfloat16 on CUDA under the paper's regime, else float32)."""
    name = args.device or default
    dev = str(resolve_device(name))
    if dev == "xla" or dev.startswith("xla"):
        raise ExperimentError("--device xla: this experiment runs on cpu or cuda")
    dtype = args.dtype or ("bfloat16" if args.regime == "paper" and dev.startswith("cuda") else "float32")
    if not args.estimate:
        warn_slow_bfloat16(dtype, torch.device(dev))
    return dev, dtype


def settings_from_args(args: argparse.Namespace) -> Settings:
    full, quick = REGIMES[args.regime]
    d = {**full, **quick} if args.quick else full
    pick = lambda name: getattr(args, name, None) if getattr(args, name, None) is not None else d[name]  # noqa: E731
    if args.regime == "paper" and not args.init:
        raise ExperimentError("--regime paper fine-tunes a pretrained model: pass --init FOLDER (e.g. an imported "
                              "or downloaded Llama-3.2-1B-Instruct, Qwen2.5-0.5B-Instruct or SmolLM2-135M-Instruct)")
    if args.gpu and not args.estimate:
        raise ExperimentError("--gpu projects the cost of a run; it goes with --estimate")
    train, test, name = _data_files(args)
    d_model = pick("d_model")
    if d_model % 16:
        raise ExperimentError(f"--d-model must be a multiple of 16, got {d_model}")
    text = pick("inits")
    inits = [x.strip() for x in text.split(",") if x.strip()]
    if not inits or any(x not in INITS for x in inits):
        raise ExperimentError(f"--inits {text!r}: accepted are {', '.join(INITS)}")
    init_sha = None
    if args.init:
        info = describe(str(args.init))  # a missing or foreign path is a one-line CheckpointError
        models = [("init", info.cfg.pattern)]
        init_sha, d_model = info.sha, info.cfg.d_model
        chat_format(str(args.init), args.chat_template)  # a tokenizer or template that cannot work: refused now
    else:
        models = options.models(pick("models"), lambda p: model_config(p, d_model))
    device, dtype = _device(args, d["device"])
    workers = args.workers or (1 if device.startswith("cuda") else options.cores())
    if device.startswith("cuda") and workers > 1:
        raise ExperimentError(f"--workers {workers} on {device}: arms share the one GPU; use --workers 1")
    lr = args.lr if args.lr is not None else d["lr"]
    return Settings(
        train_file=str(train), test_file=str(test), data_name=name, out=pick("out"), models=models,
        lambdas=options.floats(pick("lambdas"), "--lambdas"), fractions=options.fractions(pick("fractions")),
        seeds=options.seeds(pick("seeds")), triple_lambda=pick("triple_lambda") or None,
        inits=[i for i in INITS if i in inits],
        init=str(args.init) if args.init else None, d_model=d_model, pretrain_epochs=float(pick("pretrain_epochs")),
        pretrain_seq_len=d["pretrain_seq_len"], pretrain_batch=d["pretrain_batch"], pretrain_lr=args.pretrain_lr,
        pretrain_warmup=d["pretrain_warmup"], pretrain_max_bytes=pick("pretrain_max_bytes"),
        pretrain_every=d["pretrain_every"], lrs=options.floats(pick("lrs"), "--lrs", positive=True), lr=lr,
        epochs=float(pick("epochs")), batch_size=pick("batch_size"), weight_decay=args.weight_decay,
        ntp_targets=args.ntp_targets, n_spans=args.n_spans, gate_margin=args.gate_margin, gate=d["gate"],
        train_rows=pick("train_rows"), test_rows=pick("test_rows"), system_prompt=pick("system_prompt"),
        threads=args.threads, workers=workers, init_sha=init_sha, device=device, dtype=dtype,
        chat_template=args.chat_template, regime=args.regime,
        data_sha={"train": options.sha(train), "test": options.sha(test)},
    )


def command(argv: list[str]) -> int:
    """``amer experiment nlrx-finetune``; errors propagate as :class:`~amer.errors.AmerError` (one line, exit 2)."""
    return run_resumable(argv, build_parser(), settings_from_args, _command)


def _command(args: argparse.Namespace, s: Settings, argv: list[str]) -> int:
    if args.dry_run:
        arms = pick_arms(s) + build_grid(s, {(i, m): s.lr or s.lrs[0] for i in s.inits for m, _ in s.models})
        for a in dict.fromkeys(arms):
            print(f"{'done' if arm_path(s, a).is_file() else 'todo'}  {a.id}")
        print(f"{len(set(arms))} arms (grid listed at lr {s.lr or s.lrs[0]:g}; the pick decides the real one)")
        return 0
    if args.estimate:
        if args.gpu:
            project(s, args.gpu)
        else:
            estimate(s)
        return 0
    res = read_all(s) if args.report_only else run_all(s)
    summary = summarize(res, s)
    if args.quick:  # a width-32 model on a slice of the data: the mechanics run, the verdict means nothing
        summary["statement"] = ("--quick (a smoke run of every stage on a slice of the data; no evidence either "
                                "way): " + summary["statement"])
    line = "amer experiment nlrx-finetune " + " ".join(a for a in argv if a != "--report-only")
    for p in write_report(summary, Path(s.out), command=line.strip()):
        print(f"wrote {p}")
    print(summary["statement"])
    return 0


def main(argv: list[str] | None = None) -> int:
    """``amer experiment nlrx-finetune`` in-process: bad input prints one line and returns 2."""
    return run(command, list(sys.argv[1:] if argv is None else argv))
