/*
 * moe_gemm_sm90.cu - the two grouped GEMMs of the fused MoE forward and the final combine for
 * Hopper (sm_90a): warpgroup MMA (wgmma m64nBNk16, both operands read from 128-byte-swizzled
 * shared memory) fed by a cp.async multistage pipeline in which every thread copies.
 *
 * Same entries, parameter block, launch grid and semantics as moe_gemm_sm80.cu (read its header
 * comment): fm_moe_gemm1_sm90 (gather + gate/up + SwiGLU), fm_moe_gemm2_sm90 (down + routing
 * weight + scatter), fm_moe_combine. Differences:
 *  - BLOCK_M = 64 x warpgroups: warpgroup w owns tile rows 64w..64w+63 and all BLOCK_N columns,
 *    so a thread keeps BLOCK_N/2 fp32 accumulators (m64nNk16 layout, see ptx_sm90.cuh).
 *  - BLOCK_K = 64: one 128-byte row per tile row, which is exactly the wgmma 128-byte swizzle
 *    atom (8 rows, 1024 bytes, 16-byte unit u of row r at u ^ (r % 8)), the layout the sm80
 *    loader already writes. Descriptors: K-major, SBO = 1024 (next 8 rows), k16 step = +32 B.
 *  - gemm1's weight tile is [BLOCK_N/2 gate rows; the BLOCK_N/2 up rows of the same columns]:
 *    accumulator column c (gate) and c + BLOCK_N/2 (up) belong to the same thread (a thread's
 *    columns are fixed mod 8), so SwiGLU runs in registers.
 * Why cp.async and not the copy engine: gemm1's A rows are gathered token rows (one 14 KB row
 * per slot at H = 7168), which a tiled tensor map cannot address; one uniform loader keeps both
 * GEMMs the same code. Writes by cp.async are generic-proxy writes and wgmma reads through the
 * async proxy: every thread fences (fence.proxy.async) after its copies land, before the CTA
 * barrier that publishes the stage.
 *
 * Pipeline per k-tile: wait for this thread's copies of tile kt, fence, barrier; issue the 4
 * wgmma of tile kt and commit; wait until at most one wgmma group is in flight (tile kt-1's is
 * done) and barrier again (so every warpgroup is done with kt-1's slot); then refill that slot
 * with tile kt + STAGES - 1. The tensor cores work on tile kt while the threads refill.
 *
 * Block = 128 * BLOCK_M/64 threads; dynamic shared memory = STAGES * (BM + BN) * 128 + 1024 bytes
 * (the slack aligns the tiles to 1024 bytes for the swizzle atoms).
 *
 * FM_MOE_WS = 1 replaces the two GEMM entries by the warp-specialised persistent pipeline of
 * common/moe_gemm_sm90_ws.cuh (producer warpgroup, TMA weights, two consumer warpgroups; its
 * entries take two tensor maps first), FM_MOE_WS = 2 by its operand-swapped form
 * (common/moe_gemm_sm90_swap.cuh: tokens on the wgmma N side, no padded rows of 64); the
 * combine entry is the same in all three.
 */
#include "common/moe_params.h"
#include "common/numeric.cuh"
#include "common/ptx_sm80.cuh"
#include "common/ptx_sm90.cuh"
#include "common/moe_device.cuh"

#ifndef FM_BLOCK_M
#define FM_BLOCK_M 128
#endif
#ifndef FM_BLOCK_N
#define FM_BLOCK_N 256
#endif
#ifndef FM_STAGES
#define FM_STAGES 4
#endif
/* 0: the all-thread cp.async pipeline below; 1: the warp-specialised persistent pipeline (TMA
 * weights, producer warpgroup, two consumer warpgroups) of common/moe_gemm_sm90_ws.cuh, whose
 * GEMM entries take two tensor maps before the parameter block; 2: the same with the operands
 * swapped (weights on the wgmma M side, tokens on N), common/moe_gemm_sm90_swap.cuh. */
