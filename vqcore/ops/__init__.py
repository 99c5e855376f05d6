"""Shared hot kernels used by several quantizers."""

from vqcore.ops.dist import all_reduce_sum_, broadcast_, is_distributed
from vqcore.ops.nearest import (
    nearest_code,
    nearest_feature_per_code,
    squared_distances,
    use_fused,
)

__all__ = [
    "all_reduce_sum_",
    "broadcast_",
    "is_distributed",
    "nearest_code",
    "nearest_feature_per_code",
    "squared_distances",
    "use_fused",
]
