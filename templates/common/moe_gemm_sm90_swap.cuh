/*
 * moe_gemm_sm90_swap.cuh - the warp-specialised Hopper grouped GEMMs with the operands swapped
 * (moe_gemm_sm90 with pipe = swap; included by templates/moe_gemm_sm90.cu when FM_MOE_WS = 2):
 * the weights are the wgmma's M side and the tokens its N side.
 *
 * Why: wgmma's M is 64 rows per warpgroup, its N anything from 8 to 256 in steps of 8. With the
 * tokens on M (pipe = ws) an expert's last tile is padded to 64 rows per warpgroup: at T = 4096
 * on DeepSeek-V3 (about 128 +- 15 tokens per expert) a quarter of the tensor work is padding, and
 * on an H200 the layer takes 8.2 ms with the usual loads against 6.5 ms when every expert gets
 * exactly 128 tokens (bench/NOTES.md). Here each tile issues its wgmma with N = its real token
 * count rounded up to 16 (kStep), so the padding is 8 rows on average instead of about 32.
 *
 * Launch (the same as pipe = ws, runtime/moe.c builds the maps):
 *   fm_moe_gemm1_sm90(tma_x = (a copy of tma_w, unused), tma_w = w13 as 5-D (H, 8, 2, I/8, E), p)
 *   fm_moe_gemm2_sm90(tma_x = intermediate as (I, rows, 1, 1), tma_w = w2 as (I, H, E, 1), p)
 *   block 128 * (1 + BLOCK_N / 64) threads, grid = tiles (ws_grid = tiles) or min(SMs, tiles),
 *   dynamic shared memory STAGES * BLOCK_N * 128 + X_STAGES * BLOCK_M * 128 + 2048 + the token
 *   table (BLOCK_M * 4) + the consumers' slot/weight tables (BLOCK_N / 64 * BLOCK_M * 8).
 * BLOCK_M is the token tile (the alignment pads each expert to a multiple of it), BLOCK_N the
 * weight rows of a tile: 64 per consumer warpgroup.
 *
 * Two rings, 128-byte rows, 128-byte swizzle: STAGES weight stages [BLOCK_N x 64] (from DRAM,
 * as deep as shared memory allows) and X_STAGES token stages [BLOCK_M x 64] (from L2), each
 * with its own full/empty barriers and its own producer, so that weight copies run ahead of
 * the token gathers. A first version shared one stage between both and reached 73% of the
 * DRAM bandwidth in gemm1 where the ws tile reached 89% (ncu, H100): too few weight bytes in
 * flight per SM.
 *  - gemm1's weight box is (64, 8, 2, BLOCK_N/16, 1) of w13 viewed as (H, 8, 2, I/8, E): the
 *    stage holds groups of 16 rows, 8 gate rows of columns c..c+7 then the 8 up rows of the same
 *    columns. In the m64nN accumulator a thread owns rows g and g + 8 of its warp's 16, so gate
 *    and up of one column meet in one thread and SwiGLU runs in registers.
 *  - gemm1's token rows are gathered by producer warps 1..3 with cp.async (16 bytes each; the
 *    rows' token indices in a shared table written when the tile starts); only the real rows
 *    are copied. gemm2's token rows come by TMA in boxes of 32 rows, as many
 *    as the real rows need.
 *  - Rows past the real count hold whatever the stage held before. They only feed accumulator
 *    columns of tokens that do not exist (column n of D depends on row n of B alone), which
 *    the epilogues never write.
 *
 * Consumers: per tile, n = the real token count rounded up to kStep; the k loop is instantiated
 * for every N = kStep .. BLOCK_M and the tile runs the one for n (a warp-uniform branch per tile,
 * not per k step, so wgmma stays pipelined). Epilogues from registers:
 *  - gemm1: thread (warp w, g, tq) holds gate and up of column c = 8w + g for tokens
 *    8i + 2tq + {0, 1}; neighbours g and g^1 swap one value each so that every thread stores two
 *    adjacent columns (4 bytes) of one token's intermediate row.
 *  - gemm2: rows are output columns; the same swap, then the routing weight of the token, into
 *    its slot row (16-bit) or added in fp32 to its token's row. The slots and weights of the
 *    tile's tokens come from a per-warpgroup table (kMetaOffset), filled from registers loaded
 *    when the tile started (the alignment kernel wrote each padded row's weight).
 */
