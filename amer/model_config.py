"""The model's configuration: the pattern, the shared dimensions and one config per block family, with named
variants of a family for per-layer differences.

A family's config is its ``[model.<config_key>]`` table; a *variant* is that table with some values changed,
declared under ``[model.<config_key>.variants.<name>]`` and chosen per layer in the pattern as ``A.swa`` (see
:mod:`amer.pattern`). A dense feed-forward beside MoE layers, sliding-window beside full attention with its
own RoPE base: each is one family with a variant, so taps and selectors still address every layer by family and
index (``A-1``, ``E0``), and ``A.swa`` selects a variant's layers.

>>> cfg = ModelConfig(pattern="A.swa E A E.dense", d_model=64,
...                   attention={"variants": {"swa": {"window": 128, "rope_theta": 10000.0}}},
...                   moe={"n_experts": 4, "variants": {"dense": {"n_experts": 1}}})
>>> cfg.family_config("A", "swa").window, cfg.family_config("E", "dense").n_experts
(128, 1)
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from amer.configio import check, check_fields, coerce, from_dict, opt, suggest, to_dict
from amer.errors import ConfigError
from amer.families import FamilySpec, families, get_family
from amer.pattern import load_preset, parse_pattern

__all__ = ["Dims", "ModelConfig", "BlockOptions", "shared_fields", "VARIANT_NAME"]

VARIANT_NAME = re.compile(r"^[a-z][a-z_]{0,31}$")  # as the pattern language writes them: A.swa, E.dense


class Dims(NamedTuple):
    """The dimensions every mixer shares (a family's own settings come in its own config)."""

    d_model: int  # residual stream width
    n_layers: int  # depth of the whole stack (for residual-scaled initialisation)
    max_seq_len: int  # longest sequence the model accepts
    norm_eps: float  # RMSNorm epsilon
    init_std: float  # std of the normal weight init
    residual_scale: float = 1.0  # multiplier of every block's update (Granite's residual_multiplier)
    norm_offset: float = 0.0  # RMSNorm gain = offset + weight (Gemma: 1)

    @property
    def out_std(self) -> float:
        """GPT-2 residual scaling: projections that write into the residual stream get std / sqrt(2L)."""
        return self.init_std / (2 * max(1, self.n_layers)) ** 0.5


@dataclass(frozen=True)
class BlockOptions:
    """How a block joins the residual stream. Set for the whole model (``--model.norm-placement``), for a family
    in its table (``[model.attention] norm_placement = "post"``) or for a variant (``[model.moe.variants.post]``)."""

    norm_placement: Literal["pre", "post", "sandwich"] = opt(
        "pre", "where a block's RMSNorm sits: pre (x + f(norm(x)), Llama), post (x + norm(f(x)), OLMo 2) or "
               "sandwich (x + norm2(f(norm1(x))), Gemma 2/3)")
    residual_multiplier: float = opt(1.0, "multiplier of the residual a block adds its update to (MiniMax's "
                                     "alpha factors)")
    update_multiplier: float = opt(1.0, "multiplier of a block's update (MiniMax's beta factors; applied on top of "
                                   "the model's residual-scale)")
    residual_normed: bool = opt(False, "the residual is the block's normed input: a * norm(x) + b * f(norm(x)) "
                                "(MiniMax's post-norm layers; needs norm-placement pre or sandwich)")
    input_multiplier: float = opt(1.0, "multiplier of the mixer's (normed) input: x + f(m * norm(x)) (Falcon-H1's "
                                  "attention and SSM input multipliers)")

    def __post_init__(self) -> None:
        check(self.norm_placement in ("pre", "post", "sandwich"),
              f"norm_placement must be 'pre', 'post' or 'sandwich', got {self.norm_placement!r}")
        check(not self.residual_normed or self.norm_placement != "post",
              "residual_normed needs a norm before the mixer (norm_placement 'pre' or 'sandwich', not 'post')")


BLOCK_KEYS = tuple(f.name for f in dataclasses.fields(BlockOptions))  # keys of a family's table that are the block's


@dataclass(init=False, frozen=True)
class ModelConfig:
    """A hybrid language model: a pattern string, the shared dimensions, and one config per registered
    block family (``cfg.attention``, ``cfg.mamba``, ... by each family's ``config_key``; TOML tables
    ``[model.attention]``...). Families absent from the pattern keep their defaults and are not validated.

    >>> ModelConfig(pattern="(AE)*2M", d_model=64, moe={"n_experts": 4}).moe.n_experts
    4
    """

    pattern: str = opt("AEMR", "block pattern: one letter per block (see `amer patterns`); '(AE)*2M', 'AEMR@12'")
    d_model: int = opt(128, "residual stream width", ge=1)
    vocab_size: int = opt(260, "embedding rows; amer train sets it from --tokenizer (byte: 260, others: their size "
                          "rounded up to a multiple of 64), replacing a preset's or flag's value", ge=2)
    max_seq_len: int = opt(1024, "longest sequence the model accepts (--seq-len must not exceed it)", ge=1)
    tie_embeddings: bool = opt(True, "share the input embedding and the LM head weights")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon", gt=0)
    init_std: float = opt(0.02,
                          "std of the normal weight init (residual output projections scaled by 1/sqrt(2 layers))")
    # what imported checkpoints use (1 / 0 / None leave the model as it is)
    embed_scale: float = opt(1.0, "multiplier of the token embeddings (Gemma: sqrt(d-model))")
    residual_scale: float = opt(1.0, "multiplier of every block's update before it joins the residual stream")
    logit_scale: float = opt(1.0, "multiplier of the logits (Granite: 1 / logits_scaling)")
    logit_softcap: float | None = opt(None, "cap the logits smoothly to (-c, c) as c * tanh(logits / c)", gt=0)
    norm_offset: float = opt(0.0, "every RMSNorm's gain is norm-offset + weight (Gemma's 1 + w)")
    norm_placement: Literal["pre", "post", "sandwich"] = opt(
        "pre", "every block's norm placement unless its family or variant says otherwise: pre (x + f(norm(x))), post "
               "(x + norm(f(x)), OLMo 2) or sandwich (both, Gemma 2/3)")
    family_configs: dict[str, Any] = field(default_factory=dict)
    family_variants: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    family_blocks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __init__(self, pattern: str = "AEMR", *, family_configs: dict[str, Any] | None = None,
                 family_variants: dict[str, dict[str, dict[str, Any]]] | None = None,
                 family_blocks: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> None:
        """Shared settings by name, each family's config by its ``config_key`` (a config or a table, whose
        ``variants`` key holds the family's named variants: ``{"swa": {"window": 4096}}``); ``family_configs``
        and ``family_variants`` (what ``dataclasses.replace`` passes) give several at once, named keys win."""
        # frozen: the fields are set once, here, through object.__setattr__
        object.__setattr__(self, "pattern", pattern)
        for f in shared_fields():
            if f.name != "pattern":
                object.__setattr__(self, f.name, kwargs.pop(f.name, f.default))
        specs = {s.config_key: s for s in families()}
        given = {**(family_configs or {}), **kwargs}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            accepted = [f.name for f in shared_fields()] + list(specs)
            raise ConfigError(f"unknown model setting '{unknown[0]}'{suggest(unknown[0], accepted)} "
                              f"(accepted: {', '.join(accepted)})")
        configs: dict[str, Any] = {}
        variants = {k: dict(v) for k, v in (family_variants or {}).items()}
        blocks = {k: dict(v) for k, v in (family_blocks or {}).items()}
        for key, spec in specs.items():
            clash = set(BLOCK_KEYS) & {f.name for f in dataclasses.fields(spec.config)}
            if clash:  # the key would be ambiguous in the family's table
                raise ConfigError(f"family {spec.name}'s config has a field {sorted(clash)[0]!r}, which is a block "
                                  "option's name")
            value = given.get(key)
            if isinstance(value, dict):
                value = dict(value)
                if "variants" in value:
                    variants[key] = {**variants.get(key, {}), **_variant_tables(value.pop("variants"), key)}
                own = {k: value.pop(k) for k in BLOCK_KEYS if k in value}
                if own:
                    blocks[key] = {**blocks.get(key, {}), **own}
            if value is None:
                value = spec.config()
            elif isinstance(value, dict):
                value = from_dict(spec.config, value, where=f"model.{key}.")
            elif not isinstance(value, spec.config):
                raise ConfigError(f"model.{key} must be a {spec.config.__name__} or a table (in TOML a [model.{key}] "
                                  f"section with keys), got {type(value).__name__} {value!r:.40}")
            configs[key] = value
        unknown_keys = sorted(set(variants) - set(specs))
        if unknown_keys:
            raise ConfigError(f"variants of unknown family '{unknown_keys[0]}' (families: {', '.join(specs)})")
        object.__setattr__(self, "family_configs", configs)
        object.__setattr__(self, "family_variants", {k: v for k, v in variants.items() if v})
        object.__setattr__(self, "family_blocks", {k: v for k, v in blocks.items() if v})
        # each variant is its family's table with its own values on top, built and checked like the family
        built = {key: {name: from_dict(specs[key].config, {**to_dict(configs[key]), **_family_part(over)},
                                       where=f"model.{key}.variants.{name}.")
                       for name, over in table.items()} for key, table in self.family_variants.items()}
        object.__setattr__(self, "_variant_configs", built)
        # block options: the model's, then the family table's, then the variant's
        options = {}
        for key in specs:
            base = {"norm_placement": self.norm_placement, **self.family_blocks.get(key, {})}
            options[(key, None)] = from_dict(BlockOptions, base, where=f"model.{key}.")
            for name, over in self.family_variants.get(key, {}).items():
                options[(key, name)] = from_dict(BlockOptions, {**base, **_block_part(over)},
                                                 where=f"model.{key}.variants.{name}.")
        object.__setattr__(self, "_block_options", options)
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        configs = self.__dict__.get("family_configs")
        if configs is not None and name in configs:
            return configs[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __post_init__(self) -> None:
        check_fields(self, "model.")
        for key, cfg in self.family_configs.items():  # a family's own checks cannot see NaN or infinity
            check_fields(cfg, f"model.{key}.")
        for key, table in self._variant_configs.items():
            for name, cfg in table.items():
                check_fields(cfg, f"model.{key}.variants.{name}.")
        object.__setattr__(self, "parsed", parse_pattern(self.pattern))
        dims = self.dims
        for layer in self.parsed.layers:
            spec = layer.family.spec
            have = sorted(self._variant_configs.get(spec.config_key, {}))
            if layer.variant is not None and layer.variant not in have:
                raise ConfigError(f"model.pattern: {layer.key} (layer {layer.index}) names a variant of {spec.name} "
                                  f"that is not defined; declare it as [model.{spec.config_key}.variants."
                                  f"{layer.variant}]{suggest(layer.variant, have)} "
                                  f"(defined: {', '.join(have) or 'none'})")
        for layer in self.parsed.layers:  # a parallel layer's branches share one pre-norm and one residual
            opts = self.block_options(layer)
            if layer.branch is not None and (opts.norm_placement != "pre" or opts.residual_multiplier != 1
                                             or opts.residual_normed):
                raise ConfigError(f"model.pattern: {layer.key} (layer {layer.index}) is a branch of a parallel layer, "
                                  "whose blocks share one pre-norm and one residual; it needs norm_placement 'pre', "
                                  "residual_multiplier 1 and residual_normed false, got "
                                  f"{opts.norm_placement!r}, {opts.residual_multiplier}, {opts.residual_normed}")
        for family, variant in dict.fromkeys((layer.family, layer.variant) for layer in self.parsed.layers):
            own = self.family_config(family, variant)
            key = family.spec.companion_key(own)
            for cfg in (own, None if key is None else self.family_configs[key]):
                if hasattr(cfg, "validate"):
                    cfg.validate(dims)

    @property
    def n_layers(self) -> int:
        return len(self.parsed.layers)

    @property
    def dims(self) -> Dims:
        return Dims(self.d_model, self.n_layers, self.max_seq_len, self.norm_eps, self.init_std, self.residual_scale,
                    self.norm_offset)

    def family_config(self, family: str | FamilySpec, variant: str | None = None) -> Any:
        """The config of ``family`` (a letter, a :class:`~amer.families.Family` or a spec), or of its named
        ``variant``."""
        spec = family if isinstance(family, FamilySpec) else get_family(str(family))
        if variant is None:
            return self.family_configs[spec.config_key]
        try:
            return self._variant_configs[spec.config_key][variant]
        except KeyError:
            have = sorted(self._variant_configs.get(spec.config_key, {}))
            raise ConfigError(f"no variant {variant!r} of {spec.name} (defined: {', '.join(have) or 'none'})") from None

    def layer_config(self, layer: Any) -> Any:
        """The config a layer of the pattern is built from: its family's, or its variant's."""
        return self.family_config(layer.family, layer.variant)

    def companion_config(self, layer: Any) -> Any:
        """The config of the family a layer's mixer runs inside itself (its family's ``companion``), or None."""
        key = layer.family.spec.companion_key(self.layer_config(layer))
        return None if key is None else self.family_configs[key]

    def block_options(self, layer: Any) -> BlockOptions:
        """How a layer joins the residual stream (the model's options, its family's, its variant's)."""
        return self._block_options[(layer.family.spec.config_key, layer.variant)]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The ``[model]`` table of preset ``name`` (``patterns/<name>.toml``), with top-level overrides."""
        data = dict(load_preset(name)["model"])
        data.update(overrides)
        return from_dict(cls, data, where="model.")

    @classmethod
    def _from_dict(cls, data: dict[str, Any], where: str) -> ModelConfig:
        shared = {f.name: f for f in shared_fields()}
        hints = typing.get_type_hints(cls)
        specs = {s.config_key: s for s in families()}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            k = key.replace("-", "_")
            if k in shared:
                kwargs[k] = coerce(value, hints[k], f"{where}{k}")
            elif k in specs:
                if isinstance(value, dict):  # the family's table; its variants are built by __init__
                    value = dict(value)
                    if "variants" in value:
                        kwargs.setdefault("family_variants", {})[k] = _variant_tables(value.pop("variants"), k)
                    own = {b: value.pop(b) for b in BLOCK_KEYS if b in value}
                    if own:
                        kwargs.setdefault("family_blocks", {})[k] = own
                    value = from_dict(specs[k].config, value, where=f"{where}{k}.")
                kwargs[k] = value
            else:
                accepted = list(shared) + list(specs)
                raise ConfigError(f"unknown key '{where}{key}'{suggest(k, accepted)} (accepted: {', '.join(accepted)})")
        return cls(**kwargs)

    def _to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in shared_fields()}
        out.update({key: to_dict(cfg) for key, cfg in self.family_configs.items()})
        for key, own in self.family_blocks.items():
            out[key].update(own)
        for key, table in self.family_variants.items():
            out[key]["variants"] = {name: dict(over) for name, over in table.items()}
        return out


def shared_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(ModelConfig)
            if f.name not in ("family_configs", "family_variants", "family_blocks")]


def _family_part(table: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if k.replace("-", "_") not in BLOCK_KEYS}


def _block_part(table: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in table.items() if k.replace("-", "_") in BLOCK_KEYS}


def _variant_tables(tables: Any, key: str) -> dict[str, dict[str, Any]]:
    """``[model.<key>.variants]``: named tables of the family's settings, checked for shape here (their values
    are checked when each variant's config is built)."""
    if not isinstance(tables, dict):
        raise ConfigError(f"model.{key}.variants must be a table of named variants, e.g. [model.{key}.variants.swa], "
                          f"got {type(tables).__name__}")
    for name, over in tables.items():
        if not isinstance(name, str) or not VARIANT_NAME.match(name):
            raise ConfigError(f"model.{key}.variants: variant name {name!r} must be lower case letters and '_', "
                              "starting with a letter (at most 32 characters), as the pattern writes it: A.swa")
        if not isinstance(over, dict):
            raise ConfigError(f"model.{key}.variants.{name} must be a table of {key} settings, got "
                              f"{type(over).__name__}")
        if "variants" in over:
            raise ConfigError(f"model.{key}.variants.{name}: a variant has no variants of its own")
    return {name: dict(over) for name, over in tables.items()}


