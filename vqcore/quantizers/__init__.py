"""vqcore quantizers: one interface (`Quantizer`), one result (`Quantized`), one registry.

    from vqcore.quantizers import build
    q = build({"type": "looc", "dim": 64, "codebook_dim": 4})
"""

from vqcore.quantizers import (
    fsq,  # noqa: F401  (registers)
    gvq,  # noqa: F401  (registers)
    hrvq,  # noqa: F401  (registers)
    lfq,  # noqa: F401  (registers)
    looc,  # noqa: F401  (registers)
    pq,  # noqa: F401  (registers)
    pyramid,  # noqa: F401  (registers)
    residual,  # noqa: F401  (registers)
    vq,  # noqa: F401  (registers)
)
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
