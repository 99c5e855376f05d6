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


def make_config(spec: dict[str, Any] | QuantizerConfig) -> QuantizerConfig:
    """A typed config from a dict; unknown types and keys fail naming them."""
    if isinstance(spec, QuantizerConfig):
        return spec
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"quantizer config must be a dict with a 'type' key, got {spec!r}")
    spec = dict(spec)
    name = spec.pop("type")
    if name not in _REGISTRY:
        raise ValueError(f"unknown quantizer type {name!r}; known: {', '.join(names())}")
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
