"""STP where the paper claims it works: pretrain small models, then fine-tune them with the span form of STP.

Claim under test (Huang, LeCun, Balestriero, arXiv 2602.22617): fine-tuning a *pretrained* language model with
Semantic Tube Prediction on NL-RX-SYNTH matches the next-token baseline's exact match with 16x less data. The
released code (``--linear=random_span``) regularises one patch of each example's content against its
complement (:mod:`amer.stp.span`), trains next-token CE on every token, and fine-tunes at a small lr with
linear decay and no warm-up for 4 epochs. ``amer experiment nlrx`` tested small models *from scratch* and found
no benefit; this experiment gives STP the premise it relies on, pretrained trajectories, at CPU scale.

Phases (each resumable, see :mod:`.runner`):

1. **Pretraining** (:mod:`.pretrain`): a hybrid (``AMER``) and a dense (``(AE)*2``) model at width 128 on the
   bundled King James Bible + Python standard library (15 MB of bytes), NTP, 1 epoch by default; or
   ``--init`` fine-tunes any checkpoint, run directory, pretrained or transformers folder instead, with its own
   tokenizer and chat template (:mod:`.init`); ``--regime paper`` is the paper's own setup for such a model
   (lr 2e-5, 4 epochs, batch 16, bf16 on a GPU, five seeds, no gate, no from-scratch control).
2. **Gate**: held-out span-form STP loss on the test rows for the pretrained model, a random initialisation
   and (from the grid) the from-scratch NTP model. If pretraining does not bring it clearly below the
   from-scratch level, the report says so instead of giving a verdict.
3. **Learning-rate pick**: NTP on all the data, the first seed, lr in {1e-4, 3e-4, 1e-3}, per model and per
   init (pretrained / scratch); the best exact match wins.
4. **Grid**: lambda {0, 0.005, 0.02, 0.04} (span form) plus a triple-form arm at 0.02 (the bridge to
   ``amer experiment nlrx``) x data fractions {1, 1/4, 1/16} x seeds {0, 1, 2}, fine-tuned from the pretrained
   weights and, as the control, the same grid from scratch. A fixed number of epochs per arm (as the paper),
   so a smaller fraction costs proportionally less. Every arm of a seed shares the subset (nested), the batch
   order, and for the control the initialisation, so the tests are paired.

Report (:mod:`.report`): exact match, held-out CE on the answer, held-out STP in both forms, effective rank of
the final states, paired t-tests, the gate, the decision rule (written before the results) and a verdict.
The command line is :mod:`amer.cli.experiment_nlrx_finetune`.
"""

from __future__ import annotations

from amer.experiments.nlrx_finetune.arm import Data, evaluate_model, load_data, run_arm, train_arm
from amer.experiments.nlrx_finetune.data import NTP_TARGETS, ChatSet, pretraining_corpus
from amer.experiments.nlrx_finetune.grid import INITS, NTP, PROTOCOL, SPAN, TRIPLE, Arm, Settings, build_grid, pick_arms
from amer.experiments.nlrx_finetune.pretrain import pretrain
from amer.experiments.nlrx_finetune.report import DECISION_RULE, summarize, write_report
from amer.experiments.nlrx_finetune.runner import measure_gate, pick_lrs, read_all, run_all, run_arms

__all__ = [
    "Data", "evaluate_model", "load_data", "run_arm", "train_arm", "NTP_TARGETS", "ChatSet", "pretraining_corpus",
    "INITS", "NTP", "PROTOCOL", "SPAN", "TRIPLE", "Arm", "Settings", "build_grid", "pick_arms",
    "pretrain", "DECISION_RULE", "summarize", "write_report", "measure_gate", "pick_lrs", "read_all", "run_all",
    "run_arms",
]
