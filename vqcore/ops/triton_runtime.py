"""Triton, optional: whether it is here, whether kernels run compiled or interpreted, and
jitting a kernel once per mode. `vqcore` imports and runs with torch alone.

Under `TRITON_INTERPRET=1` kernels run on CPU tensors with numpy (the tests, no GPU). The mode
is read when a kernel is first launched, not at import, so one process can hold both."""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # vqcore needs torch alone
    triton = None
    tl = None

MAX_BLOCK_D = 64  # a kernel reduces D in slices of at most this many channels


def available() -> bool:
    """Triton is importable."""
    return triton is not None


def interpreting() -> bool:
    """Kernels built now run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def can_run(x: torch.Tensor) -> bool:
    """A kernel can take `x`: Triton present and x on CUDA (or the interpreter on)."""
    return available() and (x.is_cuda or interpreting())


def block_d(d: int) -> int:
    """The D slice of a kernel over rows of `d` channels: a power of two in [16, MAX_BLOCK_D]
    (`tl.dot` needs at least 16)."""
    return max(16, min(MAX_BLOCK_D, triton.next_power_of_2(d)))


_KERNELS: dict[tuple[object, bool], object] = {}


def jit(fn):
    """(kernel, interpreted): `fn` jitted on first use for the current mode."""
    mode = interpreting()
    if (fn, mode) not in _KERNELS:
        _KERNELS[fn, mode] = triton.jit(fn)
    return _KERNELS[fn, mode], mode
