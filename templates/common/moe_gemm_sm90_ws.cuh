/*
 * moe_gemm_sm90_ws.cuh - the warp-specialised, persistent variant of the Hopper grouped GEMMs
 * (moe_gemm_sm90 with pipe = ws; included by templates/moe_gemm_sm90.cu when FM_MOE_WS = 1).
 * Same semantics, parameter block and outputs as the cp.async variant; different launch:
 *
 *   fm_moe_gemm1_sm90(const __grid_constant__ fm_tma_desc tma_a,   (unused by gemm1)
 *                     const __grid_constant__ fm_tma_desc tma_b,   w13 as 4-D (H, I, 2, E)
 *                     const fm_moe_gemm_params p)
 *   fm_moe_gemm2_sm90(tma_a = intermediate as 4-D (I, rows, 1, 1), tma_b = w2 as 4-D (I, H, E, 1), p)
 *   block 128 * (1 + BLOCK_M / 64) threads (a producer and BLOCK_M / 64 consumer warpgroups),
 *   grid = min(SMs, m_tiles * n_tiles) persistent CTAs, dynamic shared memory
 *   STAGES * (BLOCK_M + BLOCK_N) * 128 + 2048 bytes.
 * All boxes are 64 elements (128 bytes, the 128-byte swizzle span) wide; rows past the end of
 * a dimension come back as zeros (N tails: I or H not a multiple of the tile).
 *
 * Roles:
 *  - warpgroup 0, the producer, gives registers away (setmaxnreg.dec) and fills a ring of
 *    STAGES shared-memory stages [A BLOCK_M x 64 | B BLOCK_N x 64], each guarded by a full and an
 *    empty mbarrier. Thread 0 issues the weight tile with the copy engine (one 4-D box; for
 *    gemm1 the box spans both the gate and the up half, so the stage holds BLOCK_N/2 gate rows
 *    followed by the BLOCK_N/2 up rows of the same columns), and gemm2's A tile (contiguous
 *    rows of the intermediate). gemm1's A rows are gathered token rows, which no tiled tensor
 *    map can address: all 128 producer threads copy them with cp.async (16 bytes each,
 *    BLOCK_M / 16 per thread per stage; padding rows zero-filled). A thread keeps the token
 *    index of each of its rows (32-bit) rather than a pointer: the producer runs on 32 to 40
 *    registers.
 *  - warpgroups 1..BLOCK_M/64, the consumers, take 64 rows each of the tile and all BLOCK_N
 *    columns: 4 wgmma m64nNk16 per stage, one group in flight behind the one issued, then they
 *    release the previous stage (one arrival per consumer warp) and run the epilogue from
 *    registers (SwiGLU for gemm1; routing weight and slot row or fp32 atomics for gemm2).
 *    While the consumers run an epilogue the producer is already filling the next tile's
 *    stages. A CTA's last tile (every tile with one CTA per tile) instead stages its rows in
 *    the freed ring and copies each out in one bulk copy (epilogue_staged), and there a slab of
 *    at most 48 real rows runs with the operands swapped (the hybrid tile, mainloop_swapped).
 *    FM_MOE_STAGED_GEMM1 and FM_MOE_HYBRID (default on) switch these off for A/B builds.
 *  - BLOCK_M = 192 (three consumers) against 128: every stage brings (192 + 256) rows for
 *    2 * 192 * 256 * 64 FLOP, 110 FLOP per byte of L2 traffic instead of 85; at large T the
 *    two-consumer tile moves about 5.5 TB/s out of L2 (bench/NOTES.md, MoE v3), which is where
 *    an H100/H200 L2 tops out.
 *  - a consumer warpgroup whose 64 rows are all padding (an expert's last tile holding <= 64
 *    rows: padding rows are at the end of each expert's range, so its first row decides) issues no
 *    wgmma and writes nothing, only keeps the barrier protocol. At T = 4096 with 256 experts
 *    (~128 rows per expert) this removes about half of the padding work.
 *
 * cp.async and the tensor cores: cp.async writes through the generic proxy, wgmma reads
 * through the async proxy. A producer thread signals the full barrier of stage j only after
 * cp.async.wait_group has seen its copies of j land and it executed fence.proxy.async; the
 * mbarrier arrive (release) / consumer wait (acquire) then orders them before the wgmma. To keep
 * copies in flight the thread signals stage j while the copies of j+1 .. j+LAG are still
 * pending (LAG = STAGES - 2). No deadlock: before waiting on the empty barrier of stage j the
 * producer has signalled every stage up to j - 1 - LAG >= j - STAGES + 1, which includes the
 * stage j - STAGES the consumers must finish first.
 *
 * FM_WS_CLUSTER = 2 (one CTA per tile, group_m even): CTAs 2j and 2j+1 form a cluster and run
 * tiles 2j and 2j+1, which the raster order makes neighbouring M tiles of one N column. When
 * both exist and belong to the same expert (most pairs once an expert has several M tiles, as at
 * T = 16384) they need the same weight tile: each CTA copies half of every weight stage (gemm1:
 * the gate or the up rows; gemm2: the first or second BLOCK_N / 2 rows) with TMA multicast into
 * both CTAs' stages, so L2 serves each weight byte once per pair instead of twice (the 128x256
 * GEMMs move about 5.5 TB/s out of L2 at large T, where it tops out; bench/NOTES.md). Each
 * stage's full barrier still expects the whole stage, half of it from the peer; a stage is
 * refilled only once the consumers of both CTAs released it (each consumer warp arrives on
 * both CTAs' empty barriers). A pair that does not share (different experts or columns, or a
 * partner past the real tiles) loads both halves itself and arrives twice on its own barrier,
 * so the barrier counts are the same in both modes; both CTAs of a cluster decide the mode from
 * the same two tile indices.
 *
 * FM_WS_DYNAMIC = 1 (ws_grid = dynamic): a persistent grid whose CTAs take tiles in order from
 * a counter in global memory (zeroed by the host before each launch) instead of striding by
 * gridDim.x. Statically strided CTAs drift apart over their rounds, so the tiles in flight stop
 * being neighbours in the raster (which is what keeps a weight tile in L2 while all the M tiles
 * of its expert read it); taking them in order keeps the ~SM-count tiles in flight consecutive,
 * and unlike one CTA per tile the producer fills the next tile's stages while the consumers
 * run the previous tile's epilogue. Producer thread 0 takes each tile index and hands it on
 * through a two-slot ring in shared memory (tile_full / tile_empty mbarriers); the gathering
 * producer's other threads read it after a named barrier. A CTA stops at the first index past
 * the real tiles.
 *
 * Persistent order: tile t (of num_tiles * n_tiles, num_tiles read from the device) is
 * rasterised in groups of group_m M-tiles walking the N tiles together, M fastest. The ~132
 * CTAs in flight then cover a band of consecutive M-tiles (one or two per expert at T = 4096)
 * with every N tile, so each weight tile is read from HBM once and served from L2 to the
 * other M tile of its expert, and each gathered A tile is reused from L2 across N tiles.
 */
