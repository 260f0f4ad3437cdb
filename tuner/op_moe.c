/*
 * op_moe.c - the fused MoE forward as a tuning operation.
 *
 * Shape: --shape TxHxI (tokens x hidden x intermediate) with --experts, --topk, --routing,
 * --n-group, --topk-group, --no-renormalize (or a --preset) already stored in prob->p.
 * Inputs are fresh uniform random numbers drawn on the GPU (fm_moe_fill: the DeepSeek-V3 layer
 * holds 22.5 GB of weights, too much to draw and upload from the host for every shape):
 * hidden ~ U(-1, 1), weights ~ U(-a, a) with a = sqrt(3 / fan_in) (unit-variance products),
 * logits ~ U(-3, 3), correction bias ~ U(-0.001, 0.001) (see below). The reference is the
 * moe_ref kernels (fp32 formulas, independent routing, no sorting, no tensor cores) run once;
 * the comparison runs on the GPU too (fm_moe_compare), since [T, H] outputs reach hundreds
 * of MB.
 * One set of inputs: the tuner flushes L2 before every timed run, and the weights of the hit
 * experts (8 x 88 MB at DeepSeek-V3, T = 1) are far larger than L2 anyway, so `rot` is unused.
 */
#include "op.h"
#include "testdata.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct moe_state {
    fm_moe_args a;
    const fm_driver *drv;
    CUdeviceptr hidden, logits, bias, w13, w2, out, ids, weights, ws;
    CUdeviceptr ref_ids, ref_weights, ref_inter, ref_out, sums;
    CUfunction f_compare;
    size_t out_elems;
} moe_state;

static void args_of(const fm_problem *prob, fm_moe_args *a) {
    memset(a, 0, sizeof *a);
    const char *dt = fm_config_str(&prob->p, "dtype");
    a->dtype = dt && !strcmp(dt, "fp16") ? FM_DTYPE_FP16 : FM_DTYPE_BF16;
    a->tokens = (int)fm_config_int(&prob->p, "t", 1);
    a->hidden = (int)fm_config_int(&prob->p, "h", 64);
    a->intermediate = (int)fm_config_int(&prob->p, "i", 64);
    a->experts = (int)fm_config_int(&prob->p, "experts", 8);
    a->topk = (int)fm_config_int(&prob->p, "topk", 2);
    a->routing = fm_config_int(&prob->p, "routing", 0) == 1 ? FM_MOE_ROUTING_SIGMOID_GROUPED
                                                            : FM_MOE_ROUTING_SOFTMAX_TOPK;
    a->renormalize = (int)fm_config_int(&prob->p, "renormalize", 1);
    a->n_group = (int)fm_config_int(&prob->p, "n_group", 1);
    a->topk_group = (int)fm_config_int(&prob->p, "topk_group", 1);
    a->routed_scaling_factor = (float)fm_config_int(&prob->p, "scaling_milli", 1000) / 1000.0f;
}

