/*
 * test_moe_gpu.c - the fused MoE forward on the GPU against the CPU.
 *
 *  A. routing: ids and weights of the router (returned through topk_ids / topk_weights) against
 *     a CPU router with the same fp32 selection values and the same tie rule (lower expert /
 *     group index wins): exact ids wherever the choice is not within rounding of a tie (exact
 *     ties included: quantised logits make many), weights within 1e-5 of float64;
 *  B. the whole layer against float64 on the CPU: small shapes with T = 1 and 3, an expert that
 *     receives no token, one expert receiving every token, E = 512 with K = 16, more routing
 *     slots than one CTA of the alignment takes (several CTAs counting and placing, also all on
 *     one expert), both routing
 *     modes (softmax with and without renormalisation; sigmoid with and without groups and
 *     bias), bf16 and fp16, through fm_moe_fwd (the library's own choice);
 *  C. a set of configurations spanning every axis value of both families (sm80: block_m
 *     16..128, block_n, block_k 32, stages, warps; sm90 on sm_90 devices: both pipelines,
 *     block_m 64/128, block_n 64..256, stages; both: group_m, split_k, both combine modes), or
 *     every kept configuration with FM_TEST_MOE_ALL=1, through fm_moe_launch (FM_TEST_MOE_PIPE=P
 *     restricts C and C' to the sm90 configurations of pipe P);
 *  C'. the warp-specialised sm90 configurations (pipe = ws and swap) on the odd shapes of B too:
 *     T = 1, an expert with no token, one expert with every token (many tiles of one expert,
 *     partial last tile), I and H below one tile (tensor-map zero fill), E = 512 with K = 16;
 *  D. argument checking: H or I not a multiple of 64, topk > E, topk > 16, E > 512, NULL
 *     pointers, bad groups, a workspace one byte too small: FM_ERR_INVALID_ARGUMENT with a
 *     message.
 * Outputs (and the routing outputs) are poisoned with 0xFF bytes before every run; fresh random
 * inputs every run. Exits 77 (skip) when there is no GPU.
 */
#define _GNU_SOURCE
#include "check.h"
#include "internal.h"
#include "testdata.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct moe_case {
    const char *name;
    fm_dtype dt;
    int T, H, I, E, K;
    int routing; /* 0 softmax, 1 sigmoid */
    int renorm, n_group, topk_group;
    float scale;
    int use_bias;
    int quantize;    /* logits (and bias) on a coarse grid: many exact ties */
    int dead_expert; /* >= 0: this expert's logit is -30 for every token (receives nothing) */
    int hot_expert;  /* >= 0: this expert's logit is +30 for every token (receives everything) */
    int slab_widths; /* E = 16, K = 1, expert e gets exactly 1: kSlabCounts[e], 2: kMergeCounts[e]
                      * tokens (see there) */
} moe_case;

/* Expert loads around every width the warp-specialised GEMMs treat differently: an expert's last
 * 64-row slab of at most 48 rows runs with the operands swapped at N = 16, 32 or 48 (the hybrid
 * tile), 49..64 rows run as usual; 65, 129, 176 and 177 put that slab in a second 128-row tile,
 * alone or behind a full one. T = their sum (1061). */
static const int kSlabCounts[16] = {1,  16, 17, 31, 32, 33,  47,  48,
                                    49, 63, 64, 65, 113, 129, 176, 177};
/* Loads around a merged slab (ws_tail = merge: an expert's last tile of at most 48 real rows, 32
 * with clusters, run by the tile before it): 128 + 1, 15, 16, 17, 31, 32, 33, 47, 48, 49, a full
 * tile, an expert of one short tile (not merged: it is its expert's first), and three tiles
 * ending in a merged or a lone slab. T = their sum (2636). */
static const int kMergeCounts[16] = {129, 143, 144, 145, 159, 160, 161, 175,
                                     176, 177, 128, 40,  289, 304, 305, 1};
static const int *slab_counts(const moe_case *c) {
    return c->slab_widths == 2 ? kMergeCounts : kSlabCounts;
}

/* ---- host random numbers ------------------------------------------------------------------ */
static unsigned long long rng_state;
static double urand(void) { /* [0, 1) */
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(rng_state >> 11) * (1.0 / 9007199254740992.0);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)urand(); }

/* ---- CPU router (fp32 selection values, exactly the kernel's formulas) ------------------ */
static float sel_score(const moe_case *c, const float *row, const float *bias, int e) {
    if (c->routing == 0) return row[e];
    float s = 1.0f / (1.0f + expf(-row[e]));
    return s + (c->use_bias ? bias[e] : 0.0f);
}

/* Kept groups of one token (all kept without grouping); returns the group scores too. */
static void cpu_groups(const moe_case *c, const float *score, int *keep, float *gscore) {
    int ng = c->routing == 1 && c->n_group > 1 ? c->n_group : 1;
    int gs = c->E / ng;
    for (int g = 0; g < ng; g++) {
        float b1 = -INFINITY, b2 = -INFINITY;
        for (int j = 0; j < gs; j++) {
            float v = score[g * gs + j];
            if (v > b1) {
                b2 = b1;
                b1 = v;
            } else if (v > b2) {
                b2 = v;
            }
        }
        gscore[g] = gs >= 2 ? b1 + b2 : b1;
        keep[g] = ng == 1;
    }
    if (ng == 1) return;
    for (int n = 0; n < c->topk_group; n++) {
        int best = -1;
        for (int g = 0; g < ng; g++)
            if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
        keep[best] = 1;
    }
}

static void cpu_route_token(const moe_case *c, const float *row, const float *bias, int *ids,
                            float *score, int *keep, float *gscore) {
    int gs = c->E / (c->routing == 1 && c->n_group > 1 ? c->n_group : 1);
    for (int e = 0; e < c->E; e++) score[e] = sel_score(c, row, bias, e);
    cpu_groups(c, score, keep, gscore);
    int taken[FM_MOE_MAX_EXPERTS] = {0};
    for (int k = 0; k < c->K; k++) {
        int best = -1;
        for (int e = 0; e < c->E; e++)
            if (!taken[e] && keep[e / gs] && (best < 0 || score[e] > score[best])) best = e;
        ids[k] = best;
        taken[best] = 1;
    }
}

