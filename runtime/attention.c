/*
 * attention.c - fm_attention_fwd: validate, choose a configuration, load it, launch it.
 */
#include "internal.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void fm_attention_args_contiguous(fm_attention_args *a) {
    int64_t d = a->head_dim;
    a->q_stride[2] = d;
    a->q_stride[1] = (int64_t)a->heads * d;
    a->q_stride[0] = (int64_t)a->seqlen_q * a->q_stride[1];
    a->o_stride[0] = a->q_stride[0];
    a->o_stride[1] = a->q_stride[1];
    a->o_stride[2] = a->q_stride[2];
    a->k_stride[2] = d;
    a->k_stride[1] = (int64_t)a->kv_heads * d;
    a->k_stride[0] = (int64_t)a->seqlen_k * a->k_stride[1];
    memcpy(a->v_stride, a->k_stride, sizeof a->k_stride);
}

static const char *dtype_name(fm_dtype t) { return t == FM_DTYPE_BF16 ? "bf16" : "fp16"; }

static fm_status check_strides(const fm_context *ctx, const char *what, const int64_t st[3]) {
    for (int i = 0; i < 3; i++)
        if (st[i] < 0 || st[i] % 8 != 0)
            return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                                "%s stride[%d] = %lld: strides must be non-negative multiples of 8 "
                                "elements (16 bytes), head dim contiguous",
                                what, i, (long long)st[i]);
    return FM_OK;
}

fm_status fm_attn_prepare(const fm_context *ctx, const fm_attention_args *a,
                          fm_attn_kernel_params *p) {
    if (!a) return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "args is NULL");
    if (a->dtype != FM_DTYPE_BF16 && a->dtype != FM_DTYPE_FP16)
        return fm_set_error(ctx, FM_ERR_UNSUPPORTED, "dtype %d: attention supports bf16 and fp16",
                            (int)a->dtype);
    if (a->head_dim != 64 && a->head_dim != 128 && a->head_dim != 256)
        return fm_set_error(ctx, FM_ERR_UNSUPPORTED,
                            "head_dim %d: attention supports head dims 64, 128 and 256",
                            a->head_dim);
    if (a->batch < 1 || a->seqlen_q < 1 || a->seqlen_k < 1 || a->heads < 1 || a->kv_heads < 1)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "shape b=%d sq=%d sk=%d h=%d hkv=%d: every size must be at least 1",
                            a->batch, a->seqlen_q, a->seqlen_k, a->heads, a->kv_heads);
    if (a->heads % a->kv_heads != 0)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "heads %d is not a multiple of kv_heads %d", a->heads, a->kv_heads);
    if (a->batch > 65535 || a->heads > 65535)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "batch and heads must be at most 65535");
    if (!isfinite(a->softmax_scale) || a->softmax_scale < 0)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "softmax_scale %g: must be positive and finite (0: 1/sqrt(head_dim))",
                            (double)a->softmax_scale);
    const void *ptrs[4] = {a->q, a->k, a->v, a->o};
    const char *names[4] = {"q", "k", "v", "o"};
    for (int i = 0; i < 4; i++) {
        if (!ptrs[i]) return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "%s is NULL", names[i]);
        if ((uintptr_t)ptrs[i] % 16)
            return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                                "%s = %p is not 16-byte aligned", names[i], ptrs[i]);
    }
    if (a->workspace && (uintptr_t)a->workspace % 16)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "workspace = %p is not 16-byte aligned",
                            a->workspace);
    if (a->workspace && a->workspace_bytes < fm_attn_workspace_bytes(ctx, a->head_dim))
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "workspace_bytes = %zu is too small: fm_attention_workspace_size asks "
                            "%zu for head_dim %d",
                            a->workspace_bytes, fm_attn_workspace_bytes(ctx, a->head_dim),
                            a->head_dim);
    if (a->lse && (uintptr_t)a->lse % 4)
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "lse is not 4-byte aligned");
    /* The kernels keep offsets inside a tile in 32 bits: a sequence stride must stay below 2^23
     * elements (a tile spans at most 256 rows). */
    if (a->q_stride[1] >= (1 << 23) || a->k_stride[1] >= (1 << 23) || a->v_stride[1] >= (1 << 23) ||
        a->o_stride[1] >= (1 << 23))
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "sequence strides must be below 2^23 elements");
    fm_status s;
    if ((s = check_strides(ctx, "q", a->q_stride)) || (s = check_strides(ctx, "k", a->k_stride)) ||
        (s = check_strides(ctx, "v", a->v_stride)) || (s = check_strides(ctx, "o", a->o_stride)))
        return s;

    memset(p, 0, sizeof *p);
    p->q = a->q;
    p->k = a->k;
    p->v = a->v;
    p->o = a->o;
    p->lse = a->lse;
    p->q_stride_b = a->q_stride[0];
    p->q_stride_s = a->q_stride[1];
    p->q_stride_h = a->q_stride[2];
    p->k_stride_b = a->k_stride[0];
    p->k_stride_s = a->k_stride[1];
    p->k_stride_h = a->k_stride[2];
    p->v_stride_b = a->v_stride[0];
    p->v_stride_s = a->v_stride[1];
    p->v_stride_h = a->v_stride[2];
    p->o_stride_b = a->o_stride[0];
    p->o_stride_s = a->o_stride[1];
    p->o_stride_h = a->o_stride[2];
    p->batch = a->batch;
    p->seqlen_q = a->seqlen_q;
    p->seqlen_k = a->seqlen_k;
    p->heads = a->heads;
    p->kv_heads = a->kv_heads;
    p->head_group = a->heads / a->kv_heads;
    p->causal_offset = a->seqlen_k - a->seqlen_q;
    p->softmax_scale = a->softmax_scale != 0.0f ? a->softmax_scale
                                                : 1.0f / sqrtf((float)a->head_dim);
    p->scale_log2 = p->softmax_scale * 1.4426950408889634f;
    return FM_OK;
}