#ifndef FM_MOE_WS
#define FM_MOE_WS 0
#endif
/* pipes ws and swap: gemm1's last tile per CTA also leaves through the staged epilogue */
#ifndef FM_MOE_STAGED_GEMM1
#define FM_MOE_STAGED_GEMM1 1
#endif

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ != 900 || !defined(__CUDA_ARCH_FEAT_SM90_ALL))
#error "moe_gemm_sm90.cu uses wgmma: compile it for sm_90a"
#endif
#if FM_MOE_WS != 2 && FM_BLOCK_M != 64 && FM_BLOCK_M != 128 && !(FM_MOE_WS && FM_BLOCK_M == 192)
#error "FM_BLOCK_M must be 64 or 128 (one or two warpgroups of 64 rows), or 192 with FM_MOE_WS"
#endif
#if FM_MOE_WS != 2 && FM_BLOCK_N != 64 && FM_BLOCK_N != 128 && FM_BLOCK_N != 256
#error "FM_BLOCK_N must be 64, 128 or 256 (the wgmma N; gemm1 needs BLOCK_N/2 % 8 == 0)"
#endif
#if FM_STAGES < 2 || FM_STAGES > 6
#error "FM_STAGES must be in 2..6"
#endif
#if FM_MOE_WS < 0 || FM_MOE_WS > 2
#error "FM_MOE_WS must be 0, 1 or 2"
#endif
#if FM_BLOCK_M > FM_MOE_MAX_BLOCK_M || FM_BLOCK_M < FM_MOE_MIN_BLOCK_M
#error "FM_BLOCK_M outside the range the workspace is sized for"
#endif

/* The epilogue of both pipelines: one warpgroup's m64nBN accumulator, acc[4i + r] = (row
 * row_base + 8*(r/2), column n_out0 + 8i + 2*tq + r%2) with row_base this thread's first padded
 * row, to the output. gemm1: SwiGLU (gate column c and up column c + BN/2 sit in the same thread)
 * into the 16-bit intermediate, padding rows included (nothing reads them). gemm2: scaled by the
 * slot's routing weight, into the slot's 16-bit row or added in fp32 to its token's row; padding
 * rows skipped. Columns past n are not written (N tails). */
template <bool GATED, int BN>
static __device__ __forceinline__ void fm_moe_wgmma_epilogue(const fm_moe_gemm_params &p,
                                                             const float (&acc)[BN / 2],
                                                             int row_base, int n_out0, int tq) {
    if (GATED) {
        fm_elem_t *C = (fm_elem_t *)p.c;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long row = row_base + 8 * h;
#pragma unroll
            for (int i = 0; i < BN / 16; ++i) {
                const int col = n_out0 + 8 * i + 2 * tq;
                if (col >= p.n) continue;
                const int gi = 4 * i + 2 * h, ui = 4 * (i + BN / 16) + 2 * h;
                const float v0 = fm_moe::silu(acc[gi]) * acc[ui];
                const float v1 = fm_moe::silu(acc[gi + 1]) * acc[ui + 1];
                *(unsigned *)(C + row * p.n + col) = fm_pack_elem2(v0, v1);
            }
        }
    } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int slot = p.sorted_slot[row_base + 8 * h];
            if (slot < 0) continue; /* padding row */
            const float w = p.slot_weight[slot];
            if (p.atomic) {
                float *C = (float *)p.c + (long long)(slot / p.topk) * p.n;
#pragma unroll
                for (int i = 0; i < BN / 8; ++i) {
                    const int col = n_out0 + 8 * i + 2 * tq;
                    if (col < p.n)
                        fm_moe::red_add_f32x2(C + col, w * acc[4 * i + 2 * h],
                                              w * acc[4 * i + 2 * h + 1]);
                }
            } else {
                fm_elem_t *C = (fm_elem_t *)p.c + (long long)slot * p.n;
#pragma unroll
                for (int i = 0; i < BN / 8; ++i) {
                    const int col = n_out0 + 8 * i + 2 * tq;
                    if (col < p.n)
                        *(unsigned *)(C + col) =
                            fm_pack_elem2(w * acc[4 * i + 2 * h], w * acc[4 * i + 2 * h + 1]);
                }
            }
        }
    }
}

#if FM_MOE_WS
#if FM_MOE_WS == 2
#include "common/moe_gemm_sm90_swap.cuh"
#else
#include "common/moe_gemm_sm90_ws.cuh"
#endif
/* The warp-specialised entries: the token operand's tensor map (gemm1: unused), the weights'. */
extern "C" __global__ void __launch_bounds__(128 * (1 + FM_WSP_CONSUMERS), 1)
fm_moe_gemm1_sm90(const __grid_constant__ fm_tma_desc tma_a,
                  const __grid_constant__ fm_tma_desc tma_b, const fm_moe_gemm_params p) {
    extern __shared__ __align__(1024) unsigned char fm_smem[];
    fm_moe_wsp::gemm<true>(&tma_a, &tma_b, p, fm_smem);
}

