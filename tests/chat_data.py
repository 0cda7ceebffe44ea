"""Chat-format NL-RX data for the experiment tests: rows as the STP paper's released datasets hold them, a tiny
synthetic train/test pair written on demand, and where the shared copy of the real data lives."""

from __future__ import annotations

import json
from pathlib import Path

from amer.experiments.nlrx.data import TEST_FILE, TRAIN_FILE

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nl-rx-synth"
SYSTEM = "Convert natural language to regular expression."
WORDS = ("dog", "truck", "ring", "lake")


def chat_row(user: str, regex: str, system: bool = True) -> str:
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": regex}]
    return json.dumps({"messages": msgs})


def write_chat_data(d: Path, n_train: int = 48, n_test: int = 12,
                    phrase: str = "lines with the string '{w}' {n} or more times") -> Path:
    """``TRAIN_FILE`` and ``TEST_FILE`` under ``d``: a word repeated ``n`` or more times, as description and
    regex (``phrase`` formats the description from ``w`` and ``n``)."""
    d.mkdir(parents=True, exist_ok=True)
    rows = [chat_row(phrase.format(w=WORDS[i % 4], n=i % 5 + 1), f"({WORDS[i % 4]}){{{i % 5 + 1},}}")
            for i in range(n_train + n_test)]
    (d / TRAIN_FILE).write_text("\n".join(rows[:n_train]) + "\n")
    (d / TEST_FILE).write_text("\n".join(rows[n_train:]) + "\n")
    return d
