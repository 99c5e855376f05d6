"""Build any quantizer from a config dict `{"type": NAME, **fields}`."""

from __future__ import annotations

import dataclasses
from typing import Any

from vqcore.quantizers.base import Quantizer, QuantizerConfig

_REGISTRY: dict[str, tuple[type[QuantizerConfig], type[Quantizer]]] = {}


def register(config_cls: type[QuantizerConfig]):
    """Class decorator: `@register(VQConfig) class VectorQuantizer(Quantizer)`."""

    def wrap(cls: type[Quantizer]) -> type[Quantizer]:
        _REGISTRY[config_cls.type] = (config_cls, cls)
        return cls

    return wrap


def names() -> list[str]:
    return sorted(_REGISTRY)


def split_type(spec: Any, what: str, known: list[str]) -> tuple[str, dict[str, Any]]:
    """`{"type": NAME, **rest}` -> (NAME, rest), failing with a message that names `what`
    (quantizer, model, discriminator) and the known types. Shared by every vqcore registry."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"{what} config must be a dict with a 'type' key, got {spec!r}")
    rest = dict(spec)
    name = rest.pop("type")
    if name not in known:
        raise ValueError(f"unknown {what} type {name!r}; known: {', '.join(known)}")
    return name, rest


def make_config(spec: dict[str, Any] | QuantizerConfig) -> QuantizerConfig:
    """A typed config from a dict; unknown types and keys fail naming them."""
    if isinstance(spec, QuantizerConfig):
        return spec
    name, spec = split_type(spec, "quantizer", names())
    config_cls = _REGISTRY[name][0]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise ValueError(
            f"{name}: unknown config key(s) {unknown}; valid keys: {', '.join(sorted(fields))}"
        )
    return config_cls(**spec)


def build(spec: dict[str, Any] | QuantizerConfig) -> Quantizer:
    config = make_config(spec)
    return _REGISTRY[config.type][1](config)
