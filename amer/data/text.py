"""Text as bytes, the one way every tokenizer and the packer see it."""

from __future__ import annotations

__all__ = ["utf8_bytes"]


def utf8_bytes(text: str) -> bytes:
    """``text`` as UTF-8; "replace" so a lone surrogate (legal in JSON ``"\\ud800"``) cannot crash a whole run."""
    return text.encode("utf-8", errors="replace")