#pragma once

#if FM_BLOCK_M != 128 && FM_BLOCK_M != 192
#error "the warp-specialised MoE GEMM takes BLOCK_M = 128 or 192 (two or three consumer warpgroups of 64 rows)"
#endif
#define FM_WS_CONSUMERS (FM_BLOCK_M / 64)
#ifndef FM_WS_CLUSTER
#define FM_WS_CLUSTER 1
#endif
#ifndef FM_WS_DYNAMIC
#define FM_WS_DYNAMIC 0
#endif
#ifndef FM_PRODUCER_REGS
#if FM_WS_CONSUMERS == 2 && (FM_WS_CLUSTER > 1 || FM_WS_DYNAMIC)
/* the pair's mode and tile, or the tile ring, besides: 56 spilled 24 (8) bytes */
#define FM_PRODUCER_REGS 72
#elif FM_WS_CONSUMERS == 2
#define FM_PRODUCER_REGS 56 /* 40 spilled 56 bytes in gemm1's gather loop (ncu: 130M local requests) */
#else
#define FM_PRODUCER_REGS 32
#endif
#endif
#ifndef FM_CONSUMER_REGS
#if FM_WS_CONSUMERS == 2 && (FM_WS_CLUSTER > 1 || FM_WS_DYNAMIC)
#define FM_CONSUMER_REGS 216 /* 128 * (72 + 2 * 216) = 64512 */
#elif FM_WS_CONSUMERS == 2
#define FM_CONSUMER_REGS 224 /* 128 * (56 + 2 * 224) = 64512 <= 65536 */
#else
#define FM_CONSUMER_REGS 160 /* 128 * (32 + 3 * 160) = 65536: 128 accumulators + addressing */
#endif
#endif
#if FM_BLOCK_N != 128 && FM_BLOCK_N != 256
#error "the warp-specialised MoE GEMM takes BLOCK_N = 128 or 256"
#endif
#if FM_STAGES < 3
#error "the warp-specialised MoE GEMM needs at least 3 stages (cp.async lag STAGES - 2 >= 1)"
#endif
#if FM_PRODUCER_REGS < 24 || FM_PRODUCER_REGS % 8 != 0 || FM_CONSUMER_REGS > 256 || \
    FM_CONSUMER_REGS % 8 != 0
#error "setmaxnreg counts must be multiples of 8 in 24..256"
#endif
/* setmaxnreg moves registers within what the CTA was launched with: 384 threads start with
 * 168 each (64512), 512 threads with 128 (65536). A split asking for more blocks the consumers'
 * setmaxnreg.inc for ever (a 64 + 2 x 224 split hung). */
#define FM_WS_LAUNCH_REGS (128 * (1 + FM_WS_CONSUMERS) * ((65536 / (128 * (1 + FM_WS_CONSUMERS))) & ~7))
#if 128 * (FM_PRODUCER_REGS + FM_WS_CONSUMERS * FM_CONSUMER_REGS) > FM_WS_LAUNCH_REGS
#error "register split exceeds the registers the CTA is launched with"
#endif

#if FM_WS_CLUSTER != 1 && FM_WS_CLUSTER != 2
#error "FM_WS_CLUSTER is 1 or 2"
#endif
#if FM_WS_DYNAMIC && FM_WS_CLUSTER > 1
#error "FM_WS_DYNAMIC takes one CTA per cluster (a pair runs one tile each)"
#endif

