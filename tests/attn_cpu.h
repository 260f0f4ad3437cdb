/*
 * attn_cpu.h - float64 attention reference on the CPU, and the device plumbing the attention
 * tests share: run one case through a given configuration (or through fm_attention_fwd), with
 * poisoned outputs and a guard region, and compare sampled rows with the reference.
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

typedef struct attn_cmp_job {
    const attn_case *c;
    const fm_attention_args *a;
    const unsigned short *q, *k, *v, *o;
    const float *l;
    double scale;
    long next; /* next (b, h, row) index to take */
    pthread_mutex_t lock;
    double num, den, maxe, lse_err;
} attn_cmp_job;

/* Takes rows (flattened over batch, head, query) and folds their errors into the job. */
static void *attn_cmp_worker(void *arg) {
    attn_cmp_job *j = arg;
    const attn_case *c = j->c;
    int bf = c->dt == FM_DTYPE_BF16;
    double *orow = malloc((size_t)c->d * sizeof *orow), *sc = malloc((size_t)c->sk * sizeof *sc);
    double num = 0, den = 0, maxe = 0, lse_err = 0;
    long total = (long)c->b * c->h * c->sq;
    for (;;) {
        pthread_mutex_lock(&j->lock);
        long r0 = j->next;
        j->next += 16;
        pthread_mutex_unlock(&j->lock);
        if (r0 >= total) break;
        for (long r = r0; r < r0 + 16 && r < total; r++) {
            int i = (int)(r % c->sq), hh = (int)((r / c->sq) % c->h), bb = (int)(r / ((long)c->sq * c->h));
            if (!attn_row_sampled(i, c->sq)) continue;
            double lse = attn_cpu_row(c, j->q, j->k, j->v, j->a, bb, hh, i, j->scale, orow, sc);
            const unsigned short *out = j->o + ((size_t)bb * c->sq + i) * c->h * c->d + (size_t)hh * c->d;
            for (int x = 0; x < c->d; x++) {
                if (out[x] == 0xFFFF) continue;
                double e = fm_16_to_float(out[x], bf) - orow[x];
                if (!(fabs(e) <= maxe)) maxe = isnan(e) ? INFINITY : fabs(e);
                num += e * e;
                den += orow[x] * orow[x];
            }
            if (c->lse) {
                float got = j->l[((size_t)bb * c->h + hh) * c->sq + i];
                double e = isinf(lse) ? (isinf(got) && got < 0 ? 0 : INFINITY) : fabs(got - lse);
                if (!(e <= lse_err)) lse_err = isnan(e) ? INFINITY : e;
            }
        }
    }
    free(orow);
    free(sc);
    pthread_mutex_lock(&j->lock);
    j->num += num;
    j->den += den;
    if (!(maxe <= j->maxe)) j->maxe = maxe;
    if (!(lse_err <= j->lse_err)) j->lse_err = lse_err;
    pthread_mutex_unlock(&j->lock);
    return NULL;
}

