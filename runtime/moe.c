/*
 * moe.c - fm_moe_workspace_size / fm_moe_fwd: validate, carve the workspace, choose the GEMM
 * configuration, and enqueue the fused MoE forward on the caller's stream.
 *
 * Launch sequence (all on `stream`, no host synchronisation: every size the host needs is an
 * upper bound known from the arguments; the real counts stay on the device):
 *   0. memset the counters (tile count, dynamic-schedule counters, alignment ticket, expert
 *      counts: one block of the workspace); combine=atomic only: memset acc [T, H] fp32 to 0
 *   1. fm_moe_route        grid ceil(T / 4) x 128 threads: ids, weights [T, K]
 *   2. fm_moe_align        grid ceil(T*K / 2048) x 256: counts, padded offsets, tile_expert,
 *                          num_tiles, padding rows, each expert's first free row (the last CTA)
 *      fm_moe_align_place  same grid: sorted_slot (pipe = swap: also each padded row's
 *                          routing weight)
 *   3. fm_moe_gemm1_<arch> grid m_tiles * ceil(I / (BN/2)): intermediate [rows, I] 16-bit
 *   4. fm_moe_gemm2_<arch> grid (m_tiles * ceil(H / BN), split_k): slot rows or fp32 atomics
 *      (<arch> = sm80 or sm90 from the configuration's family; block and shared memory from
 *      the loaded configuration, the same for both GEMMs). moe_gemm_sm90 with pipe = ws or
 *      swap: both GEMMs take two tensor maps before the parameter block (ws_maps below) and
 *      run persistent (grid min(SMs, tiles)) or one CTA per tile (ws_grid)
 *   5. fm_moe_combine      grid ceil(T * H / 2048) x 256: out [T, H]
 * m_tiles = floor((T*K + min(E, T*K) * (BM - 1)) / BM) bounds the real tile count: an expert
 * with c > 0 rows needs ceil(c / BM) <= (c + BM - 1) / BM tiles, at most min(E, T*K) experts
 * are hit, and the sum is an integer. CTAs of tiles past the real count exit at once, and they
 * come last in launch order.
 *
 * Workspace (config-independent, so its size never depends on what the database holds; each
 * region starts on a 256-byte boundary):
 *   ids [T*K] i32 | weights [T*K] f32 | num_tiles and counters (256 bytes) | counts [E] i32 |
 *   offsets [E+1] i32 | cursor [E] i32 | sorted_slot [R] i32 | sorted_weight [R] f32 |
 *   tile_expert [M] i32 | tile_row0 [M] i32 | expert_tiles [E+1] i32 |
 *   intermediate [R, I] 16-bit |
 *   buffer max(T*K*H*2, T*H*4) bytes (slot rows, or the fp32 accumulator)
 * with R = T*K + min(E, T*K) * (MAX_BLOCK_M - 1) (rows grow with BM) and
 *      M = floor((T*K + min(E, T*K) * (MIN_BLOCK_M - 1)) / MIN_BLOCK_M) (tiles shrink with BM).
 * ids/weights are used only when the caller passes no topk_ids/topk_weights.
 */
#include "internal.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The launch contracts of the fixed kernels (generator/moe_route.lua, moe_align.lua); their
 * configurations have no parameters and are named after their family. */
#define MOE_COMBINE_THREADS 256

static const char *dtype_name(fm_dtype t) { return t == FM_DTYPE_BF16 ? "bf16" : "fp16"; }

/* ---- validation -------------------------------------------------------------------------- */

/* Everything the workspace size depends on. */
static fm_status check_shape(const fm_context *ctx, const fm_moe_args *a) {
    if (!a) return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "moe: args is NULL");
    if (a->dtype != FM_DTYPE_BF16 && a->dtype != FM_DTYPE_FP16)
        return fm_set_error(ctx, FM_ERR_UNSUPPORTED, "moe: dtype %d: supported are bf16 and fp16",
                            (int)a->dtype);
    if (a->tokens < 1)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "moe: tokens = %d, must be at least 1",
                            a->tokens);
    if (a->hidden < 64 || a->hidden % 64 != 0)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "moe: hidden = %d must be a positive multiple of 64", a->hidden);
    if (a->intermediate < 64 || a->intermediate % 64 != 0)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "moe: intermediate = %d must be a positive multiple of 64",
                            a->intermediate);
    if (a->experts < 1 || a->experts > FM_MOE_MAX_EXPERTS)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "moe: experts = %d, must be in 1..%d",
                            a->experts, FM_MOE_MAX_EXPERTS);
    if (a->topk < 1 || a->topk > FM_MOE_MAX_TOPK)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "moe: topk = %d, must be in 1..%d",
                            a->topk, FM_MOE_MAX_TOPK);
    if (a->topk > a->experts)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "moe: topk = %d exceeds the number of experts (%d)", a->topk,
                            a->experts);
    /* Index arithmetic: slots and padded rows are int on the device; weight-row offsets inside
     * one expert are 32-bit (gemm1 reads 2I rows of H). */
    long long slots = (long long)a->tokens * a->topk;
    long long rows = slots + (long long)a->experts * (FM_MOE_MAX_BLOCK_M - 1);
    if (rows > INT_MAX / 2)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "moe: tokens * topk = %lld is too large (the padded rows must stay "
                            "below 2^30)",
                            slots);
    if (2LL * a->intermediate * a->hidden >= INT_MAX)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "moe: 2 * intermediate * hidden = %lld elements per expert is too "
                            "large (below 2^31)",
                            2LL * a->intermediate * a->hidden);
    return FM_OK;
}