#pragma once

#define FM_SWAP_CONSUMERS (FM_BLOCK_N / 64)
#if FM_BLOCK_N != 128 && FM_BLOCK_N != 192
#error "pipe = swap takes BLOCK_N = 128 or 192 weight rows (two or three consumer warpgroups)"
#endif
#if FM_BLOCK_M != 128 && FM_BLOCK_M != 192 && FM_BLOCK_M != 256
#error "pipe = swap takes BLOCK_M = 128, 192 or 256 token rows"
#endif
#if FM_SWAP_CONSUMERS == 3 && FM_BLOCK_M > 192
#error "three consumers hold at most 96 accumulators each (BLOCK_M <= 192)"
#endif
/* The producer's gather loop (runtime row bounds, 64-bit addresses) needs about 40 registers;
 * 32 spilled. */
#ifndef FM_PRODUCER_REGS
#if FM_SWAP_CONSUMERS == 2
#define FM_PRODUCER_REGS 56
#else
#define FM_PRODUCER_REGS 48
#endif
#endif
#ifndef FM_CONSUMER_REGS
#if FM_SWAP_CONSUMERS == 2
#define FM_CONSUMER_REGS 224 /* 128 * (56 + 2 * 224) = 64512 <= 65536 */
#else
#define FM_CONSUMER_REGS 152 /* 128 * (48 + 3 * 152) = 64512: 96 accumulators + addressing */
#endif
#endif
#ifndef FM_X_STAGES
#define FM_X_STAGES 3 /* token ring depth (the weight ring's is FM_STAGES) */
#endif
#if FM_STAGES < 2 || FM_X_STAGES < 3
#error "pipe = swap needs 2+ weight stages and 3+ token stages (cp.async lag X_STAGES - 2 >= 1)"
#endif
#if 128 * (FM_PRODUCER_REGS + FM_SWAP_CONSUMERS * FM_CONSUMER_REGS) > 65536
#error "register split exceeds the 64K registers of an SM"
#endif

