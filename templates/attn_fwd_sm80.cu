/*
 * attn_fwd_sm80.cu - attention forward, FlashAttention-2 scheme on warp-level tensor cores
 * (mma.sync m16n8k16, ldmatrix, cp.async): runs on sm_80 and later, including sm_90.
 *
 * One CTA owns BLOCK_M query rows of one (batch, head); its warps split those rows, 16 or 32
 * each, so a warp owns whole rows and the softmax never crosses warps. The Q tile is copied to
 * shared memory once; K and V tiles of BLOCK_N keys stream through a STAGES-deep cp.async ring.
 * Per tile, per warp: S = Q K^T on the tensor cores (fp32), online softmax in registers (exp2
 * with the scale folded into one FMA), P rounded to 16 bits in registers where it is already in
 * the A-operand layout of the next mma, O += P V. O is normalised at the end, staged through the
 * (then free) Q tile and written with 16-byte stores.
 *
 * Launch contract (the runtime's side):
 *   grid  = (ceil(seqlen_q / FM_BLOCK_M), heads, batch); the kernel does not read
 *           p.num_m_blocks, it reverses blockIdx.x over gridDim.x for causal problems.
 *   block = FM_WARPS * 32 threads
 *   dynamic shared memory = (2 * FM_HEAD_DIM + 16) * (FM_BLOCK_M + 2 * FM_STAGES * FM_BLOCK_N)
 *           bytes (rows padded by 16 bytes)
 *           (set CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES first when above 48 KiB)
 *   p: q/k/v/o 16-byte aligned, head dim contiguous, every stride a multiple of 8 elements,
 *      q/k/v stride_s < 2^23 elements (offsets inside a tile are 32-bit); softmax_scale > 0
 *      and scale_log2 = softmax_scale * log2(e); heads = kv_heads * head_group;
 *      causal_offset = seqlen_k - seqlen_q (FM_CAUSAL only); seqlen_q, seqlen_k >= 1.
 */
#include "common/attn_params.h"
#include "common/numeric.cuh"
#include "common/ptx_sm80.cuh"

#ifndef FM_HEAD_DIM
#define FM_HEAD_DIM 128
#endif
#ifndef FM_BLOCK_M
#define FM_BLOCK_M 128
#endif
#ifndef FM_BLOCK_N
#define FM_BLOCK_N 64
#endif
#ifndef FM_WARPS
#define FM_WARPS 8
#endif
#ifndef FM_STAGES
#define FM_STAGES 2
#endif
#ifndef FM_CAUSAL
#define FM_CAUSAL 0
#endif

#if FM_HEAD_DIM != 64 && FM_HEAD_DIM != 128 && FM_HEAD_DIM != 256
#error "FM_HEAD_DIM must be 64, 128 or 256"
#endif
#if FM_BLOCK_M % FM_WARPS != 0 || (FM_BLOCK_M / FM_WARPS != 16 && FM_BLOCK_M / FM_WARPS != 32)
#error "each warp owns 16 or 32 query rows: FM_BLOCK_M / FM_WARPS must be 16 or 32"
#endif
#if FM_BLOCK_N % 16 != 0 || FM_BLOCK_N < 16 || FM_BLOCK_N > 256
#error "FM_BLOCK_N must be a multiple of 16 in [16, 256]"
#endif
#if FM_STAGES < 2 || FM_STAGES > 4
#error "FM_STAGES must be 2, 3 or 4"
#endif
#if FM_CAUSAL != 0 && FM_CAUSAL != 1
#error "FM_CAUSAL must be 0 or 1"
#endif
#if (FM_BLOCK_N * FM_HEAD_DIM / 8) % (FM_WARPS * 32) != 0 || \
    (FM_BLOCK_M * FM_HEAD_DIM / 8) % (FM_WARPS * 32) != 0
#error "tile loads need a whole number of 16-byte chunks per thread"
#endif

/* Keep the Q fragments in registers for the whole K loop when a warp has one 16-row m-tile and
 * d <= 128: 4*d/16 = 32 registers at d=128 replace one of every five ldmatrix per k-step.
 * With 32 rows per warp or d=256 they would cost 64+ registers the O accumulators need. */
#ifndef FM_Q_IN_REGS
#if FM_BLOCK_M / FM_WARPS == 16 && FM_HEAD_DIM <= 128
#define FM_Q_IN_REGS 1
#else
#define FM_Q_IN_REGS 0
#endif
#endif

