"""``amer experiment nlrx-finetune`` on pretrained models with their own tokenizers: chat templates rendered as
transformers renders them, answer and STP spans located through the tokenizer's offsets (decoded back here),
the template's stop token, a random-init Llama folder imported and fine-tuned end to end on NL-RX-TURK-format
files, ``--regime paper``, bfloat16 autocast through training, evaluation and decoding (STP in fp32), the GPU
projection, and the one-line refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from chat_data import SYSTEM, chat_row, write_chat_data
from pretrained_chat import CHATML, FAMILIES, LLAMA3, chat_texts, write_llama, write_tokenizer

import amer.cli.experiment_nlrx_finetune as ft_cli
from amer.data import ByteTokenizer, tokenizer_from_file
from amer.data.chat_template import ChatTemplate, read_chat_template
from amer.errors import DataError
from amer.experiments.nlrx import Example
from amer.experiments.nlrx.encode import ChatFormat
from amer.experiments.nlrx_finetune import ChatSet

transformers = pytest.importorskip("transformers")

MSGS = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "lines with 'dog' 2 times"},
        {"role": "assistant", "content": "(dog){2,}"}]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data"), phrase="lines with '{w}' {n} times")


@pytest.fixture(scope="module")
def folders(data: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {fam: (write_tokenizer(root / fam, fam, chat_texts(data)), root / fam)[1] for fam in FAMILIES}


def _fmt(folder: Path, family: str) -> ChatFormat:
    tpl, _, bos, eos = FAMILIES[family]
    return ChatFormat(tokenizer_from_file(folder), ChatTemplate(tpl, bos_token=bos, eos_token=eos))


# ---------------------------------------------------------------- templates and spans


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_render_is_transformers_and_spans_decode_back(folders: dict[str, Path], family: str) -> None:
    folder = folders[family]
    tpl, _, bos, eos = FAMILIES[family]
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token=bos,
                                               eos_token=eos)
    fmt = _fmt(folder, family)
    text, spans = fmt.template.render_with_spans(MSGS)
    assert text == ref.apply_chat_template(MSGS, tokenize=False, chat_template=tpl)
    assert [text[a:b] for a, b in spans] == [m["content"] for m in MSGS]
    enc = fmt.encode(MSGS[1]["content"], MSGS[2]["content"], SYSTEM)
    tok = fmt.tok
    assert tok.decode(enc.ids[enc.user[0] : enc.user[1]]) == MSGS[1]["content"]
    assert tok.decode(enc.ids[enc.start : -1]) == MSGS[2]["content"]
    # the answer ends with the template's own end-of-turn token, and the prompt is transformers' generation prompt
    assert enc.ids[-1] == fmt.stop_id == tok.token_id(FAMILIES[family][3])
    prompt = ref.apply_chat_template(MSGS[:2], tokenize=False, add_generation_prompt=True, chat_template=tpl)
    assert tok.hf.decode(enc.ids[: enc.start], skip_special_tokens=False) == prompt
    # negative control: amer's own template lays the same example out differently
    own = ChatFormat(tok).encode(MSGS[1]["content"], MSGS[2]["content"], SYSTEM)
    assert tok.hf.decode(own.ids[: own.start], skip_special_tokens=False) != prompt
    assert tok.decode(own.ids[own.start : -1]) == MSGS[2]["content"] and own.ids[-1] == tok.eos_id


def test_content_mask_with_a_model_template_is_user_and_answer_content(folders: dict[str, Path]) -> None:
    fmt = _fmt(folders["llama3"], "llama3")
    exs = [Example("lines with 'ring' 3 times", "(ring){3,}", SYSTEM), Example("x", "a", SYSTEM)]
    b = ChatSet(exs, fmt.tok, system=True, ntp="all", fmt=fmt).batch([0, 1])
    for row, ex in enumerate(exs):
        pos = b["stp_content"][row].nonzero().flatten().tolist()
        runs = [[pos[0]]]
        for p in pos[1:]:
            runs[-1].append(p) if p == runs[-1][-1] + 1 else runs.append([p])
        tokens = b["tokens"][row].tolist()
        assert len(runs) == 2
        assert fmt.tok.decode(tokens[runs[0][1] : runs[0][-1] + 1]) == ex.prompt
        assert fmt.tok.decode(tokens[runs[1][1] : runs[1][-1] + 1]) == ex.target
        n = int((b["doc_ids"][row] >= 0).sum())
        assert runs[1][-1] == n - 1  # the stop token is only a target
        assert b["targets"][row, n - 1] == fmt.stop_id


def test_template_file_lookup_and_refusals(tmp_path: Path, folders: dict[str, Path]) -> None:
    assert read_chat_template(folders["llama3"]) == LLAMA3
    (tmp_path / "chat_template.jinja").write_text(CHATML)  # the newer file wins over tokenizer_config.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default",
                                                                                    "template": LLAMA3}]}))
    assert read_chat_template(tmp_path) == CHATML
    (tmp_path / "chat_template.jinja").unlink()
    assert read_chat_template(tmp_path) == LLAMA3
    assert read_chat_template(tmp_path / "nowhere") is None
    rewriting = ChatTemplate("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", where="t")
    with pytest.raises(DataError, match="rewrites message contents"):
        rewriting.render_with_spans(MSGS)
    with pytest.raises(DataError, match="does not parse"):
        ChatTemplate("{% for m in messages %}", where="t")
    with pytest.raises(DataError, match="needs a tokenizer with character offsets"):
        ChatFormat(ByteTokenizer(), ChatTemplate(LLAMA3))
    # a tokenizer whose encodings carry no offsets cannot place spans: refused in one line
    tok = tokenizer_from_file(folders["llama3"])
    real = tok.hf

    class NoOffsets:
        def __getattr__(self, name):
            return getattr(real, name)

        def encode(self, text, add_special_tokens=False):
            enc = real.encode(text, add_special_tokens=add_special_tokens)
            return type("Enc", (), {"ids": enc.ids, "offsets": [(0, 0)] * len(enc.ids)})()

    tok.hf = NoOffsets()
    with pytest.raises(DataError, match="no usable character offsets") as err:
        tok.encode_with_offsets("lines with a vowel")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- end to end on an imported Llama folder


@pytest.fixture(scope="module")
def llama(data: Path, tmp_path_factory) -> tuple[Path, Path]:
    from amer.interop import import_pretrained

    src = write_llama(tmp_path_factory.mktemp("hf") / "llama", chat_texts(data))
    out = tmp_path_factory.mktemp("amer") / "llama"
    import_pretrained(src, out)
    return src, out


def _turk(d: Path) -> tuple[Path, Path]:
    """NL-RX-TURK-format files (the same chat rows, human-written descriptions), under TURK's file names."""
    d.mkdir(parents=True, exist_ok=True)
    say = ["lines that have the word {w} at least {n} times", "find {w}, {n} or more times in a line",
           "{w} appears {n}+ times"]
    rows = [chat_row(say[i % 3].format(w=w, n=n), f"({w}){{{n},}}") for i, (w, n) in
            enumerate((w, n) for n in range(1, 5) for w in ("dog", "truck", "ring", "lake"))]
    (d / "turk_train.jsonl").write_text("\n".join(rows[:12]) + "\n")
    (d / "turk_test.jsonl").write_text("\n".join(rows[12:]) + "\n")
    return d / "turk_train.jsonl", d / "turk_test.jsonl"


