"""Small pretrained-model folders for the chat tests: a byte-level BPE ``tokenizer.json`` with the special tokens
of a model family, its chat template (Llama 3's and ChatML's, as those models ship them), and a random-init
transformers model saved next to them."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers as tk

# Llama-3-Instruct's template as its tokenizer_config.json holds it
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# ChatML with a default system turn, as Qwen2 ships it
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FAMILIES = {"llama3": (LLAMA3, LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>"),
            "chatml": (CHATML, CHATML_SPECIALS, "<|endoftext|>", "<|im_end|>")}


def bpe(texts: list[str], specials: list[str], vocab: int = 400) -> tk.Tokenizer:
    """A byte-level BPE (GPT-2's scheme) trained on ``texts``, ``specials`` first."""
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return hf


def chat_texts(data_dir: Path) -> list[str]:
    return [m["content"] for f in sorted(data_dir.glob("*.jsonl")) for line in f.read_text().splitlines() if line
            for m in json.loads(line)["messages"]]


def write_tokenizer(folder: Path, family: str, texts: list[str], *, with_template: bool = True) -> tk.Tokenizer:
    """``tokenizer.json`` (+ ``tokenizer_config.json`` with the chat template) of ``family`` in ``folder``."""
    template, specials, bos, eos = FAMILIES[family]
    hf = bpe(texts, specials)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": bos, "eos_token": eos, **({"chat_template": template} if with_template else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return hf


def write_llama(folder: Path, texts: list[str], *, layers: int = 2, seed: int = 0) -> Path:
    """A random-init ``LlamaForCausalLM`` folder with a Llama-3-style tokenizer and chat template; its embedding
    has exactly the tokenizer's rows (no PAD among them, as Llama 3.0's)."""
    import torch
    import transformers

    hf = write_tokenizer(folder, "llama3", texts)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=hf.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, initializer_range=0.05, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(folder)
    return folder