static fm_status check_ptr(const fm_context *ctx, const void *p, const char *name, unsigned align,
                           int required) {
    if (!p) {
        if (!required) return FM_OK;
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "moe: %s is NULL", name);
    }
    if ((uintptr_t)p % align)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "moe: %s = %p is not %u-byte aligned",
                            name, p, align);
    return FM_OK;
}

/* Byte offsets inside the 256-byte block at moe_layout.num_tiles (the tile count is at 0). */
enum { MOE_DYN_COUNTERS = 64, MOE_ALIGN_TICKET = 72 };

typedef struct moe_layout {
    size_t ids, weights, num_tiles, counts, offsets, cursor, sorted, sorted_w, tile_expert,
        tile_row0, expert_tiles, inter, buf, total;
    long long max_rows, max_tiles;
} moe_layout;

static size_t up256(size_t x) { return (x + 255) & ~(size_t)255; }

static long long hit_bound(const fm_moe_args *a) {
    long long slots = (long long)a->tokens * a->topk;
    return slots < a->experts ? slots : a->experts;
}

/* Real tiles of block_m rows are at most this many (see the header comment). */
static long long tiles_bound(const fm_moe_args *a, int block_m) {
    long long slots = (long long)a->tokens * a->topk;
    return (slots + hit_bound(a) * (block_m - 1)) / block_m;
}

static void layout_of(const fm_moe_args *a, moe_layout *l) {
    size_t slots = (size_t)a->tokens * (size_t)a->topk;
    size_t T = (size_t)a->tokens, H = (size_t)a->hidden, I = (size_t)a->intermediate;
    l->max_rows = (long long)slots + hit_bound(a) * (FM_MOE_MAX_BLOCK_M - 1);
    l->max_tiles = tiles_bound(a, FM_MOE_MIN_BLOCK_M);
    size_t off = 0;
    l->ids = off;
    off += up256(slots * 4);
    l->weights = off;
    off += up256(slots * 4);
    /* The real tile count; at MOE_DYN_COUNTERS the dynamic schedule's two tile counters, at
     * MOE_ALIGN_TICKET the alignment's ticket; the expert counts right after, so that one memset
     * before each layer clears every counter that accumulates. */
    l->num_tiles = off;
    off += 256;
    l->counts = off;
    off += up256((size_t)a->experts * 4);
    l->offsets = off;
    off += up256(((size_t)a->experts + 1) * 4);
    l->cursor = off;
    off += up256((size_t)a->experts * 4);
    l->sorted = off;
    off += up256((size_t)l->max_rows * 4);
    l->sorted_w = off;
    off += up256((size_t)l->max_rows * 4);
    l->tile_expert = off;
    off += up256((size_t)l->max_tiles * 4);
    l->tile_row0 = off;
    off += up256((size_t)l->max_tiles * 4);
    l->expert_tiles = off;
    off += up256(((size_t)a->experts + 1) * 4);
    l->inter = off;
    off += up256((size_t)l->max_rows * I * 2);
    l->buf = off;
    size_t slot_bytes = slots * H * 2, acc_bytes = T * H * 4;
    off += up256(slot_bytes > acc_bytes ? slot_bytes : acc_bytes);
    l->total = off;
}