def test_import_keeps_the_chat_template_and_the_same_encodings(llama: tuple[Path, Path]) -> None:
    from amer.experiments.nlrx_finetune.init import chat_format, describe

    src, out = llama
    assert (out / "chat_template.jinja").read_text() == LLAMA3
    a, b = chat_format(str(src)), chat_format(str(out))  # the transformers folder, converted in memory, and amer's
    ea, eb = (f.encode("lines with 'lake' 4 times", "(lake){4,}", SYSTEM) for f in (a, b))
    assert ea == eb and a.stop_id == b.stop_id == a.tok.token_id("<|eot_id|>")
    assert describe(str(src)).kind == "transformers" and describe(str(out)).kind == "amer"
    assert describe(str(src)).cfg == describe(str(out)).cfg
    # --chat-template amer lays the data out in amer's template with the same tokenizer
    own = chat_format(str(out), "amer")
    assert own.template is None and own.encode("x", "a").ids[-1] == own.tok.eos_id


def test_quick_end_to_end_on_an_imported_llama_with_turk_files(llama: tuple[Path, Path], tmp_path: Path,
                                                              capsys) -> None:
    _, folder = llama
    train, test = _turk(tmp_path / "turk")
    out = tmp_path / "out"
    argv = ["--quick", "--init", str(folder), "--train-file", str(train), "--test-file", str(test), "--out", str(out),
            "--inits", "pretrained", "--seeds", "1", "--lambdas", "0,0.02", "--fractions", "1", "--lr", "1e-3",
            "--triple-lambda", "0", "--epochs", "2", "--batch-size", "4", "--workers", "1", "--system-prompt"]
    assert ft_cli.main(argv) == 0
    capsys.readouterr()
    s = json.loads((out / "results.json").read_text())
    assert s["data"] == "turk_train.jsonl / turk_test.jsonl" and s["settings"]["models"][0][0] == "init"
    assert {(r["form"], r["lam"]) for r in s["rows"]} == {("ntp", 0.0), ("span", 0.02)}
    arm = json.loads((out / "arms" / "pretrained_init_lr0.001_span_lam0.02_f1_s0.json").read_text())
    assert arm["n_test"] == 4 and 0.0 <= arm["accuracy"] <= 1.0 and arm["train_stp"] > 0
    assert arm["heldout_stp_span"] > 0 and arm["steps"] == 6 and arm["device"] == "cpu"
    # the gate's random initialisation has the imported model's config
    gate = json.loads((out / "gate.json").read_text())["models"]["init"]
    assert gate["pretrained"]["heldout_stp_span"] != gate["random_init"]["heldout_stp_span"]


