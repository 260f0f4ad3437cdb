/*
 * moe_gemm_sm80.cu - the two grouped GEMMs of the fused MoE forward and the final combine, for
 * sm_80 and later (mma.sync m16n8k16, ldmatrix, cp.async multistage pipeline).
 *
 * One module holds three entries that share the tile configuration:
 *   fm_moe_gemm1_sm80   intermediate[row, j] = silu(x Wg[e][j]) * (x Wu[e][j]), x = hidden row of
 *                       the slot in sorted_slot[row] (zeros for padding rows), 16-bit out.
 *   fm_moe_gemm2_sm80   y_slot = w_slot * intermediate[row] W2[e]^T, scattered by slot: 16-bit
 *                       rows of the slot buffer [T*K, H], or fp32 red.add into acc [T, H].
 *   fm_moe_combine      out[t] = sum_k slot_buf[t*K + k] (or acc[t]), rounded to 16 bits.
 *
 * Tile: BLOCK_M padded rows (all of one expert, by construction of the alignment) x BLOCK_N
 * weight rows x BLOCK_K. In gemm1 the BLOCK_N weight rows are BLOCK_N/2 gate rows and the
 * matching BLOCK_N/2 up rows, interleaved per warp (see b_row) so that every thread holds the
 * gate and up accumulators of the same outputs and applies SwiGLU in registers; in gemm2 they
 * are BLOCK_N consecutive rows of W2[e] (= output columns). Both GEMMs multiply K-contiguous
 * A rows by K-contiguous weight rows (A B^T), so both operands load with plain ldmatrix.
 *
 * Grid: x = m_tiles * n_tiles (m_tiles is the host's upper bound of real tiles; CTAs past the
 * real count read from the device exit at once), y = split_k (gemm2 only). Tiles are rastered
 * in groups of GROUP_M M-tiles so that CTAs running together share both operand tiles in L2.
 * Block = FM_WARPS * 32 threads; dynamic shared memory = FM_STAGES * (BM + BN) * BK * 2 bytes.
 */
#include "common/moe_params.h"
#include "common/numeric.cuh"
#include "common/ptx_sm80.cuh"
#include "common/moe_device.cuh"

#ifndef FM_BLOCK_M
#define FM_BLOCK_M 64
#endif
#ifndef FM_BLOCK_N
#define FM_BLOCK_N 128
#endif
#ifndef FM_BLOCK_K
#define FM_BLOCK_K 64
#endif
#ifndef FM_STAGES
#define FM_STAGES 3
#endif
#ifndef FM_WARPS
#define FM_WARPS 4
#endif

#if FM_BLOCK_M != 16 && FM_BLOCK_M != 32 && FM_BLOCK_M != 64 && FM_BLOCK_M != 128
#error "FM_BLOCK_M must be 16, 32, 64 or 128"
#endif
#if FM_BLOCK_N != 64 && FM_BLOCK_N != 128 && FM_BLOCK_N != 256
#error "FM_BLOCK_N must be 64, 128 or 256"
#endif
#if FM_BLOCK_K != 32 && FM_BLOCK_K != 64
#error "FM_BLOCK_K must be 32 or 64 (H and I are multiples of 64)"
#endif
#if FM_STAGES < 2 || FM_STAGES > 6
#error "FM_STAGES must be in 2..6"
#endif
#if FM_WARPS != 4 && FM_WARPS != 8
#error "FM_WARPS must be 4 or 8"
#endif
#if FM_BLOCK_M > FM_MOE_MAX_BLOCK_M || FM_BLOCK_M < FM_MOE_MIN_BLOCK_M
#error "FM_BLOCK_M outside the range the workspace is sized for"
#endif

/* Warp grid: two warps along M once a tile has 32 rows (each warp then owns >= 16 rows), the
 * rest along N. */
#define FM_WARPS_M (FM_BLOCK_M >= 32 ? 2 : 1)
#define FM_WARPS_N (FM_WARPS / FM_WARPS_M)
#if (FM_BLOCK_N / FM_WARPS_N) % 16 != 0
#error "each warp needs a multiple of 16 weight rows (ldmatrix.x4 loads two n8 tiles)"
#endif
#if FM_BLOCK_M * FM_BLOCK_N / (32 * FM_WARPS) > 128
#error "more than 128 fp32 accumulators per thread: the tile would spill"
#endif

