"""The STP paper's headline experiment on NL-RX-SYNTH, from scratch, at CPU scale.

Claim under test (Huang, LeCun, Balestriero, arXiv 2602.22617): on NL-RX-SYNTH (natural language
to regular expression) Semantic Tube Prediction lets a model match the next-token baseline's
exact-match accuracy with 16x less training data, and held-out STP loss falls steadily as lambda
grows while cross-entropy stays flat (its Figure 4b). The paper fine-tunes pretrained 1-8B models;
here small hybrid models are trained from scratch, so the result may differ either way, and the
report says which from the numbers.

Task framing (one example = one sequence, never packed with another)::

    [BOS] "<|user|>\\n" description "\\n<|assistant|>\\n" regex [EOS] [PAD ...]

The prompt is the chat template of :func:`amer.data.render_chat_with_spans` with the generation
prompt; the constant system turn is left out by default (``--system-prompt`` keeps it) because a
model trained from scratch learns nothing from it and it would cost a third of the compute.
Next-token loss on the regex bytes and the EOS only (targets are -100 elsewhere). The STP mask is
a document id per position: the example's index for every real token (template, description,
regex, EOS), -1 for padding, so STP triples never leave their example or touch padding.

Grid: models x lambda x STP taps x data fraction x seed. Every arm of one seed shares the
initialisation, the training subset (nested: 1/16 is inside 1/4 is inside 1) and the batch order,
so STP vs NTP differences are paired. All arms run the same optimizer steps and batch size, so a
smaller fraction is seen for proportionally more epochs (equal compute).

Evaluation on the test rows: greedy decoding with the decoding caches and exact string match
(surrounding whitespace stripped, see :func:`exact_match`), held-out cross-entropy on the target
tokens, held-out STP loss on both tap selections (fixed spans, identical for every arm), and the
effective rank of the final hidden states (a representation-collapse check).

Modules: :mod:`.data` (examples, batches, exact match), :mod:`.grid` (settings, arms, models),
:mod:`.arm` (train and evaluate one arm through :class:`amer.training.TrainStep`,
:func:`amer.training.evaluate` and :func:`amer.generate.decode`), :mod:`.runner` (the grid, in parallel,
resumable, the duration estimate), :mod:`.report` (summary, verdicts, results files); the command line is
:mod:`amer.cli.experiment_nlrx`.

Resumable: each finished arm is written to ``OUT/arms/<arm-id>.json`` and skipped when present;
the report (``results.json``, ``results.md``, ``results.png``) is rebuilt from those files.

Default grid (sized for at most 90 minutes on 2 cores): ``dense=(AE)*2`` (239k parameters) and
``hybrid=AMER`` (173k) at d_model 64; 1000 steps x batch 16 per arm (16k examples: 2 epochs of the full
set, 8 of 1/4, 32 of 1/16), lr 3e-3 with 5% warm-up and cosine decay; three seeds. The full lambda sweep
{0, .005, .01, .02, .04, .08} x taps {final, family} runs at fraction 1; fractions 1/4 and 1/16 run NTP
and lambda 0.02 (the paper's best on SYNTH) with both taps: 102 arms. ``--lambdas-small all`` runs the
full 198-arm cross instead. Measured on 2 cores (AMD EPYC, 2026-12-01), one thread per worker, two
workers: ~44 s (dense) / ~48 s (hybrid) of training and ~7-8 s of evaluation per arm; the default grid
~47 min, the full cross 90 min (119 min on a 2-core Intel Xeon). NTP reaches ~23-31% (dense) and ~41-45% (hybrid)
exact match at fraction 1, depending on the initial draws.
"""

from __future__ import annotations

from amer.errors import ExperimentError
from amer.experiments.nlrx.arm import Data, evaluate_arm, load_data, predict, run_arm, train_arm
from amer.experiments.nlrx.data import (
                                        ENV_DIR,
                                        IGNORE,
                                        TEST_FILE,
                                        TRAIN_FILE,
                                        Example,
                                        ExampleSet,
                                        LengthBucketedBatches,
                                        default_data_dir,
                                        encode_example,
                                        exact_match,
                                        load_examples,
                                        normalize_regex,
)
from amer.experiments.nlrx.grid import (
                                        NTP,
                                        PROTOCOL,
                                        TAPS,
                                        Arm,
                                        Settings,
                                        build_grid,
                                        family_selector,
                                        model_config,
                                        subset_rows,
)
from amer.experiments.nlrx.report import summarize, write_report
from amer.experiments.nlrx.runner import check_stale, estimate, run_grid

__all__ = [
    "ExperimentError", "TRAIN_FILE", "TEST_FILE", "ENV_DIR", "IGNORE", "TAPS", "NTP", "PROTOCOL",
    "Example", "load_examples", "encode_example", "ExampleSet", "LengthBucketedBatches", "exact_match",
    "normalize_regex", "Settings", "Arm", "build_grid", "model_config", "family_selector", "subset_rows",
    "Data", "load_data", "train_arm", "evaluate_arm", "predict", "run_arm", "check_stale", "run_grid",
    "summarize", "write_report", "default_data_dir", "estimate",
]