namespace fm_moe_swap {

constexpr int kTN = FM_BLOCK_M; /* token rows of a tile */
constexpr int kWM = FM_BLOCK_N; /* weight rows of a tile */
constexpr int kBK = 64;
constexpr int kConsumers = FM_SWAP_CONSUMERS;
constexpr int kWStages = FM_STAGES;   /* weight ring (from DRAM: deep) */
constexpr int kXStages = FM_X_STAGES; /* token ring (from L2) */
constexpr int kXLag = kXStages - 2;   /* gathered stages pending behind the one being filled */
constexpr int kStep = 16;     /* token granularity of the wgmma N */
constexpr int kBoxRows = 32;  /* gemm2's token rows per TMA box */
constexpr int kGatherThreads = 96; /* producer warps 1..3 */
constexpr int kRowBytes = kBK * 2;
constexpr int kWBytes = kWM * kRowBytes;
constexpr int kXBytes = kTN * kRowBytes;
constexpr int kOffX = kWStages * kWBytes;
constexpr int kBarOffset = kOffX + kXStages * kXBytes;
/* w_full[SW], w_empty[SW], x_full[SX], x_empty[SX] */
constexpr int kBarW = kBarOffset, kBarX = kBarOffset + 16 * kWStages;
constexpr int kTokOffset = kBarOffset + 256; /* [kTN] token index of each gathered row */
constexpr int kAccMax = kTN / 2;
/* gemm2's epilogue needs each token column's slot and routing weight. Loaded in the epilogue,
 * one pair per column group behind the previous group's stores, they cost a global round trip
 * each (about 18 per tile: longer than gemm2's whole k loop). Instead every consumer thread
 * loads kMetaPer rows' (slot, weight) when its tile starts, keeps them in registers through the
 * k loop, and parks them in its warpgroup's table [slot x kTN | weight x kTN] for the epilogue. */
constexpr int kMetaPer = (kTN + 127) / 128;
constexpr int kMetaOffset = kTokOffset + kTN * 4;
constexpr int kMetaBytes = kTN * 8; /* per consumer warpgroup */
static_assert(kWBytes % 1024 == 0 && kXBytes % 1024 == 0, "1024-byte swizzle atoms");
static_assert(kTN % kBoxRows == 0 && kTN % kStep == 0, "whole boxes and steps per tile");
static_assert(16 * (kWStages + kXStages) <= 256, "barriers fit below the token table");
static_assert(kXLag >= 1, "the token ring needs at least 3 stages");

/* Named barriers: 1 + cw for consumer warpgroup cw's table, kBarGather for the gatherers,
 * kBarStaging for all consumers around a staged epilogue. */
constexpr unsigned kBarGather = 4;
constexpr unsigned kBarStaging = 5;
/* Staged epilogue (a CTA's last tile): token rows of the tile's output columns in the freed
 * rings, each row 16 bytes longer than its data (the 8 token rows of one store instruction then
 * fall on distinct banks). */
constexpr int kStagingRow1 = kWM + 16, kStagingRow2 = 2 * kWM + 16; /* bytes: gemm1, gemm2 */
static_assert(kTN * kStagingRow2 <= kBarOffset, "the staged epilogue fits the rings");

static __device__ __forceinline__ void st_shared_s32(unsigned addr, int v) {
    asm volatile("st.shared.s32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
static __device__ __forceinline__ int ld_shared_s32(unsigned addr) {
    int v;
    asm volatile("ld.shared.s32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
    return v;
}

/* Tile t: its M (token) tile, N (weight) tile, expert, first padded row and real token rows. */
struct tile {
    int m_tile, n_tile, expert, m0, rows;
};
static __device__ __forceinline__ tile tile_at(const fm_moe_gemm_params &p, int t, int m_tiles) {
    tile x;
    fm_moe::tile_coords(t, m_tiles, kTN, p, x.m_tile, x.n_tile);
    x.expert = p.tile_expert[x.m_tile];
    x.m0 = x.m_tile * kTN;
    x.rows = min(kTN, p.expert_counts[x.expert] - (x.m0 - p.expert_offsets[x.expert]));
    return x;
}

/* Producer warpgroup: warp 0's first lane streams the weights (its own ring, as deep as shared
 * memory allows: the weights come from DRAM); warps 1..3 bring the tokens (gemm1: gathered
 * with cp.async by all 96 threads, only real rows; gemm2: TMA boxes issued by one thread). The
 * two rings advance once per k step each, independently: a weight copy never waits for a token
 * gather, which is what kept too few weight bytes in flight when both shared one stage. */
template <bool GATHER>
static __device__ __forceinline__ void producer(const fm_tma_desc *tma_w, const fm_tma_desc *tma_x,
                                                const fm_moe_gemm_params &p, unsigned s_base,
                                                int m_tiles, int total) {
    const int tid = threadIdx.x; /* 0..127 */
    const int k_tiles = p.k / kBK;
    const unsigned w_full = s_base + kBarW, w_empty = w_full + 8 * kWStages;
    const unsigned x_full = s_base + kBarX, x_empty = x_full + 8 * kXStages;

    if (tid < 32) { /* ---- weights ---- */
        if (tid != 0) return;
        int it = 0;
        for (int t = blockIdx.x; t < total; t += gridDim.x) {
            const tile x = tile_at(p, t, m_tiles);
            for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                const int s = it % kWStages;
                const unsigned sW = s_base + (unsigned)(s * kWBytes);
                fm_mbar_wait(w_empty + 8 * s, ((unsigned)(it / kWStages) & 1u) ^ 1u);
                fm_mbar_arrive_expect_tx(w_full + 8 * s, kWBytes);
                if (GATHER) /* w13 (H, 8, 2, I/8, E): groups of 8 gate + 8 up rows */
                    fm_tma_load_5d(sW, tma_w, w_full + 8 * s, kt * kBK, 0, 0,
                                   x.n_tile * (kWM / 16), x.expert);
                else /* w2 (I, H, E, 1) */
                    fm_tma_load_4d(sW, tma_w, w_full + 8 * s, kt * kBK, x.n_tile * kWM, x.expert,
                                   0);
            }
        }
        return;
    }

    /* ---- tokens ---- */
    if (!GATHER) {
        if (tid != 32) return;
        int it = 0;
        for (int t = blockIdx.x; t < total; t += gridDim.x) {
            const tile x = tile_at(p, t, m_tiles);
            const unsigned tx = (unsigned)((x.rows + kBoxRows - 1) / kBoxRows * kBoxRows * kRowBytes);
            for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                const int s = it % kXStages;
                const unsigned sX = s_base + (unsigned)(kOffX + s * kXBytes);
                fm_mbar_wait(x_empty + 8 * s, ((unsigned)(it / kXStages) & 1u) ^ 1u);
                fm_mbar_arrive_expect_tx(x_full + 8 * s, tx);
                for (int r = 0; r < x.rows; r += kBoxRows) /* intermediate (I, rows, 1, 1) */
                    fm_tma_load_4d(sX + (unsigned)(r * kRowBytes), tma_x, x_full + 8 * s,
                                   kt * kBK, x.m0 + r, 0, 0);
            }
        }
        return;
    }

    const int gt = tid - 32; /* 0..95 */
    const int ccol = gt % 8, r0 = gt / 8; /* rows r0 + 12 j, 16-byte chunk ccol */
    const fm_elem_t *A = (const fm_elem_t *)p.a;
    const unsigned tok_tab = s_base + kTokOffset;
    int it = 0, signaled = 0;
    for (int t = blockIdx.x; t < total; t += gridDim.x) {
        const tile x = tile_at(p, t, m_tiles);
        fm_bar_sync(kBarGather, kGatherThreads); /* the previous tile's table is no longer read */
        for (int r = gt; r < x.rows; r += kGatherThreads)
            st_shared_s32(tok_tab + 4u * (unsigned)r, p.sorted_slot[x.m0 + r] / p.topk);
        fm_bar_sync(kBarGather, kGatherThreads);
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
            const int s = it % kXStages;
            const unsigned sX = s_base + (unsigned)(kOffX + s * kXBytes);
            fm_mbar_wait(x_empty + 8 * s, ((unsigned)(it / kXStages) & 1u) ^ 1u);
            const fm_elem_t *col = A + kt * kBK + ccol * 8;
            for (int r = r0; r < x.rows; r += kGatherThreads / 8) {
                const int tok = ld_shared_s32(tok_tab + 4u * (unsigned)r);
                fm_cp_async_16(sX + fm_moe::swz<kBK>(r, ccol), col + (long long)tok * p.k, 16);
            }
            fm_cp_async_commit();
            if (it + 1 - signaled > kXLag) {
                /* k-tile `signaled` is the oldest pending group: wait for it, publish it. */
                fm_cp_async_wait<kXLag>();
                fm_fence_proxy_async();
                fm_mbar_arrive(x_full + 8 * (signaled % kXStages));
                ++signaled;
            }
        }
    }
    fm_cp_async_wait<0>();
    fm_fence_proxy_async();
    for (; signaled < it; ++signaled) fm_mbar_arrive(x_full + 8 * (signaled % kXStages));
}

/* The k loop of one tile with wgmma N = N tokens: 4 m64nNk16 per k step, one group in flight
 * behind the one issued, the previous step's weight and token stages released once its group
 * is done. */
struct rings {
    unsigned long long a_desc0, b_desc0; /* stage 0 of each ring (this warpgroup's weight rows) */
    unsigned bar;                        /* w_full[0]; the other barriers at fixed offsets */
};

template <int N>
static __device__ __forceinline__ void mainloop(float (&acc)[kAccMax], const rings &rg,
                                                int k_tiles, int &it, int lane) {
    constexpr unsigned kWEmpty = 8 * kWStages, kXFull = kBarX - kBarW;
    constexpr unsigned kXEmpty = kXFull + 8 * kXStages;
    float(&d)[N / 2] = *reinterpret_cast<float(*)[N / 2]>(&acc[0]);
    for (int kt = 0; kt < k_tiles; ++kt, ++it) {
        const int sw = it % kWStages, sx = it % kXStages;
        fm_mbar_wait(rg.bar + 8 * sw, (unsigned)(it / kWStages) & 1u);
        fm_mbar_wait(rg.bar + kXFull + 8 * sx, (unsigned)(it / kXStages) & 1u);
        const unsigned long long ad = rg.a_desc0 + (unsigned long long)(sw * (kWBytes >> 4));
        const unsigned long long bd = rg.b_desc0 + (unsigned long long)(sx * (kXBytes >> 4));
        fm_wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kBK / 16; ++ks)
            fm_wgmma<N>::template ss<FM_DTYPE_BF16, 0>(d, ad + (unsigned)(2 * ks),
                                                       bd + (unsigned)(2 * ks), 1);
        fm_wgmma_commit();
        fm_wgmma_wait<1>();
        if (kt > 0 && lane == 0) { /* the previous step's stages */
            fm_mbar_arrive(rg.bar + kWEmpty + 8 * ((it - 1) % kWStages));
            fm_mbar_arrive(rg.bar + kXEmpty + 8 * ((it - 1) % kXStages));
        }
    }
    fm_wgmma_wait<0>();
    fm_fence_regs(d);
    if (lane == 0) {
        fm_mbar_arrive(rg.bar + kWEmpty + 8 * ((it - 1) % kWStages));
        fm_mbar_arrive(rg.bar + kXEmpty + 8 * ((it - 1) % kXStages));
    }
}