/* Routing weights of the given ids, in float64. */
static void cpu_weights(const moe_case *c, const float *row, const int *ids, double *w) {
    if (c->routing == 1) {
        double sum = 0;
        for (int k = 0; k < c->K; k++) sum += w[k] = 1.0 / (1.0 + exp(-(double)row[ids[k]]));
        double sc = c->scale != 0.0f ? c->scale : 1.0;
        for (int k = 0; k < c->K; k++) w[k] = w[k] / (sum + 1e-20) * sc;
        return;
    }
    double mx = -INFINITY, den = 0;
    for (int e = 0; e < c->E; e++) mx = fmax(mx, row[e]);
    if (c->renorm)
        for (int k = 0; k < c->K; k++) den += exp((double)row[ids[k]] - mx);
    else
        for (int e = 0; e < c->E; e++) den += exp((double)row[e] - mx);
    for (int k = 0; k < c->K; k++) w[k] = exp((double)row[ids[k]] - mx) / den;
}

/* A choice that differs from the CPU's is accepted only where rounding can flip it: some pair of
 * selection (or group) scores closer than eps, and the GPU's set still the top-K within eps.
 * Scores made from equal inputs are exact ties that both sides break toward the lower index; but
 * scores from different inputs that the CPU rounds to the same float (sigmoid saturates) may
 * differ by an ulp on the GPU, so they count as near ties. */
/* The (logit, bias) pairs of a group's two best choice scores (lower index first on ties), the
 * inputs of its group score. */
static void group_top2(const float *row, const float *bias, const float *score, int gs, int g,
                       float in[2][2]) {
    int b1 = -1, b2 = -1;
    for (int e = g * gs; e < (g + 1) * gs; e++) {
        if (b1 < 0 || score[e] > score[b1]) {
            b2 = b1;
            b1 = e;
        } else if (b2 < 0 || score[e] > score[b2]) {
            b2 = e;
        }
    }
    const int top[2] = {b1, b2 >= 0 ? b2 : b1};
    for (int k = 0; k < 2; k++) {
        in[k][0] = row[top[k]];
        in[k][1] = bias ? bias[top[k]] : 0.f;
    }
}

/* Do groups i and j score from the same inputs (as multisets of (logit, bias) pairs)? */
static int same_group_inputs(const float *row, const float *bias, const float *score, int gs,
                             int i, int j) {
    float a[2][2], b[2][2];
    group_top2(row, bias, score, gs, i, a);
    group_top2(row, bias, score, gs, j, b);
    const int same = a[0][0] == b[0][0] && a[0][1] == b[0][1] && a[1][0] == b[1][0] &&
                     a[1][1] == b[1][1];
    const int crossed = a[0][0] == b[1][0] && a[0][1] == b[1][1] && a[1][0] == b[0][0] &&
                        a[1][1] == b[0][1];
    return same || crossed;
}

static int near_tie_valid(const moe_case *c, const float *row, const float *bias,
                          const float *score, const float *gscore, const int *gpu_ids) {
    const float eps = 2e-6f;
    int ng = c->routing == 1 && c->n_group > 1 ? c->n_group : 1, gs = c->E / ng;
    int ambiguous = 0;
    for (int i = 0; i < c->E && !ambiguous; i++)
        for (int j = i + 1; j < c->E; j++) {
            float d = fabsf(score[i] - score[j]);
            int same_inputs = row[i] == row[j] && (!bias || bias[i] == bias[j]);
            if (d <= eps && (d > 0 || !same_inputs)) ambiguous = 1;
        }
    /* Group scores likewise: equal only because the CPU rounded two different sums of different
     * inputs to the same float, they may differ by an ulp on the GPU (its expf is not the C
     * library's); equal sums of the same inputs are exact ties. */
    for (int i = 0; i < ng && !ambiguous; i++)
        for (int j = i + 1; j < ng; j++) {
            float d = fabsf(gscore[i] - gscore[j]);
            if (d > 0 && d <= eps) ambiguous = 1;
            if (d == 0 && !same_group_inputs(row, bias, score, gs, i, j)) ambiguous = 1;
        }
    if (!ambiguous) return 0;
    int chosen[FM_MOE_MAX_EXPERTS] = {0}, in_g[FM_MOE_MAX_GROUPS] = {0};
    float min_chosen = INFINITY;
    int n_g = 0;
    for (int k = 0; k < c->K; k++) {
        int e = gpu_ids[k];
        if (e < 0 || e >= c->E || chosen[e]) return 0;
        chosen[e] = 1;
        min_chosen = fminf(min_chosen, score[e]);
        if (!in_g[e / gs]) n_g++;
        in_g[e / gs] = 1;
    }
    if (ng == 1) { /* every expert was eligible: the set must be the top K within eps */
        for (int e = 0; e < c->E; e++)
            if (!chosen[e] && score[e] > min_chosen + eps) return 0;
        return 1;
    }
    /* Grouped: the GPU kept some set S of topk_group groups, containing the groups of its
     * choices (and possibly groups it kept but took nothing from). S is valid if no group
     * outside it scores more than eps above S's weakest, and no expert left in S scores more
     * than eps above the weakest choice. Groups that are alternatives to each other (a near
     * tie) are not all required at once: S is completed from the groups the choices allow. */
    if (n_g > c->topk_group) return 0;
    int in_s[FM_MOE_MAX_GROUPS];
    memcpy(in_s, in_g, sizeof in_s);
    for (int n = n_g; n < c->topk_group; n++) {
        int best = -1;
        for (int g = 0; g < ng; g++) {
            if (in_s[g]) continue;
            int fits = 1; /* could the GPU have kept g and taken nothing from it? */
            for (int e = g * gs; e < (g + 1) * gs; e++)
                if (score[e] > min_chosen + eps) fits = 0;
            if (fits && (best < 0 || gscore[g] > gscore[best])) best = g;
        }
        if (best < 0) return 0;
        in_s[best] = 1;
    }
    float weakest = INFINITY;
    for (int g = 0; g < ng; g++)
        if (in_s[g]) weakest = fminf(weakest, gscore[g]);
    for (int g = 0; g < ng; g++) {
        if (!in_s[g] && gscore[g] > weakest + eps) return 0;
        if (!in_s[g]) continue;
        for (int e = g * gs; e < (g + 1) * gs; e++)
            if (!chosen[e] && score[e] > min_chosen + eps) return 0;
    }
    return 1;
}

