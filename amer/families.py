"""The block-family registry: everything amer knows about a family lives in its :class:`FamilySpec`.

A family is registered next to its mixer (``amer/blocks/<family>.py`` calls :func:`register_family`),
and every other part of amer (the pattern parser, tap selectors, STP family weights, the config and its
flags, FLOP counts, the curvature report and its colours, ``amer patterns``) reads this registry instead
of naming families. Adding a family is one new block file plus its import in ``amer/blocks/__init__.py``.

The registry imports no block module: the block modules import it to register themselves, and the
package ``amer`` imports ``amer.blocks`` before anything else, so the built-in families are registered
whenever any part of amer runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from amer.errors import InputError

__all__ = ["FamilySpec", "Family", "register_family", "unregister_family", "get_family", "families", "letters",
           "expected_text", "RESERVED_LETTERS"]

# Letters the grammars use for something else: 'L' is the absolute-layer tap selector (L7).
RESERVED_LETTERS = frozenset("L")


@dataclass(frozen=True)
class FamilySpec:
    """One block family.

    ``config`` is the dataclass of the family's own settings (every field has a default and a ``help``
    in its metadata; the instance lives at ``ModelConfig.<config_key>`` and in the ``[model.<config_key>]``
    TOML table). ``mixer`` is the token/channel mixer class, built as ``mixer(config, dims, layer)``;
    it owns its initialisation (``reset_parameters``), reports its matmul work (``flops(seq_len)``) and
    its decoding state (``init_cache``), following the contract in :mod:`amer.blocks.common`.
    """

    letter: str  # one upper-case letter in the pattern language
    name: str  # long name, e.g. "attention"
    colour: str  # plot colour, e.g. "#1f77b4"
    config_key: str  # ModelConfig attribute / TOML table, e.g. "attention"
    config: type  # the family's config dataclass
    mixer: type  # the mixer class (an nn.Module)
    summary: str = ""  # one line for listings, e.g. "causal GQA attention with RoPE"
    # the config key of another family whose config this family's mixer is also built with (``companion=``), for a
    # mixer that runs that family's mixer inside itself (Zamba2's hybrid layer runs a Mamba-2); several keys when the
    # family's config picks one of them with its ``companion`` field (Zamba's runs a Mamba-1 instead)
    companion: str | tuple[str, ...] | None = None

    def companion_key(self, cfg: Any) -> str | None:
        """The config key of the family whose mixer this family's mixer, built from ``cfg``, runs inside itself."""
        if self.companion is None or isinstance(self.companion, str):
            return self.companion
        key = getattr(cfg, "companion", None)
        if key not in self.companion:
            raise InputError(f"{self.config_key}.companion must be one of {', '.join(self.companion)}, got {key!r}")
        return key

    def __post_init__(self) -> None:
        if len(self.letter) != 1 or not self.letter.isupper() or not self.letter.isascii():
            raise InputError(f"family letter must be one upper-case ASCII letter, got {self.letter!r}")
        if self.letter in RESERVED_LETTERS:
            raise InputError(f"family letter {self.letter!r} is reserved (L selects absolute layers)")
        if not self.config_key.isidentifier():
            raise InputError(f"family config_key must be an identifier, got {self.config_key!r}")
        params = getattr(self.config, "__dataclass_params__", None)
        if params is None or not params.frozen:  # a run's config is resolved once and never rewritten
            raise InputError(f"family config {getattr(self.config, '__name__', self.config)!r} must be a frozen "
                             "dataclass (@dataclass(frozen=True))")


_REGISTRY: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add ``spec`` to the registry. Re-registering the same letter with the same mixer (same module and
    name) and config key replaces the entry (a reloaded module); anything else under a taken letter or
    config key is an error."""
    old = _REGISTRY.get(spec.letter)
    same = old is not None and (old.mixer.__module__, old.mixer.__qualname__, old.config_key) == (
        spec.mixer.__module__, spec.mixer.__qualname__, spec.config_key)
    if old is not None and not same:
        raise InputError(f"family letter {spec.letter!r} is already registered to {old.name}")
    clash = [s for s in _REGISTRY.values() if s.config_key == spec.config_key and s.letter != spec.letter]
    if clash:
        raise InputError(f"family config_key {spec.config_key!r} is already used by {clash[0].name}")
    _REGISTRY[spec.letter] = spec
    return spec


def unregister_family(letter: str) -> None:
    """Remove a family (tests that register a toy family clean up with this)."""
    _REGISTRY.pop(letter, None)


def families() -> tuple[FamilySpec, ...]:
    """Every registered family, in registration order (built-ins first: A, M, E, R)."""
    return tuple(_REGISTRY.values())


def letters() -> str:
    """The registered family letters, e.g. ``"AMER"``."""
    return "".join(s.letter for s in families())


def expected_text() -> str:
    """``"expected A (attention), M (mamba), ..."``: what error messages list as accepted."""
    return "expected " + ", ".join(f"{s.letter} ({s.name})" for s in families())


def get_family(letter: str) -> FamilySpec:
    """The spec of ``letter``; an unknown letter is an :class:`InputError` listing the known ones."""
    spec = _REGISTRY.get(letter)
    if spec is None:
        raise InputError(f"unknown block family {letter!r}; {expected_text()}")
    return spec


class Family(str):
    """A family's pattern letter as a typed string: ``Family("A") == "A"``, ``Family("A").spec.name``.

    Only registered letters construct; it hashes and compares like the letter, so it can key dicts and
    travel through JSON unchanged.
    """

    __slots__ = ()

    def __new__(cls, letter: Any) -> Family:
        if isinstance(letter, Family):
            return letter
        return super().__new__(cls, get_family(str(letter)).letter)

    @property
    def spec(self) -> FamilySpec:
        return get_family(str(self))

    @property
    def value(self) -> str:
        """The letter (as a plain ``str``)."""
        return str.__str__(self)

    @property
    def long_name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"Family({self.value!r})"

    @classmethod
    def all(cls) -> Iterator[Family]:
        return iter([cls(s.letter) for s in families()])
