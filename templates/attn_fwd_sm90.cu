/*
 * attn_fwd_sm90.cu - attention forward for Hopper (sm_90a): TMA + mbarrier pipeline, warp-
 * specialised warpgroups, wgmma for both products, online softmax in registers.
 *
 * O[b, i, h, :] = sum_j softmax_j(scale * Q[b, i, h, :] . K[b, j, h / group, :]) V[b, j, h / group, :]
 *
 * Block of FM_THREADS = 128 * (1 + FM_CONSUMER_WGS) threads, one tile of FM_BLOCK_M query rows of
 * one (batch, head) at a time (persistent: several tiles, strided by gridDim.x).
 *  - Warpgroup 0 is the producer. After giving most of its registers away (setmaxnreg.dec), two
 *    threads issue the copies: one Q once per tile and K of each key block, the other V, into a
 *    ring of FM_STAGES slots guarded by full (copy landed) and empty (slot released) mbarriers.
 *  - FM_CLUSTER 2 (persistent, not causal): a cluster of two CTAs runs tiles of 2 * FM_BLOCK_M
 *    rows, each CTA its own FM_BLOCK_M of them, both visiting the same key blocks. Each CTA
 *    copies half of every K and V block and multicasts it into both CTAs' rings, so L2 is read
 *    once per cluster; a slot is refilled once the consumers of both CTAs released it (they
 *    arrive on both CTAs' empty barriers).
 *  - Warpgroups 1..FM_CONSUMER_WGS are consumers; consumer c owns query rows 64c..64c+63 of the
 *    tile. Per key block: S = Q K^T (wgmma, both operands in shared memory), mask, online
 *    softmax in registers (exp2 with the scale folded into one FMA), P rounded to 16 bits in
 *    registers and fed as the A operand of O += P V (wgmma with A from registers; V, stored
 *    [key][dim], is read transposed through its descriptor).
 *  - FM_INTRA_OVERLAP: a consumer issues S_n = Q K_n^T and O += P_{n+1} V_{n+1} back to back and
 *    runs the softmax of S_n while the second product is still on the tensor cores.
 *  - FM_FLAT (persistent, with intra-warpgroup overlap): the key blocks of a CTA's tiles form
 *    one stream. At a tile's end the next tile's first S product goes to the tensor cores with
 *    this tile's last P V, as any two blocks inside a tile do, and the epilogue runs after
 *    them; without it the last P V and the next first S product (and its softmax) each ran
 *    alone, about 5% of a 32-block d128 tile. Measured neutral on its own at the power limit,
 *    ahead at d128 S2048-8192 together with clusters (bench/NOTES.md, fourteenth session).
 *  - FM_PINGPONG: the consumers take turns issuing their products (a token passed through named
 *    barriers), so one warpgroup's softmax runs while another's products occupy the tensor cores.
 *  - Key blocks are visited from the last to the first, so the blocks that need masking (the
 *    diagonal and the ragged end of the keys) come first and the rest run a mask-free loop.
 *  - Each consumer warpgroup computes only the key blocks its own 64 rows see: the blocks the
 *    tile loads for its later rows only (causal diagonal), and all blocks for rows past
 *    seqlen_q, are passed over (fm_skip_block). With 192-row tiles this removes a quarter of the
 *    tensor work of causal S = 1024 and the ragged last tile of any S not a multiple of 192.
 *  - Persistent causal CTAs run pairs of m-blocks (long + short) so that the static schedule is
 *    balanced (fm_tile_iter).
 *  - A consumer releases Q as soon as its last S product is done, so that a persistent CTA
 *    loads the next tile's Q during the last P V and the epilogue. With FM_Q_STAGES = 2 the
 *    next tile's Q has a slot of its own and is copied as soon as the producer is done with the
 *    current tile, so the consumers find it in place when they start the tile. The output is normalised in
 *    registers, staged through shared memory and written with 16-byte stores, or (FM_TMA_STORE)
 *    handed by one thread to the copy engine, the warpgroup going on to its next tile at once
 *    (the staging area is waited for before its next use). FM_O_SEPARATE:
 *    the staging area is a buffer of its own, each consumer's 64 rows private to it, so the
 *    warpgroups finish their tiles independently and the next tile's K and V stream in during
 *    the epilogue. Otherwise (no room: d128 with block_n 176, d256 with two consumers) it aliases
 *    the V ring, free once every consumer's last P V is done; the producer then holds the next
 *    tile's V copies until the staging area is released (o_empty), and the next tile's first
 *    P V waits for a V copy issued only after the epilogue.
 *
 * Shared memory, from a 1024-byte aligned base (128-byte swizzle atoms must be 1024-aligned):
 *   Q  [Q_STAGES][D/64][BLOCK_M][64]  (each [rows][64] chunk written by one TMA box)
 *   K  [STAGES][D/64][BLOCK_N][64]
 *   V  [STAGES][D/64][BLOCK_N][64]
 *   O  [BLOCK_M][D] staging, FM_O_SEPARATE only (else it aliases V); consumer c's rows at
 *      O + c * 64 * D * 2, as D/64 chunks [64][64]
 *   mbarriers: q_full[Q_STAGES], q_empty[Q_STAGES], o_empty, k_full[S], k_empty[S], v_full[S],
 *              v_empty[S]
 * The generator's smem_bytes adds 1024 bytes of slack for the alignment (dynamic shared memory
 * is only guaranteed 16-byte alignment).
 */
#include "common/attn_params.h"
#include "common/numeric.cuh"
#include "common/ptx_sm90.cuh"

/* ---- parameters ------------------------------------------------------------------------- */
#ifndef FM_HEAD_DIM
#define FM_HEAD_DIM 128
#endif
#ifndef FM_CAUSAL
#define FM_CAUSAL 0
#endif
#ifndef FM_CONSUMER_WGS
#define FM_CONSUMER_WGS 2
#endif
#ifndef FM_BLOCK_M
#define FM_BLOCK_M (64 * FM_CONSUMER_WGS)
#endif
#ifndef FM_BLOCK_N
#define FM_BLOCK_N 128
#endif
#ifndef FM_STAGES
#define FM_STAGES 2
#endif
#ifndef FM_PINGPONG
#define FM_PINGPONG 1
#endif
#ifndef FM_INTRA_OVERLAP
#define FM_INTRA_OVERLAP 1
#endif
#ifndef FM_PERSISTENT
#define FM_PERSISTENT 0
#endif
#ifndef FM_O_SEPARATE
#define FM_O_SEPARATE 0 /* the generator sets it where the buffer fits in shared memory */
#endif
#ifndef FM_Q_STAGES
#define FM_Q_STAGES 1 /* Q buffers: 2 lets a persistent CTA load the next tile's Q early */
#endif
#ifndef FM_TMA_STORE
#define FM_TMA_STORE 0 /* the output leaves the staging area by TMA store (FM_O_SEPARATE only) */
#endif
#ifndef FM_SPLIT_TAIL
#define FM_SPLIT_TAIL 0 /* split the last tiles of a persistent non-causal grid by key block */
#endif
#ifndef FM_CTAS_PER_SM
#define FM_CTAS_PER_SM 1 /* resident CTAs per SM the kernel is built for (launch bounds) */
#endif
#ifndef FM_CLUSTER
#define FM_CLUSTER 1 /* CTAs per cluster sharing each K/V block (multicast); see the header */
#endif
#ifndef FM_FLAT
#define FM_FLAT 0 /* persistent: the next tile's first S product issued with the last P V */
#endif
#ifndef FM_LAZY_RESCALE
#define FM_LAZY_RESCALE 1 /* a row's softmax reference moves only when its maximum grows by more
                           * than FM_RESCALE_LOG2 (see fm_softmax) */
#endif
#define FM_RESCALE_LOG2 8.0f
#ifndef FM_Q_REGS
#define FM_Q_REGS 0 /* Q S products take this warpgroup's Q rows from registers (see fm_consumer) */
#endif
/* Register split under setmaxnreg: the producer needs few (one thread issues copies), the
 * consumers hold O (D/2 floats), S (BLOCK_N/2 floats) and P (BLOCK_N/4 words) per thread. With
 * one consumer warpgroup and one CTA per SM the entry cap (65536 / 256 = 255) is already the
 * maximum: no split. With two CTAs per SM the entry cap is 128 and the one consumer takes what
 * the producer gives up (24 + 232 = 2 * 128). */
#define FM_SPLIT (FM_CONSUMER_WGS > 1 || FM_CTAS_PER_SM > 1)
#ifndef FM_PRODUCER_REGS
#if FM_SPLIT
#define FM_PRODUCER_REGS 24
#else
#define FM_PRODUCER_REGS 0
#endif
#endif
#ifndef FM_CONSUMER_REGS
#if !FM_SPLIT
#define FM_CONSUMER_REGS 0
#elif FM_CONSUMER_WGS == 1
#define FM_CONSUMER_REGS 232 /* two CTAs per SM: 2 * 128 * (24 + 232) = 65536 */
#elif FM_CONSUMER_WGS == 2
#define FM_CONSUMER_REGS 240 /* 128 * (24 + 2 * 240) = 64512 <= 65536 */
#else
#define FM_CONSUMER_REGS 160 /* 128 * (24 + 3 * 160) = 64512 */
#endif
#endif