/* Runs mainloop<n> for the runtime n (a multiple of kStep in kStep..N). */
template <int N>
static __device__ __forceinline__ void mainloop_n(int n, float (&acc)[kAccMax], const rings &rg,
                                                  int k_tiles, int &it, int lane) {
    if constexpr (N > kStep) {
        if (n < N) {
            mainloop_n<N - kStep>(n, acc, rg, k_tiles, it, lane);
            return;
        }
    }
    mainloop<N>(acc, rg, k_tiles, it, lane);
}

/* Epilogue through shared memory for a CTA's last tile (see moe_gemm_sm90_ws.cuh: 4-byte
 * stores of 8 rows per instruction are 8 store requests each). Every consumer writes its values
 * (the same ones the register epilogue stores) into token rows in the freed rings; after a
 * barrier of all consumers each real token row leaves as one bulk copy (copy engine): gemm1 to
 * its padded row of the intermediate, gemm2 to its slot's row. Called after the kBarStaging
 * barrier that follows every consumer's last wgmma (and, gemm2, its slot/weight table). */
template <bool GATED>
static __device__ __forceinline__ void epilogue_staged(const fm_moe_gemm_params &p,
                                                       const float (&acc)[kAccMax],
                                                       unsigned s_base, unsigned meta,
                                                       const tile &x, int n, int cw, int wtid) {
    constexpr int kRow = GATED ? kStagingRow1 : kStagingRow2;
    constexpr int kCols = GATED ? kWM / 2 : kWM;
    const int warp = wtid / 32, lane = wtid % 32;
    const int g = lane / 4, tq = lane % 4, odd = g & 1;
    if (GATED) {
        const int col = 32 * cw + 8 * warp + g - odd; /* in the tile */
#pragma unroll
        for (int i = 0; i < kAccMax / 4; ++i) {
            if (8 * i >= n) break;
            float lo, hi;
            fm_moe::swap_pair(fm_moe::silu(acc[4 * i]) * acc[4 * i + 2],
                              fm_moe::silu(acc[4 * i + 1]) * acc[4 * i + 3], odd, lo, hi);
            const int tok = 8 * i + 2 * tq + odd;
            st_shared_s32(s_base + (unsigned)(tok * kRow + 2 * col), (int)fm_pack_elem2(lo, hi));
        }
    } else {
        const int col0 = 64 * cw + 16 * warp + g - odd;
#pragma unroll
        for (int i = 0; i < kAccMax / 4; ++i) {
            if (8 * i >= n) break;
            const int tok = 8 * i + 2 * tq + odd;
            const float w = __int_as_float(ld_shared_s32(meta + 4u * (unsigned)(kTN + tok)));
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float lo, hi;
                fm_moe::swap_pair(acc[4 * i + 2 * h], acc[4 * i + 2 * h + 1], odd, lo, hi);
                st_shared_s32(s_base + (unsigned)(tok * kRow + 2 * (col0 + 8 * h)),
                              (int)fm_pack_elem2(w * lo, w * hi));
            }
        }
    }
    fm_fence_proxy_async(); /* the copy engine reads what the generic proxy wrote */
    fm_bar_sync(kBarStaging, 128 * kConsumers);
    const int cols = min(kCols, p.n - x.n_tile * kCols);
    if (cols <= 0) return;
    bool issued = false;
    for (int r = wtid + 128 * cw; r < x.rows; r += 128 * kConsumers) {
        const long long out_row = GATED ? (long long)(x.m0 + r)
                                        : (long long)ld_shared_s32(meta + 4u * (unsigned)r);
        if (out_row < 0) continue;
        fm_bulk_store((fm_elem_t *)p.c + out_row * p.n + x.n_tile * kCols,
                      s_base + (unsigned)(r * kRow), (unsigned)cols * 2u);
        issued = true;
    }
    if (issued) {
        fm_tma_store_commit();
        fm_tma_store_wait_read<0>(); /* the shared memory goes with the CTA */
    }
}

