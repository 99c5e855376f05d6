"""vqcore models, each built from a config dict by `build_model`.

    model = build_model({"type": "pvqvae", "flavour": "debug", "quantizer": {"type": "vq"}})

`type` picks the model (image_tokenizer, hfsvq, pvqvae); `flavour` (optional) picks a named
base config; every other key overrides a field of that model's config dataclass. Unknown
types, flavours and keys fail naming them. `model_config` gives the typed config
(`TokenizerConfig`); its `to_spec()` is the dict again, every field resolved.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vqcore.models.config import TokenizerConfig
from vqcore.models.hfsvq import HFSVQ, HFSVQConfig
from vqcore.models.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from vqcore.models.pvqvae import PVQVAE, PVQVAEConfig
from vqcore.quantizers.registry import split_type

CONFIGS: dict[str, type] = {
    "image_tokenizer": ImageTokenizerConfig,
    "hfsvq": HFSVQConfig,
    "pvqvae": PVQVAEConfig,
}


def model_config(cfg: dict[str, Any] | TokenizerConfig) -> TokenizerConfig:
    """The typed config of `{"type": NAME, "flavour": ..., **fields}` (a typed config is
    returned as it is)."""
    if isinstance(cfg, TokenizerConfig):
        return cfg
    name, spec = split_type(cfg, "model", list(CONFIGS))
    return CONFIGS[name].from_dict(spec)


def build_model(cfg: dict[str, Any] | TokenizerConfig) -> nn.Module:
    return model_config(cfg).build()


__all__ = [
    "CONFIGS",
    "HFSVQ",
    "HFSVQConfig",
    "ImageTokenizer",
    "ImageTokenizerConfig",
    "PVQVAE",
    "PVQVAEConfig",
    "TokenizerConfig",
    "build_model",
    "model_config",
]