/* ---- CPU layer in float64 ----------------------------------------------------------------- */
static void cpu_layer(const moe_case *c, const unsigned short *x, const unsigned short *w13,
                      const unsigned short *w2, const int *ids, const double *w, double *y) {
    int bf = c->dt == FM_DTYPE_BF16;
    size_t H = (size_t)c->H, I = (size_t)c->I;
    double *xf = malloc(H * sizeof *xf), *h = malloc(I * sizeof *h);
    for (int t = 0; t < c->T; t++) {
        for (size_t i = 0; i < H; i++) xf[i] = fm_16_to_float(x[(size_t)t * H + i], bf);
        for (size_t n = 0; n < H; n++) y[(size_t)t * H + n] = 0;
        for (int k = 0; k < c->K; k++) {
            int e = ids[t * c->K + k];
            const unsigned short *g = w13 + (size_t)e * 2 * I * H;
            for (size_t j = 0; j < I; j++) {
                double a = 0, b = 0;
                for (size_t i = 0; i < H; i++) {
                    a += xf[i] * fm_16_to_float(g[j * H + i], bf);
                    b += xf[i] * fm_16_to_float(g[(I + j) * H + i], bf);
                }
                h[j] = a / (1.0 + exp(-a)) * b;
            }
            const unsigned short *d = w2 + (size_t)e * H * I;
            for (size_t n = 0; n < H; n++) {
                double s = 0;
                for (size_t j = 0; j < I; j++) s += h[j] * fm_16_to_float(d[n * I + j], bf);
                y[(size_t)t * H + n] += w[t * c->K + k] * s;
            }
        }
    }
    free(xf);
    free(h);
}

/* ---- one case: inputs on the device, run, check ------------------------------------------- */
typedef struct moe_data {
    moe_case c;
    unsigned short *x, *w13, *w2;
    float *logits, *bias;
    CUdeviceptr d_x, d_logits, d_bias, d_w13, d_w2, d_out, d_ids, d_w, d_ws;
    size_t ws_bytes;
    fm_moe_args a;
} moe_data;

static void fill16(unsigned short *v, size_t n, float amp, int bf) {
    for (size_t i = 0; i < n; i++) v[i] = fm_float_to_16(uniform(-amp, amp), bf);
}

static int data_init(fm_context *ctx, moe_data *m, const moe_case *c) {
    const fm_driver *d = ctx->drv;
    memset(m, 0, sizeof *m);
    m->c = *c;
    int bf = c->dt == FM_DTYPE_BF16;
    size_t T = (size_t)c->T, H = (size_t)c->H, I = (size_t)c->I, E = (size_t)c->E;
    m->x = malloc(T * H * 2);
    m->w13 = malloc(E * 2 * I * H * 2);
    m->w2 = malloc(E * H * I * 2);
    m->logits = malloc(T * E * 4);
    m->bias = malloc(E * 4);
    if (!m->x || !m->w13 || !m->w2 || !m->logits || !m->bias) return 0;
    fill16(m->x, T * H, 1.0f, bf);
    fill16(m->w13, E * 2 * I * H, sqrtf(3.0f / (float)H), bf);
    fill16(m->w2, E * H * I, sqrtf(3.0f / (float)I), bf);
    for (size_t i = 0; i < T * E; i++) {
        float v = uniform(-3.0f, 3.0f);
        m->logits[i] = c->quantize ? roundf(v * 2.0f) / 2.0f : v;
    }
    for (size_t e = 0; e < E; e++) {
        float v = uniform(-0.25f, 0.25f);
        m->bias[e] = c->quantize ? roundf(v * 8.0f) / 8.0f : v;
    }
    for (size_t t = 0; t < T; t++) {
        if (c->dead_expert >= 0) m->logits[t * E + (size_t)c->dead_expert] = -30.0f;
        if (c->hot_expert >= 0) m->logits[t * E + (size_t)c->hot_expert] = 30.0f;
    }
    if (c->slab_widths) {
        size_t t = 0;
        for (size_t e = 0; e < 16 && e < E; e++)
            for (int j = 0; j < slab_counts(c)[e] && t < T; j++, t++) m->logits[t * E + e] = 30.0f;
    }
    fm_moe_args *a = &m->a;
    a->dtype = c->dt;
    a->tokens = c->T;
    a->hidden = c->H;
    a->intermediate = c->I;
    a->experts = c->E;
    a->topk = c->K;
    a->routing = c->routing ? FM_MOE_ROUTING_SIGMOID_GROUPED : FM_MOE_ROUTING_SOFTMAX_TOPK;
    a->renormalize = c->renorm;
    a->n_group = c->n_group;
    a->topk_group = c->topk_group;
    a->routed_scaling_factor = c->scale;
    fm_status s = fm_moe_workspace_size(ctx, a, &m->ws_bytes);
    CHECK(s == FM_OK, "%s: workspace size: %s", c->name, fm_last_error(ctx));
    if (s != FM_OK) return 0;
    CUresult r = CUDA_SUCCESS;
#define ALLOC(p, n)                                                                            \
    if (r == CUDA_SUCCESS) r = d->cuMemAlloc(&(p), (n))
    ALLOC(m->d_x, T * H * 2);
    ALLOC(m->d_logits, T * E * 4);
    ALLOC(m->d_bias, E * 4);
    ALLOC(m->d_w13, E * 2 * I * H * 2);
    ALLOC(m->d_w2, E * H * I * 2);
    ALLOC(m->d_out, T * H * 2);
    ALLOC(m->d_ids, T * (size_t)c->K * 4);
    ALLOC(m->d_w, T * (size_t)c->K * 4);
    ALLOC(m->d_ws, m->ws_bytes);
#undef ALLOC
    if (r == CUDA_SUCCESS) r = d->cuMemcpyHtoD(m->d_x, m->x, T * H * 2);
    if (r == CUDA_SUCCESS) r = d->cuMemcpyHtoD(m->d_logits, m->logits, T * E * 4);
    if (r == CUDA_SUCCESS) r = d->cuMemcpyHtoD(m->d_bias, m->bias, E * 4);
    if (r == CUDA_SUCCESS) r = d->cuMemcpyHtoD(m->d_w13, m->w13, E * 2 * I * H * 2);
    if (r == CUDA_SUCCESS) r = d->cuMemcpyHtoD(m->d_w2, m->w2, E * H * I * 2);
    CHECK(r == CUDA_SUCCESS, "%s: allocating / uploading inputs failed (%d)", c->name, (int)r);
    if (r != CUDA_SUCCESS) return 0;
    a->hidden_states = (const void *)(uintptr_t)m->d_x;
    a->router_logits = (const float *)(uintptr_t)m->d_logits;
    a->correction_bias = c->use_bias ? (const float *)(uintptr_t)m->d_bias : NULL;
    a->w13 = (const void *)(uintptr_t)m->d_w13;
    a->w2 = (const void *)(uintptr_t)m->d_w2;
    a->out = (void *)(uintptr_t)m->d_out;
    a->topk_ids = (int32_t *)(uintptr_t)m->d_ids;
    a->topk_weights = (float *)(uintptr_t)m->d_w;
    a->workspace = (void *)(uintptr_t)m->d_ws;
    a->workspace_bytes = m->ws_bytes;
    return 1;
}