static fm_status moe_parse(fm_problem *prob, const char *shape, char *err, size_t errlen) {
    long long t = 0, h = 0, i = 0;
    char tail = 0;
    if (!shape || sscanf(shape, "%lldx%lldx%lld%c", &t, &h, &i, &tail) != 3) {
        snprintf(err, errlen,
                 "--shape '%s': expected TOKENSxHIDDENxINTERMEDIATE, e.g. 4096x7168x2048",
                 shape ? shape : "");
        return FM_ERR_INVALID_ARGUMENT;
    }
    if (t < 1 || t > (1 << 24) || h < 1 || h > (1 << 20) || i < 1 || i > (1 << 20)) {
        snprintf(err, errlen, "--shape '%s': sizes must be positive (tokens <= 16M)", shape);
        return FM_ERR_INVALID_ARGUMENT;
    }
    char dt[8]; /* a copy: setting "dtype" below must not read from the slot it writes */
    const char *given = fm_config_str(&prob->p, "dtype");
    snprintf(dt, sizeof dt, "%s", given ? given : "bf16");
    if (strcmp(dt, "bf16") && strcmp(dt, "fp16")) {
        snprintf(err, errlen, "--dtype %s: MoE supports bf16 and fp16", dt);
        return FM_ERR_UNSUPPORTED;
    }
    fm_config_set_str(&prob->p, "dtype", dt);
    fm_config_set_int(&prob->p, "t", t);
    fm_config_set_int(&prob->p, "h", h);
    fm_config_set_int(&prob->p, "i", i);
    if (fm_config_int(&prob->p, "experts", 0) == 0) fm_config_set_int(&prob->p, "experts", 8);
    if (fm_config_int(&prob->p, "topk", 0) == 0) fm_config_set_int(&prob->p, "topk", 2);
    if (fm_config_int(&prob->p, "routing", -1) < 0) fm_config_set_int(&prob->p, "routing", 0);
    if (fm_config_int(&prob->p, "routing", 0) == 1) {
        /* sigmoid without groups: one group holding every expert */
        if (fm_config_int(&prob->p, "n_group", 0) == 0) fm_config_set_int(&prob->p, "n_group", 1);
        if (fm_config_int(&prob->p, "topk_group", 0) == 0)
            fm_config_set_int(&prob->p, "topk_group", fm_config_int(&prob->p, "n_group", 1));
    }
    fm_moe_args a;
    args_of(prob, &a);
    /* the library's own validation of everything but pointers */
    size_t bytes = 0;
    fm_status s = fm_moe_workspace_size(NULL, &a, &bytes);
    if (s == FM_OK && a.routing == FM_MOE_ROUTING_SIGMOID_GROUPED &&
        (a.n_group > FM_MOE_MAX_GROUPS || a.experts % a.n_group ||
         a.topk_group < 1 || a.topk_group > a.n_group ||
         a.topk > a.topk_group * (a.experts / a.n_group))) {
        snprintf(err, errlen,
                 "--n-group %d --topk-group %d: groups must divide the %d experts (at most %d), "
                 "keep 1..n_group of them, and hold at least topk = %d experts",
                 a.n_group, a.topk_group, a.experts, FM_MOE_MAX_GROUPS, a.topk);
        return FM_ERR_INVALID_ARGUMENT;
    }
    if (s != FM_OK) {
        snprintf(err, errlen, "%s", fm_last_error(NULL));
        return s;
    }
    snprintf(prob->dtype, sizeof prob->dtype, "%s", dt);
    fm_moe_shape(&a, prob->shape, sizeof prob->shape);
    return FM_OK;
}

/* 2 * T * K * 3 * H * I: gate, up and down GEMMs over the routed slots. */
static double moe_flops(const fm_problem *prob) {
    fm_moe_args a;
    args_of(prob, &a);
    return 2.0 * a.tokens * a.topk * 3.0 * a.hidden * (double)a.intermediate;
}

static void moe_teardown(void *state) {
    moe_state *st = state;
    if (!st) return;
    CUdeviceptr bufs[] = {st->hidden,  st->logits,      st->bias,      st->w13,     st->w2,
                          st->out,     st->ids,         st->weights,   st->ws,      st->ref_ids,
                          st->ref_weights, st->ref_inter, st->ref_out, st->sums};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) st->drv->cuMemFree(bufs[i]);
    free(st);
}

#define CK(call, what)                                                                         \
    do {                                                                                       \
        CUresult r_ = (call);                                                                  \
        if (r_ != CUDA_SUCCESS) {                                                              \
            char b_[200];                                                                      \
            snprintf(err, errlen, "%s: %s", what, fm_driver_error_text(r_, b_, sizeof b_));   \
            s = r_ == CUDA_ERROR_OUT_OF_MEMORY ? FM_ERR_OUT_OF_MEMORY : FM_ERR_CUDA;           \
            goto fail;                                                                         \
        }                                                                                      \
    } while (0)

static CUresult fill(const fm_driver *d, CUfunction f, CUdeviceptr dst, size_t count, int is_f32,
                     float lo, float hi, unsigned long long seed) {
    fm_moe_fill_params p;
    memset(&p, 0, sizeof p);
    p.dst = (void *)(uintptr_t)dst;
    p.count = (long long)count;
    p.seed = seed;
    p.lo = lo;
    p.hi = hi;
    p.is_f32 = is_f32;
    void *argv[] = {&p};
    size_t blocks = (count + 255) / 256;
    if (blocks > 65536) blocks = 65536;
    return d->cuLaunchKernel(f, (unsigned)blocks, 1, 1, 256, 1, 1, 0, NULL, argv, NULL);
}