#if FM_HEAD_DIM != 64 && FM_HEAD_DIM != 128 && FM_HEAD_DIM != 256
#error "FM_HEAD_DIM must be 64, 128 or 256"
#endif
#if FM_CAUSAL != 0 && FM_CAUSAL != 1
#error "FM_CAUSAL must be 0 or 1"
#endif
#if FM_CONSUMER_WGS < 1 || FM_CONSUMER_WGS > 3
#error "FM_CONSUMER_WGS must be 1, 2 or 3"
#endif
#if FM_BLOCK_M != 64 * FM_CONSUMER_WGS
#error "FM_BLOCK_M must be 64 * FM_CONSUMER_WGS: each consumer warpgroup owns one m64 wgmma tile"
#endif
#if FM_BLOCK_N % 16 != 0 || FM_BLOCK_N < 16 || FM_BLOCK_N > 256
#error "FM_BLOCK_N must be a multiple of 16 in 16..256 (wgmma N <= 256; P V steps k16 over it)"
#endif
#if FM_STAGES < 2 || FM_STAGES > 8
#error "FM_STAGES must be in 2..8"
#endif
#if FM_PINGPONG != 0 && FM_PINGPONG != 1
#error "FM_PINGPONG must be 0 or 1"
#endif
#if FM_PINGPONG && FM_CONSUMER_WGS < 2
#error "FM_PINGPONG needs at least two consumer warpgroups"
#endif
#if FM_INTRA_OVERLAP != 0 && FM_INTRA_OVERLAP != 1
#error "FM_INTRA_OVERLAP must be 0 or 1"
#endif
#if FM_PERSISTENT != 0 && FM_PERSISTENT != 1
#error "FM_PERSISTENT must be 0 or 1"
#endif
#if FM_O_SEPARATE != 0 && FM_O_SEPARATE != 1
#error "FM_O_SEPARATE must be 0 or 1"
#endif
#if FM_Q_STAGES != 1 && FM_Q_STAGES != 2
#error "FM_Q_STAGES must be 1 or 2"
#endif
#if FM_TMA_STORE != 0 && FM_TMA_STORE != 1
#error "FM_TMA_STORE must be 0 or 1"
#endif
#if FM_TMA_STORE && !FM_O_SEPARATE
#error "FM_TMA_STORE needs FM_O_SEPARATE (a staging buffer no copy into shared memory reuses)"
#endif
#if FM_SPLIT_TAIL != 0 && FM_SPLIT_TAIL != 1
#error "FM_SPLIT_TAIL must be 0 or 1"
#endif
#if FM_SPLIT_TAIL && (!FM_PERSISTENT || FM_CAUSAL || FM_CTAS_PER_SM != 1)
#error "FM_SPLIT_TAIL needs a persistent, non-causal grid of one CTA per SM"
#endif
#if FM_CTAS_PER_SM != 1 && FM_CTAS_PER_SM != 2
#error "FM_CTAS_PER_SM must be 1 or 2"
#endif
#if FM_CLUSTER != 1 && FM_CLUSTER != 2
#error "FM_CLUSTER must be 1 or 2"
#endif
#if FM_CLUSTER > 1 && (!FM_PERSISTENT || FM_CAUSAL || FM_CTAS_PER_SM != 1 || FM_BLOCK_N % 16 != 0)
#error "FM_CLUSTER 2 needs a persistent, non-causal grid of one CTA per SM and block_n a multiple of 16"
#endif
#if FM_FLAT != 0 && FM_FLAT != 1
#error "FM_FLAT must be 0 or 1"
#endif
#if FM_FLAT && (!FM_PERSISTENT || !FM_INTRA_OVERLAP)
#error "FM_FLAT needs a persistent grid and intra-warpgroup overlap"
#endif
#if FM_CTAS_PER_SM > 1 && FM_CONSUMER_WGS > 1
#error "two CTAs per SM only with one consumer warpgroup"
#endif
#if FM_SPLIT
#if FM_PRODUCER_REGS < 24 || FM_PRODUCER_REGS % 8 != 0 || FM_CONSUMER_REGS > 256 || \
    FM_CONSUMER_REGS % 8 != 0
#error "setmaxnreg counts must be multiples of 8 in 24..256"
#endif
#if 128 * (FM_PRODUCER_REGS + FM_CONSUMER_WGS * FM_CONSUMER_REGS) > 65536 / FM_CTAS_PER_SM
#error "register split exceeds the CTA's share of the 64K registers of an SM"
#endif
#endif

#define FM_D FM_HEAD_DIM
#define FM_BM FM_BLOCK_M
#define FM_BN FM_BLOCK_N
#define FM_THREADS (128 * (1 + FM_CONSUMER_WGS))
#define FM_DCHUNKS (FM_D / 64)              /* 128-byte (64-element) column chunks */
#define FM_Q_BYTES (FM_BM * FM_D * 2)
#define FM_KV_BYTES (FM_BN * FM_D * 2)      /* one stage of K (or of V) */
#define FM_VBM (FM_BM * FM_CLUSTER)         /* rows of a cluster's tile */
#define FM_KV_BOX (FM_BN / FM_CLUSTER)      /* K/V rows each CTA of a cluster copies */
#define FM_OFF_K (FM_Q_STAGES * FM_Q_BYTES)
#define FM_OFF_V (FM_OFF_K + FM_STAGES * FM_KV_BYTES)
#define FM_OFF_O (FM_OFF_V + FM_STAGES * FM_KV_BYTES)
#define FM_O_BYTES (FM_O_SEPARATE ? FM_BM * FM_D * 2 : 0)
#define FM_OFF_BAR (FM_OFF_O + FM_O_BYTES)
#define FM_NUM_BARS (2 * FM_Q_STAGES + 1 + 4 * FM_STAGES)
#if !FM_O_SEPARATE && FM_STAGES * FM_BN < FM_BM
#error "the V ring (STAGES * BLOCK_N rows) must hold the BLOCK_M output rows staged in the epilogue"
#endif
/* Keep in sync with generator/attn_fwd_sm90.lua smem_bytes. */
#define FM_SMEM_BYTES (FM_OFF_BAR + 8 * FM_NUM_BARS + 1024)

/* Named barriers: 1..3 the ping-pong turn of consumer 0..2, 4..6 consumer c's epilogue, 7 all
 * consumers (before the epilogue overwrites V, when O is staged there). */
#define FM_BAR_TURN 1
#define FM_BAR_EPI 4
#define FM_BAR_CONSUMERS 7

/* ---- tiles ------------------------------------------------------------------------------ */
struct fm_tile {
    int mb, h, b;
    int n_end;       /* key blocks n_lo..n_end-1 are visited (from the last); n_end <= n_lo:
                      * nothing visible */
    int n_lo;        /* 0 but for a piece of a split tile */
    int n_mask_from; /* blocks n >= n_mask_from need the key-bound or causal mask */
};

/* Key blocks seen by query rows first_row..first_row+rows-1 (clipped to seqlen_q): n_end (0 when
 * no row exists or none sees a key) and the first block that needs the mask. Computed per tile
 * (what the producer loads) and per consumer warpgroup (what it multiplies): with a 192-row tile
 * the upper warpgroups of the diagonal tile, or every row past a ragged seqlen_q, would otherwise
 * run products whose scores are all masked. */
static __device__ __forceinline__ void fm_key_range(int first_row, int rows,
                                                    const fm_attn_kernel_params &p, int &n_end,
                                                    int &n_mask_from) {
    const int n_total = (p.seqlen_k + FM_BN - 1) / FM_BN;
    n_end = first_row < p.seqlen_q ? n_total : 0;
    n_mask_from = p.seqlen_k / FM_BN; /* blocks wholly below seqlen_k */
#if FM_CAUSAL
    /* Row i sees keys j <= i + off. The last existing row bounds the keys visited; the first row
     * bounds the blocks every row sees in full. */
    const int off = p.causal_offset;
    const int last_row = min(first_row + rows, p.seqlen_q) - 1;
    const int max_key = last_row + off;
    if (max_key < 0) n_end = 0;
    else n_end = min(n_end, max_key / FM_BN + 1);
    const int seen_by_all = first_row + off + 1; /* keys < this are visible to every row */
    n_mask_from = min(n_mask_from, seen_by_all <= 0 ? 0 : seen_by_all / FM_BN);
#endif
}

static __device__ __forceinline__ fm_tile fm_make_tile(int bh, int mb,
                                                       const fm_attn_kernel_params &p) {
    fm_tile r;
    r.mb = mb;
    r.h = bh % p.heads;
    r.b = bh / p.heads;
    r.n_lo = 0;
    fm_key_range(mb * FM_VBM, FM_VBM, p, r.n_end, r.n_mask_from);
    return r;
}

/* The sequence of tiles one CTA runs; producer and consumers walk identical copies.
 *  - Non-persistent: tile blockIdx.x only. Tiles are numbered with the m-blocks of one (batch,
 *    head) adjacent, so the CTAs running at one time share K/V of a few heads through L2; with
 *    causal masking each head's m-blocks go from the longest (last rows, most keys) to the
 *    shortest, and the hardware's in-order dispatch hands the short ones to the SMs that free
 *    up first.
 *  - Persistent, not causal: every tile costs the same; tiles blockIdx.x, + gridDim.x, ...
 *  - Persistent, causal, more tiles than CTAs: a static stride over the causal order would give
 *    CTA i the m-blocks i, i + G, ... of the heads, i.e. always about the same lengths (with 128
 *    m-blocks per head and G = 132 the first CTAs get mostly long tiles, the others short ones:
 *    measured 480 TFLOP/s against 720 for one tile per CTA at 16k). Instead the unit of work is a
 *    pair of m-blocks (nmb-1-q, q) of one head, whose key blocks add up to about n_total + 1
 *    whatever q is; units are strided over the CTAs (each runs the long tile, then the short
 *    one, which rereads the long one's last key blocks from L2). An odd middle m-block is a
 *    unit alone.
 *  - Split tail (FM_SPLIT_TAIL, persistent and not causal): with T tiles on G CTAs the last
 *    round is only (T mod G) / G full, e.g. 2048 tiles of d128 on 132 SMs are 15.5 rounds that
 *    take 16. The host leaves the first T / G * G tiles (a round fewer where the rest is too
 *    small, see the launcher) to the strided schedule and makes the rest a row of units of one
 *    key block each (sk_units = tiles * sk_blocks, tile after tile, each tile's blocks in
 *    visiting order, last first); CTA
 *    j takes units [j * sk_units / G, (j + 1) * sk_units / G), cut into pieces at tile edges.
 *    A piece that starts a tile but does not finish it is the tile's owner; a piece that
 *    starts inside a tile is a writer and is always its CTA's first unit, so every CTA writes
 *    at most one partial result (slot blockIdx.x): unnormalised O, row maxima and sums, in
 *    registers' order. The owner, at the end of its share, merges the partials of the CTAs
 *    after it whose first unit lies in its tile (they ran those first: no wait in practice)
 *    and stores the tile. Every CTA must be resident at once (the persistent grid is one CTA
 *    per SM) since an owner spins on a later CTA's flag.
 *    The index v is the tile (v >= 0, strided phase) or -(first unit of the piece) - 1. */
