"""The chat template a pretrained tokenizer ships, rendered as its model was instruction-tuned on, with the
character span of every message's content in the render.

A Hugging Face model folder keeps its template as ``chat_template.jinja`` (newer writers) or as the
``chat_template`` entry of ``tokenizer_config.json`` (a string, or a list of named templates: ``default`` is
used). It is a Jinja program (Llama-3 headers ``<|start_header_id|>role<|end_header_id|>``, ChatML's
``<|im_start|>role``, Mistral's ``[INST]``...), so it is rendered by Jinja itself, the way transformers'
``apply_chat_template`` renders it: a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the loop
controls, ``raise_exception``, a ``tojson`` filter, and ``bos_token`` / ``eos_token`` from the tokenizer. Two
choices keep a render reproducible: ``strftime_now`` is not provided, so a Llama-3.1+ template writes its own
fixed default date instead of today's, and ``enable_thinking`` is false (Qwen3 templates then write the empty
reasoning block a non-thinking answer has). Rendering needs ``jinja2`` (``pip install 'amer[chat]'``; it comes
with transformers).

Content spans. A template may wrap, trim or prefix a message's content, so its place in the render is not
searched for: the template is rendered a second time with each content replaced by a unique marker, which
yields the template text around every content exactly; the real render must then be that text with each
content put back (verbatim, stripped, or without leading newlines, whatever the template did), and the spans
follow. A template that rewrites content in any other way is refused in one line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from amer.errors import DataError
from amer.fileread import json_loads, read_file

__all__ = ["TEMPLATE_FILE", "CONFIG_FILE", "ChatTemplate", "read_chat_template"]

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
_MARK = "\ue000{}\ue001"  # private-use characters: no template trims, splits or tests for them


def read_chat_template(folder: str | Path) -> str | None:
    """The Jinja chat template of a model folder (``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template``), or None when it has none."""
    folder = Path(folder)
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    cfg = folder / CONFIG_FILE
    if not cfg.is_file():
        return None
    try:
        data = json_loads(read_file(cfg))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{cfg}: not a readable JSON file ({e})") from None
    tpl = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    if tpl is not None and not isinstance(tpl, str):
        raise DataError(f"{cfg}: chat_template must be a Jinja string (or a list with a 'default' one)")
    return tpl or None


def _environment() -> Any:
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DataError("this model folder has a chat template; rendering it needs jinja2: "
                        "pip install 'amer[chat]' (or jinja2)") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    return env


class ChatTemplate:
    """A Jinja chat template with the special tokens it is rendered with (``where`` names it in errors)."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", where: str = "chat template") -> None:
        self.source, self.where = source, where
        self.bos_token, self.eos_token = bos_token, eos_token
        env = _environment()
        try:
            self._template = env.from_string(source)
        except Exception as e:  # jinja2's TemplateSyntaxError: the folder's template does not parse
            raise DataError(f"{where}: the chat template does not parse as Jinja ({_first_line(e)})") from None

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The template applied to ``messages`` (``[{"role", "content"}, ...]``)."""
        try:
            return self._template.render(messages=[dict(m) for m in messages], bos_token=self.bos_token,
                                         eos_token=self.eos_token, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=False)
        except Exception as e:  # raise_exception(...) in the template, or a construct the sandbox refuses
            raise DataError(f"{self.where}: rendering the chat template failed ({_first_line(e)})") from None

    def render_with_spans(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """``(text, spans)``: the render and, per message, the ``[start, end)`` characters of its content in it."""
        text = self.render(messages)
        marked = self.render([{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)])
        pieces, rest = [], marked
        for i in range(len(messages)):
            head, sep, rest = rest.partition(_MARK.format(i))
            if not sep:
                raise DataError(f"{self.where}: the chat template does not write message {i} "
                                f"({messages[i]['role']!r}) into the conversation; spans cannot be located")
            pieces.append(head)
        pieces.append(rest)
        spans: list[tuple[int, int]] = []
        pos = len(pieces[0]) if text.startswith(pieces[0]) else -1
        for i, m in enumerate(messages):
            content = m["content"]  # as the template may write it: verbatim, trimmed, without leading newlines
            forms = [f for f in dict.fromkeys((content, content.strip(), content.lstrip("\n")))
                     if pos >= 0 and text.startswith(f, pos) and text.startswith(pieces[i + 1], pos + len(f))]
            if not forms:
                break
            spans.append((pos, pos + len(forms[0])))
            pos += len(forms[0]) + len(pieces[i + 1])
        if len(spans) != len(messages) or pos != len(text):
            raise DataError(f"{self.where}: the chat template rewrites message contents (beyond trimming); their "
                            "spans in the render cannot be located")
        return text, spans


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