/* Split-tail workspace (templates/attn_fwd_sm90.cu): a ready flag and a partial-result slot per
 * (CTA, consumer warpgroup) of a one-CTA-per-SM persistent grid, up to three consumers; a slot
 * is 128 threads x (D/2 + 4) floats. Flags first, padded to 256 bytes. */
size_t fm_attn_workspace_flags_bytes(const fm_context *ctx) {
    size_t n = (size_t)(ctx->sm_count > 0 ? ctx->sm_count : 0) * 3 * sizeof(unsigned);
    return (n + 255) / 256 * 256;
}

size_t fm_attn_workspace_bytes(const fm_context *ctx, int head_dim) {
    if (ctx->arch < 90 || ctx->sm_count <= 0) return 0;
    return fm_attn_workspace_flags_bytes(ctx) +
           (size_t)ctx->sm_count * 3 * 128 * (size_t)(head_dim / 2 + 4) * sizeof(float);
}

fm_status fm_attention_workspace_size(fm_context *ctx, const fm_attention_args *args,
                                      size_t *bytes) {
    if (!ctx) return fm_set_error(NULL, FM_ERR_INVALID_ARGUMENT, "context is NULL");
    if (!args || !bytes) return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "NULL argument");
    if (args->head_dim != 64 && args->head_dim != 128 && args->head_dim != 256)
        return fm_set_error(ctx, FM_ERR_UNSUPPORTED,
                            "head_dim %d: attention supports head dims 64, 128 and 256",
                            args->head_dim);
    *bytes = fm_attn_workspace_bytes(ctx, args->head_dim);
    return FM_OK;
}

void fm_attn_problem(const fm_attention_args *a, fm_config *problem) {
    memset(problem, 0, sizeof *problem);
    fm_config_set_str(problem, "dtype", dtype_name(a->dtype));
    fm_config_set_int(problem, "head_dim", a->head_dim);
    fm_config_set_int(problem, "causal", a->causal ? 1 : 0);
}

void fm_attn_shape(const fm_attention_args *a, char *buf, size_t len) {
    snprintf(buf, len, "b=%d,sq=%d,sk=%d,h=%d,hkv=%d,d=%d,causal=%d", a->batch, a->seqlen_q,
             a->seqlen_k, a->heads, a->kv_heads, a->head_dim, a->causal ? 1 : 0);
}

/* A tuned shape may stand in for another only with the same head dim and causality (the kernel
 * is specialised on both). Among those, sequence lengths matter most (they set the number of
 * tiles and the work per tile), then batch x heads (how full the grid is). */
double fm_attn_distance(const char *want, const char *have) {
    long long w[6], h[6];
    const char *keys[6] = {"b", "sq", "sk", "h", "d", "causal"};
    for (int i = 0; i < 6; i++)
        if (fm_shape_get(want, keys[i], &w[i]) != 1 || fm_shape_get(have, keys[i], &h[i]) != 1)
            return -1;
    if (w[4] != h[4] || w[5] != h[5]) return -1;
    double d = fabs(log2((double)w[1] / (double)h[1])) + fabs(log2((double)w[2] / (double)h[2]));
    d += 0.5 * fabs(log2((double)(w[0] * w[3]) / (double)(h[0] * h[3])));
    return d;
}

fm_status fm_attn_launch_sm80(fm_context *ctx, const fm_loaded *k, fm_attn_kernel_params *p,
                              const fm_attention_args *a, CUstream stream) {
    (void)a;
    long long bm = fm_config_int(&k->cfg, "block_m", 0);
    if (bm <= 0) return fm_set_error(ctx, FM_ERR_INTERNAL, "%s has no block_m", k->name);
    p->num_m_blocks = (int)((p->seqlen_q + bm - 1) / bm);
    p->num_tiles = p->num_m_blocks * p->heads * p->batch;
    void *params[] = {p};
    CUresult r = ctx->drv->cuLaunchKernel(k->fn, (unsigned)p->num_m_blocks, (unsigned)p->heads,
                                          (unsigned)p->batch, (unsigned)k->threads, 1, 1,
                                          (unsigned)k->smem_bytes, stream, params, NULL);
    return r == CUDA_SUCCESS ? FM_OK : fm_cuda_error(ctx, ctx->drv, r, k->name);
}

