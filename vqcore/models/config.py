"""The base of the model configs (`TokenizerConfig`: how a model describes itself to an
application) and their plumbing: dict -> dataclass with named-key errors, and named
flavours (a flavour is a complete config; keys given beside it override it)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, TypeVar

from vqcore.models.blocks import NORMS

T = TypeVar("T")


def check_keys(owner: str, cls: type, spec: dict[str, Any]) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise ValueError(
            f"{owner}: unknown config key(s) {unknown}; valid keys: {', '.join(sorted(fields))}"
        )


def merge_quantizer(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """A quantizer override with a `type` replaces the flavour's; without one it is merged
    into it (e.g. `{"codebook_size": 64}` keeps the flavour's family)."""
    if override is None:
        return dict(base)
    if not isinstance(override, dict):
        raise ValueError(f"quantizer config must be a dict, got {override!r}")
    return dict(override) if "type" in override else {**base, **override}


def from_flavour(
    owner: str, cls: type[T], flavours: dict[str, T], spec: dict[str, Any] | T | None
) -> T:
    """`spec` = a config instance, or a dict of fields, optionally with `flavour: NAME` as the
    base (default: the class defaults). Unknown keys and flavours fail naming them."""
    if isinstance(spec, cls):
        return spec
    spec = dict(spec or {})
    name = spec.pop("flavour", None)
    if name is None:
        base = cls()
    elif name in flavours:
        base = flavours[name]
    else:
        raise ValueError(f"{owner}: unknown flavour {name!r}; known: {', '.join(flavours)}")
    return override(owner, base, spec)


def override(owner: str, base: T, spec: dict[str, Any]) -> T:
    """`base` with the fields of `spec` replaced. A dict given for a nested config field is
    applied onto that config (or, if it names a `flavour`, built by its `from_dict`)."""
    check_keys(owner, type(base), spec)
    spec = dict(spec)
    for key, value in spec.items():
        current = getattr(base, key)
        if key == "quantizer" and isinstance(current, dict):
            spec[key] = merge_quantizer(current, value)
        elif dataclasses.is_dataclass(current) and isinstance(value, dict):
            nested = type(current)
            spec[key] = (
                nested.from_dict(value)
                if "flavour" in value
                else override(f"{owner}.{key}", current, value)
            )
    return dataclasses.replace(base, **spec)


def check_positive_ints(owner: str, config: Any, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{owner}: {key} must be a positive int, got {value!r}")


def check_quantizer_spec(owner: str, quantizer: dict[str, Any], latent_dim: int) -> None:
    """A model's quantizer spec: a registry dict with a `type`; its `dim` is the model's
    latent_dim (filled in at build). Keys are checked by the registry at build time."""
    if not isinstance(quantizer, dict) or "type" not in quantizer:
        raise ValueError(f"{owner}: quantizer must be a dict with a 'type', got {quantizer!r}")
    if quantizer.get("dim", latent_dim) != latent_dim:
        raise ValueError(
            f"{owner}: quantizer dim {quantizer['dim']} != latent_dim {latent_dim} "
            "(leave 'dim' out; it is filled in)"
        )


class SpecConfig:
    """A dataclass config that writes itself back as the spec it is built from."""

    name: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_spec(self) -> dict[str, Any]:
        """`{"type": name, **fields}`: every field resolved; the builder reads it back."""
        return {"type": self.name, **self.to_dict()}


class TokenizerConfig(SpecConfig):
    """Base of the model configs, and all an application needs to know about a model
    (so `pipelines/` never tests a model's type name):

    - `takes_clips`: the model codes (B, C, T, H, W) clips; else frames (B, C, H, W), and an
      application folds clips into frames;
    - `step_parts`: `()`, the whole model is one part trained by the tokenizer loss
      (`vqcore.losses.TokenizerLoss`: it has `last_layer()` for the adaptive GAN weight);
      else the parts one training step updates in turn on the same batch, each with its own
      optimiser over `model.part_parameters(p)` and loss `model.part_loss(p, x)` (HFSVQ's
      Algorithm 1);
    - `quantizer_specs()`: {label: registry spec with `dim`} of its quantizers (to check
      them before a run, and for tables).

    Subclasses are dataclasses that set `name` and `flavours` and define `build()`."""

    flavours: ClassVar[dict[str, Any]]
    takes_clips: ClassVar[bool] = False
    step_parts: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | TokenizerConfig | None):
        return from_flavour(cls.name, cls, cls.flavours, spec)

    def quantizer_specs(self) -> dict[str, dict[str, Any]]:
        return {"": self.quantizer_config()}

    def check_trunk(self) -> None:
        """Normalise and check the fields of a conv tokenizer's encoder/decoder trunk
        (widths, norm, quantizer spec); a model config calls it from `__post_init__`."""
        self.channel_mult = tuple(self.channel_mult)
        self.quantizer = copy.deepcopy(self.quantizer)
        check_positive_ints(self.name, self, ("in_channels", "channels", "num_res_blocks",
                                              "latent_dim", "norm_groups"))  # fmt: skip
        if self.norm not in NORMS:
            raise ValueError(f"{self.name}: norm must be one of {NORMS}, got {self.norm!r}")
        check_quantizer_spec(self.name, self.quantizer, self.latent_dim)

    def trunk(self, strides: list) -> dict[str, Any]:
        """The keyword arguments of `blocks.Encoder` / `Decoder` for this config's trunk."""
        return dict(channels=self.channels, channel_mult=self.channel_mult,
                    num_res_blocks=self.num_res_blocks, strides=strides, norm=self.norm,
                    norm_groups=self.norm_groups, shortcuts=self.shortcuts,
                    dropout=self.dropout)  # fmt: skip

    def quantizer_config(self) -> dict[str, Any]:
        """The quantizer's registry spec with its `dim` (the model's latent width)."""
        return {**self.quantizer, "dim": self.latent_dim}

    def build(self):
        raise NotImplementedError