struct fm_tile_iter {
    int v; /* the CTA's current index (the rest is recomputed: the producer runs on 24
            * registers, the three-consumer d64 variant on 160) */
};

/* gridDim.x, read where it is used: a volatile read is not hoisted out of the tile loop, where the
 * values derived from it (unit count, stride, the paired flag) would otherwise stay live in
 * registers across the whole tile. */
static __device__ __forceinline__ int fm_grid_ctas() {
    unsigned r;
    asm volatile("mov.u32 %0, %%nctaid.x;" : "=r"(r));
    return (int)r / FM_CLUSTER;
}

/* This CTA's index in the schedule: with clusters, both CTAs of a cluster walk the cluster's
 * sequence of tiles, each taking its own FM_BM rows of every tile. */
static __device__ __forceinline__ int fm_cta() { return (int)blockIdx.x / FM_CLUSTER; }

/* x, opaque to the compiler: what is computed from it again is not merged with (and kept live
 * from) an earlier computation from x. */
static __device__ __forceinline__ int fm_opaque(int x) {
    int r;
    asm volatile("mov.b32 %0, %1;" : "=r"(r) : "r"(x));
    return r;
}

/* Paired causal schedule (see above)? Uniform over the grid. */
static __device__ __forceinline__ bool fm_iter_paired(const fm_attn_kernel_params &p) {
#if FM_PERSISTENT && FM_CAUSAL
    return p.num_tiles > fm_grid_ctas();
#else
    (void)p;
    return false;
#endif
}

#define FM_ITER_DONE 0x7fffffff

#if FM_SPLIT_TAIL
/* First unit of CTA j's share of the split region (j = gridDim.x: its end). 32-bit: the host
 * keeps gridDim.x * sk_units within INT_MAX (64-bit division would spill the producer's 24
 * registers). */
static __device__ __forceinline__ int fm_sk_bound(int j, const fm_attn_kernel_params &p) {
    return (int)((unsigned)j * (unsigned)p.sk_units / (unsigned)fm_grid_ctas());
}
/* The index of this CTA's first piece, or done when its share is empty. */
static __device__ __forceinline__ int fm_sk_enter(const fm_attn_kernel_params &p) {
    const int u0 = fm_sk_bound(fm_cta(), p);
    return u0 < fm_sk_bound(fm_cta() + 1, p) ? -(u0 + 1) : FM_ITER_DONE;
}
#endif

static __device__ __forceinline__ void fm_iter_init(fm_tile_iter &it,
                                                    const fm_attn_kernel_params &p) {
#if FM_SPLIT_TAIL
    it.v = fm_cta() < p.sk_first_tile ? fm_cta() : fm_sk_enter(p);
#else
    it.v = fm_iter_paired(p) ? 2 * fm_cta() : fm_cta();
#endif
}

static __device__ __forceinline__ bool fm_iter_more(const fm_tile_iter &it,
                                                    const fm_attn_kernel_params &p) {
#if FM_SPLIT_TAIL
    return it.v < p.sk_first_tile; /* pieces are negative, done is INT_MAX */
#else
    if (fm_iter_paired(p)) return it.v < 2 * ((p.num_m_blocks + 1) / 2) * p.heads * p.batch;
    return it.v < p.num_tiles;
#endif
}

static __device__ __forceinline__ void fm_iter_advance(fm_tile_iter &it,
                                                       const fm_attn_kernel_params &p) {
#if FM_SPLIT_TAIL
    if (it.v >= 0) {
        it.v += fm_grid_ctas();
        if (it.v >= p.sk_first_tile) it.v = fm_sk_enter(p);
    } else {
        /* the next piece starts at the next tile's first unit, if still in this CTA's share */
        const int next = ((-it.v - 1) / p.sk_blocks + 1) * p.sk_blocks;
        it.v = next < fm_sk_bound(fm_cta() + 1, p) ? -(next + 1) : FM_ITER_DONE;
    }
#else
    if (fm_iter_paired(p)) /* v = 2u + k: k = 0 the long tile of unit u, k = 1 the short one */
        it.v = (it.v & 1) ? it.v - 1 + 2 * fm_grid_ctas() : it.v + 1;
    else
        it.v += FM_PERSISTENT ? fm_grid_ctas() : p.num_tiles;
#endif
}

/* The (batch, head, m-block) of index v; false for the second half of an odd middle unit,
 * which has no tile. */
static __device__ __forceinline__ bool fm_iter_tile(int v, const fm_attn_kernel_params &p,
                                                    int &bh, int &mb) {
    const int nmb = p.num_m_blocks;
    if (fm_iter_paired(p)) {
        const int units_per_head = (nmb + 1) / 2;
        const int u = v >> 1;
        bh = u / units_per_head;
        const int q = u - bh * units_per_head;
        mb = (v & 1) ? q : nmb - 1 - q;
        return !((v & 1) && q == nmb - 1 - q);
    }
#if FM_SPLIT_TAIL
    if (v < 0) v = p.sk_first_tile + (-v - 1) / p.sk_blocks; /* the piece's tile */
#endif
    bh = v / nmb;
    const int mi = v - bh * nmb;
    mb = FM_CAUSAL ? nmb - 1 - mi : mi;
    return true;
}

#if FM_SPLIT_TAIL
/* What part of its tile the piece of index v < 0 is: key blocks [n_lo, n_hi), and its role
 * (0: the whole tile, 1: a writer of a partial result, 2: the owner, which merges). */
struct fm_piece {
    int n_hi, n_lo, role;
};
static __device__ __forceinline__ fm_piece fm_iter_piece(int v, const fm_attn_kernel_params &p) {
    const int u = -v - 1;
    const int nb = p.sk_blocks;
    const int t0 = (u / nb) * nb; /* the tile's first unit */
    const int w = u - t0;         /* units of the tile before the piece */
    const int end = min(fm_sk_bound(fm_cta() + 1, p), t0 + nb) - t0;
    fm_piece r;
    r.n_hi = nb - w;
    r.n_lo = nb - end;
    r.role = w > 0 ? 1 : end < nb ? 2 : 0;
    return r;
}
#endif

/* The tile (or piece of a split tile) of index v. */
static __device__ __forceinline__ fm_tile fm_iter_make(int v, int bh, int mb,
                                                       const fm_attn_kernel_params &p) {
    fm_tile t = fm_make_tile(bh, mb, p);
#if FM_SPLIT_TAIL
    if (v < 0) {
        const fm_piece pc = fm_iter_piece(v, p);
        t.n_end = min(t.n_end, pc.n_hi);
        t.n_lo = pc.n_lo;
    }
#else
    (void)v;
#endif
    return t;
}

/* ---- consumer helpers ---------------------------------------------------------------------- */
/* Byte offset of the 16-element k step kk inside a K-major [rows][D] tile stored as D/64
 * chunks of [rows][64]: chunk kk/4, 32 bytes per step inside the 128-byte row. */
template <int ROWS> static __device__ __forceinline__ unsigned fm_kmajor_step(int kk) {
    return (unsigned)((kk / 4) * ROWS * 128 + (kk % 4) * 32);
}

/* S = Q K^T for this warpgroup's 64 rows: D/16 wgmma steps, the first one zero-initialises. */
static __device__ __forceinline__ void fm_gemm_qk(float (&s)[FM_BN / 2], unsigned long long qdesc,
                                                  unsigned long long kdesc) {
    fm_wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < FM_D / 16; kk++) {
        fm_wgmma<FM_BN>::template ss<FM_DTYPE_BF16, 0>(
            s, qdesc + (fm_kmajor_step<FM_BM>(kk) >> 4), kdesc + (fm_kmajor_step<FM_BN>(kk) >> 4),
            kk > 0 ? 1 : 0);
    }
    fm_wgmma_commit();
}

/* The same with Q's fragments in registers (FM_Q_REGS). */
static __device__ __forceinline__ void fm_gemm_qk(float (&s)[FM_BN / 2],
                                                  const unsigned (&qa)[FM_D / 16][4],
                                                  unsigned long long kdesc) {
    fm_wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < FM_D / 16; kk++) {
        fm_wgmma<FM_BN>::template rs<FM_DTYPE_BF16, 0>(
            s, qa[kk], kdesc + (fm_kmajor_step<FM_BN>(kk) >> 4), kk > 0 ? 1 : 0);
    }
    fm_wgmma_commit();
}

/* O += P V: BLOCK_N/16 steps over the keys; each step's 16 keys are two 8-row groups (SBO) of
 * the V tile, i.e. 16 * 128 bytes further. */