static void data_free(fm_context *ctx, moe_data *m) {
    const fm_driver *d = ctx->drv;
    CUdeviceptr bufs[] = {m->d_x, m->d_logits, m->d_bias, m->d_w13, m->d_w2,
                          m->d_out, m->d_ids, m->d_w, m->d_ws};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) d->cuMemFree(bufs[i]);
    free(m->x);
    free(m->w13);
    free(m->w2);
    free(m->logits);
    free(m->bias);
}

/* Runs the layer (with `k` when given, else fm_moe_fwd) and checks routing and output. */
static void run_and_check(fm_context *ctx, moe_data *m, const fm_loaded *k, const char *label) {
    const fm_driver *d = ctx->drv;
    const moe_case *c = &m->c;
    size_t T = (size_t)c->T, H = (size_t)c->H, K = (size_t)c->K;
    int bf = c->dt == FM_DTYPE_BF16;
    CUresult r = d->cuMemsetD8(m->d_out, 0xFF, T * H * 2);
    if (r == CUDA_SUCCESS) r = d->cuMemsetD8(m->d_ids, 0xFF, T * K * 4);
    if (r == CUDA_SUCCESS) r = d->cuMemsetD8(m->d_w, 0xFF, T * K * 4);
    if (r == CUDA_SUCCESS) r = d->cuMemsetD8(m->d_ws, 0xFF, m->ws_bytes);
    fm_status s = k ? fm_moe_launch(ctx, k, &m->a, NULL) : fm_moe_fwd(ctx, &m->a, NULL);
    CHECK(s == FM_OK, "%s [%s]: %s", c->name, label, fm_last_error(ctx));
    if (s != FM_OK) return;
    if (r == CUDA_SUCCESS) r = d->cuCtxSynchronize();
    CHECK(r == CUDA_SUCCESS, "%s [%s]: the run failed (CUDA error %d)", c->name, label, (int)r);
    if (r != CUDA_SUCCESS) return;
    unsigned short *out = malloc(T * H * 2);
    int *ids = malloc(T * K * 4);
    float *w = malloc(T * K * 4);
    double *wref = malloc(T * K * sizeof(double)), *y = malloc(T * H * sizeof(double));
    d->cuMemcpyDtoH(out, m->d_out, T * H * 2);
    d->cuMemcpyDtoH(ids, m->d_ids, T * K * 4);
    d->cuMemcpyDtoH(w, m->d_w, T * K * 4);

    /* A: routing */
    int id_bad = 0, near = 0, w_bad = 0, dead_hits = 0, hot_missing = 0;
    double w_err = 0;
    float score[FM_MOE_MAX_EXPERTS], gscore[FM_MOE_MAX_GROUPS];
    int keep[FM_MOE_MAX_GROUPS], cids[FM_MOE_MAX_TOPK];
    for (size_t t = 0; t < T; t++) {
        const float *row = m->logits + t * (size_t)c->E;
        cpu_route_token(c, row, m->bias, cids, score, keep, gscore);
        int same = memcmp(cids, ids + t * K, K * sizeof(int)) == 0;
        if (!same) {
            if (near_tie_valid(c, row, c->routing == 1 ? m->bias : NULL, score, gscore, ids + t * K))
                near++;
            else if (id_bad++ < 3)
                fprintf(stderr, "  %s [%s] token %zu: gpu ids %d %d .. cpu %d %d ..\n", c->name,
                        label, t, ids[t * K], K > 1 ? ids[t * K + 1] : -1, cids[0],
                        K > 1 ? cids[1] : -1);
        }
        int valid = 1;
        for (size_t j = 0; j < K; j++) valid &= ids[t * K + j] >= 0 && ids[t * K + j] < c->E;
        if (!valid) continue;
        cpu_weights(c, row, ids + t * K, wref + t * K);
        for (size_t j = 0; j < K; j++) {
            double e = fabs((double)w[t * K + j] - wref[t * K + j]);
            w_err = fmax(w_err, e);
            if (!(e <= 1e-5 * fabs(wref[t * K + j]) + 1e-7)) w_bad++;
            dead_hits += ids[t * K + j] == c->dead_expert;
        }
        if (c->hot_expert >= 0 && ids[t * K] != c->hot_expert) hot_missing++;
    }
    CHECK(id_bad == 0, "%s [%s]: %d tokens routed differently from the CPU", c->name, label,
          id_bad);
    CHECK(w_bad == 0, "%s [%s]: %d routing weights off (max error %.3g)", c->name, label, w_bad,
          w_err);
    CHECK(dead_hits == 0, "%s [%s]: the starved expert received %d slots", c->name, label,
          dead_hits);
    CHECK(hot_missing == 0, "%s [%s]: %d tokens skipped the hot expert", c->name, label,
          hot_missing);
    if (near) printf("  %s [%s]: %d tokens resolved a near-tie differently (accepted)\n", c->name,
                     label, near);
    if (c->slab_widths) { /* the loads the case is about really happened */
        int load[16] = {0}, off = 0;
        for (size_t i = 0; i < T * K; i++)
            if (ids[i] >= 0 && ids[i] < 16) load[ids[i]]++;
        for (int e = 0; e < 16; e++) off += load[e] != slab_counts(c)[e];
        CHECK(off == 0, "%s [%s]: %d experts did not get their designed load", c->name, label, off);
    }

    /* B: the layer, with the GPU's (validated) routing and float64 weights */
    if (id_bad == 0) {
        cpu_layer(c, m->x, m->w13, m->w2, ids, wref, y);
        double num = 0, den = 0, mx = 0;
        int unwritten = 0, nonfinite = 0;
        for (size_t i = 0; i < T * H; i++) {
            if (out[i] == 0xFFFF) {
                unwritten++;
                continue;
            }
            double v = fm_16_to_float(out[i], bf);
            if (!isfinite(v)) {
                nonfinite++;
                continue;
            }
            num += (v - y[i]) * (v - y[i]);
            den += y[i] * y[i];
            mx = fmax(mx, fabs(v - y[i]));
        }
        double rel = den > 0 ? sqrt(num / den) : sqrt(num);
        double tol = bf ? 1e-2 : 2e-3;
        CHECK(unwritten == 0 && nonfinite == 0 && rel <= tol,
              "%s [%s]: rel %.3e (tol %.0e) max %.3e unwritten %d nonfinite %d", c->name, label,
              rel, tol, mx, unwritten, nonfinite);
        printf("  %-28s %-58s rel %.2e max %.2e\n", c->name, label, rel, mx);
    }
    free(out);
    free(ids);
    free(w);
    free(wref);
    free(y);
}