namespace fm_attn_sm80 {

constexpr int kD = FM_HEAD_DIM;
constexpr int kBM = FM_BLOCK_M;
constexpr int kBN = FM_BLOCK_N;
constexpr int kWarps = FM_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = FM_STAGES;
constexpr bool kCausal = FM_CAUSAL != 0;
constexpr bool kQInRegs = FM_Q_IN_REGS != 0;

constexpr int kRowsPerWarp = kBM / kWarps;
constexpr int kMT = kRowsPerWarp / 16; /* 16-row mma tiles per warp */
constexpr int kNT = kBN / 8;           /* 8-key mma tiles of S */
constexpr int kKD = kD / 16;           /* k-steps of Q K^T (over d) */
constexpr int kKN = kBN / 16;          /* k-steps of P V (over keys) */
constexpr int kDT = kD / 8;            /* 8-column mma tiles of O */
constexpr int kChunks = kD / 8;        /* 16-byte chunks per row */
/* Shared tiles are rows of d 16-bit values padded by one 16-byte chunk. The 8 row addresses of
 * an ldmatrix 8x8 matrix (8 consecutive rows, same column) then start 16 bytes apart modulo
 * 128 and cover all 32 banks, and so do the cp.async writes and the epilogue's staging. Padding
 * rather than an XOR swizzle keeps every per-k-step address a compile-time offset from one base
 * register per operand, where a swizzle keeps one live address per XOR pattern and operand:
 * registers the 32-rows-per-warp configurations do not have (measured: fewer spills). */
constexpr int kRowBytes = kD * 2 + 16;

constexpr int kQBytes = kBM * kRowBytes;
constexpr int kKVBytes = kBN * kRowBytes; /* one K or one V tile */
constexpr int kSmemBytes = kQBytes + 2 * kStages * kKVBytes; /* = the family's smem_bytes */
static_assert(kSmemBytes <= 227 * 1024, "tiles exceed the largest shared memory (sm_90)");

static __device__ __forceinline__ unsigned tile_off(int row, int chunk) {
    return (unsigned)(row * kRowBytes + chunk * 16);
}

/* Copies ROWS rows of d elements from `tile` (its row 0) into shared memory. The thread's part
 * is fixed: chunk column tid % kChunks of rows thr_row + i * kRowsPerPass (thr_row =
 * tid / kChunks), so consecutive threads take consecutive chunks of a row and a warp reads whole
 * 128-byte lines. smem_thr is the thread's first destination, thr_off = thr_row * stride +
 * 8 * chunk its first source offset. Offsets inside a tile are 32-bit (the launch contract
 * bounds the strides): a 64-bit address per row would cost registers the loop has not got.
 * With CHECK, rows >= valid are zero-filled and read nothing (their source clamps to row 0). */
constexpr int kRowsPerPass = kThreads / kChunks;
static_assert(kThreads % kChunks == 0, "a thread keeps one chunk column");

template <int ROWS, bool CHECK>
static __device__ __forceinline__ void load_tile(unsigned smem_thr, const fm_elem_t *tile,
                                                 int thr_off, int stride, int valid,
                                                 int thr_row) {
    constexpr int kPerThread = ROWS * kChunks / kThreads;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        const unsigned dst = smem_thr + i * kRowsPerPass * kRowBytes;
        const int off = thr_off + i * kRowsPerPass * stride;
        if (CHECK) {
            const bool ok = thr_row + i * kRowsPerPass < valid;
            fm_cp_async_16(dst, tile + (ok ? off : 0), ok ? 16 : 0);
        } else {
            fm_cp_async_16(dst, tile + off, 16);
        }
    }
}

} // namespace fm_attn_sm80