def test_regime_paper_settings_and_refusals(llama: tuple[Path, Path], data: Path, capsys) -> None:
    _, folder = llama
    args = ft_cli.build_parser().parse_args(["--regime", "paper", "--init", str(folder), "--data-dir", str(data)])
    s = ft_cli.settings_from_args(args)
    assert (s.lr, s.epochs, s.batch_size, s.seeds, s.fractions) == (2e-5, 4.0, 16, [0, 1, 2, 3, 4],
                                                                   ["1", "1/4", "1/16"])
    assert s.lambdas == [0.0, 0.005, 0.02, 0.04] and s.inits == ["pretrained"] and s.triple_lambda is None
    assert s.system_prompt and not s.gate and s.weight_decay == 0 and s.ntp_targets == "all"
    assert (s.device, s.dtype) == (("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32"))
    s2 = ft_cli.settings_from_args(ft_cli.build_parser().parse_args(
        ["--regime", "paper", "--init", str(folder), "--data-dir", str(data), "--dtype", "bfloat16", "--seeds", "3",
         "--lambdas", "0,0.02", "--fractions", "1", "--device", "cpu", "--estimate"]))
    assert s2.dtype == "bfloat16" and s2.seeds == [0, 1, 2] and s2.fingerprint()["dtype"] == "bfloat16"
    assert "dtype" not in s.fingerprint() or s.dtype != "float32"  # fp32 runs keep their earlier fingerprints
    for bad, says in ((["--regime", "paper"], "pass --init"), (["--gpu", "h100"], "goes with --estimate"),
                      (["--device", "tpu"], "--device"), (["--init", str(folder), "--chat-template", "x"], "invalid")):
        assert ft_cli.main(["--data-dir", str(data), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err


def test_a_folder_without_an_end_of_text_token_is_one_line(tmp_path: Path, data: Path, capsys) -> None:
    from pretrained_chat import bpe

    folder = tmp_path / "noeos"
    write_llama(folder, chat_texts(data))
    bpe(chat_texts(data), ["<|start_header_id|>", "<|end_header_id|>"]).save(str(folder / "tokenizer.json"))
    capsys.readouterr()
    assert ft_cli.main(["--init", str(folder), "--data-dir", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no end-of-text token" in err and "\n" not in err


# ---------------------------------------------------------------- bfloat16 and the GPU projection


def test_bfloat16_autocast_reaches_training_evaluation_and_decoding_with_stp_in_fp32(
        llama: tuple[Path, Path], data: Path, monkeypatch) -> None:
    import amer.training.step as step_mod
    from amer.experiments.nlrx_finetune import load_data, run_arm
    from amer.experiments.nlrx_finetune.grid import Arm
    from amer.model import HybridLM

    _, folder = llama
    seen: dict[str, set] = {"forward": set(), "stp": set()}
    forward, total = HybridLM.forward, step_mod.total_loss

    def spy_forward(self, *a, **kw):
        on = torch.is_autocast_enabled("cpu")
        seen["forward"].add((on, torch.get_autocast_dtype("cpu") if on else None, kw.get("cache") is not None))
        return forward(self, *a, **kw)

    def spy_total(*a, **kw):
        parts = total(*a, **kw)
        seen["stp"].add(parts.stp.dtype)
        return parts

    monkeypatch.setattr(HybridLM, "forward", spy_forward)
    monkeypatch.setattr(step_mod, "total_loss", spy_total)
    args = ["--init", str(folder), "--data-dir", str(data), "--train-rows", "4", "--test-rows", "2", "--seeds", "1",
            "--batch-size", "2", "--epochs", "1", "--device", "cpu"]
    recs = {}
    for dtype in ("bfloat16", "float32"):
        s = ft_cli.settings_from_args(ft_cli.build_parser().parse_args([*args, "--dtype", dtype]))
        s = type(s)(**{**s.__dict__, "max_new_tokens": 3})
        seen["forward"].clear()
        recs[dtype] = run_arm(Arm("pretrained", "init", s.models[0][1], "span", 0.02, "1", 0, 1e-3), s, load_data(s))
        forwards = set(seen["forward"])
        if dtype == "bfloat16":  # training, held-out evaluation and cached decoding all under bf16 autocast
            assert forwards == {(True, torch.bfloat16, False), (True, torch.bfloat16, True)}
        else:  # negative control: fp32 runs no forward under autocast
            assert forwards == {(False, None, False), (False, None, True)}
    assert seen["stp"] == {torch.float32}
    assert recs["bfloat16"]["train_ce"] != recs["float32"]["train_ce"]


def test_gpu_projection_counts_the_grid_and_names_its_assumptions(llama: tuple[Path, Path], data: Path,
                                                                  tmp_path: Path, capsys) -> None:
    import shutil

    from amer.experiments.nlrx_finetune.estimate import GPUS, project

    _, folder = llama
    cfg_only = tmp_path / "cfg-only"  # config, tokenizer and template: no weights needed to count the cost
    cfg_only.mkdir()
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        shutil.copy(folder / name, cfg_only / name)
    argv = ["--regime", "paper", "--init", str(cfg_only), "--data-dir", str(data), "--estimate", "--gpu", "h100",
            "--device", "cpu"]
    assert ft_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "estimated, not measured" in out and "H100" in out and "h on one GPU" in out
    s = ft_cli.settings_from_args(ft_cli.build_parser().parse_args(argv))
    parts = project(s, "h200", say=lambda *a: None)
    # 4 lambdas x 3 fractions x 5 seeds on 48 rows: ceil(4 * rows / 16) steps each
    steps = 4 * 5 * sum(-(-4 * n // 16) for n in (48, 12, 3))
    assert parts["train"] > 0 and parts["total"] > parts["train"]
    from amer.experiments.nlrx_finetune.arm import load_data
    from amer.experiments.nlrx_finetune.estimate import work

    assert work(s, load_data(s))["steps"] == steps and GPUS["h200"].memory_gib > GPUS["h100"].memory_gib



def test_the_prepared_gpu_script_runs_its_slice_end_to_end_on_a_cpu(llama: tuple[Path, Path], data: Path,
                                                                     tmp_path: Path) -> None:
    """``scripts/stp_paper_gpu.sh`` with the device and dtype switched to the CPU and a few rows: timed estimates,
    then the slice (NTP vs STP 0.02, all the data, 3 seeds) and its table."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DEVICE": "cpu", "DTYPE": "float32", "DATA": str(data),
           "EXTRA": "--train-rows 8 --test-rows 3 --epochs 1 --batch-size 4 --threads 1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    res = subprocess.run(["bash", str(repo / "scripts" / "stp_paper_gpu.sh"), str(llama[1]), str(tmp_path / "o")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("estimate: about") == 2 and "## Results" in res.stdout and "## Verdict" in res.stdout
    arms = {p.name for p in (tmp_path / "o" / "arms").glob("*.json")}
    assert arms == {f"pretrained_init_lr2e-05_{f}_f1_s{s}.json" for s in range(3) for f in ("ntp_lam0", "span_lam0.02")}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