static __device__ __forceinline__ void fm_gemm_pv(float (&o)[FM_D / 2],
                                                  const unsigned (&pa)[FM_BN / 16][4],
                                                  unsigned long long vdesc) {
    fm_wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < FM_BN / 16; kk++) {
        fm_wgmma<FM_D>::template rs<FM_DTYPE_BF16, 1>(o, pa[kk], vdesc + (unsigned)(kk * 128), 1);
    }
    fm_wgmma_commit();
}

/* Keys >= lim (per row half) get -inf. col0 = first key of the block + 2 * (lane % 4). */
static __device__ __forceinline__ void fm_mask(float (&s)[FM_BN / 2], int col0, int lim0,
                                               int lim1) {
#pragma unroll
    for (int i = 0; i < FM_BN / 8; i++) {
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int col = col0 + 8 * i + (r & 1);
            if (col >= (r < 2 ? lim0 : lim1)) s[4 * i + r] = fm_neg_inf();
        }
    }
}

/* Online softmax of one block. m: the thread's two rows' reference maxima (raw scores), l:
 * running per-thread partial sums (reduced over the quad only at the end), scl: factor to apply
 * to O. CHECK_INF: the block may hold rows with every score masked, whose maximum is -inf; the
 * exponent offset is then 0 so that exp2(-inf - 0) = 0 and no inf - inf appears.
 * FM_LAZY_RESCALE: the reference is the running maximum only up to a factor: it moves (and O
 * and l are rescaled) only when the block's maximum exceeds it by more than 2^FM_RESCALE_LOG2 =
 * 256 in the exponentials, which after the first blocks of a row almost never happens. P is
 * then at most 256 (bf16 and fp16 hold that with the same relative precision), l and O grow by
 * at most that factor in fp32, and the 64-128 multiplies per thread of rescaling O drop out of
 * nearly every step (about an eighth of a d128 step's instructions). The result is the same
 * softmax: O / l and lse = m + log2(l) do not depend on the reference. */
template <bool CHECK_INF>
static __device__ __forceinline__ void fm_softmax(float (&s)[FM_BN / 2], float (&m)[2],
                                                  float (&l)[2], float (&scl)[2], float sl2) {
    /* Four independent max chains per row: one serial chain of BLOCK_N/4 dependent FMNMX
     * would hold the exponentials back by its whole latency. */
    float pm[2][4];
#pragma unroll
    for (int j = 0; j < 4; j++) pm[0][j] = pm[1][j] = fm_neg_inf();
#pragma unroll
    for (int i = 0; i < FM_BN / 8; i++) {
        pm[0][i % 4] = fmaxf(pm[0][i % 4], fmaxf(s[4 * i + 0], s[4 * i + 1]));
        pm[1][i % 4] = fmaxf(pm[1][i % 4], fmaxf(s[4 * i + 2], s[4 * i + 3]));
    }
    float mx[2];
#pragma unroll
    for (int h = 0; h < 2; h++)
        mx[h] = fmaxf(fmaxf(m[h], fmaxf(pm[h][0], pm[h][1])), fmaxf(pm[h][2], pm[h][3]));
#pragma unroll
    for (int h = 0; h < 2; h++) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    }
    float ms[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
#if FM_LAZY_RESCALE
        /* Keep the reference while the maximum stays within the margin. The first block
         * (m = -inf: +inf) and rows still fully masked (-inf - -inf = NaN) fail the test and
         * take the update path. */
        if ((mx[h] - m[h]) * sl2 <= FM_RESCALE_LOG2) {
            ms[h] = m[h] * sl2;
            scl[h] = 1.f;
            continue;
        }
#endif
        ms[h] = mx[h] * sl2;
        if (CHECK_INF && mx[h] == fm_neg_inf()) ms[h] = 0.f;
        /* m = -inf (nothing seen yet) gives exp2(-inf) = 0: O and l are 0 then anyway. */
        scl[h] = fm_exp2(m[h] * sl2 - ms[h]);
        m[h] = mx[h];
    }
    float sum[2][2] = {{0.f, 0.f}, {0.f, 0.f}}; /* [row half][column parity]: two chains */
#pragma unroll
    for (int i = 0; i < FM_BN / 8; i++) {
#pragma unroll
        for (int r = 0; r < 4; r++) {
            s[4 * i + r] = fm_exp2(fmaf(s[4 * i + r], sl2, -ms[r >> 1]));
            sum[r >> 1][r & 1] += s[4 * i + r];
        }
    }
    l[0] = l[0] * scl[0] + (sum[0][0] + sum[0][1]);
    l[1] = l[1] * scl[1] + (sum[1][0] + sum[1][1]);
}

static __device__ __forceinline__ void fm_rescale(float (&o)[FM_D / 2], const float (&scl)[2]) {
#pragma unroll
    for (int i = 0; i < FM_D / 8; i++) {
        o[4 * i + 0] *= scl[0];
        o[4 * i + 1] *= scl[0];
        o[4 * i + 2] *= scl[1];
        o[4 * i + 3] *= scl[1];
    }
}

/* O *= scl where a row of the warp moved its reference (FM_LAZY_RESCALE: rarely). Called only
 * with no product of the warpgroup in flight: a branch there would make ptxas serialise every
 * wgmma of the kernel (C7518). */
static __device__ __forceinline__ void fm_rescale_lazy(float (&o)[FM_D / 2],
                                                       const float (&scl)[2]) {
#if FM_LAZY_RESCALE
    if (__any_sync(0xffffffffu, scl[0] != 1.f || scl[1] != 1.f)) fm_rescale(o, scl);
#else
    fm_rescale(o, scl);
#endif
}

/* S (accumulator layout) -> P as wgmma A fragments: k16 step kk is S columns 16kk..16kk+15,
 * i.e. accumulator blocks 2kk (a[0], a[1]) and 2kk+1 (a[2], a[3]). */