static fm_status check_args(const fm_context *ctx, const fm_moe_args *a, moe_layout *l) {
    fm_status s = check_shape(ctx, a);
    if (s != FM_OK) return s;
    if (a->routing != FM_MOE_ROUTING_SOFTMAX_TOPK && a->routing != FM_MOE_ROUTING_SIGMOID_GROUPED)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "moe: routing = %d: use FM_MOE_ROUTING_SOFTMAX_TOPK (0) or "
                            "FM_MOE_ROUTING_SIGMOID_GROUPED (1)",
                            (int)a->routing);
    if (a->routing == FM_MOE_ROUTING_SIGMOID_GROUPED) {
        int ng = a->n_group <= 0 ? 1 : a->n_group;
        if (ng > FM_MOE_MAX_GROUPS || a->experts % ng != 0)
            return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                                "moe: n_group = %d must divide experts (%d) and be at most %d",
                                a->n_group, a->experts, FM_MOE_MAX_GROUPS);
        int kg = ng == 1 ? 1 : a->topk_group;
        if (kg < 1 || kg > ng)
            return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                                "moe: topk_group = %d must be in 1..n_group (%d)", a->topk_group,
                                ng);
        if (a->topk > kg * (a->experts / ng))
            return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                                "moe: topk = %d exceeds the %d experts of the %d kept groups",
                                a->topk, kg * (a->experts / ng), kg);
        if (!isfinite(a->routed_scaling_factor))
            return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                                "moe: routed_scaling_factor is not finite");
    }
    if ((s = check_ptr(ctx, a->hidden_states, "hidden_states", 16, 1)) ||
        (s = check_ptr(ctx, a->router_logits, "router_logits", 4, 1)) ||
        (s = check_ptr(ctx, a->w13, "w13", 16, 1)) || (s = check_ptr(ctx, a->w2, "w2", 16, 1)) ||
        (s = check_ptr(ctx, a->out, "out", 16, 1)) ||
        (s = check_ptr(ctx, a->workspace, "workspace", 16, 1)) ||
        (s = check_ptr(ctx, a->correction_bias, "correction_bias", 4, 0)) ||
        (s = check_ptr(ctx, a->topk_ids, "topk_ids", 4, 0)) ||
        (s = check_ptr(ctx, a->topk_weights, "topk_weights", 4, 0)))
        return s;
    layout_of(a, l);
    if (a->workspace_bytes < l->total)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "moe: workspace_bytes = %zu is too small: fm_moe_workspace_size asks "
                            "for %zu for T=%d E=%d K=%d H=%d I=%d",
                            a->workspace_bytes, l->total, a->tokens, a->experts, a->topk,
                            a->hidden, a->intermediate);
    return FM_OK;
}

fm_status fm_moe_workspace_size(fm_context *ctx, const fm_moe_args *args, size_t *bytes) {
    if (!bytes) return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "moe: bytes is NULL");
    fm_status s = check_shape(ctx, args);
    if (s != FM_OK) return s;
    moe_layout l;
    layout_of(args, &l);
    *bytes = l.total;
    return FM_OK;
}

/* ---- configuration choice ------------------------------------------------------------------ */

void fm_moe_shape(const fm_moe_args *a, char *buf, size_t len) {
    snprintf(buf, len, "t=%d,e=%d,k=%d,h=%d,i=%d", a->tokens, a->experts, a->topk, a->hidden,
             a->intermediate);
}

/* A tuned shape stands in only for the same layer (experts, top-k, hidden, intermediate): those
 * set the weight traffic and the GEMM shapes. Across token counts the nearest bucket in log
 * scale wins, like vLLM's per-M tables: the regime (weight-streaming vs tensor-bound, how many
 * tiles each expert gets) moves with the ratio of token counts, not their difference. */
double fm_moe_distance(const char *want, const char *have) {
    static const char *keys[5] = {"t", "e", "k", "h", "i"};
    long long w[5], h[5];
    for (int i = 0; i < 5; i++)
        if (fm_shape_get(want, keys[i], &w[i]) != 1 || fm_shape_get(have, keys[i], &h[i]) != 1)
            return -1;
    for (int i = 1; i < 5; i++)
        if (w[i] != h[i]) return -1;
    if (w[0] < 1 || h[0] < 1) return -1;
    return fabs(log2((double)w[0] / (double)h[0]));
}

void fm_moe_route_setup(const fm_moe_args *a, fm_moe_route_params *rp) {
    memset(rp, 0, sizeof *rp);
    const int sigmoid = a->routing == FM_MOE_ROUTING_SIGMOID_GROUPED;
    rp->logits = a->router_logits;
    rp->bias = sigmoid ? a->correction_bias : NULL;
    rp->tokens = a->tokens;
    rp->experts = a->experts;
    rp->topk = a->topk;
    rp->routing = sigmoid ? FM_MOE_ROUTE_SIGMOID : FM_MOE_ROUTE_SOFTMAX;
    rp->renormalize = a->renormalize ? 1 : 0;
    rp->n_group = a->n_group <= 1 ? 1 : a->n_group;
    rp->topk_group = rp->n_group == 1 ? 1 : a->topk_group;
    rp->scale = a->routed_scaling_factor != 0.0f ? a->routed_scaling_factor : 1.0f;
}

