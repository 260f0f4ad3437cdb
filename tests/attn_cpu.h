/*
 * attn_cpu.h - float64 attention reference on the CPU, and the device plumbing the attention
 * tests share: run one case through a given configuration (or through fm_attention_fwd), with
 * poisoned outputs and a guard region, and compare sampled rows with the reference (drawn and
 * computed once per distinct case: attn_ref_get).
 */
#ifndef FM_ATTN_CPU_H
#define FM_ATTN_CPU_H

#include "check.h"
#include "internal.h"
#include "testdata.h"
#include "op.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

typedef struct attn_case {
    fm_dtype dt;
    int b, sq, sk, h, hkv, d, causal;
    int lse;    /* request log-sum-exp */
    int packed; /* q, k, v interleaved per token ([B, S, 3, H, D]) instead of separate tensors */
    int spread; /* keys scaled up toward the start of the sequence (see attn_spread_keys) */
} attn_case;

/* One row of the reference in float64: o[d], returns lse (-inf when the row sees no key). */
static double attn_cpu_row(const attn_case *c, const unsigned short *q, const unsigned short *k,
                           const unsigned short *v, const fm_attention_args *a, int b, int h,
                           int i, double scale, double *o, double *sc) {
    int bf = c->dt == FM_DTYPE_BF16, kvh = h / (c->h / c->hkv);
    int last = c->sk - 1;
    if (c->causal && i + c->sk - c->sq < last) last = i + c->sk - c->sq;
    for (int d = 0; d < c->d; d++) o[d] = 0;
    if (last < 0) return -INFINITY;
    const unsigned short *qr = q + b * a->q_stride[0] + i * a->q_stride[1] + h * a->q_stride[2];
    double m = -INFINITY;
    for (int j = 0; j <= last; j++) {
        const unsigned short *kr = k + b * a->k_stride[0] + j * a->k_stride[1] + kvh * a->k_stride[2];
        double s = 0;
        for (int d = 0; d < c->d; d++) s += (double)fm_16_to_float(qr[d], bf) * fm_16_to_float(kr[d], bf);
        sc[j] = s * scale;
        if (sc[j] > m) m = sc[j];
    }
    double l = 0;
    for (int j = 0; j <= last; j++) {
        double p = exp(sc[j] - m);
        l += p;
        const unsigned short *vr = v + b * a->v_stride[0] + j * a->v_stride[1] + kvh * a->v_stride[2];
        for (int d = 0; d < c->d; d++) o[d] += p * fm_16_to_float(vr[d], bf);
    }
    for (int d = 0; d < c->d; d++) o[d] /= l;
    return m + log(l);
}

/* Rows checked against the CPU: all of them for short sequences, else the first and last 64 and
 * every 37th (tails and block boundaries are where indexing goes wrong). */
static int attn_row_sampled(int i, int sq) {
    return sq <= 1200 || i < 64 || i >= sq - 64 || i % 37 == 0;
}

#define ATTN_GUARD 4096 /* elements after the output that must stay poisoned */

/* ---- the reference, once per case -------------------------------------------------------------
 * A section of the GPU test runs hundreds of configurations on the same few cases, and the float64
 * reference (with the inputs drawn for it) is what costs time. So each distinct case draws its
 * inputs and computes its reference once per process, and every configuration that runs the case
 * is checked against that: still fresh random inputs on every run of the test, and each
 * configuration's output still poisoned before its own run. The last ATTN_REF_SLOTS cases are
 * kept (sections visit their cases in runs, the split-tail and the plain case alternate). */
#define ATTN_REF_SLOTS 4

typedef struct attn_ref {
    attn_case c;
    fm_attention_args a; /* strides of the inputs (pointers unset) */
    unsigned short *q, *k, *v; /* host inputs; packed: k and v point into q's buffer */
    size_t nq, nk, nv;
    unsigned long long seed; /* of the inputs: FM_TEST_SEED=seed draws them again */
    float *o;    /* [B, Sq, H, D] reference output, sampled rows only */
    double *lse; /* [B, H, Sq], sampled rows only */
    long next;   /* next (b, h, row) a worker takes while computing */
    pthread_mutex_t lock;
} attn_ref;

static int attn_case_same(const attn_case *x, const attn_case *y) {
    return x->dt == y->dt && x->b == y->b && x->sq == y->sq && x->sk == y->sk && x->h == y->h &&
           x->hkv == y->hkv && x->d == y->d && x->causal == y->causal && x->lse == y->lse &&
           x->packed == y->packed && x->spread == y->spread;
}

/* Key j scaled by 1 + 48 (sk - 1 - j) / (sk - 1): the kernels visit key blocks from the last to
 * the first, so each block's scores reach further than the last one's (about 2.6 x 48 / blocks
 * more at the maximum, several times the kernels' rescale margin of 8 in log2 units): the
 * running maximum moves again and again and O is rescaled mid-row, which normal random scores
 * (the maximum settles in the first block) almost never make happen. */
