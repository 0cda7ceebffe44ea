"""Chat examples as token sequences, for any tokenizer: amer's own chat template, or the one a pretrained
model's tokenizer ships (:class:`~amer.data.chat_template.ChatTemplate`), with the token spans of the user's
content and of the answer located through the tokenizer's character offsets.

A sequence is ``prompt + answer + stop``: ``ids[:start]`` is the generation prompt (everything the template
writes before the answer's content), ``ids[start:-1]`` the answer's tokens and ``ids[-1]`` the token the model
emits to end it. With amer's template that is ``[BOS] <|user|>...<|assistant|>\\n`` then the answer then EOS
in the place of the turn's closing newline. With a model's template it is the render itself (its own BOS
text, e.g. ``<|begin_of_text|>``, headers, a default system turn) cut after the special token that closes the
answer's turn (``<|eot_id|>`` for Llama 3, ``<|im_end|>`` for ChatML): the stop token the model was
instruction-tuned to emit, which greedy decoding then stops at. A template that closes the answer with plain
text instead gets the tokenizer's end-of-text token appended, as amer's template does.

A token belongs to a span when it overlaps it. A token that also covers template text (a SentencePiece word
start carrying the space before the answer, say) is allowed only where that text is whitespace, which exact
match forgives; anything else would make the decoded answer differ from the reference, and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from amer.data import render_chat_with_spans
from amer.data.chat_template import ChatTemplate
from amer.errors import DataError

__all__ = ["Encoded", "ChatFormat"]


class Encoded(NamedTuple):
    ids: list[int]  # prompt, answer, stop token
    start: int  # position of the answer's first token: ids[:start] is the generation prompt
    user: tuple[int, int]  # [start, end) token positions of the user's content


def _messages(prompt: str, target: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]


class ChatFormat:
    """How chat examples become sequences for one tokenizer: ``template`` None is amer's own template."""

    def __init__(self, tok: Any, template: ChatTemplate | None = None) -> None:
        self.tok, self.template = tok, template
        self.stop_id: int = tok.eos_id  # a template's own stop token replaces it at the first example
        self._stop_seen: int | None = None
        if template is not None and not hasattr(tok, "encode_with_offsets"):
            raise DataError(f"{tok!r}: a model's chat template needs a tokenizer with character offsets "
                            "(a Hugging Face tokenizer.json)")

    @property
    def name(self) -> str:
        return "amer" if self.template is None else f"the model's ({self.template.where})"

    def encode(self, prompt: str, target: str, system: str | None = None) -> Encoded:
        msgs = _messages(prompt, target, system)
        if self.template is None:
            return self._encode_amer(msgs)
        return self._encode_template(msgs)

    def _encode_amer(self, msgs: list[dict[str, str]]) -> Encoded:
        text, _ = render_chat_with_spans(msgs)
        spans = _amer_content_spans(msgs)
        (u0, u1), (a0, a1) = spans[-2], spans[-1]
        body, (user, answer) = self.tok.encode_with_spans(text, [(u0, u1), (a0, a1)])
        ids = [self.tok.bos_id, *body[: answer[1]], self.tok.eos_id]
        return Encoded(ids, 1 + answer[0], (1 + user[0], 1 + user[1]))

    def _encode_template(self, msgs: list[dict[str, str]]) -> Encoded:
        assert self.template is not None
        text, spans = self.template.render_with_spans(msgs)
        ids, offsets = self.tok.encode_with_offsets(text, where=self.template.where)
        user = _token_span(text, offsets, spans[-2], "user")
        a0, a1 = _token_span(text, offsets, spans[-1], "answer")
        if a1 < len(ids) and self.tok.is_special(ids[a1]):
            seq, stop = ids[: a1 + 1], ids[a1]
        else:
            seq, stop = [*ids[:a1], self.tok.eos_id], self.tok.eos_id
        if self._stop_seen is None:
            self._stop_seen = self.stop_id = stop
        elif stop != self._stop_seen:
            raise DataError(f"{self.template.where}: the chat template ends answers with different tokens "
                            f"({self._stop_seen} and {stop}); greedy decoding needs one stop token")
        if a0 == 0 or a1 <= a0:
            raise DataError(f"{self.template.where}: the render has no prompt before the answer, or an empty answer")
        return Encoded(seq, a0, user)


def _amer_content_spans(msgs: Sequence[dict[str, str]]) -> list[tuple[int, int]]:
    """Character spans of each message's content in amer's render (each turn is ``<|role|>\\n`` content ``\\n``)."""
    spans, pos = [], 0
    for m in msgs:
        pos += len(f"<|{m['role']}|>\n")
        spans.append((pos, pos + len(m["content"])))
        pos += len(m["content"]) + 1
    return spans


def _token_span(text: str, offsets: Sequence[tuple[int, int]], span: tuple[int, int], what: str) -> tuple[int, int]:
    """The tokens overlapping the characters ``span``; refused where a boundary token carries non-blank template
    text, or no token covers the span."""
    s, e = span
    inside = [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
    if not inside:
        raise DataError(f"no token of the render covers the {what} content {text[s:e]!r}")
    i0, i1 = inside[0], inside[-1] + 1
    spill = text[offsets[i0][0] : s] + text[e : offsets[i1 - 1][1]]
    if spill.strip():
        raise DataError(f"the {what} content {text[s:e]!r} shares a token with the template text around it "
                        f"({spill!r}); exact match on decoded text needs token boundaries at the content's edges")
    return i0, i1