static __device__ __forceinline__ void fm_convert_p(unsigned (&pa)[FM_BN / 16][4],
                                                    const float (&s)[FM_BN / 2]) {
#pragma unroll
    for (int kk = 0; kk < FM_BN / 16; kk++) {
        pa[kk][0] = fm_pack_elem2(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = fm_pack_elem2(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = fm_pack_elem2(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = fm_pack_elem2(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

static __device__ __forceinline__ void fm_st_shared_b32(unsigned addr, unsigned v) {
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
static __device__ __forceinline__ void fm_ld_shared_v4(unsigned addr, unsigned (&v)[4]) {
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
                 : "r"(addr)
                 : "memory");
}
static __device__ __forceinline__ void fm_st_global_v4(void *p, const unsigned (&v)[4]) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v[0]), "r"(v[1]),
                 "r"(v[2]), "r"(v[3])
                 : "memory");
}

/* ---- consumer state and main-loop steps ------------------------------------------------- */
/* An arrival on the barrier at `bar` in every CTA of the cluster (in this CTA alone without
 * one): the buffers it guards are filled by every CTA's producer (multicast), so each of them
 * must see them released. */
static __device__ __forceinline__ void fm_arrive_all(unsigned bar) {
#if FM_CLUSTER > 1
#pragma unroll
    for (unsigned r = 0; r < FM_CLUSTER; r++) fm_mbar_arrive_cluster(fm_cluster_map(bar, r));
#else
    fm_mbar_arrive(bar);
#endif
}

/* First query row of this CTA's share of cluster tile mb (the tile itself without a cluster). */
static __device__ __forceinline__ int fm_tile_row0(int mb) {
    return mb * FM_VBM + (int)(blockIdx.x % FM_CLUSTER) * FM_BM;
}

/* What a consumer warpgroup carries through its loop besides the accumulators: addresses,
 * per-tile row limits and its position in the K/V ring (the producer walks the same sequence). */
struct fm_consumer {
    unsigned long long qdesc; /* this warpgroup's 64 rows of Q as the A operand */
#if FM_Q_REGS
    /* The same rows as wgmma A fragments, loaded once per tile (load_q_regs). A shared-memory A
     * operand is read again by every S product: at d128 an m64n128k16 product reads 2 KB of Q
     * besides its 4 KB of K in the 64 cycles it takes (96 B per cycle of the SM's 128, with the
     * K/V copies landing in the same memory); from registers it reads 4 KB. Costs D/4 registers
     * for the whole tile. */
    unsigned qa[FM_D / 16][4];
#endif
    unsigned sK, sV;
    unsigned bar_k_full, bar_k_empty, bar_v_full, bar_v_empty;
    unsigned turn_self, turn_next; /* ping-pong named barriers */
    int lane;
    float sl2;
    /* Key j is valid for the thread's row g iff j < lim0, for row g + 8 iff j < lim1() (one
     * register: the other bound is derived). */
    int lim0;
    int col_lane;   /* 2 * (lane % 4): the thread's first column in each 8-column block */
    int stage;
    unsigned phase;

    /* Causal: lim0 = g + causal_offset + 1 needs no clipping to seqlen_k, since a stored row
     * (g < seqlen_q) has g + causal_offset + 1 <= seqlen_k; rows past seqlen_q may then see the
     * zero-filled keys past seqlen_k, which only changes rows that are never stored. */
    __device__ __forceinline__ int lim1() const { return FM_CAUSAL ? lim0 + 8 : lim0; }

#if FM_Q_REGS
    /* Q slot qbase (this warpgroup's rows, 128-byte swizzled K-major chunks of 64 columns, the
     * layout the TMA wrote) -> A fragments: k16 step kk is columns 16kk..16kk+15 of chunk kk/4;
     * lane i gives the address of row i % 16 of the warp's 16 and 8-column half i / 16, so the
     * four 8x8 matrices land as a0..a3 of the m64nNk16 A operand. Called with no product in
     * flight. The swizzle XORs the 16-byte unit with the row's index in its 8-row atom; the
     * warp's rows start at a multiple of 8. */
    __device__ __forceinline__ void load_q_regs(unsigned qbase, int wq) {
        const int row = wq * 16 + (lane & 15);
        const unsigned rbase = qbase + (unsigned)(row * 128);
#pragma unroll
        for (int kk = 0; kk < FM_D / 16; kk++) {
            const unsigned unit = (unsigned)(((kk % 4) * 2 + (lane >> 4)) ^ (row & 7));
            fm_ldmatrix_x4(qa[kk], rbase + (unsigned)((kk / 4) * FM_BM * 128) + (unit << 4));
        }
    }
#endif
    __device__ __forceinline__ unsigned long long kdesc(int st) const {
        return fm_wgmma_desc_sw128(sK + (unsigned)(st * FM_KV_BYTES), 16, 1024);
    }
    /* V: MN-major B operand; its 64-column chunks are LBO = BLOCK_N * 128 bytes apart. */
    __device__ __forceinline__ unsigned long long vdesc(int st) const {
        return fm_wgmma_desc_sw128(sV + (unsigned)(st * FM_KV_BYTES), FM_BN * 128, 1024);
    }
    /* One arrival per warp (the empty barriers count 4 per consumer warpgroup), after the
     * warp's own wgmma wait: a slot is free only when every warp has seen its reads finish.
     * With a cluster, the slot is written in every CTA of it by each CTA's producer (multicast),
     * so every CTA's producer must see it released by every CTA's consumers: one arrival on each
     * CTA's barrier. */
    __device__ __forceinline__ void release(unsigned bar) const {
        if (lane == 0) fm_arrive_all(bar);
    }
    __device__ __forceinline__ void advance() {
        if (++stage == FM_STAGES) {
            stage = 0;
            phase ^= 1;
        }
    }
    /* Ping-pong: wait for this warpgroup's turn to issue products / hand the turn on. */
    __device__ __forceinline__ void turn_sync() const {
#if FM_PINGPONG
        fm_bar_sync(turn_self, 256);
#endif
    }
    __device__ __forceinline__ void turn_pass() const {
#if FM_PINGPONG
        fm_bar_arrive(turn_next, 256);
#endif
    }
};

/* S = Q K^T for the current ring slot, issued (Q from shared memory or from registers). */
static __device__ __forceinline__ void fm_issue_qk(const fm_consumer &c, float (&s)[FM_BN / 2]) {
#if FM_Q_REGS
    fm_gemm_qk(s, c.qa, c.kdesc(c.stage));
#else
    fm_gemm_qk(s, c.qdesc, c.kdesc(c.stage));
#endif
}

/* S = Q K_n^T for the current ring slot, waited; K released; masked; softmax. */
template <bool MASKED>
static __device__ __forceinline__ void fm_s_and_softmax(fm_consumer &c, int nb,
                                                        float (&s)[FM_BN / 2], float (&m)[2],
                                                        float (&l)[2], float (&scl)[2]) {
    fm_mbar_wait(c.bar_k_full + 8 * c.stage, c.phase);
    c.turn_sync();
    fm_issue_qk(c, s);
    c.turn_pass();
    fm_wgmma_wait<0>();
    fm_fence_regs(s);
    c.release(c.bar_k_empty + 8 * c.stage);
    if constexpr (MASKED) fm_mask(s, nb * FM_BN + c.col_lane, c.lim0, c.lim1());
    fm_softmax<MASKED>(s, m, l, scl, c.sl2);
}

/* Without intra-warpgroup overlap: S, softmax, then O += P V, one after the other. */
template <bool MASKED>
static __device__ __forceinline__ void fm_step_serial(fm_consumer &c, int nb, float (&o)[FM_D / 2],
                                                      float (&s)[FM_BN / 2],
                                                      unsigned (&pa)[FM_BN / 16][4],
                                                      float (&m)[2], float (&l)[2],
                                                      float (&scl)[2]) {
    fm_s_and_softmax<MASKED>(c, nb, s, m, l, scl);
    fm_rescale_lazy(o, scl);
    fm_convert_p(pa, s);
    fm_mbar_wait(c.bar_v_full + 8 * c.stage, c.phase);
    c.turn_sync();
    fm_gemm_pv(o, pa, c.vdesc(c.stage));
    c.turn_pass();
    fm_wgmma_wait<0>();
    fm_fence_regs(o);
    c.release(c.bar_v_empty + 8 * c.stage);
    c.advance();
}

/* With intra-warpgroup overlap, steady state: S_n = Q K_n^T and O += P_{n+1} V_{n+1} go to
 * the tensor cores back to back; the softmax of S_n runs while P V is still in flight. pa holds
 * P_{n+1} on entry and P_n on exit; (pstage, pphase) is the ring slot of block n+1.
 * O is brought to block n+1's reference before P_{n+1} V is issued: with FM_LAZY_RESCALE first
 * thing in the step, where no product is in flight (the branch that skips it is allowed there),
 * else between the two issues, while the S product runs. */
template <bool MASKED>
static __device__ __forceinline__ void fm_step_overlap(fm_consumer &c, int nb,
                                                       float (&o)[FM_D / 2],
                                                       float (&s)[FM_BN / 2],
                                                       unsigned (&pa)[FM_BN / 16][4],
                                                       float (&m)[2], float (&l)[2],
                                                       float (&scl)[2], int &pstage,
                                                       unsigned &pphase) {
#if FM_LAZY_RESCALE
    fm_rescale_lazy(o, scl); /* O was last written by the P V waited on in the previous step */
#endif
    fm_mbar_wait(c.bar_k_full + 8 * c.stage, c.phase);
    c.turn_sync();
    fm_issue_qk(c, s);
#if !FM_LAZY_RESCALE
    fm_rescale(o, scl); /* O was last written by the P V waited on in the previous step */
#endif
    fm_mbar_wait(c.bar_v_full + 8 * pstage, pphase);
    fm_gemm_pv(o, pa, c.vdesc(pstage));
    c.turn_pass();
    fm_wgmma_wait<1>(); /* S_n done, P V may still run */
    fm_fence_regs(s);
    c.release(c.bar_k_empty + 8 * c.stage);
    if constexpr (MASKED) fm_mask(s, nb * FM_BN + c.col_lane, c.lim0, c.lim1());
    fm_softmax<MASKED>(s, m, l, scl, c.sl2);
    fm_wgmma_wait<0>(); /* P V done: pa and the V slot are free */
    fm_fence_regs(o);
    c.release(c.bar_v_empty + 8 * pstage);
    fm_convert_p(pa, s);
    pstage = c.stage;
    pphase = c.phase;
    c.advance();
}

/* A key block the tile loads but none of this warpgroup's rows sees (above the diagonal for its
 * rows, or every row past seqlen_q): no products, but the warpgroup still keeps its place in the
 * ring and in the ping-pong order. It waits for the copies before releasing their slots: an
 * empty barrier counts arrivals, and an arrival for a later use of the slot made before the
 * other warpgroups released the current one would complete the wrong phase. Full landing means
 * the producer has seen the previous use released. The turns are the ones a computed block
 * takes: one with intra-warpgroup overlap (S and P V issue together), two without. */
static __device__ __forceinline__ void fm_skip_block(fm_consumer &c) {
    fm_mbar_wait(c.bar_k_full + 8 * c.stage, c.phase);
    c.turn_sync();
    c.turn_pass();
#if !FM_INTRA_OVERLAP
    c.turn_sync();
    c.turn_pass();
#endif
    c.release(c.bar_k_empty + 8 * c.stage);
    fm_mbar_wait(c.bar_v_full + 8 * c.stage, c.phase);
    c.release(c.bar_v_empty + 8 * c.stage);
    c.advance();
}

/* The producer's copy of key block n (K or V) into a ring slot. Each 64-column chunk is one box
 * of BLOCK_N rows, or with a cluster this CTA's share of them (rows rank * FM_KV_BOX onward),
 * multicast to the same slot of every CTA of the cluster: each CTA's full barrier receives the
 * whole block's bytes, and L2 is read once per cluster. A share starts on a multiple of 8 rows,
 * i.e. of the 1024-byte swizzle atom. K and V are read again by the other tiles of their head
 * (running on other SMs at about the same time): keep them in L2 first. */
static __device__ __forceinline__ void fm_load_kv(unsigned dst, const fm_tma_desc *tm, unsigned bar,
                                                  int n, int hk, int b) {
#if FM_CLUSTER > 1
    const int r0 = (int)fm_cluster_rank() * FM_KV_BOX;
#pragma unroll
    for (int c = 0; c < FM_DCHUNKS; c++)
        fm_tma_load_4d_multicast(dst + (unsigned)(c * FM_BN * 128 + r0 * 128), tm, bar, 64 * c,
                                 n * FM_BN + r0, hk, b, (unsigned short)((1u << FM_CLUSTER) - 1),
                                 fm_l2_policy_evict_last());
#else
#pragma unroll
    for (int c = 0; c < FM_DCHUNKS; c++)
        fm_tma_load_4d_hint(dst + (unsigned)(c * FM_BN * 128), tm, bar, 64 * c, n * FM_BN, hk, b,
                            fm_l2_policy_evict_last());
#endif
}

/* The producer's copy of tile `q_iter`'s Q into slot q_iter % FM_Q_STAGES, once the consumers
 * have released that slot's previous use. */
static __device__ __forceinline__ void fm_load_q(unsigned q_iter, const fm_tile &tile,
                                                 const fm_tma_desc *tmQ, unsigned sQ,
                                                 unsigned bar_q_full, unsigned bar_q_empty) {
    const unsigned slot = q_iter % FM_Q_STAGES;
    fm_mbar_wait(bar_q_empty + 8 * slot, ((q_iter / FM_Q_STAGES) & 1) ^ 1);
    fm_mbar_arrive_expect_tx(bar_q_full + 8 * slot, FM_Q_BYTES);
#pragma unroll
    for (int c = 0; c < FM_DCHUNKS; c++)
        fm_tma_load_4d_hint(sQ + slot * FM_Q_BYTES + c * FM_BM * 128, tmQ, bar_q_full + 8 * slot,
                            64 * c, fm_tile_row0(tile.mb), tile.h, tile.b,
                            fm_l2_policy_evict_first());
}

#if FM_SPLIT_TAIL
/* ---- split tail: partial results ------------------------------------------------------------
 * Slot of (CTA, consumer warpgroup): 128 threads x (D/8 + 1) float4, [k][thread] so that a
 * warp's 16-byte stores and loads are contiguous: k < D/8 the thread's O accumulators 4k..4k+3,
 * k = D/8 its (m0, m1, l0, l1). Values stay in the accumulator layout: the owner's thread with
 * the same index holds the same rows and columns. */
static __device__ __forceinline__ float4 *fm_sk_slot(const fm_attn_kernel_params &p, int cta,
                                                     int cw) {
    return reinterpret_cast<float4 *>(p.sk_partial) +
           (long long)(cta * FM_CONSUMER_WGS + cw) * (128 * (FM_D / 8 + 1));
}

static __device__ __forceinline__ void fm_sk_write(const fm_attn_kernel_params &p, int cw,
                                                   int tid, const float (&o)[FM_D / 2],
                                                   const float (&m)[2], const float (&l)[2]) {
    float4 *slot = fm_sk_slot(p, (int)blockIdx.x, cw);
#pragma unroll
    for (int k = 0; k < FM_D / 8; k++)
        __stcg(slot + k * 128 + tid,
               make_float4(o[4 * k], o[4 * k + 1], o[4 * k + 2], o[4 * k + 3]));
    __stcg(slot + (FM_D / 8) * 128 + tid, make_float4(m[0], m[1], l[0], l[1]));
    /* Every thread's stores, then one release of the flag (cumulative over the barrier). */
    fm_bar_sync(FM_BAR_EPI + (unsigned)cw, 128);
    if (tid == 0) {
        __threadfence();
        unsigned *flag = p.sk_flags + blockIdx.x * FM_CONSUMER_WGS + cw;
        asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(flag), "r"(1u) : "memory");
    }
}

/* The owner of the split tile whose piece has index v: merge the partial results of the CTAs
 * after this one whose first unit lies in the tile (online-softmax merge: rescale both sides to
 * the larger maximum). The host zeroes the flags before each launch. */
static __device__ __forceinline__ void fm_sk_merge(const fm_attn_kernel_params &p, int v, int cw,
                                                   int tid, float (&o)[FM_D / 2], float (&m)[2],
                                                   float (&l)[2], float sl2) {
    const int tile_end = ((-v - 1) / p.sk_blocks + 1) * p.sk_blocks;
    const int ctas = fm_grid_ctas();
#pragma unroll 1
    for (int q = fm_cta() + 1; q < ctas && fm_sk_bound(q, p) < tile_end; q++) {
        /* the slot of CTA q's member with this CTA's rank (its rows) */
        const int qs = q * FM_CLUSTER + (int)blockIdx.x % FM_CLUSTER;
        if (tid == 0) {
            unsigned *flag = p.sk_flags + qs * FM_CONSUMER_WGS + cw;
            unsigned ready;
            for (;;) {
                asm volatile("ld.acquire.gpu.global.u32 %0, [%1];"
                             : "=r"(ready)
                             : "l"(flag)
                             : "memory");
                if (ready) break;
                __nanosleep(32);
            }
        }
        fm_bar_sync(FM_BAR_EPI + (unsigned)cw, 128);
        const float4 *slot = fm_sk_slot(p, qs, cw);
        const float4 ml = __ldcg(slot + (FM_D / 8) * 128 + tid);
        const float pm[2] = {ml.x, ml.y}, pl[2] = {ml.z, ml.w};
        float a[2], b[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float mx = fmaxf(m[h], pm[h]);
            /* both -inf: nothing seen on either side, both factors 0 (no inf - inf) */
            const float ms = mx == fm_neg_inf() ? 0.f : mx * sl2;
            a[h] = fm_exp2(m[h] * sl2 - ms);
            b[h] = fm_exp2(pm[h] * sl2 - ms);
            l[h] = l[h] * a[h] + pl[h] * b[h];
            m[h] = mx;
        }
#pragma unroll
        for (int k = 0; k < FM_D / 8; k++) {
            const float4 x = __ldcg(slot + k * 128 + tid);
            o[4 * k + 0] = o[4 * k + 0] * a[0] + x.x * b[0];
            o[4 * k + 1] = o[4 * k + 1] * a[0] + x.y * b[0];
            o[4 * k + 2] = o[4 * k + 2] * a[1] + x.z * b[1];
            o[4 * k + 3] = o[4 * k + 3] * a[1] + x.w * b[1];
        }
    }
}
#endif

/* ---- epilogue ------------------------------------------------------------------------------ */
/* Tile (or piece) v of this consumer warpgroup is complete in o, m, l: a split-tail writer
 * hands its partial result on, an owner merges the others'; otherwise normalise, stage through
 * shared memory, store, and write the lse. No product of this warpgroup is in flight here: the
 * branches on the thread index below would otherwise make ptxas serialise every wgmma of the
 * kernel (C7518). */
static __device__ __forceinline__ void fm_epilogue(const fm_attn_kernel_params &p,
                                                   const fm_tma_desc *tmO, int v, int cw, int tid,
                                                   int lane, int row_in_wg0, float (&o)[FM_D / 2],
                                                   float (&m)[2], float (&l)[2], float sl2,
                                                   unsigned sQ, unsigned sV, unsigned bar_o_empty) {
#if FM_SPLIT_TAIL
    if (v < 0) {
        const int vo = fm_opaque(v);
        const fm_piece pc = fm_iter_piece(vo, p);
        if (pc.role == 1) {
            /* A writer: the partial result goes to this CTA's slot; no output. */
            fm_sk_write(p, cw, tid, o, m, l);
#if !FM_O_SEPARATE
            fm_arrive_all(bar_o_empty); /* the staging area was not touched */
#endif
            return;
        }
        if (pc.role == 2) fm_sk_merge(p, vo, cw, tid, o, m, l, sl2);
    }
#endif
    /* Where the rows go, derived again from the tile index rather than kept live through the
     * main loop (registers are scarcest there: 160 with three consumers). */
    int bh, mb;
    fm_iter_tile(fm_opaque(v), p, bh, mb);
    const int row_base = fm_tile_row0(mb) + cw * 64;
    const int row0 = row_base + row_in_wg0;
    const int eb = bh / p.heads, eh = bh - eb * p.heads;
    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        inv[h] = l[h] > 0.f ? 1.f / l[h] : 0.f;
    }
    if (p.lse && (lane & 3) == 0) {
        float *lse = p.lse + (long long)bh * p.seqlen_q; /* bh = b * heads + h */
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = row0 + 8 * h;
            if (row < p.seqlen_q)
                lse[row] = l[h] > 0.f ? (m[h] * sl2 + fm_log2(l[h])) * FM_LN2 : fm_neg_inf();
        }
    }
    /* Staging layout: D/64 chunks of [64 rows][128 bytes] with the 128-byte swizzle, so the 8
     * rows a warp writes per instruction hit 8 distinct 16-byte units: no bank conflicts. */
#if FM_O_SEPARATE
    /* This warpgroup's own rows: only its warps' reads of the previous tile's output (rows other
     * warps wrote, or the copy engine's store) must be done before they are overwritten. */
#if FM_TMA_STORE
    if (tid == 0) fm_tma_store_wait_read<0>();
#endif
    fm_bar_sync(FM_BAR_EPI + (unsigned)cw, 128);
    /* opaque: else the staging addresses (one per store) are computed once before the tile loop
     * and held in registers through the main loop, which spilled */
    const unsigned so = (unsigned)fm_opaque((int)(sQ + FM_OFF_O + (unsigned)(cw * 64 * FM_D * 2)));
    (void)sV;
#else
    /* The V ring, once every consumer's last P V has completed (the other warpgroups may lag by
     * up to a step under ping-pong). */
    fm_bar_sync(FM_BAR_CONSUMERS, 128 * FM_CONSUMER_WGS);
    const unsigned so = (unsigned)fm_opaque((int)(sV + (unsigned)(cw * 64 * FM_D * 2)));
    (void)sQ;
#endif
#pragma unroll
    for (int i = 0; i < FM_D / 8; i++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = row_in_wg0 + 8 * h;
            const unsigned addr = so + (unsigned)((i / 8) * 64 * 128 + r * 128 +
                                                  (((i % 8) ^ (r & 7)) << 4) + (lane & 3) * 4);
            fm_st_shared_b32(addr, fm_pack_elem2(o[4 * i + 2 * h] * inv[h],
                                                 o[4 * i + 2 * h + 1] * inv[h]));
        }
    }