/* Launches k with a parameter block fm_attn_prepare already filled from a. */
static fm_status launch_prepared(fm_context *ctx, const fm_loaded *k, fm_attn_kernel_params *p,
                                 const fm_attention_args *a, CUstream stream) {
    long long d = fm_config_int(&k->cfg, "head_dim", 0);
    long long c = fm_config_int(&k->cfg, "causal", -1);
    const char *dt = fm_config_str(&k->cfg, "dtype");
    if (d != a->head_dim || c != (a->causal ? 1 : 0) || !dt || strcmp(dt, dtype_name(a->dtype)))
        return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT,
                            "configuration %s does not match the call (%s, d=%d, causal=%d)",
                            k->name, dtype_name(a->dtype), a->head_dim, a->causal ? 1 : 0);
    fm_status s = fm_context_enter(ctx);
    if (s != FM_OK) return s;
    if (strcmp(k->cfg.family, "attn_fwd_sm90") == 0)
        s = fm_attn_launch_sm90(ctx, k, p, a, stream);
    else if (strcmp(k->cfg.family, "attn_fwd_sm80") == 0)
        s = fm_attn_launch_sm80(ctx, k, p, a, stream);
    else
        s = fm_set_error(ctx, FM_ERR_INTERNAL, "no launcher for family %s", k->cfg.family);
    fm_context_leave(ctx);
    return s;
}

fm_status fm_attn_launch(fm_context *ctx, const fm_loaded *k, const fm_attention_args *a,
                         CUstream stream) {
    fm_attn_kernel_params p;
    fm_status s = fm_attn_prepare(ctx, a, &p);
    return s != FM_OK ? s : launch_prepared(ctx, k, &p, a, stream);
}

/* The per-architecture default comes from the generator (each family's `default`), computed
 * once per (dtype, head dim, causal) and kept in the context. */
static fm_status attn_default(fm_context *ctx, const fm_attention_args *a, fm_config *out) {
    int di = a->head_dim == 64 ? 0 : a->head_dim == 128 ? 1 : 2;
    fm_config *slot = &ctx->attn_default[a->dtype == FM_DTYPE_BF16 ? 0 : 1][di][a->causal ? 1 : 0];
    pthread_mutex_lock(&ctx->lock);
    fm_status s = FM_OK;
    if (!slot->name[0]) {
        fm_config problem;
        fm_attn_problem(a, &problem);
        char err[512] = "";
        s = fm_generator_default(ctx->gen, "attn_fwd", &problem, &ctx->limits, slot, err,
                                 sizeof err);
        if (s != FM_OK) fm_set_error(ctx, s, "%s", err);
    }
    if (s == FM_OK) *out = *slot;
    pthread_mutex_unlock(&ctx->lock);
    return s;
}

static fm_status attn_choose(fm_context *ctx, const fm_attention_args *a, fm_config *cfg,
                             fm_selection *sel) {
    fm_config dflt;
    fm_status s = attn_default(ctx, a, &dflt);
    if (s != FM_OK) return s;
    char shape[160];
    fm_attn_shape(a, shape, sizeof shape);
    return fm_select(ctx, "attn_fwd", dtype_name(a->dtype), shape, fm_attn_distance, &dflt, cfg,
                     sel);
}

fm_status fm_attention_select(fm_context *ctx, const fm_attention_args *args, fm_selection *out) {
    if (!ctx || !out) return fm_set_error(ctx, FM_ERR_INVALID_ARGUMENT, "NULL argument");
    fm_attn_kernel_params p;
    fm_status s = fm_attn_prepare(ctx, args, &p);
    if (s != FM_OK) return s;
    fm_config cfg;
    return attn_choose(ctx, args, &cfg, out);
}

fm_status fm_attention_fwd(fm_context *ctx, const fm_attention_args *args, void *stream) {
    if (!ctx) return fm_set_error(NULL, FM_ERR_INVALID_ARGUMENT, "context is NULL");
    fm_attn_kernel_params p;
    fm_status s = fm_attn_prepare(ctx, args, &p);
    if (s != FM_OK) return s;
    fm_config cfg;
    fm_selection sel;
    if ((s = attn_choose(ctx, args, &cfg, &sel)) != FM_OK) return s;
    const fm_loaded *k;
    s = fm_context_load(ctx, &cfg, &k);
    if (s == FM_ERR_GENERATOR && sel.source != FM_SOURCE_DEFAULT) {
        /* A database entry this build's generator no longer knows (an axis renamed, a value
         * culled since it was tuned): serve the default rather than fail. */
        if ((s = attn_default(ctx, args, &cfg)) == FM_OK) s = fm_context_load(ctx, &cfg, &k);
    }
    if (s != FM_OK) return s;
    return launch_prepared(ctx, k, &p, args, (CUstream)stream);
}
