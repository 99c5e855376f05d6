"""vqcore quantizers: one interface (`Quantizer`), one result (`Quantized`), one registry.

    from vqcore.quantizers import build
    q = build({"type": "looc", "dim": 64, "codebook_dim": 4})
"""

from vqcore.quantizers import vq  # noqa: F401  (registers)
from vqcore.quantizers.base import CodeUsage, Quantized, Quantizer, QuantizerConfig
from vqcore.quantizers.registry import build, make_config, names, register

__all__ = [
    "CodeUsage",
    "Quantized",
    "Quantizer",
    "QuantizerConfig",
    "build",
    "make_config",
    "names",
    "register",
]