#if FM_TMA_STORE
    /* One thread hands the rows to the copy engine (rows past seqlen_q fall outside the tensor
     * map and are not written) and the warpgroup goes on to its next tile; the staging area is
     * waited for before its next use. */
    fm_fence_proxy_async();
    fm_bar_sync(FM_BAR_EPI + (unsigned)cw, 128);
    if (tid == 0) {
#pragma unroll
        for (int ch = 0; ch < FM_DCHUNKS; ch++)
            fm_tma_store_4d(tmO, so + (unsigned)(ch * 64 * 128), 64 * ch, row_base, eh, eb);
        fm_tma_store_commit();
    }
#else
    (void)tmO;
    unsigned short *const og = (unsigned short *)p.o;
    const long long o_base = (long long)eb * p.o_stride_b + (long long)eh * p.o_stride_h;
    fm_bar_sync(FM_BAR_EPI + (unsigned)cw, 128);
#pragma unroll
    for (int it = 0; it < 64 * FM_D / 8 / 128; it++) {
        const int u = it * 128 + tid;
        const int r = u / (FM_D / 8);
        const int cu = u % (FM_D / 8); /* 16-byte unit along the row */
        unsigned w[4];
        fm_ld_shared_v4(so + (unsigned)((cu / 8) * 64 * 128 + r * 128 + (((cu % 8) ^ (r & 7)) << 4)),
                        w);
        if (row_base + r < p.seqlen_q)
            fm_st_global_v4(og + o_base + (long long)(row_base + r) * p.o_stride_s + cu * 8, w);
    }
