/*
 * attn_launch_sm90.c - launcher of the Hopper attention family (templates/attn_fwd_sm90.cu):
 * builds the three TMA tensor maps, sizes the grid, launches.
 *
 * The kernel reads Q, K and V through the copy engine in boxes of 64 head-dim columns (128
 * bytes, the widest inner box the 128-byte swizzle allows) by block_m (Q) or block_n (K, V)
 * rows; the shared-memory layout that swizzle produces is the one its wgmma descriptors
 * assume. The tensors are described as 4-D (D, S, H, B) with the caller's strides, so any
 * layout with a contiguous head dim and 16-byte aligned strides works without copies, and rows
 * past the end of a sequence come back as zeros.
 *
 * Tensor maps are encoded on every launch: encoding is a few hundred nanoseconds of host work
 * against a launch that moves megabytes, and caching them per (kernel, pointers, shape) would
 * need invalidation and locking for no measurable gain.
 */
#include "internal.h"

#include <limits.h>
#include <string.h>

/* One 4-D map over a [B, S, H, D] tensor given by its element strides (batch, seq, head). */
static fm_status encode_map(fm_context *ctx, CUtensorMap *map, const char *what, fm_dtype dtype,
                            const void *base, int d, int s, int h, int b, const int64_t st[3],
                            int box_rows) {
    const cuuint64_t esize = 2; /* bf16 and fp16 */
    cuuint64_t dims[4] = {(cuuint64_t)d, (cuuint64_t)s, (cuuint64_t)h, (cuuint64_t)b};
    /* Byte strides of dims 1..3 (seq, head, batch). A dimension of extent 1 is never stepped,
     * but the driver still wants a non-zero multiple of 16 there. */
    const int64_t el[3] = {st[1], st[2], st[0]};
    cuuint64_t strides[3];
    for (int i = 0; i < 3; i++) {
        strides[i] = (cuuint64_t)el[i] * esize;
        if (dims[i + 1] == 1 && strides[i] == 0) strides[i] = 16;
    }
    const cuuint32_t box[4] = {64, (cuuint32_t)box_rows, 1, 1};
    return fm_tma_encode_4d(ctx, map, what, dtype, base, dims, strides, box);
}