template <bool GATED>
static __device__ __forceinline__ void consumer(const fm_moe_gemm_params &p, unsigned s_base,
                                                int m_tiles, int total) {
    const int cw = threadIdx.x / 128 - 1; /* weight rows 64cw..64cw+63 of each tile */
    const int wtid = threadIdx.x % 128;
    const int warp = wtid / 32, lane = wtid % 32;
    const int g = lane / 4, tq = lane % 4;
    const int odd = g & 1;
    const int k_tiles = p.k / kBK;
    rings rg;
    rg.a_desc0 = fm_wgmma_desc_sw128(s_base + (unsigned)(cw * 64 * kRowBytes), 16, 1024);
    rg.b_desc0 = fm_wgmma_desc_sw128(s_base + (unsigned)kOffX, 16, 1024);
    rg.bar = s_base + kBarW;

    const unsigned meta = s_base + (unsigned)(kMetaOffset + cw * kMetaBytes);

    float acc[kAccMax];
    int it = 0;
    for (int t = blockIdx.x; t < total; t += gridDim.x) {
        const tile x = tile_at(p, t, m_tiles);
        const int n = (x.rows + kStep - 1) / kStep * kStep;
        /* The CTA's last tile ends with the staged epilogue (gemm2 with fp32 atomics keeps the
         * register one). Uniform in the CTA. */
        const bool staged = (GATED ? FM_MOE_STAGED_GEMM1 != 0 : !p.atomic) &&
                            t + (int)gridDim.x >= total;
        int m_slot[kMetaPer];
        float m_w[kMetaPer];
        if (!GATED) {
#pragma unroll
            for (int j = 0; j < kMetaPer; ++j) {
                const int r = wtid + 128 * j;
                const bool real = r < x.rows;
                m_slot[j] = real ? p.sorted_slot[x.m0 + r] : -1;
                m_w[j] = real ? p.sorted_weight[x.m0 + r] : 0.f;
            }
        }
#pragma unroll
        for (int i = 0; i < kAccMax; ++i) acc[i] = 0.f;
        mainloop_n<kTN>(n, acc, rg, k_tiles, it, lane);
        if (!GATED) {
#pragma unroll
            for (int j = 0; j < kMetaPer; ++j) {
                const int r = wtid + 128 * j;
                if (r < kTN) {
                    st_shared_s32(meta + 4u * (unsigned)r, m_slot[j]);
                    st_shared_s32(meta + 4u * (unsigned)(kTN + r), __float_as_int(m_w[j]));
                }
            }
            if (!staged) fm_bar_sync(1 + cw, 128); /* this warpgroup's table is complete */
        }
        if (staged) {
            /* every consumer is past its last wgmma (the rings are free) and its table is done */
            fm_bar_sync(kBarStaging, 128 * kConsumers);
            epilogue_staged<GATED>(p, acc, s_base, meta, x, n, cw, wtid);
            continue;
        }

        if (GATED) {
            /* Column c of this warp's rows; the pair a thread stores starts at c - odd. */
            const int col = x.n_tile * (kWM / 2) + 32 * cw + 8 * warp + g - odd;
            fm_elem_t *C = (fm_elem_t *)p.c;
#pragma unroll
            for (int i = 0; i < kAccMax / 4; ++i) {
                if (8 * i >= n) break;
                float lo, hi;
                fm_moe::swap_pair(fm_moe::silu(acc[4 * i]) * acc[4 * i + 2],
                                  fm_moe::silu(acc[4 * i + 1]) * acc[4 * i + 3], odd, lo, hi);
                const int tok = 8 * i + 2 * tq + odd;
                if (tok < x.rows && col < p.n)
                    *(unsigned *)(C + (long long)(x.m0 + tok) * p.n + col) = fm_pack_elem2(lo, hi);
            }
        } else {
            const int col0 = x.n_tile * kWM + 64 * cw + 16 * warp + g - odd;
#pragma unroll
            for (int i = 0; i < kAccMax / 4; ++i) {
                if (8 * i >= n) break;
                const int tok = 8 * i + 2 * tq + odd;
                const int slot = ld_shared_s32(meta + 4u * (unsigned)tok);
                const float w = __int_as_float(ld_shared_s32(meta + 4u * (unsigned)(kTN + tok)));
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float lo, hi;
                    fm_moe::swap_pair(acc[4 * i + 2 * h], acc[4 * i + 2 * h + 1], odd, lo, hi);
                    lo *= w;
                    hi *= w;
                    const int col = col0 + 8 * h;
                    if (slot < 0 || col >= p.n) continue;
                    if (p.atomic)
                        fm_moe::red_add_f32x2((float *)p.c + (long long)(slot / p.topk) * p.n + col,
                                              lo, hi);
                    else
                        *(unsigned *)((fm_elem_t *)p.c + (long long)slot * p.n + col) =
                            fm_pack_elem2(lo, hi);
                }
            }
            fm_bar_sync(1 + cw, 128); /* everyone has read the table: the next tile may refill it */
        }
    }
}