void fm_moe_problem(const fm_context *ctx, const fm_moe_args *a, fm_config *problem) {
    memset(problem, 0, sizeof *problem);
    fm_config_set_str(problem, "dtype", dtype_name(a->dtype));
    fm_config_set_int(problem, "t", a->tokens);
    fm_config_set_int(problem, "e", a->experts);
    fm_config_set_int(problem, "k", a->topk);
    fm_config_set_int(problem, "h", a->hidden);
    fm_config_set_int(problem, "i", a->intermediate);
    fm_config_set_int(problem, "sms", ctx->sm_count);
}

/* The per-architecture default (generator/moe_gemm_*.lua `default`) depends only on the device
 * limits, the SM count and the shape, so one process-wide memo serves every context; it keeps
 * the Lua round trip off the per-call path (fm_select wants the default before its own memo). */
#define MOE_DEFAULT_MEMO 64
static struct {
    char key[192];
    fm_config cfg;
} g_default_memo[MOE_DEFAULT_MEMO];
static int g_default_next;
static pthread_mutex_t g_default_lock = PTHREAD_MUTEX_INITIALIZER;

static fm_status moe_default(fm_context *ctx, const fm_moe_args *a, const char *shape,
                             fm_config *out) {
    char key[192];
    snprintf(key, sizeof key, "%d|%d|%d|%s|%s", ctx->arch, ctx->limits.smem_per_block,
             ctx->sm_count, dtype_name(a->dtype), shape);
    pthread_mutex_lock(&g_default_lock);
    for (int i = 0; i < MOE_DEFAULT_MEMO; i++)
        if (strcmp(g_default_memo[i].key, key) == 0) {
            *out = g_default_memo[i].cfg;
            pthread_mutex_unlock(&g_default_lock);
            return FM_OK;
        }
    pthread_mutex_unlock(&g_default_lock);

    fm_config problem;
    fm_moe_problem(ctx, a, &problem);
    char err[512] = "";
    pthread_mutex_lock(&ctx->lock); /* the Lua state is not thread-safe */
    fm_status s = fm_generator_default(ctx->gen, "moe", &problem, &ctx->limits, out, err,
                                       sizeof err);
    pthread_mutex_unlock(&ctx->lock);
    if (s != FM_OK) return fm_set_error(ctx, s, "moe: %s", err);

    pthread_mutex_lock(&g_default_lock);
    int i = g_default_next;
    g_default_next = (g_default_next + 1) % MOE_DEFAULT_MEMO;
    snprintf(g_default_memo[i].key, sizeof g_default_memo[i].key, "%s", key);
    g_default_memo[i].cfg = *out;
    pthread_mutex_unlock(&g_default_lock);
    return FM_OK;
}

fm_status fm_moe_choose(fm_context *ctx, const fm_moe_args *a, fm_config *cfg,
                        fm_selection *sel) {
    char shape[160];
    fm_moe_shape(a, shape, sizeof shape);
    fm_config dflt;
    fm_status s = moe_default(ctx, a, shape, &dflt);
    if (s != FM_OK) return s;
    return fm_select(ctx, "moe", dtype_name(a->dtype), shape, fm_moe_distance, &dflt, cfg, sel);
}

/* ---- launching ------------------------------------------------------------------------------ */

/* The maps of the warp-specialised GEMMs; m[0] is the token operand, m[1] the weights.
 * pipe = ws (templates/common/moe_gemm_sm90_ws.cuh): gemm1 reads w13 [E, 2I, H] as
 * (H, I, 2, E) in boxes (64, bn/2, 2, 1), so one box holds the gate rows and the up rows of the
 * same bn/2 columns, and rows past I in a tail tile are zeros rather than the next half; gemm2
 * reads w2 [E, H, I] as (I, H, E, 1) in boxes (64, bn, 1, 1) and the intermediate [rows, I] as
 * (I, rows, 1, 1) in boxes (64, bm, 1, 1) (ws_tail = merge: 64 rows, see the caller).
 * pipe = swap (moe_gemm_sm90_swap.cuh): gemm1 reads w13 as (H, 8, 2, I/8, E) in boxes
 * (64, 8, 2, bn/16, 1): groups of 8 gate rows and the 8 up rows of the same columns, which the
 * swapped accumulator layout pairs in one thread; the intermediate in boxes of 32 rows, issued as
 * many as a tile's real rows need.
 * ws_cluster = 2: the weight boxes are half a stage, (64, bn/2, 1, 1) for both, so that each CTA
 * of a pair can copy one half (gemm1: the gate or the up rows) for both.
 * gemm1's token rows are gathered by the kernel itself; its m1[0] is a copy of m1[1], never read. */