extern "C" __global__ void __launch_bounds__(FM_WARPS * 32, 1)
fm_attn_fwd_sm80(const fm_attn_kernel_params p) {
    using namespace fm_attn_sm80;
    extern __shared__ __align__(128) unsigned char fm_smem[];

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2; /* mma row group */
    const int tq = lane & 3; /* mma thread-in-group */

    /* Causal: the last m-blocks see the most keys; launching them first shortens the tail. */
    const int m_block = kCausal ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x;
    const int head = blockIdx.y;
    const int batch = blockIdx.z;
    const int m0 = m_block * kBM;
    if (m0 >= p.seqlen_q) return;
    const int kv_head = head / p.head_group;
    const int sq = p.seqlen_q, sk = p.seqlen_k;

    const fm_elem_t *qg = (const fm_elem_t *)p.q + batch * p.q_stride_b + head * p.q_stride_h +
                          (long long)m0 * p.q_stride_s;
    const fm_elem_t *kg =
        (const fm_elem_t *)p.k + batch * p.k_stride_b + kv_head * p.k_stride_h;
    const fm_elem_t *vg =
        (const fm_elem_t *)p.v + batch * p.v_stride_b + kv_head * p.v_stride_h;

    const unsigned sQ = fm_smem_u32(fm_smem);
    const unsigned sK = sQ + kQBytes;
    const unsigned sV = sK + kStages * kKVBytes;

    /* Key tiles this CTA needs: all of them, or for causal only up to the one holding the last
     * key its last valid row sees (rows past seqlen_q do not extend the range). */
    int n_tiles = (sk + kBN - 1) / kBN;
    if (kCausal) {
        const int m_last = min(m0 + kBM, sq) - 1;
        const int keys = min(sk, m_last + p.causal_offset + 1);
        n_tiles = keys > 0 ? (keys + kBN - 1) / kBN : 0;
    }
    /* Tiles are visited from the last to the first: the tiles that need a mask (the seqlen_k
     * tail, the causal diagonal) come first, and only the very first can be partial. */
    const int n_first = n_tiles - 1;

    /* ---- prologue: Q with the first K tile in one group, then V; STAGES-1 tiles ahead ---- */
    const int ld_row = tid / kChunks;
    const int ld_chunk = tid % kChunks;
    const unsigned ld_smem = tile_off(ld_row, ld_chunk);
    const int k_stride = (int)p.k_stride_s, v_stride = (int)p.v_stride_s;
    const int k_off = ld_row * k_stride + ld_chunk * 8;
    const int v_off = ld_row * v_stride + ld_chunk * 8;
    load_tile<kBM, true>(sQ + ld_smem, qg, ld_row * (int)p.q_stride_s + ld_chunk * 8,
                         (int)p.q_stride_s, sq - m0, ld_row);
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        /* Tiles go from the last to the first, so only tile n_first can hold the end of the
         * keys: it alone needs the zero-fill check (the loop's prefetches never do). */
        const int n = n_first - s;
        if (n >= 0)
            load_tile<kBN, true>(sK + s * kKVBytes + ld_smem,
                                 kg + (long long)n * kBN * p.k_stride_s, k_off, k_stride,
                                 sk - n * kBN, ld_row);
        fm_cp_async_commit();
        if (n >= 0)
            load_tile<kBN, true>(sV + s * kKVBytes + ld_smem,
                                 vg + (long long)n * kBN * p.v_stride_s, v_off, v_stride,
                                 sk - n * kBN, ld_row);
        fm_cp_async_commit();
    }

    /* ---- per-lane ldmatrix addresses; each k-step adds a compile-time offset ---- */
    /* Q (A operand, non-trans): lanes 0-15 rows 0-15 at chunk 2k, lanes 16-31 at chunk 2k+1. */
    const unsigned q_lane = sQ + tile_off(warp * kRowsPerWarp + (lane & 15), lane >> 4);
    /* K (B operand of Q K^T, non-trans): matrices (keys 0-7, d lo), (keys 0-7, d hi),
     * (keys 8-15, d lo), (keys 8-15, d hi) = b0,b1 of n-tile j and b0,b1 of n-tile j+1. */
    const unsigned k_lane = tile_off((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
    /* V (B operand of P V, trans): matrices (keys 0-7, d lo), (keys 8-15, d lo),
     * (keys 0-7, d hi), (keys 8-15, d hi) = b0,b1 of d-tile j and b0,b1 of d-tile j+1. */
    const unsigned v_lane = tile_off((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);

    /* Rows owned by this thread: (mt, half) -> m0 + warp rows + 16 mt + g + 8 half. */
    float acc[kMT][kDT][4];
    float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int j = 0; j < kDT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            row_max[mt][h] = fm_neg_inf();
            row_sum[mt][h] = 0.f;
        }
    }
    const float sl2 = p.scale_log2;

    unsigned qf[kQInRegs ? kMT : 1][kQInRegs ? kKD : 1][4];

    /* Tile n needs the mask iff n * BLOCK_N > mask_above: it reaches past seqlen_k, or (causal)
     * its last key lies beyond what this warp's first row sees. */
    int mask_above = sk - kBN;
    if (kCausal)
        mask_above = min(mask_above, m0 + warp * kRowsPerWarp + p.causal_offset - kBN + 1);

    int stage = 0; /* ring slot of tile n */
    for (int n = n_first; n >= 0; --n) {
        /* K of tile n has landed when at most V(n) and the 2*(STAGES-2) groups of the tiles
         * after it are pending. The barrier publishes every thread's copies and guarantees
         * all warps are done with the previous tile, whose slot the prefetch reuses. */
        fm_cp_async_wait<2 * kStages - 3>();
        __syncthreads();
        if (kQInRegs && n == n_first) {
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                for (int kk = 0; kk < kKD; ++kk)
                    fm_ldmatrix_x4(qf[kQInRegs ? mt : 0][kQInRegs ? kk : 0],
                                   q_lane + tile_off(mt * 16, 2 * kk));
        }
        {
            const int np = n - (kStages - 1);
            const int sp = stage == 0 ? kStages - 1 : stage - 1;
            /* np < n_first: a whole tile, no tail check */
            if (np >= 0)
                load_tile<kBN, false>(sK + sp * kKVBytes + ld_smem,
                                      kg + (long long)np * kBN * p.k_stride_s, k_off, k_stride,
                                      0, 0);
            fm_cp_async_commit();
            if (np >= 0)
                load_tile<kBN, false>(sV + sp * kKVBytes + ld_smem,
                                      vg + (long long)np * kBN * p.v_stride_s, v_off, v_stride,
                                      0, 0);
            fm_cp_async_commit();
        }

        /* ---- S = Q K^T ---- */
        const unsigned sKs = sK + stage * kKVBytes;
        const unsigned sVs = sV + stage * kKVBytes;
        float s[kMT][kNT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int j = 0; j < kNT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kKD; ++kk) {
            unsigned a[kMT][4];
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
                if (kQInRegs) {
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        a[mt][e] = qf[kQInRegs ? mt : 0][kQInRegs ? kk : 0][e];
                } else {
                    fm_ldmatrix_x4(a[mt],
                                   q_lane + tile_off(mt * 16, 2 * kk));
                }
            }
#pragma unroll
            for (int jj = 0; jj < kNT / 2; ++jj) {
                unsigned b[4];
                fm_ldmatrix_x4(b, sKs + k_lane + tile_off(jj * 16, 2 * kk));
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) {
                    fm_mma_16816(s[mt][2 * jj], a[mt], b[0], b[1]);
                    fm_mma_16816(s[mt][2 * jj + 1], a[mt], b[2], b[3]);
                }
            }
        }

        /* ---- mask: the seqlen_k tail and the causal diagonal (only tiles that reach them) ---- */
        const int key0 = n * kBN;
        if (key0 > mask_above) {
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    /* keys >= end are masked for this row; relative to key0 + 2 tq */
                    int end = sk;
                    if (kCausal)
                        end = min(end, m0 + warp * kRowsPerWarp + mt * 16 + g + 8 * h +
                                           p.causal_offset + 1);
                    end -= key0 + 2 * tq;
#pragma unroll
                    for (int j = 0; j < kNT; ++j) {
                        if (j * 8 >= end) s[mt][j][2 * h] = fm_neg_inf();
                        if (j * 8 + 1 >= end) s[mt][j][2 * h + 1] = fm_neg_inf();
                    }
                }
        }

        /* ---- online softmax: m = running max of raw scores; p = 2^(s*sl2 - m*sl2) ---- */
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = row_max[mt][h];
#pragma unroll
                for (int j = 0; j < kNT; ++j)
                    mx = fmaxf(mx, fmaxf(s[mt][j][2 * h], s[mt][j][2 * h + 1]));
                /* the 4 lanes of a quad hold the same row */
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                /* A row with no visible key so far keeps m = -inf: shift by 0 instead so that
                 * exp2(-inf - shift) = 0 rather than NaN. The old max -inf gives alpha = 0,
                 * harmless since acc and sum are still 0. */
                const float shift = mx == fm_neg_inf() ? 0.f : mx * sl2;
                const float alpha = fm_exp2(fmaf(row_max[mt][h], sl2, -shift));
                row_max[mt][h] = mx;
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < kNT; ++j) {
                    const float p0 = fm_exp2(fmaf(s[mt][j][2 * h], sl2, -shift));
                    const float p1 = fm_exp2(fmaf(s[mt][j][2 * h + 1], sl2, -shift));
                    s[mt][j][2 * h] = p0;
                    s[mt][j][2 * h + 1] = p1;
                    sum += p0 + p1;
                }
                /* per-lane partial sums; the quad is summed once at the end */
                row_sum[mt][h] = row_sum[mt][h] * alpha + sum;
