/*
 * tma.c - tensor maps for the Hopper families.
 *
 * Every family that reads through the copy engine here uses the same kind of map: 4-D (5-D for
 * the operand-swapped MoE GEMM's interleaved gate/up view),
 * bf16/fp16, boxes 64 elements (128 bytes) wide, so that the 128-byte swizzle the wgmma
 * descriptors assume is what lands in shared memory, 256-byte L2 promotion, and zeros for rows
 * past a dimension's end (sequence and tile tails need no masking on the load side).
 */
#include "internal.h"

#include <stdint.h>

fm_status fm_tma_encode(fm_context *ctx, CUtensorMap *map, const char *what, fm_dtype dtype,
                        const void *base, int rank, const cuuint64_t *dims,
                        const cuuint64_t *strides, const cuuint32_t *box) {
    for (int i = 0; i + 1 < rank; i++)
        if (strides[i] % 16 != 0 || strides[i] >= (1ull << 40))
            return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                                "%s: stride %llu bytes is not a multiple of 16 below 2^40 (the "
                                "copy engine's rule)",
                                what, (unsigned long long)strides[i]);
    const cuuint32_t estride[5] = {1, 1, 1, 1, 1};
    CUtensorMapDataType dt = dtype == FM_DTYPE_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                    : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    CUresult r = ctx->drv->cuTensorMapEncodeTiled(
        map, dt, (cuuint32_t)rank, (void *)(uintptr_t)base, dims, strides, box, estride,
        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS ? FM_OK : fm_cuda_error(ctx, ctx->drv, r, what);
}

fm_status fm_tma_encode_4d(fm_context *ctx, CUtensorMap *map, const char *what, fm_dtype dtype,
                           const void *base, const cuuint64_t dims[4], const cuuint64_t strides[3],
                           const cuuint32_t box[4]) {
    return fm_tma_encode(ctx, map, what, dtype, base, 4, dims, strides, box);
}