namespace fm_moe_sm80 {

constexpr int kBM = FM_BLOCK_M, kBN = FM_BLOCK_N, kBK = FM_BLOCK_K;
constexpr int kStages = FM_STAGES;
constexpr int kWarps = FM_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kWM = FM_WARPS_M, kWN = FM_WARPS_N;
constexpr int kTM = kBM / kWM;   /* rows per warp */
constexpr int kTN = kBN / kWN;   /* weight rows (mma columns) per warp */
constexpr int kMI = kTM / 16;    /* m16 tiles per warp */
constexpr int kNI = kTN / 8;     /* n8 tiles per warp */
constexpr int kCPR = kBK / 8;    /* 16-byte chunks per tile row */
constexpr int kRowBytes = kBK * 2;
constexpr int kABytes = kBM * kRowBytes;
constexpr int kStageBytes = (kBM + kBN) * kRowBytes;
constexpr int kRowStep = kThreads / kCPR;                 /* rows one load sweep covers */
constexpr int kAIters = (kBM + kRowStep - 1) / kRowStep;  /* may overhang when BM is small */
constexpr int kBIters = kBN / kRowStep;
static_assert(kBN % kRowStep == 0, "B tile rows are a whole number of sweeps");
static_assert(kNI % 2 == 0, "pairs of n8 tiles");

/* Tile rows are swizzled in 16-byte chunks (fm_moe::swz): conflict-free ldmatrix without
 * padding. The swizzle term depends on the row's low 3 bits only. */
constexpr int kSwShift = kCPR == 8 ? 0 : 1;
static __device__ __forceinline__ unsigned swz(int row, int chunk) {
    return fm_moe::swz<kBK>(row, chunk);
}

/* gemm1: smem weight row r -> (gate or up, output column). Warp w's kTN rows are its kTN/2 gate
 * rows then the kTN/2 up rows of the same columns, so acc[.][ni] (gate) and acc[.][ni + kNI/2]
 * (up) of one thread hold the same output element. */
static __device__ __forceinline__ void gated_row(int r, int &col, int &is_up) {
    const int w = r / kTN, q = r % kTN;
    is_up = q >= kTN / 2;
    col = w * (kTN / 2) + (is_up ? q - kTN / 2 : q);
}

template <bool GATED>
static __device__ __forceinline__ void gemm(const fm_moe_gemm_params &p, unsigned char *smem) {
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int wm = warp / kWN, wn = warp % kWN;
    const int g = lane >> 2, tq = lane & 3;

    /* ---- tile raster ---- */
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

    /* ---- per-thread copy sources, fixed for the whole K loop: thread tid copies chunk column
     * tid % kCPR of rows tid / kCPR + j * kRowStep ---- */
    const int ccol = tid % kCPR;
    const int rbase = tid / kCPR;
    const fm_elem_t *a_src[kAIters];
    const unsigned a_ok = fm_moe::a_sources<GATED, kBM, kCPR, kRowStep>(p, m0, tid, a_src);
    /* Weight rows: 32-bit element offsets inside the expert (the host checks 2*I*H < 2^31). */
    int b_off[kBIters];
    unsigned b_ok = 0;
    const int n_out0 = GATED ? n_tile * (kBN / 2) : n_tile * kBN;
#pragma unroll
    for (int j = 0; j < kBIters; ++j) {
        const int r = rbase + j * kRowStep;
        int col, grow;
        if (GATED) {
            int is_up;
            gated_row(r, col, is_up);
            col += n_out0;
            grow = col + (is_up ? p.n : 0);
        } else {
            col = n_out0 + r;
            grow = col;
        }
        const bool ok = col < p.n;
        b_off[j] = (ok ? grow : 0) * p.k + ccol * 8;
        if (ok) b_ok |= 1u << j;
    }

    const unsigned s_base = fm_smem_u32(smem);
    auto load_stage = [&](int stage, int kt) {
        const unsigned sA = s_base + stage * kStageBytes;
        const unsigned sB = sA + kABytes;
        const int koff = kt * kBK;
#pragma unroll
        for (int j = 0; j < kAIters; ++j) {
            const int r = rbase + j * kRowStep;
            if (kAIters * kRowStep > kBM && r >= kBM) break;
            const bool ok = (a_ok >> j) & 1u;
            fm_cp_async_16(sA + swz(r, ccol), ok ? a_src[j] + koff : a_src[j], ok ? 16 : 0);
        }
#pragma unroll
        for (int j = 0; j < kBIters; ++j) {
            const int r = rbase + j * kRowStep;
            const bool ok = (b_ok >> j) & 1u;
            fm_cp_async_16(sB + swz(r, ccol), B + b_off[j] + (ok ? koff : 0), ok ? 16 : 0);
        }
    };

    float acc[kMI][kNI][4];
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

    /* ---- prologue: kStages - 1 tiles in flight ---- */
    int kt_load = kt_begin;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (kt_load < kt_end) load_stage(s, kt_load);
        fm_cp_async_commit(); /* empty groups keep the wait count uniform */
        ++kt_load;
    }

    /* ldmatrix lane addresses. A (non-trans): lanes 0-15 give rows 0-15 of the m16 tile at the
     * low k-chunk, lanes 16-31 the same rows at the high chunk -> a0..a3 in mma order.
     * B (non-trans, rows = n): matrices (n 0-7, k lo), (n 0-7, k hi), (n 8-15, k lo),
     * (n 8-15, k hi) -> b0, b1 of two n8 tiles. The row's low 3 bits are the lane's, so the
     * swizzle term is per lane and the same for every mi / nj. */
    const int sw = ((lane & 7) >> kSwShift) & (kCPR - 1);
    const int a_row = wm * kTM + (lane & 15);
    const int a_hi = lane >> 4;
    const int b_row = wn * kTN + (lane & 7) + ((lane >> 4) << 3);
    const int b_hi = (lane >> 3) & 1;