static fm_status ws_maps(fm_context *ctx, const fm_moe_args *a, const void *inter,
                         long long inter_rows, int bm, int bn, int swap, int cluster,
                         CUtensorMap m1[2], CUtensorMap m2[2]) {
    const cuuint64_t H = (cuuint64_t)a->hidden, I = (cuuint64_t)a->intermediate;
    const cuuint64_t E = (cuuint64_t)a->experts;
    memset(m1, 0, 2 * sizeof *m1);
    memset(m2, 0, 2 * sizeof *m2);
    fm_status s;
    if (swap) {
        const cuuint64_t dims[5] = {H, 8, 2, I / 8, E};
        const cuuint64_t st[4] = {H * 2, I * H * 2, 8 * H * 2, 2 * I * H * 2};
        const cuuint32_t box[5] = {64, 8, 2, (cuuint32_t)(bn / 16), 1};
        s = fm_tma_encode(ctx, &m1[1], "moe: tensor map of w13", a->dtype, a->w13, 5, dims, st,
                          box);
    } else {
        const cuuint64_t dims[4] = {H, I, 2, E};
        const cuuint64_t st[3] = {H * 2, I * H * 2, 2 * I * H * 2};
        const cuuint32_t box[4] = {64, (cuuint32_t)(bn / 2), cluster > 1 ? 1u : 2u, 1};
        s = fm_tma_encode_4d(ctx, &m1[1], "moe: tensor map of w13", a->dtype, a->w13, dims, st,
                             box);
    }
    if (s != FM_OK) return s;
    m1[0] = m1[1];
    {
        const cuuint64_t dims[4] = {I, H, E, 1};
        const cuuint64_t st[3] = {I * 2, H * I * 2, E * H * I * 2};
        const cuuint32_t box[4] = {64, (cuuint32_t)(cluster > 1 ? bn / 2 : bn), 1, 1};
        s = fm_tma_encode_4d(ctx, &m2[1], "moe: tensor map of w2", a->dtype, a->w2, dims, st, box);
        if (s != FM_OK) return s;
    }
    {
        const cuuint64_t rows = (cuuint64_t)inter_rows;
        const cuuint64_t dims[4] = {I, rows, 1, 1};
        /* Extent-1 dimensions are never stepped; the driver still wants a multiple of 16. */
        const cuuint64_t st[3] = {I * 2, rows * I * 2, rows * I * 2};
        const cuuint32_t box[4] = {64, (cuuint32_t)(swap ? 32 : bm), 1, 1};
        s = fm_tma_encode_4d(ctx, &m2[0], "moe: tensor map of the intermediate", a->dtype, inter,
                             dims, st, box);
        if (s != FM_OK) return s;
    }
    return FM_OK;
}

static fm_status load_fixed(fm_context *ctx, const char *family, const fm_loaded **out) {
    fm_config c;
    memset(&c, 0, sizeof c);
    snprintf(c.family, sizeof c.family, "%s", family);
    snprintf(c.name, sizeof c.name, "%s", family); /* name_of of a family without parameters */
    return fm_context_load(ctx, &c, out);
}

static fm_status launch(fm_context *ctx, CUfunction fn, const char *what, unsigned gx,
                        unsigned gy, unsigned threads, unsigned smem, CUstream stream,
                        void *params) {
    void *argv[] = {params};
    CUresult r = ctx->drv->cuLaunchKernel(fn, gx, gy, 1, threads, 1, 1, smem, stream, argv, NULL);
    return r == CUDA_SUCCESS ? FM_OK : fm_cuda_error(ctx, ctx->drv, r, what);
}

static fm_status get_fn(fm_context *ctx, const fm_loaded *k, const char *entry, int smem,
                        CUfunction *fn) {
    const fm_driver *d = ctx->drv;
    CUresult r = d->cuModuleGetFunction(fn, k->module, entry);
    if (r == CUDA_SUCCESS && smem > 48 * 1024)
        r = d->cuFuncSetAttribute(*fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem);
    if (r != CUDA_SUCCESS) {
        char what[256];
        snprintf(what, sizeof what, "moe: %s in %s", entry, k->name);
        return fm_cuda_error(ctx, d, r, what);
    }
    return FM_OK;
}

/* Runs the layer with GEMM configuration `gemm` (a loaded moe_gemm_* configuration): the whole
 * launch sequence of the header comment. Validates args itself. */