#pragma unroll
                for (int j = 0; j < kDT; ++j) {
                    acc[mt][j][2 * h] *= alpha;
                    acc[mt][j][2 * h + 1] *= alpha;
                }
            }
        }

        /* ---- P to 16 bits: the S accumulators of n-tiles 2k, 2k+1 are exactly the A fragment
         * of k-step k of P V (rows g / g+8, keys 2t.. / 2t+8..). ---- */
        unsigned pa[kKN][kMT][4];
#pragma unroll
        for (int kk = 0; kk < kKN; ++kk)
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
                pa[kk][mt][0] = fm_pack_elem2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[kk][mt][1] = fm_pack_elem2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[kk][mt][2] = fm_pack_elem2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[kk][mt][3] = fm_pack_elem2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }

        /* V of tile n: everything after it may still be pending (the prefetched tile's K and
         * V plus the 2*(STAGES-2) groups in between). Barrier: other threads' copies. */
        fm_cp_async_wait<2 * kStages - 2>();
        __syncthreads();

        /* ---- O += P V ---- */
#pragma unroll
        for (int kk = 0; kk < kKN; ++kk) {
#pragma unroll
            for (int dd = 0; dd < kDT / 2; ++dd) {
                unsigned b[4];
                fm_ldmatrix_x4_trans(b, sVs + v_lane + tile_off(kk * 16, 2 * dd));
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) {
                    fm_mma_16816(acc[mt][2 * dd], pa[kk][mt], b[0], b[1]);
                    fm_mma_16816(acc[mt][2 * dd + 1], pa[kk][mt], b[2], b[3]);
                }
            }
        }
        stage = stage == kStages - 1 ? 0 : stage + 1;
    }

    /* ---- epilogue: normalise, LSE, stage O in this warp's Q rows, 16-byte stores ---- */
    /* Every copy landed (n_tiles == 0 never waited on Q) and every warp is past its last
     * ldmatrix, so the Q tile can be overwritten with O: Q rows were copied by threads of any
     * warp, and before this barrier another warp's copy could still be landing in our rows. */
    fm_cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = row_sum[mt][h];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            /* l == 0 only for a row that sees no key: O = 0, lse = -inf */
            const float inv = l > 0.f ? fm_rcp(l) : 0.f;
            const int row_local = warp * kRowsPerWarp + mt * 16 + g + 8 * h;
            if (p.lse && tq == 0 && m0 + row_local < sq) {
                const float lse =
                    l > 0.f ? (row_max[mt][h] * sl2 + fm_log2(l)) * FM_LN2 : fm_neg_inf();
                p.lse[((long long)batch * p.heads + head) * sq + m0 + row_local] = lse;
            }
#pragma unroll
            for (int j = 0; j < kDT; ++j) {
                const unsigned v =
                    fm_pack_elem2(acc[mt][j][2 * h] * inv, acc[mt][j][2 * h + 1] * inv);
                /* chunk j of the row, bytes 4*tq: 8 rows x 4 lanes hit 32 distinct banks */
                fm_sts32(sQ + tile_off(row_local, j) + 4 * tq, v);
            }
        }
    }
    /* the stores below read rows other warps staged */
    __syncthreads();
    {
        constexpr int kPerThread = kBM * kChunks / kThreads;
        const int chunk = tid % kChunks;
        const int row0 = tid / kChunks;
        fm_elem_t *og = (fm_elem_t *)p.o + batch * p.o_stride_b + head * p.o_stride_h +
                        (long long)m0 * p.o_stride_s;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int row = row0 + i * (kThreads / kChunks);
            if (m0 + row < sq) {
                unsigned v[4];
                fm_lds128(v, sQ + tile_off(row, chunk));
                fm_stg128(og + (long long)row * p.o_stride_s + chunk * 8, v);
            }
        }
    }
}