/* ---- C: explicit configurations ---------------------------------------------------------- */
typedef struct cfg_spec {
    const char *family;
    int bm, bn, bk, stages, warps, group_m, split; /* bk, warps: sm80 only */
    const char *combine;
    const char *pipe; /* sm90 only: "sync", "ws" or "swap" */
    const char *ws_grid; /* sm90 ws only: "persistent" (NULL), "tiles" or "dynamic" */
    int x_stages;        /* sm90 swap only: token ring depth (0: the default, 3) */
    int cluster;         /* sm90 ws tiles only: CTAs per cluster sharing weight copies (0: 1) */
    const char *ws_tail; /* sm90 ws tiles only: "tile" (NULL) or "merge" */
} cfg_spec;

/* Every axis value at least once; each is a kept configuration of generator/moe_gemm_sm80.lua
 * or moe_gemm_sm90.lua on an H100 (smaller devices skip what does not fit). */
static const cfg_spec specs[] = {
    {"moe_gemm_sm80", 16, 64, 64, 3, 4, 1, 1, "slot", NULL, NULL, 0, 0, NULL},
    {"moe_gemm_sm80", 16, 128, 64, 4, 4, 1, 4, "atomic", NULL, NULL, 0, 0, NULL},
    {"moe_gemm_sm80", 16, 256, 64, 5, 4, 1, 2, "atomic", NULL, NULL, 0, 0, NULL},
    {"moe_gemm_sm80", 32, 128, 64, 4, 4, 1, 1, "slot", NULL, NULL, 0, 0, NULL},
    {"moe_gemm_sm80", 32, 64, 64, 3, 4, 1, 4, "atomic", NULL, NULL, 0, 0, NULL},
    {"moe_gemm_sm80", 64, 128, 64, 3, 8, 8, 1, "slot", NULL, NULL, 0, 0, NULL},
    {"moe_gemm_sm80", 64, 256, 64, 4, 8, 1, 1, "atomic", NULL, NULL, 0, 0, NULL},
    {"moe_gemm_sm80", 128, 128, 64, 4, 4, 8, 1, "atomic", NULL, NULL, 0, 0, NULL},
    {"moe_gemm_sm80", 128, 256, 64, 2, 8, 1, 1, "slot", NULL, NULL, 0, 0, NULL},
    {"moe_gemm_sm80", 128, 256, 32, 4, 8, 8, 1, "slot", NULL, NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 64, 64, 64, 3, 0, 1, 1, "slot", "sync", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 64, 128, 64, 4, 0, 1, 4, "atomic", "sync", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 64, 256, 64, 5, 0, 1, 2, "atomic", "sync", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 128, 128, 64, 3, 0, 8, 1, "atomic", "sync", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 128, 256, 64, 4, 0, 8, 1, "slot", "sync", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 128, 256, 64, 3, 0, 1, 1, "atomic", "sync", NULL, 0, 0, NULL},
};

/* The warp-specialised sm90 pipelines: ws with both block_n, two and three consumers (block_m
 * 128, 192), stages 3..6, both rasters and combines; swap likewise over its own tiles. */
