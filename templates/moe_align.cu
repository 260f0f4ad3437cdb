/*
 * moe_align.cu - sorts the T*K routing slots by expert into BLOCK_M-padded row ranges, on the
 * GPU, so that the host never waits for the routing result.
 *
 * Outputs (see common/moe_params.h): expert_counts[e]; expert_offsets[e] = first padded row of
 * expert e (each range rounded up to block_m rows), expert_offsets[E] = total rows;
 * sorted_slot[row] = slot id (token * K + k) or -1 for the padding rows of every expert;
 * sorted_weight[row] (when asked for) = that slot's routing weight, 0 for padding;
 * tile_expert[i] = expert of the i-th block_m-row tile; num_tiles = total rows / block_m.
 * merge_max > 0 (ws_tail = merge) leaves each expert's last tile out of the list when it holds at
 * most merge_max rows behind a full tile (the tile before it runs them); tile_row0[i] and
 * expert_tiles[e] (first listed tile of each expert, then the count) say where the listed
 * tiles are.
 * Rows past the total are not written: the GEMMs never read them (their tiles exit early).
 * Within one expert the order of slots is whatever the atomics give; each row of the GEMMs is
 * computed independently of the others, so the results do not depend on it.
 *
 * Two kernels, each over CTAs of FM_ALIGN_THREADS x FM_MOE_ALIGN_PER_THREAD slots (so the work
 * per CTA is bounded whatever T is; one CTA for the whole problem took 0.36 ms at T = 16384,
 * K = 8 on an H100, bench/NOTES.md):
 *  - fm_moe_align: each CTA counts its slots per expert in shared memory and adds the counts to
 *    expert_counts (global atomics, at most E per CTA); the last CTA to finish (a ticket
 *    counter) computes the padded offsets, the tile table, the padding rows and each expert's
 *    first free row (cursor). expert_counts and the ticket must be zero before the launch.
 *  - fm_moe_align_place: every slot takes the next row of its expert from the cursor (global
 *    atomics) and writes its slot id and weight there.
 * Counting and placing aggregate the lanes of a warp that hit the same expert into one atomic,
 * so even every slot routed to one expert costs one atomic per warp, not 32 serialised ones.
 * E <= 512 (checked by the host); no dynamic shared memory (about 4 KB static).
 */
#include "common/moe_params.h"

#ifndef FM_ALIGN_THREADS
#define FM_ALIGN_THREADS 256
#endif
#if FM_ALIGN_THREADS % 32 != 0 || FM_ALIGN_THREADS < 64 || FM_ALIGN_THREADS > 1024
#error "FM_ALIGN_THREADS must be a multiple of 32 in 64..1024"
#endif

namespace fm_moe_align_k {
constexpr int kThreads = FM_ALIGN_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kE = FM_MOE_MAX_EXPERTS;
constexpr int kChunk = kThreads * FM_MOE_ALIGN_PER_THREAD; /* slots per CTA */

static __device__ __forceinline__ unsigned lanemask_lt(void) {
    unsigned r;
    asm("mov.u32 %0, %%lanemask_lt;" : "=r"(r));
    return r;
}

/* Adds one to counter[e] (shared or global) for every lane with a valid e (all 32 lanes must call
 * it); returns the
 * counter's value before this lane's increment, ordered by lane within the warp. Lanes with the
 * same expert agree on a leader that does a single atomic for the group. */
static __device__ __forceinline__ int aggregated_inc(int *counter, int e, bool valid) {
    const int key = valid ? e : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    const int lane = threadIdx.x & 31;
    const int leader = __ffs(peers) - 1;
    int base = 0;
    if (valid && lane == leader) base = atomicAdd(&counter[e], __popc(peers));
    base = __shfl_sync(0xffffffffu, base, leader);
    return base + __popc(peers & lanemask_lt());
}
} // namespace fm_moe_align_k