static fm_status moe_setup(fm_context *ctx, const fm_problem *prob, void **state, char *err,
                           size_t errlen) {
    moe_state *st = calloc(1, sizeof *st);
    if (!st) return FM_ERR_OUT_OF_MEMORY;
    st->drv = ctx->drv;
    const fm_driver *d = ctx->drv;
    fm_moe_args *a = &st->a;
    args_of(prob, a);
    fm_status s = fm_context_enter(ctx);
    if (s != FM_OK) {
        snprintf(err, errlen, "%s", fm_last_error(ctx));
        free(st);
        return s;
    }
    const size_t T = (size_t)a->tokens, H = (size_t)a->hidden, I = (size_t)a->intermediate;
    const size_t E = (size_t)a->experts, K = (size_t)a->topk;
    size_t ws_bytes = 0;
    if ((s = fm_moe_workspace_size(ctx, a, &ws_bytes)) != FM_OK) {
        snprintf(err, errlen, "%s", fm_last_error(ctx));
        goto fail;
    }
    st->out_elems = T * H;
    CK(d->cuMemAlloc(&st->hidden, T * H * 2), "allocating hidden states");
    CK(d->cuMemAlloc(&st->logits, T * E * 4), "allocating router logits");
    CK(d->cuMemAlloc(&st->bias, E * 4), "allocating the correction bias");
    CK(d->cuMemAlloc(&st->w13, E * 2 * I * H * 2), "allocating w13");
    CK(d->cuMemAlloc(&st->w2, E * H * I * 2), "allocating w2");
    CK(d->cuMemAlloc(&st->out, T * H * 2), "allocating the output");
    CK(d->cuMemAlloc(&st->ids, T * K * 4), "allocating topk ids");
    CK(d->cuMemAlloc(&st->weights, T * K * 4), "allocating topk weights");
    CK(d->cuMemAlloc(&st->ws, ws_bytes), "allocating the workspace");
    CK(d->cuMemAlloc(&st->ref_ids, T * K * 4), "allocating reference ids");
    CK(d->cuMemAlloc(&st->ref_weights, T * K * 4), "allocating reference weights");
    CK(d->cuMemAlloc(&st->ref_inter, T * K * I * 4), "allocating the reference intermediate");
    CK(d->cuMemAlloc(&st->ref_out, T * H * 4), "allocating the reference output");
    CK(d->cuMemAlloc(&st->sums, 64), "allocating comparison sums");

    /* the reference module: ref kernels, fill, compare */
    fm_config rc;
    memset(&rc, 0, sizeof rc);
    snprintf(rc.family, sizeof rc.family, "moe_ref");
    fm_config_set_str(&rc, "dtype", a->dtype == FM_DTYPE_BF16 ? "bf16" : "fp16");
    char gerr[512] = "";
    if (fm_generator_name(ctx->gen, &rc, gerr, sizeof gerr) != FM_OK) {
        snprintf(err, errlen, "%s", gerr);
        s = FM_ERR_GENERATOR;
        goto fail;
    }
    const fm_loaded *ref;
    if ((s = fm_context_load(ctx, &rc, &ref)) != FM_OK) {
        snprintf(err, errlen, "reference kernels: %s", fm_last_error(ctx));
        goto fail;
    }
    CUfunction f_ffn1, f_ffn2, f_fill;
    CK(d->cuModuleGetFunction(&f_ffn1, ref->module, "fm_moe_ref_ffn1"), "fm_moe_ref_ffn1");
    CK(d->cuModuleGetFunction(&f_ffn2, ref->module, "fm_moe_ref_ffn2"), "fm_moe_ref_ffn2");
    CK(d->cuModuleGetFunction(&f_fill, ref->module, "fm_moe_fill"), "fm_moe_fill");
    CK(d->cuModuleGetFunction(&st->f_compare, ref->module, "fm_moe_compare"), "fm_moe_compare");

    /* fresh inputs every run: the seed comes from the clock */
    unsigned long long seed = fm_test_seed();
    float aw1 = sqrtf(3.0f / (float)H), aw2 = sqrtf(3.0f / (float)I);
    CK(fill(d, f_fill, st->hidden, T * H, 0, -1.f, 1.f, seed + 1), "drawing hidden states");
    CK(fill(d, f_fill, st->logits, T * E, 1, -3.f, 3.f, seed + 2), "drawing logits");
    /* The correction bias of a trained DeepSeek-V3 exists to balance the experts' loads. The
     * top sigmoid scores of a token lie within a few hundredths of each other, so a random bias
     * of any size decides the choice: U(-0.25, 0.25) left experts with 0 and 1030 tokens at
     * T = 4096 (mean 128), and the tuner then timed a layer that reads a fraction of the
     * weights. U(-0.001, 0.001) keeps the path exercised and the loads balanced (89..174). */
    CK(fill(d, f_fill, st->bias, E, 1, -1e-3f, 1e-3f, seed + 3), "drawing the bias");
    CK(fill(d, f_fill, st->w13, E * 2 * I * H, 0, -aw1, aw1, seed + 4), "drawing w13");
    CK(fill(d, f_fill, st->w2, E * H * I, 0, -aw2, aw2, seed + 5), "drawing w2");

    a->hidden_states = (const void *)(uintptr_t)st->hidden;
    a->router_logits = (const float *)(uintptr_t)st->logits;
    a->correction_bias = (const float *)(uintptr_t)st->bias;
    a->w13 = (const void *)(uintptr_t)st->w13;
    a->w2 = (const void *)(uintptr_t)st->w2;
    a->out = (void *)(uintptr_t)st->out;
    a->topk_ids = (int32_t *)(uintptr_t)st->ids;
    a->topk_weights = (float *)(uintptr_t)st->weights;
    a->workspace = (void *)(uintptr_t)st->ws;
    a->workspace_bytes = ws_bytes;

    /* Routing options exactly as the library passes them to its own routing kernel. */
    fm_moe_route_params route;
    fm_moe_route_setup(a, &route);
    fm_moe_ref_params rp;
    memset(&rp, 0, sizeof rp);
    rp.hidden = a->hidden_states;
    rp.logits = route.logits;
    rp.bias = route.bias;
    rp.w13 = a->w13;
    rp.w2 = a->w2;
    rp.ids = (int *)(uintptr_t)st->ref_ids;
    rp.weights = (float *)(uintptr_t)st->ref_weights;
    rp.inter = (float *)(uintptr_t)st->ref_inter;
    rp.out = (float *)(uintptr_t)st->ref_out;
    rp.tokens = route.tokens;
    rp.hidden_size = a->hidden;
    rp.inter_size = a->intermediate;
    rp.experts = route.experts;
    rp.topk = route.topk;
    rp.routing = route.routing;
    rp.renormalize = route.renormalize;
    rp.n_group = route.n_group;
    rp.topk_group = route.topk_group;
    rp.scale = route.scale;
    void *argv[] = {&rp};
    CK(d->cuLaunchKernel(ref->fn, (unsigned)((T + 255) / 256), 1, 1, 256, 1, 1, 0, NULL, argv,
                         NULL),
       "reference routing");
    CK(d->cuLaunchKernel(f_ffn1, (unsigned)(T * K), 1, 1, 256, 1, 1, 0, NULL, argv, NULL),
       "reference gate/up");
    CK(d->cuLaunchKernel(f_ffn2, (unsigned)T, 1, 1, 256, 1, 1, 0, NULL, argv, NULL),
       "reference down");
    CK(d->cuCtxSynchronize(), "running the reference");
    fm_context_leave(ctx);
    *state = st;
    return FM_OK;
fail:
    fm_context_leave(ctx);
    moe_teardown(st);
    return s;
}

