"""vqcore models, each built from a config dict by `build_model`.

    model = build_model({"type": "pvqvae", "flavour": "debug", "quantizer": {"type": "vq"}})

`type` picks the model (image_tokenizer, hfsvq, pvqvae); `flavour` (optional) picks a named
base config; every other key overrides a field of that model's config dataclass. Unknown
types, flavours and keys fail naming them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vqcore.models.hfsvq import HFSVQ, HFSVQConfig
from vqcore.models.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from vqcore.models.pvqvae import PVQVAE, PVQVAEConfig
from vqcore.quantizers.registry import split_type

CONFIGS: dict[str, type] = {
    "image_tokenizer": ImageTokenizerConfig,
    "hfsvq": HFSVQConfig,
    "pvqvae": PVQVAEConfig,
}


def model_config(cfg: dict[str, Any]):
    """The typed config of `{"type": NAME, "flavour": ..., **fields}`."""
    name, spec = split_type(cfg, "model", list(CONFIGS))
    return CONFIGS[name].from_dict(spec)


def build_model(cfg: dict[str, Any]) -> nn.Module:
    return model_config(cfg).build()


__all__ = [
    "CONFIGS",
    "HFSVQ",
    "HFSVQConfig",
    "ImageTokenizer",
    "ImageTokenizerConfig",
    "PVQVAE",
    "PVQVAEConfig",
    "build_model",
    "model_config",
]