extern "C" __global__ void __launch_bounds__(128 * (1 + FM_WSP_CONSUMERS), 1)
fm_moe_gemm2_sm90(const __grid_constant__ fm_tma_desc tma_a,
                  const __grid_constant__ fm_tma_desc tma_b, const fm_moe_gemm_params p) {
    extern __shared__ __align__(1024) unsigned char fm_smem[];
    fm_moe_wsp::gemm<false>(&tma_a, &tma_b, p, fm_smem);
}
#else
namespace fm_moe_sm90 {

constexpr int kBM = FM_BLOCK_M, kBN = FM_BLOCK_N, kBK = 64;
constexpr int kStages = FM_STAGES;
constexpr int kWG = kBM / 64;
constexpr int kThreads = kWG * 128;
constexpr int kCPR = kBK / 8;      /* 8 chunks of 16 bytes per 128-byte row */
constexpr int kRowBytes = kBK * 2; /* 128 */
constexpr int kABytes = kBM * kRowBytes;
constexpr int kStageBytes = (kBM + kBN) * kRowBytes;
constexpr int kRowStep = kThreads / kCPR;
constexpr int kAIters = kBM / kRowStep;
constexpr int kBIters = kBN / kRowStep;
constexpr int kAcc = kBN / 2; /* fp32 accumulators per thread: 64 x BN over 128 threads */
static_assert(kBM % kRowStep == 0 && kBN % kRowStep == 0, "whole load sweeps");
static_assert(kStageBytes % 1024 == 0 && kABytes % 1024 == 0, "1024-byte swizzle atoms");

template <bool GATED>
static __device__ __forceinline__ void gemm(const fm_moe_gemm_params &p, unsigned char *smem_raw) {
    const int tid = threadIdx.x;
    const int wg = tid / 128;
    const int wtid = tid % 128;
    const int warp = wtid / 32, lane = wtid % 32;
    const int g = lane / 4, tq = lane % 4;

    int m_tile, n_tile;
    fm_moe::raster(p, blockIdx.x, m_tile, n_tile);
    if (m_tile >= *p.num_tiles) return;
    const int expert = p.tile_expert[m_tile];
    const int m0 = m_tile * kBM;

    const int k_tiles = p.k / kBK;
    const int kt_begin = blockIdx.y * p.k_tiles_per_split;
    const int kt_end = min(k_tiles, kt_begin + p.k_tiles_per_split);
    if (kt_begin >= kt_end) return;

    const fm_elem_t *B = (const fm_elem_t *)p.b + (long long)expert * p.b_expert_stride;

    /* ---- copy sources (as in the sm80 kernel): chunk column tid % 8 of rows tid/8 + j*step ---- */
    const int ccol = tid % kCPR;
    const int rbase = tid / kCPR;
    const fm_elem_t *a_src[kAIters];
    const unsigned a_ok = fm_moe::a_sources<GATED, kBM, kCPR, kRowStep>(p, m0, tid, a_src);
    /* Weight rows: gemm1 rows [0, BN/2) are gate columns, [BN/2, BN) the up rows of the same
     * columns; gemm2 rows are output columns. 32-bit offsets (host: 2*I*H < 2^31). */
    const int n_out0 = GATED ? n_tile * (kBN / 2) : n_tile * kBN;
    int b_off[kBIters];
    unsigned b_ok = 0;
#pragma unroll
    for (int j = 0; j < kBIters; ++j) {
        const int r = rbase + j * kRowStep;
        int col, grow;
        if (GATED) {
            const bool up = r >= kBN / 2;
            col = n_out0 + (up ? r - kBN / 2 : r);
            grow = col + (up ? p.n : 0);
        } else {
            col = n_out0 + r;
            grow = col;
        }
        const bool ok = col < p.n;
        b_off[j] = (ok ? grow : 0) * p.k + ccol * 8;
        if (ok) b_ok |= 1u << j;
    }

    const unsigned s_base = (fm_smem_u32(smem_raw) + 1023u) & ~1023u;
    auto load_stage = [&](int stage, int kt) {
        const unsigned sA = s_base + stage * kStageBytes;
        const unsigned sB = sA + kABytes;
        const int koff = kt * kBK;
#pragma unroll
        for (int j = 0; j < kAIters; ++j) {
            const int r = rbase + j * kRowStep;
            const bool ok = (a_ok >> j) & 1u;
            fm_cp_async_16(sA + fm_moe::swz<kBK>(r, ccol), ok ? a_src[j] + koff : a_src[j],
                           ok ? 16 : 0);
        }
#pragma unroll
        for (int j = 0; j < kBIters; ++j) {
            const int r = rbase + j * kRowStep;
            const bool ok = (b_ok >> j) & 1u;
            fm_cp_async_16(sB + fm_moe::swz<kBK>(r, ccol), B + b_off[j] + (ok ? koff : 0),
                           ok ? 16 : 0);
        }
    };

    float acc[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;

    int kt_load = kt_begin;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (kt_load < kt_end) load_stage(s, kt_load);
        fm_cp_async_commit(); /* empty groups keep the wait count uniform */
        ++kt_load;
    }

    /* Descriptors of stage 0 (A: this warpgroup's 64 rows = 8 atoms further per warpgroup). */
    const unsigned long long a_desc0 =
        fm_wgmma_desc_sw128(s_base + (unsigned)(wg * 64 * kRowBytes), 16, 1024);
    const unsigned long long b_desc0 = fm_wgmma_desc_sw128(s_base + kABytes, 16, 1024);
    constexpr unsigned kStageDesc = kStageBytes >> 4; /* descriptor units are 16 bytes */

    int read_stage = 0, write_stage = kStages - 1;
    for (int kt = kt_begin; kt < kt_end; ++kt) {
        /* Tile kt has landed for this thread; the proxy fence makes this thread's cp.async
         * writes visible to the tensor cores' (async-proxy) reads, and the barrier gathers every
         * thread's part of the tile. */
        fm_cp_async_wait<kStages - 2>();
        fm_fence_proxy_async();
        __syncthreads();

        const unsigned long long ad = a_desc0 + (unsigned long long)(read_stage * kStageDesc);
        const unsigned long long bd = b_desc0 + (unsigned long long)(read_stage * kStageDesc);
        fm_wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kBK / 16; ++ks)
            fm_wgmma<kBN>::template ss<FM_DTYPE_BF16, 0>(acc, ad + (unsigned)(2 * ks),
                                                         bd + (unsigned)(2 * ks), 1);
        fm_wgmma_commit();
        /* Tile kt-1's group has finished in this warpgroup; after the barrier, in all of them:
         * its slot (write_stage) can be refilled while tile kt's group runs. */
        fm_wgmma_wait<1>();
        __syncthreads();
        if (kt_load < kt_end) load_stage(write_stage, kt_load);
        fm_cp_async_commit();
        ++kt_load;

        read_stage = read_stage + 1 == kStages ? 0 : read_stage + 1;
        write_stage = write_stage + 1 == kStages ? 0 : write_stage + 1;
    }
    fm_wgmma_wait<0>();
    fm_fence_regs(acc);
    fm_cp_async_wait<0>(); /* no copy may still target shared memory when the CTA retires */

    const int row_base = m0 + wg * 64 + warp * 16 + g;
    fm_moe_wgmma_epilogue<GATED, kBN>(p, acc, row_base, n_out0, tq);
}

} // namespace fm_moe_sm90

extern "C" __global__ void __launch_bounds__(FM_BLOCK_M / 64 * 128, 1)
fm_moe_gemm1_sm90(const fm_moe_gemm_params p) {
    extern __shared__ __align__(1024) unsigned char fm_smem[];
    fm_moe_sm90::gemm<true>(p, fm_smem);
}

extern "C" __global__ void __launch_bounds__(FM_BLOCK_M / 64 * 128, 1)
fm_moe_gemm2_sm90(const fm_moe_gemm_params p) {
    extern __shared__ __align__(1024) unsigned char fm_smem[];
    fm_moe_sm90::gemm<false>(p, fm_smem);
}

#endif

/* Combine (common/moe_device.cuh). Launch: 256 threads, grid = ceil(T * H / 8 / 256). */
extern "C" __global__ void __launch_bounds__(256)
fm_moe_combine(const fm_moe_combine_params p) {
    fm_moe::combine(p);
}