fm_status fm_moe_launch(fm_context *ctx, const fm_loaded *gemm, const fm_moe_args *a,
                        CUstream stream) {
    moe_layout l;
    fm_status s = check_args(ctx, a, &l);
    if (s != FM_OK) return s;
    const fm_config *cfg = &gemm->cfg;
    const char *dt = fm_config_str(cfg, "dtype");
    if (!dt || strcmp(dt, dtype_name(a->dtype)) != 0)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "moe: configuration %s is not for %s", gemm->name,
                            dtype_name(a->dtype));
    const int bm = (int)fm_config_int(cfg, "block_m", 0);
    const int bn = (int)fm_config_int(cfg, "block_n", 0);
    const int bk = (int)fm_config_int(cfg, "block_k", 64); /* sm90: fixed 64, no axis */
    const int group_m = (int)fm_config_int(cfg, "group_m", 1);
    int split = (int)fm_config_int(cfg, "split_k", 1);
    const char *comb = fm_config_str(cfg, "combine");
    const int atomic = comb && strcmp(comb, "atomic") == 0;
    const char *pipe = fm_config_str(cfg, "pipe");
    /* moe_gemm_sm90 pipe = ws or swap: warp-specialised, two tensor maps before the parameters */
    const int swap_pipe = pipe && strcmp(pipe, "swap") == 0;
    const int ws_pipe = swap_pipe || (pipe && strcmp(pipe, "ws") == 0);
    const char *ws_grid = fm_config_str(cfg, "ws_grid");
    const int ws_tiles = ws_grid && strcmp(ws_grid, "tiles") == 0; /* one CTA per tile */
    /* persistent, tiles taken in order from a counter (moe_gemm_sm90_ws.cuh) */
    const int ws_dynamic = ws_grid && strcmp(ws_grid, "dynamic") == 0;
    /* pairs of tiles in 2-CTA clusters sharing weight copies (moe_gemm_sm90_ws.cuh) */
    const long long cluster = fm_config_int(cfg, "ws_cluster", 1);
    /* an expert's short last tile run by the tile before it (moe_gemm_sm90_ws.cuh, merge_rows) */
    const char *ws_tail = fm_config_str(cfg, "ws_tail");
    const int merge = ws_tail && strcmp(ws_tail, "merge") == 0;
    /* the most rows the kernel merges (a launch fact of the generator): the alignment must leave
     * exactly the tails this short out of the tile list */
    const int merge_rows = merge ? (int)fm_config_int(&gemm->launch, "merge_rows", 0) : 0;
    if (bm < FM_MOE_MIN_BLOCK_M || bm > FM_MOE_MAX_BLOCK_M || bn < 16 || bk < 16 ||
        a->hidden % bk || a->intermediate % bk || split < 1 || (split > 1 && !atomic) ||
        (ws_pipe && !swap_pipe && ((bm != 128 && bm != 192) || bk != 64 || split != 1 ||
                                   (bn != 128 && bn != 256))) ||
        (swap_pipe && (bm < 128 || bm % 64 || bk != 64 || split != 1 || (bn != 128 && bn != 192))) ||
        (cluster != 1 && (cluster != 2 || !ws_pipe || swap_pipe || !ws_tiles || group_m % 2)) ||
        (ws_dynamic && (!ws_pipe || swap_pipe)) ||
        (merge && (!ws_pipe || swap_pipe || !ws_tiles || bm != 128 || bn != 256 || atomic ||
                   merge_rows < 1 || merge_rows > 64)))
        return fm_set_error(ctx, FM_ERR_INTERNAL,
                            "moe: configuration %s has unusable tile parameters", gemm->name);

    const fm_loaded *route, *align;
    if ((s = load_fixed(ctx, "moe_route", &route)) != FM_OK) return s;
    if ((s = load_fixed(ctx, "moe_align", &align)) != FM_OK) return s;

    const int T = a->tokens, E = a->experts, K = a->topk, H = a->hidden, I = a->intermediate;
    char *ws = (char *)a->workspace;
    int *ids = a->topk_ids ? (int *)a->topk_ids : (int *)(ws + l.ids);
    float *weights = a->topk_weights ? a->topk_weights : (float *)(ws + l.weights);
    int *num_tiles = (int *)(ws + l.num_tiles);
    int *sorted = (int *)(ws + l.sorted);
    int *tile_expert = (int *)(ws + l.tile_expert);
    void *inter = ws + l.inter;
    void *buf = ws + l.buf;
    const long long m_tiles = tiles_bound(a, bm);

    fm_moe_route_params rp;
    fm_moe_route_setup(a, &rp);
    rp.topk_ids = ids;
    rp.topk_weights = weights;

    fm_moe_align_params ap;
    memset(&ap, 0, sizeof ap);
    ap.topk_ids = ids;
    ap.sorted_slot = sorted;
    ap.tile_expert = tile_expert;
    ap.num_tiles = num_tiles;
    ap.expert_counts = (int *)(ws + l.counts);
    ap.expert_offsets = (int *)(ws + l.offsets);
    ap.slot_weight = weights;
    ap.sorted_weight = swap_pipe ? (float *)(ws + l.sorted_w) : NULL;
    ap.cursor = (int *)(ws + l.cursor);
    ap.ticket = (int *)(ws + l.num_tiles + MOE_ALIGN_TICKET);
    ap.slots = T * K;
    ap.experts = E;
    ap.block_m = bm;
    ap.max_tiles = (int)l.max_tiles;
    if (merge) {
        ap.merge_max = merge_rows;
        ap.tile_row0 = (int *)(ws + l.tile_row0);
        ap.expert_tiles = (int *)(ws + l.expert_tiles);
    }

    fm_moe_gemm_params g1;
    memset(&g1, 0, sizeof g1);
    g1.a = a->hidden_states;
    g1.b = a->w13;
    g1.c = inter;
    g1.sorted_slot = sorted;
    g1.tile_expert = tile_expert;
    g1.num_tiles = num_tiles;
    g1.tile_row0 = ap.tile_row0;
    g1.expert_tiles = ap.expert_tiles;
    g1.slot_weight = weights;
    g1.b_expert_stride = 2LL * I * H;
    g1.n = I;
    g1.k = H;
    g1.topk = K;
    g1.m_tiles = (int)m_tiles;
    g1.n_tiles = (I + bn / 2 - 1) / (bn / 2);
    g1.split_k = 1;
    g1.k_tiles_per_split = H / bk;
    g1.group_m = group_m;
    g1.atomic = 0;
    g1.expert_counts = ap.expert_counts;
    g1.expert_offsets = ap.expert_offsets;
    g1.sorted_weight = ap.sorted_weight;
    /* the dynamic schedule's two tile counters (see layout_of) */
    int *counters = (int *)(ws + l.num_tiles + MOE_DYN_COUNTERS);
    g1.tile_counter = ws_dynamic ? counters : NULL;

    fm_moe_gemm_params g2 = g1;
    g2.a = inter;
    g2.b = a->w2;
    g2.c = buf;
    g2.b_expert_stride = (long long)H * I;
    g2.n = H;
    g2.k = I;
    g2.n_tiles = (H + bn - 1) / bn;
    if (split > I / bk) split = I / bk;
    g2.k_tiles_per_split = (I / bk + split - 1) / split;
    g2.split_k = split;
    g2.atomic = atomic;
    g2.tile_counter = ws_dynamic ? counters + 1 : NULL;

    fm_moe_combine_params cp;
    memset(&cp, 0, sizeof cp);
    cp.src = buf;
    cp.out = a->out;
    cp.tokens = T;
    cp.hidden = H;
    cp.topk = K;
    cp.atomic = atomic;

    const long long g1_ctas = m_tiles * g1.n_tiles, g2_ctas = m_tiles * g2.n_tiles;
    const long long vecs = (long long)T * H / 8;
    const long long comb_ctas = (vecs + MOE_COMBINE_THREADS - 1) / MOE_COMBINE_THREADS;
    if (g1_ctas > INT_MAX || g2_ctas > INT_MAX || comb_ctas > INT_MAX)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "moe: problem too large for one grid");

    /* gemm2 of family moe_gemm_<arch> is fm_moe_gemm2_<arch> (generator/moe_gemm_*.lua). */
    char entry2[96];
    const char *suffix = strncmp(cfg->family, "moe_gemm_", 9) == 0 ? cfg->family + 9 : "";
    snprintf(entry2, sizeof entry2, "fm_moe_gemm2_%s", suffix);

    /* pipe = ws: persistent, one CTA per SM at most (each takes ~200 KB of shared memory); with
     * ws_grid = tiles one CTA per tile of the bound (those past the real count exit at once). */
    CUtensorMap m1[2], m2[2];
    long long g1_grid = g1_ctas, g2_grid = g2_ctas;
    if (ws_pipe) {
        /* merge: the intermediate in boxes of 64 rows (two per tile, one for the merged slab) */
        if ((s = ws_maps(ctx, a, inter, l.max_rows, merge ? 64 : bm, bn, swap_pipe, (int)cluster,
                         m1, m2)) != FM_OK)
            return s;
        const long long sms = ctx->sm_count > 0 ? ctx->sm_count : 1;
        if (!ws_tiles && g1_grid > sms) g1_grid = sms;
        if (!ws_tiles && g2_grid > sms) g2_grid = sms;
        /* whole clusters (a CTA past the real tiles only waits for its partner) */
        g1_grid = (g1_grid + cluster - 1) / cluster * cluster;
        g2_grid = (g2_grid + cluster - 1) / cluster * cluster;
    }

    if ((s = fm_context_enter(ctx)) != FM_OK) return s;
    CUfunction f_gemm2, f_combine, f_place;
    if ((s = get_fn(ctx, gemm, entry2, gemm->smem_bytes, &f_gemm2)) != FM_OK ||
        (s = get_fn(ctx, gemm, "fm_moe_combine", 0, &f_combine)) != FM_OK ||
        (s = get_fn(ctx, align, "fm_moe_align_place", 0, &f_place)) != FM_OK)
        goto out;
    {
        /* the tile count, the dynamic schedule's counters, the alignment's ticket and the expert
         * counts (adjacent, see layout_of) */
        const size_t n = (l.counts - l.num_tiles) / 4 + (size_t)E;
        CUresult r = ctx->drv->cuMemsetD32Async((CUdeviceptr)(uintptr_t)num_tiles, 0, n, stream);
        if (r != CUDA_SUCCESS) {
            s = fm_cuda_error(ctx, ctx->drv, r, "moe: clearing the counters");
            goto out;
        }
    }
    if (atomic) {
        CUresult r = ctx->drv->cuMemsetD32Async((CUdeviceptr)(uintptr_t)buf, 0,
                                                (size_t)T * (size_t)H, stream);
        if (r != CUDA_SUCCESS) {
            s = fm_cuda_error(ctx, ctx->drv, r, "moe: clearing the fp32 accumulator");
            goto out;
        }
    }
    {
        const unsigned route_warps = (unsigned)route->threads / 32;
        if ((s = launch(ctx, route->fn, "moe: fm_moe_route", ((unsigned)T + route_warps - 1) /
                                                                 route_warps,
                        1, (unsigned)route->threads, 0, stream, &rp)) != FM_OK)
            goto out;
    }
    {
        const long long chunk = (long long)align->threads * FM_MOE_ALIGN_PER_THREAD;
        const unsigned grid = (unsigned)(((long long)T * K + chunk - 1) / chunk);
        if ((s = launch(ctx, align->fn, "moe: fm_moe_align", grid, 1, (unsigned)align->threads, 0,
                        stream, &ap)) != FM_OK ||
            (s = launch(ctx, f_place, "moe: fm_moe_align_place", grid, 1,
                        (unsigned)align->threads, 0, stream, &ap)) != FM_OK)
            goto out;
    }
    if (ws_pipe) {
        void *argv1[] = {&m1[0], &m1[1], &g1};
        void *argv2[] = {&m2[0], &m2[1], &g2};
        CUlaunchAttribute attr;
        CUlaunchConfig lc;
        fm_launch_config(&lc, &attr, (unsigned)gemm->threads, (unsigned)gemm->smem_bytes,
                         (unsigned)cluster, stream);
        lc.gridDimX = (unsigned)g1_grid;
        CUresult r = ctx->drv->cuLaunchKernelEx(&lc, gemm->fn, argv1, NULL);
        if (r != CUDA_SUCCESS) {
            s = fm_cuda_error(ctx, ctx->drv, r, "moe: gemm1");
            goto out;
        }
        lc.gridDimX = (unsigned)g2_grid;
        r = ctx->drv->cuLaunchKernelEx(&lc, f_gemm2, argv2, NULL);
        if (r != CUDA_SUCCESS) {
            s = fm_cuda_error(ctx, ctx->drv, r, "moe: gemm2");
            goto out;
        }
    } else {
        if ((s = launch(ctx, gemm->fn, "moe: gemm1", (unsigned)g1_ctas, 1,
                        (unsigned)gemm->threads, (unsigned)gemm->smem_bytes, stream, &g1)) !=
            FM_OK)
            goto out;
        if ((s = launch(ctx, f_gemm2, "moe: gemm2", (unsigned)g2_ctas, (unsigned)split,
                        (unsigned)gemm->threads, (unsigned)gemm->smem_bytes, stream, &g2)) !=
            FM_OK)
            goto out;
    }
    s = launch(ctx, f_combine, "moe: combine", (unsigned)comb_ctas, 1, MOE_COMBINE_THREADS, 0,
               stream, &cp);
out:
    fm_context_leave(ctx);
    return s;
}

fm_status fm_moe_fwd(fm_context *ctx, const fm_moe_args *args, void *stream) {
    if (!ctx) return fm_set_error(NULL, FM_ERR_INVALID_ARGUMENT, "moe: context is NULL");
    moe_layout l;
    fm_status s = check_args(ctx, args, &l);
    if (s != FM_OK) return s;
    fm_config cfg;
    fm_selection sel;
    if ((s = fm_moe_choose(ctx, args, &cfg, &sel)) != FM_OK) return s;
    const fm_loaded *k;
    s = fm_context_load(ctx, &cfg, &k);
    if (s == FM_ERR_GENERATOR && sel.source != FM_SOURCE_DEFAULT) {
        /* a tuned entry this build's generator no longer renders: serve the default */
        char shape[160];
        fm_moe_shape(args, shape, sizeof shape);
        if ((s = moe_default(ctx, args, shape, &cfg)) == FM_OK) s = fm_context_load(ctx, &cfg, &k);
    }
    if (s != FM_OK) return s;
    return fm_moe_launch(ctx, k, args, (CUstream)stream);
}