    int read_stage = 0, write_stage = kStages - 1;
    for (int kt = kt_begin; kt < kt_end; ++kt) {
        /* Tile kt has landed for this thread; the barrier makes every thread's copies visible
         * and also guarantees that all warps finished reading the stage reloaded below (it was
         * computed on in the previous iteration). */
        fm_cp_async_wait<kStages - 2>();
        __syncthreads();
        if (kt_load < kt_end) load_stage(write_stage, kt_load);
        fm_cp_async_commit();
        ++kt_load;

        const unsigned sA = s_base + read_stage * kStageBytes;
        const unsigned sB = sA + kABytes;
#pragma unroll
        for (int ks = 0; ks < kBK / 16; ++ks) {
            unsigned af[kMI][4];
#pragma unroll
            for (int mi = 0; mi < kMI; ++mi)
                fm_ldmatrix_x4(af[mi], sA + (unsigned)((a_row + mi * 16) * kRowBytes) +
                                           (unsigned)(((2 * ks + a_hi) ^ sw) << 4));
            unsigned bf[kNI][2];
#pragma unroll
            for (int nj = 0; nj < kNI / 2; ++nj) {
                unsigned r4[4];
                fm_ldmatrix_x4(r4, sB + (unsigned)((b_row + nj * 16) * kRowBytes) +
                                       (unsigned)(((2 * ks + b_hi) ^ sw) << 4));
                bf[2 * nj][0] = r4[0];
                bf[2 * nj][1] = r4[1];
                bf[2 * nj + 1][0] = r4[2];
                bf[2 * nj + 1][1] = r4[3];
            }
#pragma unroll
            for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
                for (int ni = 0; ni < kNI; ++ni) fm_mma_16816(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
        }
        read_stage = read_stage + 1 == kStages ? 0 : read_stage + 1;
        write_stage = write_stage + 1 == kStages ? 0 : write_stage + 1;
    }
    fm_cp_async_wait<0>(); /* no copy may still target shared memory when the CTA retires */

    /* ---- epilogue ---- */
    if (GATED) {
        fm_elem_t *C = (fm_elem_t *)p.c;
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + wm * kTM + mi * 16 + g + 8 * h;
#pragma unroll
                for (int ni = 0; ni < kNI / 2; ++ni) {
                    const int col = n_out0 + wn * (kTN / 2) + ni * 8 + 2 * tq;
                    if (col >= p.n) continue;
                    const float v0 = fm_moe::silu(acc[mi][ni][2 * h]) * acc[mi][ni + kNI / 2][2 * h];
                    const float v1 =
                        fm_moe::silu(acc[mi][ni][2 * h + 1]) * acc[mi][ni + kNI / 2][2 * h + 1];
                    *(unsigned *)(C + (long long)row * p.n + col) = fm_pack_elem2(v0, v1);
                }
            }
    } else {
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + wm * kTM + mi * 16 + g + 8 * h;
                const int slot = p.sorted_slot[row];
                if (slot < 0) continue; /* padding row */
                const float w = p.slot_weight[slot];
                if (p.atomic) {
                    float *C = (float *)p.c + (long long)(slot / p.topk) * p.n;
#pragma unroll
                    for (int ni = 0; ni < kNI; ++ni) {
                        const int col = n_out0 + wn * kTN + ni * 8 + 2 * tq;
                        if (col < p.n)
                            fm_moe::red_add_f32x2(C + col, w * acc[mi][ni][2 * h],
                                          w * acc[mi][ni][2 * h + 1]);
                    }
                } else {
                    fm_elem_t *C = (fm_elem_t *)p.c + (long long)slot * p.n;
#pragma unroll
                    for (int ni = 0; ni < kNI; ++ni) {
                        const int col = n_out0 + wn * kTN + ni * 8 + 2 * tq;
                        if (col < p.n)
                            *(unsigned *)(C + col) =
                                fm_pack_elem2(w * acc[mi][ni][2 * h], w * acc[mi][ni][2 * h + 1]);
                    }
                }
            }
    }
}

} // namespace fm_moe_sm80

extern "C" __global__ void __launch_bounds__(FM_WARPS * 32, 1)
fm_moe_gemm1_sm80(const fm_moe_gemm_params p) {
    extern __shared__ __align__(128) unsigned char fm_smem[];
    fm_moe_sm80::gemm<true>(p, fm_smem);
}

extern "C" __global__ void __launch_bounds__(FM_WARPS * 32, 1)
fm_moe_gemm2_sm80(const fm_moe_gemm_params p) {
    extern __shared__ __align__(128) unsigned char fm_smem[];
    fm_moe_sm80::gemm<false>(p, fm_smem);
}

/* Combine (common/moe_device.cuh). Launch: 256 threads, grid = ceil(T * H / 8 / 256). */
extern "C" __global__ void __launch_bounds__(256)
fm_moe_combine(const fm_moe_combine_params p) {
    fm_moe::combine(p);
}