static const cfg_spec ws_specs[] = {
    {"moe_gemm_sm90", 128, 256, 64, 4, 0, 8, 1, "slot", "ws", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 128, 128, 64, 6, 0, 1, 1, "atomic", "ws", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 128, 256, 64, 3, 0, 1, 1, "atomic", "ws", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 128, 128, 64, 5, 0, 8, 1, "slot", "ws", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 192, 256, 64, 3, 0, 8, 1, "slot", "ws", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 192, 256, 64, 3, 0, 1, 1, "atomic", "ws", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 128, 256, 64, 3, 0, 8, 1, "slot", "ws", "tiles", 0, 0, NULL},
    {"moe_gemm_sm90", 128, 128, 64, 4, 0, 1, 1, "atomic", "ws", "tiles", 0, 0, NULL},
    /* pairs of tiles sharing weight copies (multicast) where they belong to one expert */
    {"moe_gemm_sm90", 128, 256, 64, 3, 0, 8, 1, "slot", "ws", "tiles", 0, 2, NULL},
    {"moe_gemm_sm90", 128, 128, 64, 5, 0, 8, 1, "atomic", "ws", "tiles", 0, 2, NULL},
    /* dynamic schedule: a persistent grid taking tiles in order from a counter */
    {"moe_gemm_sm90", 128, 256, 64, 4, 0, 0, 1, "slot", "ws", "dynamic", 0, 0, NULL},
    {"moe_gemm_sm90", 128, 128, 64, 3, 0, 8, 1, "atomic", "ws", "dynamic", 0, 0, NULL},
    /* group_m 0: one raster group per expert */
    {"moe_gemm_sm90", 128, 256, 64, 4, 0, 0, 1, "slot", "ws", "tiles", 0, 2, NULL},
    {"moe_gemm_sm90", 128, 128, 64, 4, 0, 0, 1, "atomic", "ws", NULL, 0, 0, NULL},
    /* an expert's short last tile run by the tile before it, with and without clusters */
    {"moe_gemm_sm90", 128, 256, 64, 4, 0, 0, 1, "slot", "ws", "tiles", 0, 0, "merge"},
    {"moe_gemm_sm90", 128, 256, 64, 3, 0, 8, 1, "slot", "ws", "tiles", 0, 2, "merge"},
    {"moe_gemm_sm90", 128, 256, 64, 4, 0, 0, 1, "slot", "ws", "tiles", 0, 2, "merge"},
    {"moe_gemm_sm90", 192, 192, 64, 4, 0, 0, 1, "slot", "swap", "tiles", 5, 0, NULL},
    /* pipe = swap: token tiles 128..256, two and three consumers of 64 weight rows */
    {"moe_gemm_sm90", 128, 128, 64, 3, 0, 1, 1, "slot", "swap", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 192, 128, 64, 4, 0, 8, 1, "atomic", "swap", "tiles", 0, 0, NULL},
    {"moe_gemm_sm90", 256, 128, 64, 4, 0, 1, 1, "slot", "swap", "tiles", 0, 0, NULL},
    {"moe_gemm_sm90", 256, 128, 64, 3, 0, 8, 1, "atomic", "swap", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 192, 192, 64, 3, 0, 8, 1, "slot", "swap", NULL, 0, 0, NULL},
    {"moe_gemm_sm90", 128, 192, 64, 5, 0, 1, 1, "atomic", "swap", "tiles", 0, 0, NULL},
    {"moe_gemm_sm90", 128, 128, 64, 6, 0, 8, 1, "slot", "swap", "tiles", 0, 0, NULL},
    {"moe_gemm_sm90", 192, 192, 64, 4, 0, 1, 1, "slot", "swap", "tiles", 5, 0, NULL},
    {"moe_gemm_sm90", 128, 192, 64, 4, 0, 8, 1, "atomic", "swap", NULL, 4, 0, NULL},
    {"moe_gemm_sm90", 256, 128, 64, 3, 0, 1, 1, "slot", "swap", "tiles", 5, 0, NULL},
};

/* The configuration of spec sp for type dt, named; 0 where this run does not use it. */
static int spec_config(fm_context *ctx, const cfg_spec *sp, fm_dtype dt, fm_config *out) {
    int sm90 = strcmp(sp->family, "moe_gemm_sm90") == 0;
    if (sm90 && ctx->arch != 90) return 0; /* sm_90a code runs on sm_90 only */
    /* FM_TEST_MOE_PIPE=P: only the sm90 configurations of pipe P (a quicker run while working
     * on one pipeline; the default runs everything) */
    const char *only = getenv("FM_TEST_MOE_PIPE");
    if (only && only[0] && (!sm90 || strcmp(sp->pipe, only) != 0)) return 0;
    fm_config c;
    memset(&c, 0, sizeof c);
    snprintf(c.family, sizeof c.family, "%s", sp->family);
    fm_config_set_str(&c, "dtype", dt == FM_DTYPE_BF16 ? "bf16" : "fp16");
    fm_config_set_int(&c, "block_m", sp->bm);
    fm_config_set_int(&c, "block_n", sp->bn);
    if (!sm90) fm_config_set_int(&c, "block_k", sp->bk);
    if (sm90) fm_config_set_str(&c, "pipe", sp->pipe);
    if (sm90) fm_config_set_str(&c, "ws_grid", sp->ws_grid ? sp->ws_grid : "persistent");
    if (sm90) fm_config_set_int(&c, "x_stages", sp->x_stages ? sp->x_stages : 3);
    if (sm90) fm_config_set_int(&c, "ws_cluster", sp->cluster ? sp->cluster : 1);
    if (sm90) fm_config_set_str(&c, "ws_tail", sp->ws_tail ? sp->ws_tail : "tile");
    fm_config_set_int(&c, "stages", sp->stages);
    if (!sm90) fm_config_set_int(&c, "warps", sp->warps);
    fm_config_set_int(&c, "group_m", sp->group_m);
    fm_config_set_int(&c, "split_k", sp->split);
    fm_config_set_str(&c, "combine", sp->combine);
    char err[512] = "";
    pthread_mutex_lock(&ctx->lock);
    fm_status s = fm_generator_name(ctx->gen, &c, err, sizeof err);
    pthread_mutex_unlock(&ctx->lock);
    CHECK(s == FM_OK, "naming a %s configuration: %s", sp->family, err);
    *out = c;
    return s == FM_OK;
}

static int load_spec(fm_context *ctx, const cfg_spec *sp, fm_dtype dt, const fm_loaded **k) {
    fm_config c;
    if (!spec_config(ctx, sp, dt, &c)) return 0;
    fm_status s = fm_context_load(ctx, &c, k);
    if (s == FM_ERR_UNSUPPORTED) return 0; /* e.g. shared memory of this device */
    CHECK(s == FM_OK, "loading %s: %s", c.name, s == FM_OK ? "" : fm_last_error(ctx));
    return s == FM_OK;
}

/* Compiles every spec of C and C' for both types on all CPUs up front (one at a time, inside
 * the sections, was most of the suite's time); the sections then only load them. A spec that
 * fails here fails again, with its message, when its section loads it. */