namespace fm_moe_ws {

/* Volatile: the point is that the value is not kept in a register across the k loop. */
static __device__ __forceinline__ void fm_st_shared_s32(unsigned addr, int v) {
    asm volatile("st.shared.s32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
static __device__ __forceinline__ void fm_st_shared_u32(unsigned addr, unsigned v) {
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
static __device__ __forceinline__ int fm_ld_shared_s32(unsigned addr) {
    int v;
    asm volatile("ld.shared.s32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
    return v;
}

constexpr int kBM = FM_BLOCK_M, kBN = FM_BLOCK_N, kBK = 64;
constexpr int kConsumers = FM_WS_CONSUMERS;
constexpr int kStages = FM_STAGES;
constexpr int kLag = kStages - 2;
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kRowBytes = kBK * 2;            /* 128 */
constexpr int kABytes = kBM * kRowBytes;      /* 16 or 24 KB */
constexpr int kBBytes = kBN * kRowBytes;      /* 16 or 32 KB */
/* ws_tail = merge (FM_WS_MERGE = the merged slab's most real rows, see merge_rows): each stage
 * also holds a third slab of up to 64 token rows (X, behind the weights), and gemm2's
 * intermediate rows come in boxes of 64. */
#ifndef FM_WS_MERGE
#define FM_WS_MERGE 0
#endif
constexpr bool kMerge = FM_WS_MERGE != 0;
constexpr int kXBytes = kMerge ? 64 * kRowBytes : 0;
constexpr int kABox = kMerge ? 64 : kBM;      /* rows of gemm2's intermediate box */
constexpr int kStageBytes = kABytes + kBBytes + kXBytes;
constexpr int kBarOffset = kStages * kStageBytes; /* full[S] then empty[S], 8 bytes each */
constexpr int kAcc = kBN / 2;
/* A 512-thread CTA compiles under 128 registers per thread, too few for one m64n256 wgmma
 * (128 accumulators + operands in one instruction: ptxas C7602); three consumers issue each
 * k16 step as two m64n128 halves instead (each reads the A fragment again: 12 KB of shared
 * memory per warpgroup and k16 step instead of 10). */
constexpr int kSplitN = (kConsumers == 3 && kBN == 256) ? 2 : 1;
constexpr int kGatherIters = kBM * 8 / 128;   /* 16-byte chunks per producer thread: 8 or 12 */
static_assert(kStageBytes % 1024 == 0 && kABytes % 1024 == 0, "1024-byte swizzle atoms");
static_assert(kBarOffset + 16 * kStages <= kStages * kStageBytes + 1024, "barriers fit the slack");
/* Three consumers leave the producer 32 registers, too few to keep its rows' token indices
 * live through the k loop: each thread parks them in shared memory ([j][thread], conflict-free),
 * behind the barriers: 128 * 12 * 4 = 6 KB (generator/moe_gemm_sm90.lua counts it). */
constexpr bool kTokInSmem = kConsumers == 3;
constexpr int kTokOffset = kStages * kStageBytes + 1024;
constexpr int kCluster = FM_WS_CLUSTER;
constexpr bool kDynamic = FM_WS_DYNAMIC != 0;
/* FM_WS_DYNAMIC: tile_full[2], tile_empty[2] (mbarriers), then slot[2] (tile indices), in the
 * slack behind the stage barriers. */
constexpr int kTileRing = kBarOffset + 128;
static_assert(kTileRing + 40 <= kStages * kStageBytes + 1024, "the tile ring fits the slack");
constexpr unsigned kBarProducer = 8; /* named barrier of the gathering producer warpgroup */
constexpr unsigned kBarStaging = 9;  /* named barrier of the consumers before a staged epilogue */
/* Staged epilogue (a CTA's last tile, see epilogue_staged): each consumer warpgroup's 64 output
 * rows in the ring, rows padded by 16 bytes. */
constexpr int kOutCols1 = kBN / 2, kOutCols2 = kBN; /* output columns of a gemm1 / gemm2 tile */
constexpr int kStagingRow1 = kOutCols1 * 2 + 16, kStagingRow2 = kOutCols2 * 2 + 16; /* bytes */
/* Hybrid tile (FM_MOE_HYBRID): a warpgroup whose 64-row slab holds at most kHybridMax real rows
 * (an expert's last, partial slab) runs it with the operands swapped; see mainloop_swapped. */
#ifndef FM_MOE_HYBRID
#define FM_MOE_HYBRID 1
#endif
constexpr bool kHybrid = FM_MOE_HYBRID != 0;
constexpr int kHybridMax = 48;
/* Rows of a merged slab (merge_rows), set by the generator (generator/moe_gemm_sm90.lua,
 * merge_rows), which gives the host the same number for the alignment. */
constexpr int kMergeMax = kMerge ? FM_WS_MERGE : kHybridMax;
constexpr int kXIters = kMergeMax * 8 / 128; /* a merged slab's 16-byte chunks per producer thread */
/* A swapped slab's N: its real rows rounded up to a multiple of this (the wgmma N granularity is
 * 8). FM_MOE_SLAB_STEP = 16 gives the coarser steps of the first version (A/B builds). */
#ifndef FM_MOE_SLAB_STEP
#define FM_MOE_SLAB_STEP 8
#endif
constexpr int kSlabStep = FM_MOE_SLAB_STEP;
static_assert(kSlabStep == 8 || kSlabStep == 16, "swapped slab widths step by 8 or 16");
static_assert(kMergeMax % kSlabStep == 0 && kMergeMax <= 64, "a merged slab fits X in whole steps");

template <int V> struct fm_width {
    static constexpr int value = V;
};
/* f(fm_width<N>{}) for the N among W, W + kSlabStep, .., MAX equal to n (n > MAX - kSlabStep:
 * MAX), each N its own instantiation: a run-time width picks a compile-time one. */
template <int W, int MAX, class F>
static __device__ __forceinline__ void with_width(int n, const F &f) {
    if constexpr (W >= MAX) {
        f(fm_width<MAX>{});
    } else {
        if (n <= W)
            f(fm_width<W>{});
        else
            with_width<W + kSlabStep, MAX>(n, f);
    }
}
constexpr int kWBlocks = kBN / 64;          /* 64-row blocks of the weight stage */
constexpr unsigned kWBlockDesc = (64 * kRowBytes) >> 4; /* one such block, descriptor units */
constexpr unsigned kBarHybrid = 10;         /* + cw: one consumer warpgroup's staged rows */
constexpr unsigned kBarMerge = 13;          /* both consumers' staged rows of a merged slab */
#if FM_WS_MERGE
#if FM_BLOCK_M != 128 || FM_BLOCK_N != 256 || FM_WS_DYNAMIC
#error "FM_WS_MERGE takes the 128 x 256 tile, one CTA per tile"
#endif
#if !FM_MOE_HYBRID || !FM_MOE_STAGED_GEMM1
#error "FM_WS_MERGE needs the staged epilogue and the hybrid tile"
#endif
#endif
static_assert((kConsumers * 64 + (kMerge ? kMergeMax : 0)) * kStagingRow2 <=
                  kStages * kStageBytes,
              "the staged epilogue fits the ring");

/* ws_tail = merge: an expert whose last tile holds at most kMergeMax real rows (129..176
 * tokens in an expert's last two tiles, about half of DeepSeek-V3's experts at T = 4096) runs
 * them as a third, swapped slab of the tile before it, sharing that tile's weight stages: each
 * consumer adds N = 8..48 columns of products for two of the stage's four 64-row weight blocks
 * (gemm1: the gate and the up rows of its 64 output columns). Otherwise that last tile streams
 * the expert's whole weight tile a second time for a few rows: uniform routing (no such tile)
 * ran at 0.80x of the random-routing time (bench/NOTES.md, ninth session). The alignment
 * (merge_max = kMergeMax: the host passes the generator's launch fact merge_rows, the number
 * FM_WS_MERGE carries) leaves such tiles out of the tile list, so no CTA is spent on them;
 * listed tile i starts at padded row tile_row0[i]. Returns, for listed tile m_tile starting at
 * row m0, the merged slab's N (0: none) and its real rows. */
static __device__ __forceinline__ int merge_rows(const fm_moe_gemm_params &p, int m_tile, int m0,
                                                 int &xreal) {
    const int e = p.tile_expert[m_tile];
    const int r = p.expert_offsets[e] + p.expert_counts[e] - m0;
    xreal = r - kBM;
    return (r > kBM && r <= kBM + kMergeMax) ? (r - kBM + kSlabStep - 1) / kSlabStep * kSlabStep
                                              : 0;
}

/* First padded row of listed M tile m_tile (see merge_rows). */
static __device__ __forceinline__ int tile_row(const fm_moe_gemm_params &p, int m_tile) {
    return kMerge ? p.tile_row0[m_tile] : m_tile * kBM;
}

/* Tile t's M and N tile. With merge and one raster group per expert, the expert's listed tiles
 * are expert_tiles[e] .. expert_tiles[e + 1] - 1 (not its padded rows / BLOCK_M). */
static __device__ __forceinline__ void tile_at(int t, int m_tiles, const fm_moe_gemm_params &p,
                                               int &m_tile, int &n_tile) {
    if (kMerge && p.group_m == 0) {
        const int e = p.tile_expert[t / p.n_tiles];
        const int first = p.expert_tiles[e];
        const int rows = p.expert_tiles[e + 1] - first;
        const int local = t - first * p.n_tiles;
        m_tile = first + local % rows;
        n_tile = local / rows;
    } else {
        fm_moe::tile_coords(t, m_tiles, kBM, p, m_tile, n_tile);
    }
}

/* Dynamic schedule, producer side: thread 0 takes the next tile index once the consumers have
 * read the slot's previous one, publishes it; with `all` the warpgroup's other threads read it
 * after a named barrier. Use i of the ring: i-th tile of this CTA. */
static __device__ __forceinline__ int fetch_tile(const fm_moe_gemm_params &p, unsigned s_base,
                                                 int i, int tid, bool all) {
    const unsigned ring = s_base + (unsigned)kTileRing;
    const unsigned full = ring + 8u * (unsigned)(i & 1), empty = ring + 16u + 8u * (unsigned)(i & 1);
    const unsigned slot = ring + 32u + 4u * (unsigned)(i & 1);
    if (tid == 0) {
        fm_mbar_wait(empty, ((unsigned)(i >> 1) & 1u) ^ 1u);
        fm_st_shared_s32(slot, atomicAdd(p.tile_counter, 1));
        fm_mbar_arrive(full);
    }
    if (all) fm_bar_sync(kBarProducer, 128);
    return fm_ld_shared_s32(slot);
}

/* Dynamic schedule, consumer side: this CTA's i-th tile index (one arrival per warp once read). */
static __device__ __forceinline__ int take_tile(unsigned s_base, int i, int lane) {
    const unsigned ring = s_base + (unsigned)kTileRing;
    fm_mbar_wait(ring + 8u * (unsigned)(i & 1), (unsigned)(i >> 1) & 1u);
    const int t = fm_ld_shared_s32(ring + 32u + 4u * (unsigned)(i & 1));
    __syncwarp();
    if (lane == 0) fm_mbar_arrive(ring + 16u + 8u * (unsigned)(i & 1));
    return t;
}

/* Does this CTA's tile share its weight tile with the other CTA of its cluster (see the
 * header)? Both CTAs compute the same answer. Also gives this CTA's own tile (with clusters
 * every CTA has one tile at most), so that the roles need not compute it again: with the
 * per-expert raster the gathering producer (56 registers) spilled doing so. */
static __device__ __forceinline__ bool pair_shares(const fm_moe_gemm_params &p, int m_tiles,
                                                   int total, int &m_own, int &n_own) {
    const int t0 = (int)blockIdx.x & ~1, t1 = t0 + 1;
    int m0 = 0, n0 = 0, m1 = 0, n1 = 0;
    if (t0 < total) tile_at(t0, m_tiles, p, m0, n0);
    if (t1 < total) tile_at(t1, m_tiles, p, m1, n1);
    m_own = (blockIdx.x & 1) ? m1 : m0;
    n_own = (blockIdx.x & 1) ? n1 : n0;
    return t1 < total && n0 == n1 && p.tile_expert[m0] == p.tile_expert[m1];
}

/* Tile t's M and N tile; with clusters the one pair_shares gave (t is this CTA's only tile). */
static __device__ __forceinline__ void coords(const fm_moe_gemm_params &p, int t, int m_tiles,
                                              int m_own, int n_own, int &m_tile, int &n_tile) {
    if (kCluster > 1) {
        m_tile = m_own;
        n_tile = n_own;
    } else {
        tile_at(t, m_tiles, p, m_tile, n_tile);
    }
}

/* A consumer warp's release of stage barrier `bar` (lane 0): on both CTAs' barriers when the
 * pair shares its weight stages, else twice on its own (the counts are set for two). */
static __device__ __forceinline__ void release(unsigned bar, bool shared) {
    if (kCluster == 1) {
        fm_mbar_arrive(bar);
    } else if (shared) {
        fm_mbar_arrive_cluster(fm_cluster_map(bar, 0));
        fm_mbar_arrive_cluster(fm_cluster_map(bar, 1));
    } else {
        fm_mbar_arrive(bar);
        fm_mbar_arrive(bar);
    }
}

template <bool GATHER>
static __device__ __forceinline__ void producer(const fm_tma_desc *tma_a, const fm_tma_desc *tma_b,
                                                const fm_moe_gemm_params &p, unsigned s_base,
                                                int m_tiles, int total, bool shared, int m_own,
                                                int n_own) {
    const int tid = threadIdx.x; /* 0..127 */
    const int rank = kCluster == 1 ? 0 : (int)(blockIdx.x & 1);
    if (!GATHER && tid != 0) return;
    const unsigned bar_full = s_base + kBarOffset, bar_empty = bar_full + 8 * kStages;
    const int k_tiles = p.k / kBK;
    const int ccol = tid % 8, rbase = tid / 8; /* rows rbase + 16 j */
    const fm_elem_t *A = (const fm_elem_t *)p.a;
    constexpr unsigned kTmaBytes = GATHER ? kBBytes : kABytes + kBBytes;

    int it = 0;       /* k-tiles issued by this CTA, over all its tiles */
    int signaled = 0; /* GATHER: k-tiles whose full barrier this thread has arrived on */
    for (int i = 0, t = (int)blockIdx.x;; ++i, t += kDynamic ? 0 : (int)gridDim.x) {
        if constexpr (kDynamic) t = fetch_tile(p, s_base, i, tid, GATHER);
        if (t >= total) break;
        int m_tile, n_tile;
        coords(p, t, m_tiles, m_own, n_own, m_tile, n_tile);
        const int expert = p.tile_expert[m_tile];
        const int m0 = tile_row(p, m_tile);
        int xreal = 0;
        const int hx = kMerge ? merge_rows(p, m_tile, m0, xreal) : 0; /* rows of the merged slab */

        /* Token of each of this thread's rows, -1 for padding (tok_x: the merged slab's). */
        int tok[kGatherIters];
        int tok_x[kMerge ? kXIters : 1];
        if (GATHER) {
#pragma unroll
            for (int j = 0; j < kGatherIters; ++j) {
                const int slot = p.sorted_slot[m0 + rbase + 16 * j];
                tok[j] = slot >= 0 ? slot / p.topk : -1;
                if constexpr (kTokInSmem)
                    fm_st_shared_s32(s_base + (unsigned)(kTokOffset + 4 * (128 * j + tid)), tok[j]);
            }
            if constexpr (kMerge) {
#pragma unroll
                for (int j = 0; j < kXIters; ++j) {
                    const int slot = 16 * j < hx ? p.sorted_slot[m0 + kBM + rbase + 16 * j] : -1;
                    tok_x[j] = slot >= 0 ? slot / p.topk : -1;
                }
            }
        }
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
            const int s = it % kStages;
            const unsigned ph = (unsigned)(it / kStages) & 1u;
            const unsigned sA = s_base + (unsigned)(s * kStageBytes), sB = sA + kABytes;
            /* The consumers have finished reading this stage's previous contents. */
            fm_mbar_wait(bar_empty + 8 * s, ph ^ 1u);
            if (tid == 0) {
                fm_mbar_arrive_expect_tx(bar_full + 8 * s,
                                         kTmaBytes + (!GATHER && hx > 0 ? kXBytes : 0));
                if (kCluster == 1) {
                    if (GATHER) /* w13 (H, I, 2, E): gate and up rows of columns n0.. */
                        fm_tma_load_4d(sB, tma_b, bar_full + 8 * s, kt * kBK, n_tile * (kBN / 2),
                                       0, expert);
                    else /* w2 (I, H, E, 1) */
                        fm_tma_load_4d(sB, tma_b, bar_full + 8 * s, kt * kBK, n_tile * kBN,
                                       expert, 0);
                } else {
                    /* Boxes of half a weight stage (BLOCK_N / 2 rows, 1024-byte aligned: the
                     * swizzle pattern is the full box's): gemm1's half h is the gate (h = 0) or
                     * up (h = 1) rows of the tile's columns, gemm2's the h-th half of its rows. */
                    for (int h = 0; h < 2; ++h) {
                        if (shared && h != rank) continue; /* the peer copies that half */
                        const unsigned dst = sB + (unsigned)(h * (kBBytes / 2));
                        const int c1 = GATHER ? n_tile * (kBN / 2) : n_tile * kBN + h * (kBN / 2);
                        const int c2 = GATHER ? h : expert, c3 = GATHER ? expert : 0;
                        if (shared)
                            fm_tma_load_4d_mc(dst, tma_b, bar_full + 8 * s, kt * kBK, c1, c2, c3,
                                              (unsigned short)3);
                        else
                            fm_tma_load_4d(dst, tma_b, bar_full + 8 * s, kt * kBK, c1, c2, c3);
                    }
                }
                if (!GATHER) { /* intermediate (I, rows, 1, 1), boxes of kABox rows */
#pragma unroll
                    for (int b = 0; b < kBM / kABox; ++b)
                        fm_tma_load_4d(sA + (unsigned)(b * kABox * kRowBytes), tma_a,
                                       bar_full + 8 * s, kt * kBK, m0 + b * kABox, 0, 0);
                    if (kMerge && hx > 0) /* the merged slab: 64 rows, the first hx used */
                        fm_tma_load_4d(sB + (unsigned)kBBytes, tma_a, bar_full + 8 * s, kt * kBK,
                                       m0 + kBM, 0, 0);
                }
            }
            if (GATHER) {
                const fm_elem_t *col = A + kt * kBK + ccol * 8;
#pragma unroll
                for (int j = 0; j < kGatherIters; ++j) {
                    if constexpr (kTokInSmem)
                        tok[j] = fm_ld_shared_s32(s_base + (unsigned)(kTokOffset + 4 * (128 * j + tid)));
                    const bool v = tok[j] >= 0;
                    fm_cp_async_16(sA + fm_moe::swz<kBK>(rbase + 16 * j, ccol),
                                   v ? col + (long long)tok[j] * p.k : col, v ? 16 : 0);
                }
                if constexpr (kMerge) {
#pragma unroll
                    for (int j = 0; j < kXIters; ++j) {
                        if (16 * j >= hx) break; /* rows past N are not read */
                        const bool v = tok_x[j] >= 0;
                        fm_cp_async_16(sB + (unsigned)kBBytes + fm_moe::swz<kBK>(rbase + 16 * j, ccol),
                                       v ? col + (long long)tok_x[j] * p.k : col, v ? 16 : 0);
                    }
                }
                fm_cp_async_commit();
                if (it + 1 - signaled > kLag) {
                    /* k-tile `signaled` is the oldest pending group: wait for it, publish it. */
                    fm_cp_async_wait<kLag>();
                    fm_fence_proxy_async();
                    fm_mbar_arrive(bar_full + 8 * (signaled % kStages));
                    ++signaled;
                }
            }
        }
    }
    if (GATHER) {
        fm_cp_async_wait<0>();
        fm_fence_proxy_async();
        for (; signaled < it; ++signaled) fm_mbar_arrive(bar_full + 8 * (signaled % kStages));
    }
}

/* Epilogue through shared memory, for a CTA's last tile (its producer copies nothing more, and
 * the consumers have all waited for their last wgmma at the kBarStaging barrier, so the ring is
 * free). The register epilogue (fm_moe_wgmma_epilogue) stores 4 bytes per thread per
 * instruction: the 8 rows of a warp's instruction are 8 lines, so a 128 x 256 gemm2 tile takes
 * 4096 store requests, next to about 32 k steps of products. Here each warp writes its 16 rows
 * into shared memory (rows 16 bytes longer than the data, so the 8 rows of one instruction fall
 * on distinct banks), then each row leaves as one bulk copy by the copy engine: gemm1 to its
 * padded row of the intermediate, gemm2 (scaled by the routing weight) to its slot's row, padding
 * rows skipped. Same values as the register epilogue. */
template <bool GATED>
static __device__ __forceinline__ void epilogue_staged(const fm_moe_gemm_params &p,
                                                       const float (&acc)[kAcc], unsigned stage,
                                                       int row0, int n_out0, int warp, int lane) {
    constexpr int kRow = GATED ? kStagingRow1 : kStagingRow2;
    const int g = lane / 4, tq = lane % 4;
    const unsigned sw = stage + (unsigned)(warp * 16 * kRow);
    int slot[2] = {0, 0};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const unsigned srow = sw + (unsigned)((g + 8 * h) * kRow + 4 * tq);
        if (GATED) {
#pragma unroll
            for (int i = 0; i < kBN / 16; ++i) {
                const int gi = 4 * i + 2 * h, ui = 4 * (i + kBN / 16) + 2 * h;
                fm_st_shared_u32(srow + (unsigned)(16 * i),
                                 fm_pack_elem2(fm_moe::silu(acc[gi]) * acc[ui],
                                               fm_moe::silu(acc[gi + 1]) * acc[ui + 1]));
            }
        } else {
            slot[h] = p.sorted_slot[row0 + warp * 16 + g + 8 * h];
            const float w = slot[h] >= 0 ? p.slot_weight[slot[h]] : 0.f;
#pragma unroll
            for (int i = 0; i < kBN / 8; ++i)
                fm_st_shared_u32(srow + (unsigned)(16 * i),
                                 fm_pack_elem2(w * acc[4 * i + 2 * h], w * acc[4 * i + 2 * h + 1]));
        }
    }
    fm_fence_proxy_async(); /* the copy engine reads what the generic proxy wrote */
    __syncwarp();
    /* lane r < 16 copies the warp's row r, written by lanes 4 (r % 8) .. (h = r / 8) */
    const int s0 = __shfl_sync(0xffffffffu, slot[0], 4 * (lane & 7));
    const int s1 = __shfl_sync(0xffffffffu, slot[1], 4 * (lane & 7));
    const int cols = min(GATED ? kOutCols1 : kOutCols2, p.n - n_out0);
    if (lane < 16 && cols > 0) {
        const long long out_row = GATED ? (long long)(row0 + warp * 16 + lane)
                                        : (long long)((lane & 8) ? s1 : s0);
        if (out_row >= 0) {
            fm_bulk_store((fm_elem_t *)p.c + out_row * p.n + n_out0, sw + (unsigned)(lane * kRow),
                          (unsigned)cols * 2u);
            fm_tma_store_commit();
            fm_tma_store_wait_read<0>(); /* the shared memory goes with the CTA */
        }
    }
}

/* The k loop of a tile: per k step, wait for the stage and issue its products (issue(ad, bd)
 * with the stage's descriptors of this warpgroup's token rows and of the weights), one group
 * in flight behind the one issued; the previous step's stage is released once its group is done
 * in this warp, the last one after the final wait. The caller fences its accumulators
 * afterwards. */
template <class Issue>
static __device__ __forceinline__ void kloop(const Issue &issue, unsigned long long a_desc0,
                                             unsigned long long b_desc0, unsigned bar_full,
                                             unsigned bar_empty, int k_tiles, int &it, int lane,
                                             bool shared) {
    constexpr unsigned kStageDesc = kStageBytes >> 4;
    int prev_s = 0;
    for (int kt = 0; kt < k_tiles; ++kt, ++it) {
        const int s = it % kStages;
        fm_mbar_wait(bar_full + 8 * s, (unsigned)(it / kStages) & 1u);
        fm_wgmma_fence();
        issue(a_desc0 + (unsigned long long)(s * kStageDesc),
              b_desc0 + (unsigned long long)(s * kStageDesc));
        fm_wgmma_commit();
        fm_wgmma_wait<1>();
        if (kt > 0 && lane == 0) release(bar_empty + 8 * prev_s, shared);
        prev_s = s;
    }
    fm_wgmma_wait<0>();
    if (lane == 0) release(bar_empty + 8 * prev_s, shared);
}

/* A tile with the tokens on the wgmma M side: per k step 4 m64nBNk16 (A = this warpgroup's 64
 * token rows, B = the weight stage). */
static __device__ __forceinline__ void issue_k16(float (&acc)[kAcc], unsigned long long ad,
                                                 unsigned long long bd, int ks) {
    if constexpr (kSplitN == 1) {
        fm_wgmma<kBN>::template ss<FM_DTYPE_BF16, 0>(acc, ad + (unsigned)(2 * ks),
                                                     bd + (unsigned)(2 * ks), 1);
    } else {
        /* two n128 halves: columns 0..127 are acc[0..63], 128..255 acc[64..127]; the second
         * half's B rows start 128 rows (1024 descriptor units) on */
        float(&lo)[kAcc / 2] = *reinterpret_cast<float(*)[kAcc / 2]>(&acc[0]);
        float(&hi)[kAcc / 2] = *reinterpret_cast<float(*)[kAcc / 2]>(&acc[kAcc / 2]);
        fm_wgmma<kBN / 2>::template ss<FM_DTYPE_BF16, 0>(lo, ad + (unsigned)(2 * ks),
                                                         bd + (unsigned)(2 * ks), 1);
        fm_wgmma<kBN / 2>::template ss<FM_DTYPE_BF16, 0>(
            hi, ad + (unsigned)(2 * ks), bd + (unsigned)(2 * ks + kBN / 2 * 8), 1);
    }
}

static __device__ __forceinline__ void mainloop(float (&acc)[kAcc], unsigned long long a_desc0,
                                                unsigned long long b_desc0, unsigned bar_full,
                                                unsigned bar_empty, int k_tiles, int &it,
                                                int lane, bool shared) {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;
    kloop(
        [&](unsigned long long ad, unsigned long long bd) {
#pragma unroll
            for (int ks = 0; ks < kBK / 16; ++ks) issue_k16(acc, ad, bd, ks);
        },
        a_desc0, b_desc0, bar_full, bar_empty, k_tiles, it, lane, shared);
    fm_fence_regs(acc);
}

/* The same stages with the operands swapped, for a slab of at most N (16, 32 or 48) real token
 * rows: weights on the M side (kWBlocks m64 blocks of the weight stage as A), the slab's first N
 * token rows as B (N columns). Tokens on M pad the slab to 64 rows of products; here it costs
 * N/64 of the multiply-adds (the stages are the same: the weight stage and the token slab are
 * both K-major 128-byte-swizzled rows, valid as either operand). Block b of the weights
 * accumulates into acc[b * N/2 ..]: d[4i + r] = weight row 64b + 16w + g + 8(r/2), token
 * 8i + 2tq + r%2. */
template <int N>
static __device__ __forceinline__ void mainloop_swapped(float (&acc)[kWBlocks * N / 2],
                                                        unsigned long long a_desc0,
                                                        unsigned long long b_desc0,
                                                        unsigned bar_full, unsigned bar_empty,
                                                        int k_tiles, int &it, int lane,
                                                        bool shared) {
#pragma unroll
    for (int i = 0; i < kWBlocks * N / 2; ++i) acc[i] = 0.f;
    kloop(
        [&](unsigned long long ad, unsigned long long bd) {
#pragma unroll
            for (int ks = 0; ks < kBK / 16; ++ks) {
#pragma unroll
                for (int b = 0; b < kWBlocks; ++b) {
                    float(&d)[N / 2] = *reinterpret_cast<float(*)[N / 2]>(&acc[b * (N / 2)]);
                    fm_wgmma<N>::template ss<FM_DTYPE_BF16, 0>(
                        d, bd + (unsigned)(b * kWBlockDesc + 2 * ks), ad + (unsigned)(2 * ks), 1);
                }
            }
        },
        a_desc0, b_desc0, bar_full, bar_empty, k_tiles, it, lane, shared);
    fm_fence_regs(acc);
}

/* Staged epilogue of a swapped slab (the CTA's last tile; called after kBarStaging): the values
 * are those of epilogue_staged, transposed: a thread holds weight rows (output columns) g, g+8
 * of its warp's 16 per block for tokens 8i + 2tq + {0, 1}; neighbours g and g^1 swap one value so
 * that each writes two adjacent columns of one token (as pipe = swap does). The token rows span
 * the warpgroup's four warps, so it meets at a named barrier before the per-row bulk copies. */
template <bool GATED, int N, int NB = kWBlocks>
static __device__ __forceinline__ void epilogue_swapped(const fm_moe_gemm_params &p,
                                                        const float (&acc)[NB * N / 2],
                                                        unsigned stage,
                                                        int row0, int rows, int n_out0, int cw,
                                                        int wtid) {
    constexpr int kRow = GATED ? kStagingRow1 : kStagingRow2;
    constexpr int kOut = GATED ? NB / 2 : NB; /* blocks of output columns */
    const int warp = wtid / 32, lane = wtid % 32;
    const int g = lane / 4, tq = lane % 4, odd = g & 1;
    float wt[N / 8];
#pragma unroll
    for (int i = 0; i < N / 8; ++i) {
        wt[i] = 1.f;
        if (!GATED) {
            const int tok = 8 * i + 2 * tq + odd;
            const int slot = tok < rows ? p.sorted_slot[row0 + tok] : -1;
            wt[i] = slot >= 0 ? p.slot_weight[slot] : 0.f;
        }
    }
#pragma unroll
    for (int b = 0; b < kOut; ++b) {
#pragma unroll
        for (int i = 0; i < N / 8; ++i) {
            const int tok = 8 * i + 2 * tq + odd;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int j = b * (N / 2) + 4 * i + 2 * h;
                float v0, v1; /* tokens 8i + 2tq and + 1, weight row g + 8h */
                if (GATED) {
                    const int u = j + (NB / 2) * (N / 2); /* the up rows of the columns */
                    v0 = fm_moe::silu(acc[j]) * acc[u];
                    v1 = fm_moe::silu(acc[j + 1]) * acc[u + 1];
                } else {
                    v0 = acc[j];
                    v1 = acc[j + 1];
                }
                float lo, hi;
                fm_moe::swap_pair(v0, v1, odd, lo, hi);
                /* NB = 2 (a merged slab): blocks cw and cw + 2 of the weight stage */
                const int wb = NB == kWBlocks ? b : cw + 2 * b;
                const int col = 64 * wb + 16 * warp + 8 * h + g - odd;
                fm_st_shared_u32(stage + (unsigned)(tok * kRow + 2 * col),
                                 fm_pack_elem2(wt[i] * lo, wt[i] * hi));
            }
        }
    }
    fm_fence_proxy_async();
    /* a merged slab's rows hold both consumers' columns: the first one copies them out */
    if (NB == kWBlocks)
        fm_bar_sync(kBarHybrid + (unsigned)cw, 128);
    else
        fm_bar_sync(kBarMerge, 128 * kConsumers);
    const int cols = min(GATED ? kOutCols1 : kOutCols2, p.n - n_out0);
    if (wtid < rows && cols > 0 && (NB == kWBlocks || cw == 0)) {
        const long long out_row =
            GATED ? (long long)(row0 + wtid) : (long long)p.sorted_slot[row0 + wtid];
        if (out_row >= 0) {
            fm_bulk_store((fm_elem_t *)p.c + out_row * p.n + n_out0,
                          stage + (unsigned)(wtid * kRow), (unsigned)cols * 2u);
            fm_tma_store_commit();
            fm_tma_store_wait_read<0>(); /* the shared memory goes with the CTA */
        }
    }
}

/* One swapped slab end to end, with its own accumulators: a path that shares no accumulator
 * registers with the m64nBN one (sharing them, ptxas serialised every wgmma: C7511). */
template <bool GATED, int N>
static __device__ __forceinline__ void slab_swapped(const fm_moe_gemm_params &p,
                                                    unsigned long long a_desc0,
                                                    unsigned long long b_desc0, unsigned bar_full,
                                                    unsigned bar_empty, int k_tiles, int &it,
                                                    bool shared, unsigned stage, int row0,
                                                    int rows, int n_out0, int cw, int wtid) {
    float d[kWBlocks * N / 2];
    mainloop_swapped<N>(d, a_desc0, b_desc0, bar_full, bar_empty, k_tiles, it, wtid % 32, shared);
    fm_bar_sync(kBarStaging, 128 * kConsumers); /* every consumer is past its last wgmma */
    epilogue_swapped<GATED, N>(p, d, stage, row0, rows, n_out0, cw, wtid);
}

/* A tile with a merged slab (ws_tail = merge, see merge_rows): this warpgroup's 64 rows as in
 * mainloop plus, per k16 step, two m64nNk16 products of the weight blocks cw and cw + 2 (gemm1:
 * the gate and up rows of output columns 64cw..64cw+63) with the merged slab's first N rows (X,
 * behind the weight stage) as B; both epilogues staged. */
template <bool GATED, int N>
static __device__ __forceinline__ void tile_merged(const fm_moe_gemm_params &p,
                                                   unsigned long long a_desc0,
                                                   unsigned long long b_desc0, unsigned bar_full,
                                                   unsigned bar_empty, int k_tiles, int &it,
                                                   bool shared, unsigned s_base, int m0,
                                                   int xreal, int n_out0, int cw, int wtid) {
    constexpr unsigned kXDesc = kBBytes >> 4;
    constexpr int kRow = GATED ? kStagingRow1 : kStagingRow2;
    const int warp = wtid / 32, lane = wtid % 32;
    float acc[kAcc];
    float d[N]; /* weight block cw in d[0 .. N/2), block cw + 2 in d[N/2 .. N) */
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) d[i] = 0.f;
    kloop(
        [&](unsigned long long ad, unsigned long long bd) {
#pragma unroll
            for (int ks = 0; ks < kBK / 16; ++ks) {
                issue_k16(acc, ad, bd, ks);
#pragma unroll
                for (int b = 0; b < 2; ++b) {
                    float(&db)[N / 2] = *reinterpret_cast<float(*)[N / 2]>(&d[b * (N / 2)]);
                    fm_wgmma<N>::template ss<FM_DTYPE_BF16, 0>(
                        db, bd + (unsigned)((cw + 2 * b) * kWBlockDesc + 2 * ks),
                        bd + (unsigned)(kXDesc + 2 * ks), 1);
                }
            }
        },
        a_desc0, b_desc0, bar_full, bar_empty, k_tiles, it, lane, shared);
    fm_fence_regs(acc);
    fm_fence_regs(d);
    fm_bar_sync(kBarStaging, 128 * kConsumers); /* every consumer is past its last wgmma */
    epilogue_staged<GATED>(p, acc, s_base + (unsigned)(cw * 64 * kRow), m0 + cw * 64, n_out0,
                           warp, lane);
    epilogue_swapped<GATED, N, 2>(p, d, s_base + (unsigned)(kConsumers * 64 * kRow), m0 + kBM,
                                  xreal, n_out0, cw, wtid);
}

template <bool GATED>
static __device__ __forceinline__ void consumer(const fm_moe_gemm_params &p, unsigned s_base,
                                                int m_tiles, int total, bool shared, int m_own,
                                                int n_own) {
    const int cw = threadIdx.x / 128 - 1; /* rows 64cw..64cw+63 of each tile, 0..kConsumers-1 */
    const int wtid = threadIdx.x % 128;
    const int warp = wtid / 32, lane = wtid % 32;
    const int g = lane / 4, tq = lane % 4;
    const unsigned bar_full = s_base + kBarOffset, bar_empty = bar_full + 8 * kStages;
    const int k_tiles = p.k / kBK;

    /* Stage 0 descriptors: K-major, 128-byte swizzle, SBO 1024 (next 8 rows); this warpgroup's
     * 64 A rows start 8 atoms further per consumer. Descriptor units are 16 bytes. */
    const unsigned long long a_desc0 =
        fm_wgmma_desc_sw128(s_base + (unsigned)(cw * 64 * kRowBytes), 16, 1024);
    const unsigned long long b_desc0 = fm_wgmma_desc_sw128(s_base + kABytes, 16, 1024);

    int it = 0;
    for (int i = 0, t = (int)blockIdx.x;; ++i, t += kDynamic ? 0 : (int)gridDim.x) {
        if constexpr (kDynamic) t = take_tile(s_base, i, lane);
        if (t >= total) break;
        int m_tile, n_tile;
        coords(p, t, m_tiles, m_own, n_own, m_tile, n_tile);
        const int m0 = tile_row(p, m_tile);
        const int row0 = m0 + cw * 64;
        int xreal = 0;
        const int hx = kMerge ? merge_rows(p, m_tile, m0, xreal) : 0;
        /* Padding rows close each expert's range: a warpgroup whose first row is padding has
         * no real row. Warp-uniform (one load, same address), so wgmma stays converged. */
        const bool active = p.sorted_slot[row0] >= 0;
        /* The CTA's last tile (static schedules: the next index is past the end) ends with the
         * staged epilogue; gemm2 with fp32 atomics keeps the register one. Uniform in the CTA. */
        const bool staged = !kDynamic && (GATED ? FM_MOE_STAGED_GEMM1 != 0 : !p.atomic) &&
                            t + (int)gridDim.x >= total;

        if (!active) {
            for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                const int s = it % kStages;
                fm_mbar_wait(bar_full + 8 * s, (unsigned)(it / kStages) & 1u);
                __syncwarp();
                if (lane == 0) release(bar_empty + 8 * s, shared);
            }
            if (staged) fm_bar_sync(kBarStaging, 128 * kConsumers);
            continue;
        }

        /* Real rows of this warpgroup's slab (the hybrid tile needs the staged epilogue). */
        int rows = 64;
        if (kHybrid && staged) {
            const int e = p.tile_expert[m_tile];
            rows = min(64, p.expert_offsets[e] + p.expert_counts[e] - row0);
        }
        const int hn = (rows + kSlabStep - 1) / kSlabStep * kSlabStep; /* the swapped products' N */
        const int n_out0 = n_tile * (GATED ? kBN / 2 : kBN);
        const unsigned stage = s_base + (unsigned)(cw * 64 * (GATED ? kStagingRow1 : kStagingRow2));
        if (kMerge && hx > 0) { /* both slabs full (more than 128 rows), staged (one CTA per tile) */
            with_width<kSlabStep, kMergeMax>(hx, [&](auto w) {
                tile_merged<GATED, decltype(w)::value>(p, a_desc0, b_desc0, bar_full, bar_empty,
                                                       k_tiles, it, shared, s_base, m0, xreal,
                                                       n_out0, cw, wtid);
            });
            continue;
        }
        if (kHybrid && staged && hn <= kHybridMax) {
            with_width<kSlabStep, kHybridMax>(hn, [&](auto w) {
                slab_swapped<GATED, decltype(w)::value>(p, a_desc0, b_desc0, bar_full, bar_empty,
                                                        k_tiles, it, shared, stage, row0, rows,
                                                        n_out0, cw, wtid);
            });
            continue;
        }
        float acc[kAcc];
        mainloop(acc, a_desc0, b_desc0, bar_full, bar_empty, k_tiles, it, lane, shared);
        if (staged) {
            /* every consumer warpgroup is past its last wgmma: the ring is free */
            fm_bar_sync(kBarStaging, 128 * kConsumers);
            epilogue_staged<GATED>(p, acc, stage, row0, n_out0, warp, lane);
        } else {
            /* ---- epilogue from registers (fm_moe_wgmma_epilogue, moe_gemm_sm90.cu) ---- */
            fm_moe_wgmma_epilogue<GATED, kBN>(p, acc, row0 + warp * 16 + g, n_out0, tq);
        }
    }
}