fm_status fm_attn_launch_sm90(fm_context *ctx, const fm_loaded *k, fm_attn_kernel_params *p,
                              const fm_attention_args *a, CUstream stream) {
    const long long bm = fm_config_int(&k->cfg, "block_m", 0);
    const long long bn = fm_config_int(&k->cfg, "block_n", 0);
    const long long persistent = fm_config_int(&k->cfg, "persistent", 0);
    const long long ctas_per_sm = fm_config_int(&k->cfg, "ctas_per_sm", 1);
    const long long cluster = fm_config_int(&k->cfg, "cluster", 1);
    if (bm < 64 || bm > 256 || bm % 64 != 0 || bn < 16 || bn > 256 || bn % 16 != 0)
        return fm_set_error(ctx, FM_ERR_INTERNAL, "%s: block_m %lld / block_n %lld out of range",
                            k->name, bm, bn);
    if ((cluster != 1 && cluster != 2) || (cluster == 2 && (!persistent || a->causal)))
        return fm_set_error(ctx, FM_ERR_INTERNAL, "%s: cluster %lld needs a persistent, non-causal "
                            "kernel", k->name, cluster);
    if (a->head_dim % 64 != 0)
        return fm_set_error(ctx, FM_ERR_UNSUPPORTED,
                            "%s: head_dim %d is not a multiple of 64 (one 128-byte TMA box)",
                            k->name, a->head_dim);

    /* With clusters the schedule's tiles are a cluster's (cluster * block_m rows): the last one
     * may leave a CTA only rows past seqlen_q, which it skips while still copying its share of
     * K and V for the other. */
    const long long m_blocks = ((long long)p->seqlen_q + bm * cluster - 1) / (bm * cluster);
    const long long tiles = m_blocks * p->heads * p->batch;
    /* Half of INT_MAX: the kernel's persistent causal schedule numbers two indices per pair of
     * m-blocks, in int. */
    if (tiles > INT_MAX / 2)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "%lld tiles of %lld rows: the problem is too large for one launch",
                            tiles, bm);
    p->num_m_blocks = (int)m_blocks;
    p->num_tiles = (int)tiles;
    p->sk_first_tile = (int)tiles; /* nothing split unless set below */
    p->sk_units = 0;
    p->sk_blocks = 0;

    CUtensorMap tm[4];
    memset(tm, 0, sizeof tm);
    fm_status s;
    if ((s = encode_map(ctx, &tm[0], "tensor map of q", a->dtype, a->q, a->head_dim, a->seqlen_q,
                        a->heads, a->batch, a->q_stride, (int)bm)) != FM_OK ||
        (s = encode_map(ctx, &tm[1], "tensor map of k", a->dtype, a->k, a->head_dim, a->seqlen_k,
                        a->kv_heads, a->batch, a->k_stride, (int)(bn / cluster))) != FM_OK ||
        (s = encode_map(ctx, &tm[2], "tensor map of v", a->dtype, a->v, a->head_dim, a->seqlen_k,
                        a->kv_heads, a->batch, a->v_stride, (int)(bn / cluster))) != FM_OK)
        return s;
    /* O, for configurations that store the output through the copy engine: boxes of 64 rows
     * (one consumer warpgroup's rows); rows past seqlen_q are clipped by the map. */
    if (fm_config_int(&k->cfg, "tma_store", 0) == 1 &&
        (s = encode_map(ctx, &tm[3], "tensor map of o", a->dtype, a->o, a->head_dim, a->seqlen_q,
                        a->heads, a->batch, a->o_stride, 64)) != FM_OK)
        return s;

    /* Persistent: as many CTAs as can be resident (ctas_per_sm per SM: the configuration is
     * built for that occupancy), each striding over the tiles; otherwise one CTA per tile. */
    long long grid = tiles;
    if (ctas_per_sm < 1 || ctas_per_sm > 2)
        return fm_set_error(ctx, FM_ERR_INTERNAL, "%s: ctas_per_sm %lld out of range", k->name,
                            ctas_per_sm);
    if (persistent && ctx->sm_count > 0 && grid > ctx->sm_count * ctas_per_sm)
        grid = ctx->sm_count * ctas_per_sm;

    CUresult r = ctx->drv->cuFuncSetAttribute(k->fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                              k->smem_bytes);
    if (r != CUDA_SUCCESS) return fm_cuda_error(ctx, ctx->drv, r, k->name);

    CUlaunchAttribute attr;
    CUlaunchConfig lc;
    fm_launch_config(&lc, &attr, (unsigned)k->threads, (unsigned)k->smem_bytes, (unsigned)cluster,
                     stream);
    if (cluster > 1) {
        /* The schedule counts clusters, all resident at once (the split tail's owners wait on
         * other CTAs): as many as the GPCs hold, which may be fewer than SMs / cluster. */
        if (k->max_clusters == 0) {
            int n = 0;
            lc.gridDimX = (unsigned)(ctx->sm_count > 0 ? ctx->sm_count : cluster);
            r = ctx->drv->cuOccupancyMaxActiveClusters(&n, k->fn, &lc);
            if (r != CUDA_SUCCESS) return fm_cuda_error(ctx, ctx->drv, r, k->name);
            if (n < 1)
                return fm_set_error(ctx, FM_ERR_UNSUPPORTED, "%s: no cluster of %lld CTAs fits "
                                    "this device", k->name, cluster);
            /* a cache filled on first use; concurrent launches would store the same value */
            ((fm_loaded *)k)->max_clusters = n;
        }
        if (grid > k->max_clusters) grid = k->max_clusters;
    }

    /* Split tail: see fm_tile_iter in the template. The partial last round is split, so that
     * every CTA gets the same number of key blocks; a round more only where that round alone
     * would give a CTA fewer than two. Splitting two rounds (CUTLASS's "data-parallel + one
     * stream-K wave") measured 2-3% slower at d256 on H200: the CTAs of the split region sweep
     * the keys of their heads out of step, so twice the heads' K and V must stay in L2. The grid
     * is then every SM. */
    if (fm_config_int(&k->cfg, "split_tail", 0) == 1 && a->workspace && !a->causal &&
        ctx->sm_count > 0) {
        const long long g = cluster > 1 ? k->max_clusters : ctx->sm_count;
        const long long nk = ((long long)p->seqlen_k + bn - 1) / bn;
        long long first = tiles / g * g;
        long long units = (tiles - first) * nk;
        if (units < 2 * g && first >= g) {
            first -= g;
            units += g * nk;
        }
        if (tiles % g != 0 && units >= 2 * g && units <= INT_MAX / g) {
            p->sk_first_tile = (int)first;
            p->sk_units = (int)units;
            p->sk_blocks = (int)nk;
            p->sk_flags = (unsigned *)a->workspace;
            p->sk_partial = (float *)((char *)a->workspace + fm_attn_workspace_flags_bytes(ctx));
            grid = g;
            /* The ready flags must start at zero: each launch sets the ones it uses (and a
             * fresh workspace holds anything). */
            r = ctx->drv->cuMemsetD32Async((CUdeviceptr)(uintptr_t)a->workspace, 0,
                                           (size_t)(g * cluster) * 3, stream);
            if (r != CUDA_SUCCESS) return fm_cuda_error(ctx, ctx->drv, r, k->name);
        }
    }

    void *args[] = {&tm[0], &tm[1], &tm[2], &tm[3], p};
    lc.gridDimX = (unsigned)(grid * cluster);
    r = ctx->drv->cuLaunchKernelEx(&lc, k->fn, args, NULL);
    return r == CUDA_SUCCESS ? FM_OK : fm_cuda_error(ctx, ctx->drv, r, k->name);
}