#endif
#if !FM_O_SEPARATE
    /* The next tile's V copies (async proxy) overwrite the staging area: order our generic
     * accesses before them, then release it. */
    fm_fence_proxy_async();
    fm_arrive_all(bar_o_empty);
#endif
}

/* ---- the kernel ----------------------------------------------------------------------------- */
extern "C" __global__ void __launch_bounds__(FM_THREADS, FM_CTAS_PER_SM)
    fm_attn_fwd_sm90(const __grid_constant__ fm_tma_desc tmQ,
                     const __grid_constant__ fm_tma_desc tmK,
                     const __grid_constant__ fm_tma_desc tmV,
                     const __grid_constant__ fm_tma_desc tmO, const fm_attn_kernel_params p) {
    extern __shared__ __align__(1024) unsigned char fm_smem_raw[];
    const unsigned raw = fm_smem_u32(fm_smem_raw);
    const unsigned sQ = (raw + 1023u) & ~1023u;
    const unsigned sK = sQ + FM_OFF_K;
    const unsigned sV = sQ + FM_OFF_V;
    const unsigned bar_q_full = sQ + FM_OFF_BAR;               /* + 8 * Q slot */
    const unsigned bar_q_empty = bar_q_full + 8 * FM_Q_STAGES; /* + 8 * Q slot */
    const unsigned bar_o_empty = bar_q_empty + 8 * FM_Q_STAGES;
    const unsigned bar_k_full = bar_o_empty + 8; /* + 8 * stage */
    const unsigned bar_k_empty = bar_k_full + 8 * FM_STAGES;
    const unsigned bar_v_full = bar_k_empty + 8 * FM_STAGES;
    const unsigned bar_v_empty = bar_v_full + 8 * FM_STAGES;

    /* broadcast from lane 0: the compiler must see the warpgroup index as warp-uniform, or the
     * whole K/V loop leaves the uniform datapath (bench/NOTES.md, v3 analysis) */
    const int wg = __shfl_sync(0xffffffffu, (int)(threadIdx.x / 128), 0);
    const int tid = (int)(threadIdx.x % 128);
    const int lane = tid % 32;

    if (threadIdx.x == 0) {
        fm_tma_prefetch_desc(&tmQ);
        fm_tma_prefetch_desc(&tmK);
        fm_tma_prefetch_desc(&tmV);
#if FM_TMA_STORE
        fm_tma_prefetch_desc(&tmO);
#endif
        /* Every consumer thread arrives: on q_empty after its last S product of a tile, on
         * o_empty after its epilogue has read the output back out of the V ring (of every CTA of
         * the cluster: the V copies into this ring come from each of their producers). */
        for (int q = 0; q < FM_Q_STAGES; q++) {
            fm_mbar_init(bar_q_full + 8 * q, 1);
            fm_mbar_init(bar_q_empty + 8 * q, 128 * FM_CONSUMER_WGS);
        }
        fm_mbar_init(bar_o_empty, 128 * FM_CONSUMER_WGS * FM_CLUSTER);
        for (int s = 0; s < FM_STAGES; s++) {
            fm_mbar_init(bar_k_full + 8 * s, 1);
            fm_mbar_init(bar_v_full + 8 * s, 1);
            /* one per consumer warp of every CTA in the cluster */
            fm_mbar_init(bar_k_empty + 8 * s, 4 * FM_CONSUMER_WGS * FM_CLUSTER);
            fm_mbar_init(bar_v_empty + 8 * s, 4 * FM_CONSUMER_WGS * FM_CLUSTER);
        }
        fm_mbar_init_fence();
    }
#if FM_CLUSTER > 1
    /* the other CTAs' barriers are initialised before anyone arrives on them or copies into them */
    fm_cluster_sync();
#else
    __syncthreads();
#endif

    if (wg == 0) {
        /* ================================ producer ================================ */
#if FM_SPLIT
        fm_setmaxnreg_dec<FM_PRODUCER_REGS>();
#endif
        if (tid != 0 && tid != 32) return;
        /* Q is read by one CTA once; each K/V block is read again by the other m-blocks of its
         * head (running on neighbouring SMs at about the same time): keep K/V in L2 first.
         * The policies are created where they are used (one instruction each): two 64-bit
         * values fewer live in the producer's 24 registers. */
        /* Two copy threads, one per warp, walking the same tiles and ring slots: thread 0
         * copies Q and K, thread 32 copies V. With intra-warpgroup overlap V of a block is
         * released a step after its K (P V runs with the next block's S), so a single thread
         * copying K and V in block order would hold each K copy until the previous block's V
         * slot is free: half a step of lead left under ping-pong, less than an L2 round trip once
         * two CTAs of a cluster drift apart. */
        const bool copies_k = tid == 0;
        int stage = 0;
        unsigned phase = 0;
        unsigned q_iter = 0;
        fm_tile_iter tiles;
        for (fm_iter_init(tiles, p); fm_iter_more(tiles, p); fm_iter_advance(tiles, p)) {
            int bh, mb;
            if (!fm_iter_tile(tiles.v, p, bh, mb)) continue;
            const fm_tile tile = fm_iter_make(tiles.v, bh, mb, p);
            if (tile.n_end <= 0) continue; /* consumers write zeros; nothing to load */
            const int hk = tile.h / p.head_group;
#if FM_Q_STAGES > 1
            /* Two Q slots: this tile's Q goes first, as soon as the previous tile's copies are
             * issued (STAGES blocks before its consumers need it); the slot was released by the
             * tile before the previous one. */
            if (copies_k) fm_load_q(q_iter, tile, &tmQ, sQ, bar_q_full, bar_q_empty);
#endif
            for (int n = tile.n_end - 1; n >= tile.n_lo; n--) {
                if (copies_k) {
                    fm_mbar_wait(bar_k_empty + 8 * stage, phase ^ 1);
                    fm_mbar_arrive_expect_tx(bar_k_full + 8 * stage, FM_KV_BYTES);
                    fm_load_kv(sK + stage * FM_KV_BYTES, &tmK, bar_k_full + 8 * stage, n, hk,
                               tile.b);
#if FM_Q_STAGES == 1
                    /* One Q slot: Q after the first K block (K streams while the previous tile
                     * finishes its S products). */
                    if (n == tile.n_end - 1)
                        fm_load_q(q_iter, tile, &tmQ, sQ, bar_q_full, bar_q_empty);
#endif
                } else {
#if !FM_O_SEPARATE
                    /* Without a separate O buffer the first V waits until the previous tile's
                     * epilogue has read its output back out of the V ring. */
                    if (n == tile.n_end - 1) fm_mbar_wait(bar_o_empty, (q_iter & 1) ^ 1);
#endif
                    fm_mbar_wait(bar_v_empty + 8 * stage, phase ^ 1);
                    fm_mbar_arrive_expect_tx(bar_v_full + 8 * stage, FM_KV_BYTES);
                    fm_load_kv(sV + stage * FM_KV_BYTES, &tmV, bar_v_full + 8 * stage, n, hk,
                               tile.b);
                }
                if (++stage == FM_STAGES) {
                    stage = 0;
                    phase ^= 1;
                }
            }
            q_iter++;
        }
    } else {
        /* ================================ consumers =============================== */
#if FM_SPLIT
        fm_setmaxnreg_inc<FM_CONSUMER_REGS>();
#endif
        const int cw = wg - 1;   /* consumer index: rows 64cw..64cw+63 of the tile */
        const int wq = tid / 32; /* warp in the warpgroup: rows 16wq..16wq+15 */
        const int row_in_wg0 = 16 * wq + lane / 4;
        fm_consumer c;
        const unsigned qrow0 = sQ + (unsigned)(cw * 64 * 128); /* this warpgroup's Q rows */
        const unsigned long long qdesc0 = fm_wgmma_desc_sw128(qrow0, 16, 1024);
        c.sK = sK;
        c.sV = sV;
        c.bar_k_full = bar_k_full;
        c.bar_k_empty = bar_k_empty;
        c.bar_v_full = bar_v_full;
        c.bar_v_empty = bar_v_empty;
        c.turn_self = FM_BAR_TURN + (unsigned)cw;
        c.turn_next = FM_BAR_TURN + (unsigned)((cw + 1) % FM_CONSUMER_WGS);
        c.lane = lane;
        c.sl2 = p.scale_log2;
        c.col_lane = 2 * (lane & 3);
        c.stage = 0;
        c.phase = 0;
#if FM_PINGPONG
        /* The turn token starts with consumer 0: its own arrival is half of its first sync. */
        if (cw == 0) fm_bar_arrive(FM_BAR_TURN + 0, 256);
#endif
        unsigned q_iter = 0;
        unsigned short *const og = (unsigned short *)p.o;
        float o[FM_D / 2];
        float m[2], l[2], scl[2];
        unsigned pa[FM_BN / 16][4];
        /* FM_FLAT: the current tile's first block (S, softmax, P) was done by the previous
         * tile's last step; its loop resumes at block n_carry. */
        bool carried = false;
        int n_carry = 0;

        fm_tile_iter tiles;
        fm_iter_init(tiles, p);
        while (fm_iter_more(tiles, p)) {
            int bh, mb;
            if (!fm_iter_tile(tiles.v, p, bh, mb)) {
                fm_iter_advance(tiles, p);
                continue;
            }
            const fm_tile tile = fm_iter_make(tiles.v, bh, mb, p);
            /* first query row of this WG (with a cluster, this CTA's rows of the cluster's tile) */
            const int first_row = fm_tile_row0(tile.mb) + cw * 64;

            if (tile.n_end <= 0) {
                /* No key visible to any row (causal, seqlen_k < seqlen_q): O = 0, lse = -inf. */
                const int row_base = first_row;
                const long long o_base = (long long)tile.b * p.o_stride_b +
                                         (long long)tile.h * p.o_stride_h;
                const unsigned zero[4] = {0u, 0u, 0u, 0u};
#pragma unroll
                for (int it = 0; it < 64 * FM_D / 8 / 128; it++) {
                    const int u = it * 128 + tid;
                    const int row = u / (FM_D / 8);
                    const int col = (u % (FM_D / 8)) * 8;
                    if (row_base + row < p.seqlen_q)
                        fm_st_global_v4(og + o_base + (long long)(row_base + row) * p.o_stride_s +
                                            col,
                                        zero);
                }
                if (p.lse && tid < 64 && row_base + tid < p.seqlen_q)
                    p.lse[((long long)tile.b * p.heads + tile.h) * p.seqlen_q + row_base + tid] =
                        fm_neg_inf();
                fm_iter_advance(tiles, p);
                continue;
            }

            /* This warpgroup's own key range (see fm_key_range): blocks wg_end..n_end-1 are
             * loaded for the other warpgroups only. */
            int wg_end, wg_mask_from;
            fm_key_range(first_row, 64, p, wg_end, wg_mask_from);
            const unsigned qslot = q_iter % FM_Q_STAGES;
            const int n_lo = tile.n_lo;
            /* S is per tile: declared out here its last values would stay live through the
             * epilogue (the wgmma asm reads its accumulators), 64 registers more at d128. */
            float s[FM_BN / 2];
            int n;
            bool any = true; /* does this warpgroup multiply anything in this tile? */
            int pstage = 0; /* ring slot of the block whose P V is pending (in pa) */
            unsigned pphase = 0;
            if (carried) {
                /* c.lim0, c.qdesc, o, m, l, scl and pa were set by the last tile's last step;
                 * the pending P V is the slot before the current one (derived here rather than
                 * kept live through the epilogue). */
                n = n_carry;
                pstage = c.stage == 0 ? FM_STAGES - 1 : c.stage - 1;
                pphase = c.stage == 0 ? c.phase ^ 1u : c.phase;
                carried = false;
            } else {
#if FM_CAUSAL
                c.lim0 = first_row + row_in_wg0 + p.causal_offset + 1;
#else
                c.lim0 = p.seqlen_k;
#endif
#pragma unroll
                for (int i = 0; i < FM_D / 2; i++) o[i] = 0.f;
                m[0] = m[1] = fm_neg_inf();
                l[0] = l[1] = 0.f;
                /* Q before any arrival on q_empty (even with nothing to multiply): q_full of
                 * this tile means the producer saw the previous tile's q_empty complete. */
                c.qdesc = qdesc0 + (unsigned long long)(qslot * (FM_Q_BYTES >> 4));
                fm_mbar_wait(bar_q_full + 8 * qslot, (q_iter / FM_Q_STAGES) & 1);
#if FM_Q_REGS
                c.load_q_regs(qrow0 + qslot * FM_Q_BYTES, wq);
#endif
                n = tile.n_end - 1;
#pragma unroll 1
                for (; n >= max(wg_end, n_lo); n--) fm_skip_block(c);
#if FM_INTRA_OVERLAP
                if (n < n_lo) {
                    any = false; /* nothing visible to these rows: the epilogue writes 0 / -inf */
                } else {
                    /* First block: S and softmax only. */
                    if (n >= wg_mask_from)
                        fm_s_and_softmax<true>(c, n, s, m, l, scl);
                    else
                        fm_s_and_softmax<false>(c, n, s, m, l, scl);
                    fm_convert_p(pa, s);
                    pstage = c.stage;
                    pphase = c.phase;
                    c.advance();
                    n--;
                }
#endif
            }
            /* What the epilogue writes: this tile's row state (FM_FLAT: m and l go on to the next
             * tile's first block before the epilogue). */
            float em[2], el[2];
#if FM_INTRA_OVERLAP
            if (any) {
#pragma unroll 1
                for (; n >= n_lo && n >= wg_mask_from; n--)
                    fm_step_overlap<true>(c, n, o, s, pa, m, l, scl, pstage, pphase);
#pragma unroll 1
                for (; n >= n_lo; n--)
                    fm_step_overlap<false>(c, n, o, s, pa, m, l, scl, pstage, pphase);
            }
            /* Every S product is done (the last step waited for all groups): Q may go. */
            fm_mbar_arrive(bar_q_empty + 8 * qslot);
            em[0] = m[0], em[1] = m[1], el[0] = l[0], el[1] = l[1];
#if FM_FLAT
            /* Cross-tile step: the next tile's first S product goes to the tensor cores with this
             * tile's last P V (one fm_step_overlap, as inside a tile), and its softmax runs while
             * that P V does; the epilogue follows. The boundary then costs the tensor cores no
             * idle step: without it, the last P V ran alone, and the next tile's first S product
             * and softmax ran with no P V beside them. Only where that first block is the next
             * tile's first (no skipped blocks: a skipped block would wait for the V slot the
             * pending P V still holds). */
            fm_tile_iter nx = tiles;
            int nbh = 0, nmb = 0;
            bool found = false;
            if (any) {
                fm_iter_advance(nx, p);
                while (fm_iter_more(nx, p) && !(found = fm_iter_tile(nx.v, p, nbh, nmb)))
                    fm_iter_advance(nx, p);
            }
            if (found) {
                const fm_tile nt = fm_iter_make(nx.v, nbh, nmb, p);
                const int nrow = fm_tile_row0(nt.mb) + cw * 64;
                int nwg_end, nwg_mask_from;
                fm_key_range(nrow, 64, p, nwg_end, nwg_mask_from);
                const int nf = nt.n_end - 1; /* the next tile's first block */
                if (nt.n_end > 0 && nwg_end >= nt.n_end && nf >= nt.n_lo) {
#if FM_CAUSAL
                    c.lim0 = nrow + row_in_wg0 + p.causal_offset + 1;
#endif
                    const unsigned nslot = (q_iter + 1) % FM_Q_STAGES;
                    c.qdesc = qdesc0 + (unsigned long long)(nslot * (FM_Q_BYTES >> 4));
                    fm_mbar_wait(bar_q_full + 8 * nslot, ((q_iter + 1) / FM_Q_STAGES) & 1);
#if FM_Q_REGS
                    /* no product in flight: the tile's last step waited for all of them */
                    c.load_q_regs(qrow0 + nslot * FM_Q_BYTES, wq);
#endif
                    m[0] = m[1] = fm_neg_inf();
                    l[0] = l[1] = 0.f;
                    if (nf >= nwg_mask_from)
                        fm_step_overlap<true>(c, nf, o, s, pa, m, l, scl, pstage, pphase);
                    else
                        fm_step_overlap<false>(c, nf, o, s, pa, m, l, scl, pstage, pphase);
                    carried = true;
                    n_carry = nf - 1;
                }
            }
            if (!carried)
#endif
            if (any) {
                /* Last P V. */
                fm_rescale_lazy(o, scl);
                fm_mbar_wait(bar_v_full + 8 * pstage, pphase);
                fm_gemm_pv(o, pa, c.vdesc(pstage));
                fm_wgmma_wait<0>();
                fm_fence_regs(o);
                c.release(bar_v_empty + 8 * pstage);
            }
#else
            (void)any;
#pragma unroll 1
            for (; n >= n_lo && n >= wg_mask_from; n--)
                fm_step_serial<true>(c, n, o, s, pa, m, l, scl);
#pragma unroll 1
            for (; n >= n_lo; n--) fm_step_serial<false>(c, n, o, s, pa, m, l, scl);
            fm_mbar_arrive(bar_q_empty + 8 * qslot);
            em[0] = m[0], em[1] = m[1], el[0] = l[0], el[1] = l[1];
#endif
            fm_epilogue(p, &tmO, tiles.v, cw, tid, lane, row_in_wg0, o, em, el, c.sl2, sQ, sV,
                        bar_o_empty);
            q_iter++;
#if FM_FLAT
            if (carried) {
                /* The next tile's O starts from zero (its first P V is in the next step). The
                 * fence hides the constant: known zeros, ptxas kept a second copy of O live
                 * through the main loop (55 registers more at d128). */
#pragma unroll
                for (int i = 0; i < FM_D / 2; i++) o[i] = 0.f;
                fm_fence_regs(o);
                tiles = nx;
                continue;
            }
#endif
            fm_iter_advance(tiles, p);
        }
#if FM_TMA_STORE
        /* the shared memory must outlive the copy engine's last read of it */
        if (tid == 0) fm_tma_store_wait_read<0>();
#endif
#if FM_CLUSTER > 1
        /* nor may it go while the other CTA's consumers still release slots here */
        fm_cluster_sync();
#endif
    }
}