static fm_status moe_poison(void *state, CUstream s) {
    moe_state *st = state;
    CUresult r = st->drv->cuMemsetD8Async(st->out, 0xFF, st->out_elems * 2, s);
    if (r == CUDA_SUCCESS) r = st->drv->cuMemsetD8Async(st->ids, 0xFF, (size_t)st->a.tokens *
                                                                           (size_t)st->a.topk * 4,
                                                        s);
    return r == CUDA_SUCCESS ? FM_OK : FM_ERR_CUDA;
}

static fm_status moe_run(fm_context *ctx, void *state, const fm_loaded *k, int rot, CUstream s) {
    (void)rot; /* see the header comment */
    moe_state *st = state;
    return fm_moe_launch(ctx, k, &st->a, s);
}

static fm_status moe_check(void *state, fm_check *out) {
    moe_state *st = state;
    const fm_driver *d = st->drv;
    const fm_moe_args *a = &st->a;
    memset(out, 0, sizeof *out);
    size_t slots = (size_t)a->tokens * (size_t)a->topk;

    /* routing: the fast router and the reference must agree exactly (same fp32 values, same
     * tie rule) */
    int *ids = malloc(slots * 4), *ref_ids = malloc(slots * 4);
    if (!ids || !ref_ids) {
        free(ids);
        free(ref_ids);
        return FM_ERR_OUT_OF_MEMORY;
    }
    CUresult r = d->cuMemcpyDtoH(ids, st->ids, slots * 4);
    if (r == CUDA_SUCCESS) r = d->cuMemcpyDtoH(ref_ids, st->ref_ids, slots * 4);
    size_t id_mismatch = 0;
    for (size_t i = 0; r == CUDA_SUCCESS && i < slots; i++) id_mismatch += ids[i] != ref_ids[i];
    free(ids);
    free(ref_ids);
    if (r != CUDA_SUCCESS) return FM_ERR_CUDA;

    /* output against the reference, on the GPU */
    fm_moe_compare_params cp;
    memset(&cp, 0, sizeof cp);
    cp.out = (const void *)(uintptr_t)st->out;
    cp.ref = (const float *)(uintptr_t)st->ref_out;
    cp.sums = (double *)(uintptr_t)st->sums;
    cp.counts = (unsigned long long *)(uintptr_t)(st->sums + 32);
    cp.count = (long long)st->out_elems;
    cp.poison = 0xFFFFu;
    void *argv[] = {&cp};
    size_t blocks = (st->out_elems + 255) / 256;
    if (blocks > 4096) blocks = 4096;
    double sums[4] = {0, 0, 0, 0};
    unsigned long long counts[2] = {0, 0};
    r = d->cuMemsetD8(st->sums, 0, 64);
    if (r == CUDA_SUCCESS)
        r = d->cuLaunchKernel(st->f_compare, (unsigned)blocks, 1, 1, 256, 1, 1, 0, NULL, argv,
                              NULL);
    if (r == CUDA_SUCCESS) r = d->cuCtxSynchronize();
    if (r == CUDA_SUCCESS) r = d->cuMemcpyDtoH(sums, st->sums, 24);
    if (r == CUDA_SUCCESS) r = d->cuMemcpyDtoH(counts, st->sums + 32, 16);
    if (r != CUDA_SUCCESS) return FM_ERR_CUDA;

    out->max_abs_err = sums[2];
    out->rel_err = sums[1] > 0 ? sqrt(sums[0] / sums[1]) : sqrt(sums[0]);
    out->unwritten = counts[0] > (unsigned long long)INT32_MAX ? INT32_MAX : (int)counts[0];
    out->nonfinite = counts[1] > (unsigned long long)INT32_MAX ? INT32_MAX : (int)counts[1];
    /* bf16: the 16-bit intermediate, slot rows and output each round at ~2^-9 relative (RMS
     * ~1e-3 apiece); fp16 at ~2^-12. The tolerances leave 4-8x room over that. */
    double tol = a->dtype == FM_DTYPE_BF16 ? 1e-2 : 2e-3;
    out->ok = out->unwritten == 0 && out->nonfinite == 0 && out->rel_err <= tol &&
              id_mismatch == 0;
    snprintf(out->detail, sizeof out->detail,
             "rel %.2e (tol %.0e) max %.2e unwritten %d nonfinite %d routing mismatches %zu",
             out->rel_err, tol, out->max_abs_err, out->unwritten, out->nonfinite, id_mismatch);
    return FM_OK;
}

const fm_op fm_op_moe = {
    .name = "moe",
    .families = "moe_gemm_sm90,moe_gemm_sm80",
    .parse = moe_parse,
    .flops = moe_flops,
    .setup = moe_setup,
    .poison = moe_poison,
    .run = moe_run,
    .check = moe_check,
    .teardown = moe_teardown,
};