static void precompile_specs(fm_context *ctx) {
    const size_t n = 2 * (sizeof specs / sizeof specs[0] + sizeof ws_specs / sizeof ws_specs[0]);
    fm_config *v = calloc(n, sizeof *v);
    if (!v) return;
    int k = 0;
    for (int t = 0; t < 2; t++) {
        const fm_dtype dt = t ? FM_DTYPE_FP16 : FM_DTYPE_BF16;
        for (size_t j = 0; j < sizeof specs / sizeof specs[0]; j++)
            k += spec_config(ctx, &specs[j], dt, &v[k]);
        for (size_t j = 0; j < sizeof ws_specs / sizeof ws_specs[0]; j++)
            k += spec_config(ctx, &ws_specs[j], dt, &v[k]);
    }
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    fm_context_precompile(ctx, v, k, ncpu > 0 ? (int)ncpu : 4, NULL);
    free(v);
}

typedef struct cfg_list {
    fm_config *v;
    int n, cap;
} cfg_list;

static int collect(void *user, const fm_config *c, const char *reason) {
    cfg_list *l = user;
    if (reason) return 0;
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 64;
        fm_config *v = realloc(l->v, (size_t)cap * sizeof *v);
        if (!v) return 1;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = *c;
    return 0;
}

/* Every kept configuration of both families for this problem on this device (the generator
 * culls what the device cannot run). */
static void run_all_configs(fm_context *ctx, moe_data *m) {
    static const char *families[] = {"moe_gemm_sm80", "moe_gemm_sm90"};
    fm_config problem;
    fm_moe_problem(ctx, &m->a, &problem);
    for (size_t f = 0; f < sizeof families / sizeof families[0]; f++) {
        if (f == 1 && ctx->arch != 90) continue;
        cfg_list l = {NULL, 0, 0};
        char err[512] = "";
        pthread_mutex_lock(&ctx->lock); /* the generator; fm_context_load takes the lock itself */
        fm_status s = fm_generator_enumerate(ctx->gen, families[f], &problem, &ctx->limits,
                                             collect, &l, err, sizeof err);
        pthread_mutex_unlock(&ctx->lock);
        CHECK(s == FM_OK, "enumerating %s: %s", families[f], err);
        for (int i = 0; i < l.n; i++) {
            const fm_loaded *k;
            s = fm_context_load(ctx, &l.v[i], &k);
            CHECK(s == FM_OK, "loading %s: %s", l.v[i].name, fm_last_error(ctx));
            if (s == FM_OK) run_and_check(ctx, m, k, k->name);
        }
        printf("  %d configurations of %s\n", l.n, families[f]);
        free(l.v);
    }
}

/* ---- D: argument checking ------------------------------------------------------------------ */
static void expect_invalid(fm_context *ctx, const fm_moe_args *a, const char *what) {
    fm_status s = fm_moe_fwd(ctx, a, NULL);
    const char *msg = fm_last_error(ctx);
    CHECK(s == FM_ERR_INVALID_ARGUMENT && msg[0], "%s: got %s (%s)", what, fm_status_string(s),
          msg);
    if (s == FM_ERR_INVALID_ARGUMENT) printf("  rejected %-26s %s\n", what, msg);
}

static void check_arguments(fm_context *ctx, moe_data *m) {
    fm_moe_args a = m->a;
    size_t bytes = 0;
    CHECK(fm_moe_workspace_size(ctx, &a, &bytes) == FM_OK && bytes == m->ws_bytes,
          "workspace size of the good arguments");
    CHECK(fm_moe_fwd(ctx, &a, NULL) == FM_OK, "the good arguments: %s", fm_last_error(ctx));

    a = m->a;
    a.hidden = 96;
    expect_invalid(ctx, &a, "hidden = 96");
    CHECK(fm_moe_workspace_size(ctx, &a, &bytes) == FM_ERR_INVALID_ARGUMENT,
          "workspace size with hidden = 96");
    a = m->a;
    a.intermediate = 100;
    expect_invalid(ctx, &a, "intermediate = 100");
    a = m->a;
    a.topk = a.experts + 1;
    expect_invalid(ctx, &a, "topk > experts");
    a = m->a;
    a.experts = 32;
    a.topk = 17;
    expect_invalid(ctx, &a, "topk = 17");
    a = m->a;
    a.experts = 513;
    expect_invalid(ctx, &a, "experts = 513");
    a = m->a;
    a.tokens = 0;
    expect_invalid(ctx, &a, "tokens = 0");
    a = m->a;
    a.hidden_states = NULL;
    expect_invalid(ctx, &a, "hidden_states NULL");
    a = m->a;
    a.router_logits = NULL;
    expect_invalid(ctx, &a, "router_logits NULL");
    a = m->a;
    a.w13 = NULL;
    expect_invalid(ctx, &a, "w13 NULL");
    a = m->a;
    a.w2 = NULL;
    expect_invalid(ctx, &a, "w2 NULL");
    a = m->a;
    a.out = NULL;
    expect_invalid(ctx, &a, "out NULL");
    a = m->a;
    a.workspace = NULL;
    expect_invalid(ctx, &a, "workspace NULL");
    a = m->a;
    a.workspace_bytes = m->ws_bytes - 1;
    expect_invalid(ctx, &a, "workspace one byte short");
    a = m->a;
    a.routing = FM_MOE_ROUTING_SIGMOID_GROUPED;
    a.n_group = 3; /* does not divide E */
    a.topk_group = 1;
    expect_invalid(ctx, &a, "n_group not dividing E");
    a = m->a;
    a.routing = (fm_moe_routing)7;
    expect_invalid(ctx, &a, "routing = 7");
    CHECK(fm_moe_fwd(NULL, &m->a, NULL) == FM_ERR_INVALID_ARGUMENT, "NULL context");
    CHECK(fm_moe_fwd(ctx, NULL, NULL) == FM_ERR_INVALID_ARGUMENT, "NULL args");
}