static void attn_spread_keys(const attn_case *c, unsigned short *k, const fm_attention_args *a) {
    int bf = c->dt == FM_DTYPE_BF16;
    for (int b = 0; b < c->b; b++)
        for (int j = 0; j < c->sk; j++) {
            float f = 1.f + 48.f * (float)(c->sk - 1 - j) / (float)(c->sk > 1 ? c->sk - 1 : 1);
            for (int h = 0; h < c->hkv; h++) {
                unsigned short *kr = k + b * a->k_stride[0] + j * a->k_stride[1] + h * a->k_stride[2];
                for (int d = 0; d < c->d; d++) kr[d] = fm_float_to_16(fm_16_to_float(kr[d], bf) * f, bf);
            }
        }
}

/* Takes rows (flattened over batch, head, query) and computes their reference. */
static void *attn_ref_worker(void *arg) {
    attn_ref *r = arg;
    const attn_case *c = &r->c;
    double *orow = malloc((size_t)c->d * sizeof *orow), *sc = malloc((size_t)c->sk * sizeof *sc);
    const double scale = 1.0 / sqrt((double)c->d);
    long total = (long)c->b * c->h * c->sq;
    for (;;) {
        pthread_mutex_lock(&r->lock);
        long r0 = r->next;
        r->next += 16;
        pthread_mutex_unlock(&r->lock);
        if (r0 >= total) break;
        for (long row = r0; row < r0 + 16 && row < total; row++) {
            int i = (int)(row % c->sq), hh = (int)((row / c->sq) % c->h), bb = (int)(row / ((long)c->sq * c->h));
            if (!attn_row_sampled(i, c->sq)) continue;
            r->lse[((size_t)bb * c->h + hh) * c->sq + i] = attn_cpu_row(c, r->q, r->k, r->v, &r->a, bb, hh, i, scale, orow, sc);
            float *dst = r->o + ((size_t)bb * c->sq + i) * c->h * c->d + (size_t)hh * c->d;
            for (int x = 0; x < c->d; x++) dst[x] = (float)orow[x];
        }
    }
    free(orow);
    free(sc);
    return NULL;
}

static void attn_ref_free(attn_ref *r) {
    free(r->q);
    if (!r->c.packed) {
        free(r->k);
        free(r->v);
    }
    free(r->o);
    free(r->lse);
    memset(r, 0, sizeof *r);
}

/* The reference of case c (inputs drawn and reference computed on first use); NULL when out of
 * memory. a holds the case's strides. */
static const attn_ref *attn_ref_get(const attn_case *c, const fm_attention_args *a) {
    static attn_ref slots[ATTN_REF_SLOTS];
    static int used[ATTN_REF_SLOTS], victim;
    for (int i = 0; i < ATTN_REF_SLOTS; i++)
        if (used[i] && attn_case_same(&slots[i].c, c)) return &slots[i];
    int s = victim;
    victim = (victim + 1) % ATTN_REF_SLOTS;
    if (used[s]) attn_ref_free(&slots[s]);
    used[s] = 0;
    attn_ref *r = &slots[s];
    memset(r, 0, sizeof *r);
    r->c = *c;
    r->a = *a;
    int bf = c->dt == FM_DTYPE_BF16;
    if (c->packed) { /* one buffer [B, S, 3, H, D] (sq == sk, h == hkv) */
        r->nq = r->nk = r->nv = (size_t)c->b * c->sq * 3 * c->h * c->d;
    } else {
        r->nq = (size_t)c->b * c->sq * c->h * c->d;
        r->nk = r->nv = (size_t)c->b * c->sk * c->hkv * c->d;
    }
    size_t no = (size_t)c->b * c->sq * c->h * c->d, nl = (size_t)c->b * c->h * c->sq;
    size_t hd = (size_t)c->h * c->d;
    r->q = malloc(r->nq * 2);
    r->k = c->packed ? (r->q ? r->q + hd : NULL) : malloc(r->nk * 2);
    r->v = c->packed ? (r->q ? r->q + 2 * hd : NULL) : malloc(r->nv * 2);
    r->o = calloc(no, sizeof *r->o);
    r->lse = calloc(nl, sizeof *r->lse);
    if (!r->q || !r->k || !r->v || !r->o || !r->lse) {
        if (!c->packed) {
            free(r->k);
            free(r->v);
        }
        free(r->q);
        free(r->o);
        free(r->lse);
        memset(r, 0, sizeof *r);
        return NULL;
    }
    r->seed = fm_test_seed();
    fm_fill_normal16(r->q, r->nq, bf, r->seed);
    if (!c->packed) {
        fm_fill_normal16(r->k, r->nk, bf, r->seed + 1);
        fm_fill_normal16(r->v, r->nv, bf, r->seed + 2);
    }
    if (c->spread) attn_spread_keys(c, r->k, a);
    /* the float64 reference is the slow part: rows are shared out among threads */
    pthread_mutex_init(&r->lock, NULL);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int nth = ncpu > 1 ? (int)(ncpu > 32 ? 32 : ncpu) : 1;
    pthread_t th[32];
    int started = 0;
    for (int t = 0; t < nth; t++) started += pthread_create(&th[started], NULL, attn_ref_worker, r) == 0;
    if (!started) attn_ref_worker(r);
    for (int t = 0; t < started; t++) pthread_join(th[t], NULL);
    pthread_mutex_destroy(&r->lock);
    used[s] = 1;
    return r;
}