template <bool GATED>
static __device__ __forceinline__ void gemm(const fm_tma_desc *tma_a, const fm_tma_desc *tma_b,
                                            const fm_moe_gemm_params &p,
                                            unsigned char *smem_raw) {
    const unsigned s_base = (fm_smem_u32(smem_raw) + 1023u) & ~1023u;
    const unsigned bar_full = s_base + kBarOffset, bar_empty = bar_full + 8 * kStages;
    if (threadIdx.x == 0) {
        if (!GATED) fm_tma_prefetch_desc(tma_a);
        fm_tma_prefetch_desc(tma_b);
        for (int s = 0; s < kStages; ++s) {
            /* gemm1: 128 cp.async arrivals + thread 0's expect_tx; gemm2: the expect_tx. */
            fm_mbar_init(bar_full + 8 * s, GATED ? 129 : 1);
            /* one per consumer warp (of each CTA of a cluster; see release()) */
            fm_mbar_init(bar_empty + 8 * s, 4 * kConsumers * kCluster);
        }
        if (kDynamic) {
            for (int i = 0; i < 2; ++i) {
                fm_mbar_init(s_base + (unsigned)(kTileRing + 8 * i), 1);
                fm_mbar_init(s_base + (unsigned)(kTileRing + 16 + 8 * i), 4 * kConsumers);
            }
        }
        fm_mbar_init_fence();
    }
    /* Real M tiles (written by the alignment kernel earlier on the stream). */
    const int m_tiles = min(*p.num_tiles, p.m_tiles);
    const int total = m_tiles * p.n_tiles;
    if (kCluster == 1) {
        __syncthreads();
        fm_moe::split_roles<FM_PRODUCER_REGS, FM_CONSUMER_REGS>(
            [&] { producer<GATED>(tma_a, tma_b, p, s_base, m_tiles, total, false, 0, 0); },
            [&] { consumer<GATED>(p, s_base, m_tiles, total, false, 0, 0); });
    } else {
        /* The peer's barriers are initialised before anyone copies into or arrives on them. */
        fm_cluster_sync();
        int m_own, n_own;
        const bool shared = pair_shares(p, m_tiles, total, m_own, n_own);
        fm_moe::split_roles<FM_PRODUCER_REGS, FM_CONSUMER_REGS>(
            [&] {
                producer<GATED>(tma_a, tma_b, p, s_base, m_tiles, total, shared, m_own, n_own);
            },
            [&] { consumer<GATED>(p, s_base, m_tiles, total, shared, m_own, n_own); });
        /* Neither CTA's shared memory may go while the other still copies into it or arrives
         * on its barriers (threads that returned early count as arrived). */
        if (shared) fm_cluster_sync();
    }
}

} // namespace fm_moe_ws

#define FM_WSP_CONSUMERS FM_WS_CONSUMERS
namespace fm_moe_wsp = fm_moe_ws; /* the entry points in moe_gemm_sm90.cu */
