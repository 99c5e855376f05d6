"""The fused search's operands: rows rounded once to the dtype `tl.dot` will see, with each
rounded row's squared norm, in one pass (`operands`, the custom op
`vqcore::nearest_code_operands`), and `round_to_tf32`, its torch reference.

Rounding is to nearest, ties to even, on the fp32 bits; the cast after it is then exact.
That is done by hand because Triton's interpreter truncates fp32 -> bf16 casts where the GPU
rounds to nearest (and flushes bf16 subnormals; `fp_downcast_rounding="rtne"` does not change
it), and the tests run the kernels in the interpreter. In eager torch the tf32 rounding alone
is ~10 elementwise kernels over N x D (`round_to_tf32`); here it is one read and one write.
"""

import torch

from vqcore.ops.triton_runtime import block_d, jit, tl, triton

if triton is not None:

    def _operands_kernel(
        src_ptr,  # (R, D) any float dtype, contiguous
        dst_ptr,  # (R, D) out: operand dtype
        sq_ptr,  # (R,) fp32 out: squared norm of each operand row
        R,
        D,
        DROP: tl.constexpr,  # mantissa bits to round off (tf32, fp16: 13, bf16: 16, fp32: 0)
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ok = rows < R
        dd = tl.arange(0, BLOCK_D)
        sq = tl.zeros((BLOCK_R,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            m = row_ok[:, None] & ((d0 + dd) < D)[None, :]
            at = rows[:, None] * D + (d0 + dd)[None, :]
            v = tl.load(src_ptr + at, mask=m, other=0.0).to(tl.float32)
            if DROP > 0:  # round to nearest, ties to even, on the bits (as `round_to_tf32`)
                bits = v.to(tl.int32, bitcast=True)
                up = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & -(1 << DROP)
                finite = (bits & 0x7F800000) != 0x7F800000
                v = tl.where(finite, up.to(tl.float32, bitcast=True), v)
            v = v.to(dst_ptr.dtype.element_ty)  # exact now (the interpreter would truncate)
            tl.store(dst_ptr + at, v, mask=m)
            w = v.to(tl.float32)
            sq += tl.sum(w * w, axis=1)
        tl.store(sq_ptr + rows, sq, mask=row_ok)


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest tf32 value (10 mantissa bits, ties to even), still stored as fp32.

    The torch reference of the operand kernel's rounding: operands so rounded enter a tf32
    `tl.dot` unchanged whatever rounding the tensor cores apply, and the interpreter (plain
    fp32 matmul) computes the same products.
    """
    bits = t.float().contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = (bits + 0xFFF + lsb) & ~0x1FFF
    finite = torch.isfinite(t)
    return torch.where(finite, rounded.view(torch.float32), t.float())


# fp32 mantissa bits (23) minus the operand's: tf32 and fp16 keep 10, bf16 7
_DROP_BITS = {torch.float32: 13, torch.float16: 13, torch.bfloat16: 16}


@torch.library.custom_op("vqcore::nearest_code_operands", mutates_args=())
def operands(t: torch.Tensor, dtype: torch.dtype, tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (..., D) as the kernel's operand: rounded to nearest `dtype` (fp32: to tf32 with
    `tf32`, as `round_to_tf32`), and the squared norm of each operand row (...,) in fp32, in
    one pass. fp16 values outside its normal range are cast by the hardware."""
    d = t.shape[-1]
    rows = t.numel() // max(1, d)
    op = torch.empty(t.shape, dtype=dtype, device=t.device)
    sq = torch.empty(t.shape[:-1], dtype=torch.float32, device=t.device)
    if rows == 0:
        return op, sq.zero_()
    kernel, _ = jit(_operands_kernel)
    drop = _DROP_BITS[dtype] if tf32 or dtype != torch.float32 else 0
    slice_d = block_d(d)
    block_r = max(1, 4096 // slice_d)
    grid = (triton.cdiv(rows, block_r),)
    kernel[grid](t, op, sq, rows, d, DROP=drop, BLOCK_R=block_r, BLOCK_D=slice_d)
    return op, sq


@operands.register_fake
def _operands_fake(t, dtype, tf32):
    return t.new_empty(t.shape, dtype=dtype), t.new_empty(t.shape[:-1], dtype=torch.float32)