/* Runs case c with configuration cfg (NULL: fm_attention_fwd chooses) and checks it against the
 * case's reference. Returns the relative error (Frobenius over the sampled rows), or a negative
 * value on failure to run. */
static double attn_run_case(fm_context *ctx, const fm_config *cfg, const attn_case *c,
                            const char *label) {
    const fm_driver *d = ctx->drv;
    int bf = c->dt == FM_DTYPE_BF16;
    fm_attention_args a;
    memset(&a, 0, sizeof a);
    a.dtype = c->dt;
    a.batch = c->b;
    a.seqlen_q = c->sq;
    a.seqlen_k = c->sk;
    a.heads = c->h;
    a.kv_heads = c->hkv;
    a.head_dim = c->d;
    a.causal = c->causal;
    fm_attention_args_contiguous(&a);
    if (c->packed) { /* one buffer [B, S, 3, H, D] (sq == sk, h == hkv) */
        int64_t tok = 3LL * c->h * c->d;
        a.q_stride[0] = a.k_stride[0] = a.v_stride[0] = (int64_t)c->sq * tok;
        a.q_stride[1] = a.k_stride[1] = a.v_stride[1] = tok;
    }
    const attn_ref *ref = attn_ref_get(c, &a);
    CHECK(ref != NULL, "%s: out of host memory for the reference", label);
    if (!ref) return -1;
    size_t nq = ref->nq, nk = ref->nk, nv = ref->nv;
    size_t no = (size_t)c->b * c->sq * c->h * c->d, nl = (size_t)c->b * c->h * c->sq;
    unsigned short *ho = malloc((no + ATTN_GUARD) * 2);
    float *hl = malloc((nl + ATTN_GUARD) * 4);
    CUdeviceptr q = 0, k = 0, v = 0, o = 0, l = 0, ws = 0;
    size_t ws_bytes = 0;
    fm_attention_workspace_size(ctx, &a, &ws_bytes);
    fm_context_enter(ctx);
    CUresult r = ho && hl ? d->cuMemAlloc(&q, nq * 2) : CUDA_ERROR_OUT_OF_MEMORY;
    /* split-tail workspace, poisoned: a merge of a partial never written reads NaN */
    if (r == CUDA_SUCCESS && ws_bytes) r = d->cuMemAlloc(&ws, ws_bytes);
    if (r == CUDA_SUCCESS && ws_bytes) r = d->cuMemsetD8(ws, 0xFF, ws_bytes);
    if (!c->packed) {
        if (r == CUDA_SUCCESS) r = d->cuMemAlloc(&k, nk * 2);
        if (r == CUDA_SUCCESS) r = d->cuMemAlloc(&v, nv * 2);
    }
    if (r == CUDA_SUCCESS) r = d->cuMemAlloc(&o, (no + ATTN_GUARD) * 2);
    if (r == CUDA_SUCCESS) r = d->cuMemAlloc(&l, (nl + ATTN_GUARD) * 4);
    if (r == CUDA_SUCCESS) r = d->cuMemcpyHtoD(q, ref->q, nq * 2);
    if (!c->packed) {
        if (r == CUDA_SUCCESS) r = d->cuMemcpyHtoD(k, ref->k, nk * 2);
        if (r == CUDA_SUCCESS) r = d->cuMemcpyHtoD(v, ref->v, nv * 2);
    } else { /* k and v are views into q's buffer, offset by H*D and 2*H*D elements */
        k = q + (CUdeviceptr)(c->h * c->d * 2);
        v = q + (CUdeviceptr)(2 * c->h * c->d * 2);
    }
    /* poison: 0xFFFF is NaN in bf16 and fp16; 0xFFFFFFFF is NaN in fp32 */
    if (r == CUDA_SUCCESS) r = d->cuMemsetD8(o, 0xFF, (no + ATTN_GUARD) * 2);
    if (r == CUDA_SUCCESS) r = d->cuMemsetD8(l, 0xFF, (nl + ATTN_GUARD) * 4);
    fm_context_leave(ctx);
    double rel = -1;
    if (r != CUDA_SUCCESS) {
        CHECK(0, "%s: allocating/uploading failed (%d)", label, (int)r);
        goto out;
    }
    a.q = (void *)(uintptr_t)q;
    a.k = (void *)(uintptr_t)k;
    a.v = (void *)(uintptr_t)v;
    a.o = (void *)(uintptr_t)o;
    a.lse = c->lse ? (float *)(uintptr_t)l : NULL;
    a.workspace = (void *)(uintptr_t)ws;
    a.workspace_bytes = ws_bytes;
    fm_status s;
    if (cfg) {
        const fm_loaded *kern;
        s = fm_context_load(ctx, cfg, &kern);
        if (s == FM_OK) s = fm_attn_launch(ctx, kern, &a, NULL);
    } else {
        s = fm_attention_fwd(ctx, &a, NULL);
    }
    fm_context_enter(ctx);
    if (s == FM_OK && (r = d->cuCtxSynchronize()) != CUDA_SUCCESS) s = fm_cuda_error(ctx, d, r, "kernel");
    if (s == FM_OK) r = d->cuMemcpyDtoH(ho, o, (no + ATTN_GUARD) * 2);
    if (s == FM_OK && r == CUDA_SUCCESS) r = d->cuMemcpyDtoH(hl, l, (nl + ATTN_GUARD) * 4);
    fm_context_leave(ctx);
    if (s != FM_OK || r != CUDA_SUCCESS) {
        CHECK(0, "%s: run failed: %s", label, fm_last_error(ctx));
        goto out;
    }
    {
        long unwritten = 0, guard = 0;
        for (size_t e = 0; e < no; e++) unwritten += ho[e] == 0xFFFF;
        for (size_t e = no; e < no + ATTN_GUARD; e++) guard += ho[e] != 0xFFFF;
        double num = 0, den = 0, maxe = 0, lse_err = 0;
        for (int bb = 0; bb < c->b; bb++)
            for (int hh = 0; hh < c->h; hh++)
                for (int i = 0; i < c->sq; i++) {
                    if (!attn_row_sampled(i, c->sq)) continue;
                    size_t at = ((size_t)bb * c->sq + i) * c->h * c->d + (size_t)hh * c->d;
                    for (int x = 0; x < c->d; x++) {
                        if (ho[at + x] == 0xFFFF) continue; /* counted as unwritten */
                        double want = ref->o[at + x], e = fm_16_to_float(ho[at + x], bf) - want;
                        if (!(fabs(e) <= maxe)) maxe = isnan(e) ? INFINITY : fabs(e);
                        num += e * e;
                        den += want * want;
                    }
                    if (c->lse) {
                        size_t li = ((size_t)bb * c->h + hh) * c->sq + i;
                        double want = ref->lse[li];
                        float got = hl[li];
                        double e = isinf(want) ? (isinf(got) && got < 0 ? 0 : INFINITY) : fabs(got - want);
                        if (!(e <= lse_err)) lse_err = isnan(e) ? INFINITY : e;
                    }
                }
        if (c->lse)
            for (size_t e = nl; e < nl + ATTN_GUARD; e++) guard += hl[e] == hl[e]; /* must stay NaN */
        rel = den > 0 ? sqrt(num / den) : sqrt(num);
        double tol = bf ? 1.5e-2 : 4e-3;
        /* a failure names the inputs' seed: FM_TEST_SEED=seed draws the same inputs again */
        const unsigned long long sd = ref->seed;
        CHECK(unwritten == 0, "%s: %ld output elements never written (seed %llu)", label, unwritten, sd);
        CHECK(guard == 0, "%s: %ld elements written past the end of o/lse (seed %llu)", label, guard, sd);
        CHECK(rel <= tol, "%s: relative error %.3e > %.1e (max abs %.3e, seed %llu)", label, rel, tol,
              maxe, sd);
        CHECK(maxe <= (bf ? 0.1 : 0.02), "%s: max abs error %.3e (seed %llu)", label, maxe, sd);
        if (c->lse) CHECK(lse_err <= 2e-3, "%s: lse error %.3e (seed %llu)", label, lse_err, sd);
        if (rel > tol || unwritten || guard) rel = -rel - 1;
    }
out:
    fm_context_enter(ctx);
    if (q) d->cuMemFree(q);
    if (!c->packed) {
        if (k) d->cuMemFree(k);
        if (v) d->cuMemFree(v);
    }
    if (o) d->cuMemFree(o);
    if (l) d->cuMemFree(l);
    if (ws) d->cuMemFree(ws);
    fm_context_leave(ctx);
    free(ho);
    free(hl);
    return rel;
}

#endif