extern "C" __global__ void __launch_bounds__(FM_ALIGN_THREADS)
fm_moe_align(const fm_moe_align_params p) {
    using namespace fm_moe_align_k;
    __shared__ int s_count[kE];
    __shared__ int s_off[kE + 1];
    __shared__ int s_tile[kE + 1]; /* first listed tile of each expert, then the count */
    __shared__ int s_last;

    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int E = p.experts, BM = p.block_m;

    for (int e = tid; e < kE; e += kThreads) s_count[e] = 0;
    __syncthreads();

    /* ---- this CTA's slots, counted per expert (every thread runs the same iterations, so whole
     * warps reach the warp-synchronous aggregation) ---- */
    const int first = (int)blockIdx.x * kChunk;
#pragma unroll
    for (int j = 0; j < FM_MOE_ALIGN_PER_THREAD; ++j) {
        const int s = first + j * kThreads + tid;
        const int e = s < p.slots ? p.topk_ids[s] : -1;
        aggregated_inc(s_count, e, e >= 0 && e < E);
    }
    __syncthreads();
    for (int e = tid; e < E; e += kThreads)
        if (s_count[e]) atomicAdd(&p.expert_counts[e], s_count[e]);

    /* ---- the last CTA to finish sees every count (fence, then the ticket) ---- */
    __threadfence();
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(p.ticket, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int e = tid; e < kE; e += kThreads) s_count[e] = e < E ? __ldcg(&p.expert_counts[e]) : 0;
    __syncthreads();

    /* ---- exclusive scan of the padded counts: warp 0, 16 experts per lane ---- */
    if (warp == 0) {
        constexpr int kPer = kE / 32;
        int padded[kPer], listed[kPer];
        int run = 0, run_t = 0;
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
            const int e = lane * kPer + j;
            const int c = e < E ? s_count[e] : 0;
            padded[j] = (c + BM - 1) / BM * BM;
            /* merge_max: a last tile of at most merge_max rows behind a full one is not listed */
            listed[j] = padded[j] / BM -
                        (p.merge_max > 0 && c > BM && (c - 1) % BM + 1 <= p.merge_max ? 1 : 0);
            run += padded[j];
            run_t += listed[j];
        }
        int incl = run, incl_t = run_t; /* inclusive scans of the lane totals */
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, incl, off);
            const int vt = __shfl_up_sync(0xffffffffu, incl_t, off);
            if (lane >= off) {
                incl += v;
                incl_t += vt;
            }
        }
        int start = incl - run, start_t = incl_t - run_t;
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
            const int e = lane * kPer + j;
            if (e < E) {
                s_off[e] = start;
                s_tile[e] = start_t;
            }
            start += padded[j];
            start_t += listed[j];
        }
        if (lane == 31) {
            s_off[E] = incl;
            s_tile[E] = incl_t;
        }
    }
    __syncthreads();

    const int total = s_off[E];
    const int tiles = s_tile[E]; /* total / BM, less the tiles merge_max leaves out */
    if (tid == 0) *p.num_tiles = tiles < p.max_tiles ? tiles : p.max_tiles;
    for (int e = tid; e < E; e += kThreads) {
        p.expert_offsets[e] = s_off[e];
        p.cursor[e] = s_off[e];
        if (p.expert_tiles) p.expert_tiles[e] = s_tile[e];
    }
    if (tid == 0) p.expert_offsets[E] = total;
    if (tid == 0 && p.expert_tiles) p.expert_tiles[E] = tiles;

    /* ---- tile -> expert: binary search of each tile in the experts' first tiles ---- */
    for (int i = tid; i < tiles && i < p.max_tiles; i += kThreads) {
        int lo = 0, hi = E - 1; /* last e with s_tile[e] <= i (empty experts share first tiles:
                                   the last of them is the one that owns the tile) */
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (s_tile[mid] <= i)
                lo = mid;
            else
                hi = mid - 1;
        }
        p.tile_expert[i] = lo;
        if (p.tile_row0) p.tile_row0[i] = s_off[lo] + (i - s_tile[lo]) * BM;
    }

    /* ---- padding rows: one warp per expert, lanes over its (fewer than BM) padding rows ---- */
    for (int e = warp; e < E; e += kWarps) {
        const int pad0 = s_off[e] + s_count[e];
        for (int r = pad0 + lane; r < s_off[e + 1]; r += 32) {
            p.sorted_slot[r] = -1;
            if (p.sorted_weight) p.sorted_weight[r] = 0.f;
        }
    }
}

/* Launched after fm_moe_align on the same stream, with the same grid. */
extern "C" __global__ void __launch_bounds__(FM_ALIGN_THREADS)
fm_moe_align_place(const fm_moe_align_params p) {
    using namespace fm_moe_align_k;
    const int E = p.experts;
    const int first = (int)blockIdx.x * kChunk;
#pragma unroll
    for (int j = 0; j < FM_MOE_ALIGN_PER_THREAD; ++j) {
        const int s = first + j * kThreads + (int)threadIdx.x;
        const int e = s < p.slots ? p.topk_ids[s] : -1;
        const bool valid = e >= 0 && e < E;
        const int row = aggregated_inc(p.cursor, e, valid);
        if (valid) {
            p.sorted_slot[row] = s;
            if (p.sorted_weight) p.sorted_weight[row] = p.slot_weight[s];
        }
    }
}