int main(void) {
    fm_context *ctx = NULL;
    fm_status s = fm_context_create(&ctx, 0);
    if (s == FM_ERR_NO_DEVICE) FM_SKIP("no GPU: %s", fm_last_error(NULL));
    CHECK(s == FM_OK, "fm_context_create: %s", fm_last_error(NULL));
    if (s != FM_OK) return fm_check_report();
    if (fm_context_enter(ctx) != FM_OK) {
        CHECK(0, "cannot make the context current: %s", fm_last_error(ctx));
        return fm_check_report();
    }
    rng_state = fm_test_seed();
    printf("device %s (sm_%d, %d SMs), seed %llu\n", ctx->device_name, ctx->arch, ctx->sm_count,
           rng_state);
    const fm_dtype BF = FM_DTYPE_BF16, FP = FM_DTYPE_FP16;
    /* name dt T H I E K routing renorm n_group topk_group scale bias quantize dead hot slabs */
    const moe_case cases[] = {
        {"t1_softmax", BF, 1, 128, 64, 8, 2, 0, 1, 0, 0, 0, 0, 0, -1, -1, 0},
        {"t3_sigmoid_grouped", FP, 3, 64, 128, 16, 4, 1, 1, 4, 2, 2.5f, 1, 0, -1, -1, 0},
        {"t1_fp16_norenorm", FP, 1, 64, 64, 4, 1, 0, 0, 0, 0, 0, 0, 0, -1, -1, 0},
        {"empty_expert", BF, 37, 192, 128, 8, 2, 0, 0, 0, 0, 0, 0, 0, 5, -1, 0},
        {"all_to_one_expert", FP, 300, 128, 192, 4, 1, 0, 1, 0, 0, 0, 0, 0, -1, 2, 0},
        {"hot_expert_k2", BF, 200, 64, 64, 16, 2, 0, 1, 0, 0, 0, 0, 0, 3, 7, 0},
        {"deepseek_like", BF, 160, 256, 128, 64, 6, 1, 1, 8, 3, 2.5f, 1, 0, -1, -1, 0},
        {"sigmoid_nogroups", FP, 50, 128, 64, 32, 4, 1, 1, 1, 1, 1.0f, 0, 0, -1, -1, 0},
        {"e512_k16", BF, 5, 64, 64, 512, 16, 0, 1, 0, 0, 0, 0, 0, -1, -1, 0},
        {"ties_softmax", BF, 64, 64, 64, 32, 8, 0, 1, 0, 0, 0, 0, 1, -1, -1, 0},
        {"ties_sigmoid", FP, 64, 64, 64, 32, 8, 1, 1, 4, 2, 1.0f, 1, 1, -1, -1, 0},
        {"multi_tile", FP, 300, 512, 256, 16, 4, 0, 1, 0, 0, 0, 0, 0, -1, -1, 0},
        {"multi_tile_bf16", BF, 300, 512, 256, 16, 4, 0, 1, 0, 0, 0, 0, 0, -1, -1, 0},
        /* more slots than one CTA of the alignment takes (2048): counts added from three CTAs,
         * rows placed by three; then every slot of several CTAs on one expert */
        {"align_3_ctas", BF, 700, 128, 64, 64, 8, 0, 1, 0, 0, 0, 0, 0, 9, -1, 0},
        {"align_all_to_one", FP, 4500, 64, 64, 8, 1, 0, 1, 0, 0, 0, 0, 0, -1, 5, 0},
        /* every width of an expert's last slab (hybrid tile and its edges), in both dtypes */
        {"slab_widths", BF, 1061, 128, 128, 16, 1, 0, 1, 0, 0, 0, 0, 0, -1, -1, 1},
        {"slab_widths_fp16", FP, 1061, 192, 64, 16, 1, 0, 1, 0, 0, 0, 0, 0, -1, -1, 1},
        /* every width of a merged slab and its edges */
        {"merge_widths", BF, 2636, 128, 128, 16, 1, 0, 1, 0, 0, 0, 0, 0, -1, -1, 2},
        {"merge_widths_fp16", FP, 2636, 192, 64, 16, 1, 0, 1, 0, 0, 0, 0, 0, -1, -1, 2},
    };
    const size_t ncases = sizeof cases / sizeof cases[0];

    precompile_specs(ctx);

    /* A + B: the library's own choice */
    for (size_t i = 0; i < ncases; i++) {
        moe_data m;
        if (data_init(ctx, &m, &cases[i])) run_and_check(ctx, &m, NULL, "fm_moe_fwd");
        data_free(ctx, &m);
    }

    /* C: configurations spanning the axes, on shapes with several tiles per expert */
    const moe_case sweep[] = {
        {"sweep_bf16", BF, 257, 192, 320, 8, 2, 0, 1, 0, 0, 0, 0, 0, 6, -1, 0},
        {"sweep_fp16", FP, 3, 128, 128, 8, 2, 1, 1, 2, 1, 2.0f, 1, 0, -1, -1, 0},
    };
    const char *all = getenv("FM_TEST_MOE_ALL");
    for (size_t i = 0; i < sizeof sweep / sizeof sweep[0]; i++) {
        moe_data m;
        if (data_init(ctx, &m, &sweep[i])) {
            if (all && all[0] == '1') run_all_configs(ctx, &m);
            for (size_t j = 0; j < sizeof specs / sizeof specs[0]; j++) {
                const fm_loaded *k;
                if (load_spec(ctx, &specs[j], sweep[i].dt, &k)) run_and_check(ctx, &m, k, k->name);
            }
            for (size_t j = 0; j < sizeof ws_specs / sizeof ws_specs[0]; j++) {
                const fm_loaded *k;
                if (load_spec(ctx, &ws_specs[j], sweep[i].dt, &k))
                    run_and_check(ctx, &m, k, k->name);
            }
        }
        data_free(ctx, &m);
    }

    /* C': the ws and swap pipelines on the odd shapes of B (T = 1, empty and hot experts, tails) */
    for (size_t i = 0; i < ncases && ctx->arch == 90; i++) {
        moe_data m;
        if (data_init(ctx, &m, &cases[i])) {
            for (size_t j = 0; j < sizeof ws_specs / sizeof ws_specs[0]; j++) {
                const fm_loaded *k;
                if (load_spec(ctx, &ws_specs[j], cases[i].dt, &k))
                    run_and_check(ctx, &m, k, k->name);
            }
        }
        data_free(ctx, &m);
    }

    /* D: argument checking */
    {
        moe_data m;
        if (data_init(ctx, &m, &cases[0])) check_arguments(ctx, &m);
        data_free(ctx, &m);
    }
    fm_context_leave(ctx);
    fm_context_destroy(ctx);
    return fm_check_report();
}
