"""``amer export CHECKPOINT DIR``: a checkpoint as a pretrained folder (config.json, model.safetensors,
tokenizer.json) that ``HybridLM.from_pretrained`` loads, or, with ``--format transformers``, as a transformers
model folder where a transformers class can express the pattern."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amer.checkpoint import find_checkpoint, load_checkpoint, read_meta
from amer.cli.base import ArgParser
from amer.configio import path_arg
from amer.errors import InputError
from amer.hub import PRETRAINED_FILES, save_pretrained

__all__ = ["command"]


def _tokenizer(source: Path, vocab_size: int) -> Any:
    """The folder's tokenizer.json; else the byte tokenizer for an amer training checkpoint that predates saved
    tokenizers (they were all byte-level) and whose vocabulary holds its ids; else none: an imported folder without
    a tokenizer is exported without one, and without special ids, rather than with byte ids of another vocabulary."""
    from amer.data import ByteTokenizer, load_tokenizer

    if (source / "tokenizer.json").is_file():
        return load_tokenizer(source)
    if (source / "meta.json").is_file() and vocab_size >= ByteTokenizer.vocab_size:
        return ByteTokenizer()
    return None


def command(argv: list[str]) -> int:
    p = ArgParser(prog="amer export", description="Write a checkpoint as a pretrained folder: config.json, "
                  "model.safetensors and tokenizer.json (amer's format, loaded by HybridLM.from_pretrained), or a "
                  "transformers model folder (--format transformers).")
    p.add_argument("checkpoint", type=path_arg,
                   help="checkpoint directory, run directory (latest step) or pretrained folder")
    p.add_argument("out", type=path_arg,
                   help="folder to write: new or empty (see --overwrite)")
    p.add_argument("--format", choices=("amer", "transformers"), default="amer",
                   help="amer: HybridLM.from_pretrained folder; transformers: the folder of the transformers class "
                        "whose layout the pattern has (Llama, Mistral, Qwen2/3, Granite, Mixtral, Mamba2, Mamba, "
                        "Falcon-Mamba, LFM2, OLMo-Hybrid)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in OUT (a folder holding anything else is still refused)")
    args = p.parse_args(argv)
    source = find_checkpoint(args.checkpoint)
    out = Path(args.out)
    if args.format == "transformers":
        from amer.interop.export import check_target
    else:
        from amer.hub import check_target
    check_target(out)  # a link, a file, a folder of someone else's: refused, whatever --overwrite says
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise InputError(f"{out} is not empty: it holds an earlier export; --overwrite to replace it, or choose a new "
                         "folder")
    model, cfg = load_checkpoint(source)
    tokenizer = _tokenizer(source, cfg.vocab_size)
    if args.format == "transformers":
        from amer.interop import export_transformers

        export_transformers(model, cfg, out, tokenizer=tokenizer)
    else:
        step = read_meta(source).get("step")
        save_pretrained(model, out, tokenizer=tokenizer, source={"checkpoint": str(source), "step": step})
        print(f"exported {source}" + (f" (step {step})" if step is not None else "") + f" to {out}: "
              + ", ".join(f for f in PRETRAINED_FILES if (out / f).exists()))
        return 0
    print(f"exported {source} to {out} ({args.format} format)")
    return 0