/* Runs case c with configuration cfg (NULL: fm_attention_fwd chooses) and checks it.
 * Returns the relative error (Frobenius over the sampled rows), or a negative value on failure
 * to run. */
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
    size_t nq, nk, nv;
    if (c->packed) { /* one buffer [B, S, 3, H, D] (sq == sk, h == hkv) */
        int64_t tok = 3LL * c->h * c->d;
        a.q_stride[0] = a.k_stride[0] = a.v_stride[0] = (int64_t)c->sq * tok;
        a.q_stride[1] = a.k_stride[1] = a.v_stride[1] = tok;
        nq = nk = nv = (size_t)c->b * c->sq * tok;
    } else {
        nq = (size_t)c->b * c->sq * c->h * c->d;
        nk = nv = (size_t)c->b * c->sk * c->hkv * c->d;
    }
    size_t no = (size_t)c->b * c->sq * c->h * c->d, nl = (size_t)c->b * c->h * c->sq;
    /* packed: k and v are views into q's buffer, offset by H*D and 2*H*D elements */
    size_t hd = (size_t)c->h * c->d;
    unsigned short *hq = malloc(nq * 2), *hk = c->packed ? hq + hd : malloc(nk * 2),
                   *hv = c->packed ? hq + 2 * hd : malloc(nv * 2), *ho = malloc((no + ATTN_GUARD) * 2);
    float *hl = malloc((nl + ATTN_GUARD) * 4);
    unsigned long long seed = fm_test_seed();
    fm_fill_normal16(hq, nq, bf, seed);
    if (!c->packed) {
        fm_fill_normal16(hk, nk, bf, seed + 1);
        fm_fill_normal16(hv, nv, bf, seed + 2);
    }
    CUdeviceptr q = 0, k = 0, v = 0, o = 0, l = 0, ws = 0;
    size_t ws_bytes = 0;
    fm_attention_workspace_size(ctx, &a, &ws_bytes);
    fm_context_enter(ctx);
    CUresult r = d->cuMemAlloc(&q, nq * 2);
    /* split-tail workspace, poisoned: a merge of a partial never written reads NaN */
    if (r == CUDA_SUCCESS && ws_bytes) r = d->cuMemAlloc(&ws, ws_bytes);
    if (r == CUDA_SUCCESS && ws_bytes) r = d->cuMemsetD8(ws, 0xFF, ws_bytes);
    if (!c->packed) {
        if (r == CUDA_SUCCESS) r = d->cuMemAlloc(&k, nk * 2);
        if (r == CUDA_SUCCESS) r = d->cuMemAlloc(&v, nv * 2);
    }
    if (r == CUDA_SUCCESS) r = d->cuMemAlloc(&o, (no + ATTN_GUARD) * 2);
    if (r == CUDA_SUCCESS) r = d->cuMemAlloc(&l, (nl + ATTN_GUARD) * 4);
    if (r == CUDA_SUCCESS) r = d->cuMemcpyHtoD(q, hq, nq * 2);
    if (!c->packed) {
        if (r == CUDA_SUCCESS) r = d->cuMemcpyHtoD(k, hk, nk * 2);
        if (r == CUDA_SUCCESS) r = d->cuMemcpyHtoD(v, hv, nv * 2);
    } else {
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
        /* the float64 reference is the slow part: rows are shared out among threads */
        attn_cmp_job job = {c, &a, hq, hk, hv, ho, hl, 1.0 / sqrt((double)c->d), 0,
                            PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0};
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        int nth = ncpu > 1 ? (int)(ncpu > 32 ? 32 : ncpu) : 1;
        pthread_t th[32];
        int started = 0;
        for (int t = 0; t < nth; t++) started += pthread_create(&th[started], NULL, attn_cmp_worker, &job) == 0;
        if (!started) attn_cmp_worker(&job);
        for (int t = 0; t < started; t++) pthread_join(th[t], NULL);
        double num = job.num, den = job.den, maxe = job.maxe, lse_err = job.lse_err;
        if (c->lse)
            for (size_t e = nl; e < nl + ATTN_GUARD; e++) guard += hl[e] == hl[e]; /* must stay NaN */
        rel = den > 0 ? sqrt(num / den) : sqrt(num);
        double tol = bf ? 1.5e-2 : 4e-3;
        CHECK(unwritten == 0, "%s: %ld output elements never written", label, unwritten);
        CHECK(guard == 0, "%s: %ld elements written past the end of o/lse", label, guard);
        CHECK(rel <= tol, "%s: relative error %.3e > %.1e (max abs %.3e)", label, rel, tol, maxe);
        CHECK(maxe <= (bf ? 0.1 : 0.02), "%s: max abs error %.3e", label, maxe);
        if (c->lse) CHECK(lse_err <= 2e-3, "%s: lse error %.3e", label, lse_err);
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
    free(hq);
    if (!c->packed) {
        free(hk);
        free(hv);
    }
    free(ho);
    free(hl);
    return rel;
}

#endif