template <bool GATED>
static __device__ __forceinline__ void gemm(const fm_tma_desc *tma_x, const fm_tma_desc *tma_w,
                                            const fm_moe_gemm_params &p,
                                            unsigned char *smem_raw) {
    const unsigned s_base = (fm_smem_u32(smem_raw) + 1023u) & ~1023u;
    if (threadIdx.x == 0) {
        if (!GATED) fm_tma_prefetch_desc(tma_x);
        fm_tma_prefetch_desc(tma_w);
        for (int s = 0; s < kWStages; ++s) {
            fm_mbar_init(s_base + kBarW + 8 * s, 1);                        /* expect_tx */
            fm_mbar_init(s_base + kBarW + 8 * (kWStages + s), 4 * kConsumers); /* per warp */
        }
        for (int s = 0; s < kXStages; ++s) {
            /* gemm1: one arrival per gathering thread; gemm2: the expect_tx. */
            fm_mbar_init(s_base + kBarX + 8 * s, GATED ? kGatherThreads : 1);
            fm_mbar_init(s_base + kBarX + 8 * (kXStages + s), 4 * kConsumers);
        }
        fm_mbar_init_fence();
    }
    __syncthreads();

    const int m_tiles = min(*p.num_tiles, p.m_tiles);
    const int total = m_tiles * p.n_tiles;
    fm_moe::split_roles<FM_PRODUCER_REGS, FM_CONSUMER_REGS>(
        [&] { producer<GATED>(tma_w, tma_x, p, s_base, m_tiles, total); },
        [&] { consumer<GATED>(p, s_base, m_tiles, total); });
}

} // namespace fm_moe_swap

#define FM_WSP_CONSUMERS FM_SWAP_CONSUMERS
namespace fm_moe_wsp = fm_moe_swap; /* the entry points in moe_gemm_sm90.cu */
