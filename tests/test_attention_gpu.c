/*
 * test_attention_gpu.c - attention forward on the GPU against float64 on the CPU.
 *
 *  A. the tuner's reference kernel (attn_ref) against the CPU, since the tuner trusts it;
 *  B. every kept configuration of every family the device runs, for every problem of the default
 *     space (dtype x head dim x causal), on an odd shape (Sq=300, Sk=333, GQA 2:1, with LSE);
 *     then on cases aimed at one mechanism each: the split tail, clusters, persistent CTAs
 *     running several tiles, and scores whose maximum keeps moving (the rescaling of O);
 *  C. the runtime's own choice (fm_attention_fwd) and each family's default on the full list:
 *     lengths 1, 17, 1000, 4097, Sq != Sk both ways (bottom-right causal, rows seeing no key),
 *     GQA and MQA, a packed QKV layout (strides), with and without LSE.
 * Fresh random inputs every run; outputs poisoned before each run; a guard region after them.
 * Set FM_TEST_FAMILY=name to restrict B and C to one family; FM_TEST_MATCH=text restricts B to
 * the configurations whose name contains text and skips C.
 */
#define _GNU_SOURCE
#include "attn_cpu.h"

#include <stdio.h>
#include <unistd.h>

/* ---- A: the reference kernel ----------------------------------------------------------------- */
static void check_reference(fm_context *ctx, attn_case c) {
    const fm_driver *d = ctx->drv;
    int bf = c.dt == FM_DTYPE_BF16;
    fm_attention_args a;
    memset(&a, 0, sizeof a);
    a.dtype = c.dt;
    a.batch = c.b;
    a.seqlen_q = c.sq;
    a.seqlen_k = c.sk;
    a.heads = c.h;
    a.kv_heads = c.hkv;
    a.head_dim = c.d;
    a.causal = c.causal;
    fm_attention_args_contiguous(&a);
    size_t nq = (size_t)c.b * c.sq * c.h * c.d, nk = (size_t)c.b * c.sk * c.hkv * c.d;
    size_t nl = (size_t)c.b * c.h * c.sq;
    unsigned short *hq = malloc(nq * 2), *hk = malloc(nk * 2), *hv = malloc(nk * 2);
    float *ho = malloc(nq * 4), *hl = malloc(nl * 4);
    unsigned long long seed = fm_test_seed();
    fm_fill_normal16(hq, nq, bf, seed);
    fm_fill_normal16(hk, nk, bf, seed + 7);
    fm_fill_normal16(hv, nk, bf, seed + 9);
    fm_config rc;
    memset(&rc, 0, sizeof rc);
    snprintf(rc.family, sizeof rc.family, "attn_ref");
    fm_config_set_str(&rc, "dtype", bf ? "bf16" : "fp16");
    fm_config_set_int(&rc, "head_dim", c.d);
    fm_config_set_int(&rc, "causal", c.causal);
    char err[512];
    pthread_mutex_lock(&ctx->lock);
    fm_status s = fm_generator_name(ctx->gen, &rc, err, sizeof err);
    pthread_mutex_unlock(&ctx->lock);
    const fm_loaded *k = NULL;
    if (s == FM_OK) s = fm_context_load(ctx, &rc, &k);
    CHECK(s == FM_OK, "reference kernel: %s", fm_last_error(ctx));
    if (s != FM_OK) return;
    CUdeviceptr q, kk, v, o, l;
    fm_context_enter(ctx);
    d->cuMemAlloc(&q, nq * 2);
    d->cuMemAlloc(&kk, nk * 2);
    d->cuMemAlloc(&v, nk * 2);
    d->cuMemAlloc(&o, nq * 4);
    d->cuMemAlloc(&l, nl * 4);
    d->cuMemcpyHtoD(q, hq, nq * 2);
    d->cuMemcpyHtoD(kk, hk, nk * 2);
    d->cuMemcpyHtoD(v, hv, nk * 2);
    d->cuMemsetD8(o, 0xFF, nq * 4);
    a.q = (void *)(uintptr_t)q;
    a.k = (void *)(uintptr_t)kk;
    a.v = (void *)(uintptr_t)v;
    a.o = (void *)(uintptr_t)o; /* unused by the reference */
    fm_attn_kernel_params p;
    fm_attn_prepare(ctx, &a, &p);
    void *params[] = {&p, &o, &l};
    CUresult r = d->cuLaunchKernel(k->fn, (unsigned)((c.sq + 31) / 32), (unsigned)c.h, (unsigned)c.b,
                                   (unsigned)k->threads, 1, 1, (unsigned)k->smem_bytes, NULL, params, NULL);
    if (r == CUDA_SUCCESS) r = d->cuCtxSynchronize();
    if (r == CUDA_SUCCESS) r = d->cuMemcpyDtoH(ho, o, nq * 4);
    if (r == CUDA_SUCCESS) r = d->cuMemcpyDtoH(hl, l, nl * 4);
    d->cuMemFree(q);
    d->cuMemFree(kk);
    d->cuMemFree(v);
    d->cuMemFree(o);
    d->cuMemFree(l);
    fm_context_leave(ctx);
    CHECK(r == CUDA_SUCCESS, "reference kernel run failed (%d)", (int)r);
    double *orow = malloc((size_t)c.d * sizeof *orow), *sc = malloc((size_t)c.sk * sizeof *sc);
    double num = 0, den = 0, lse_err = 0;
    for (int b = 0; b < c.b; b++)
        for (int h = 0; h < c.h; h++)
            for (int i = 0; i < c.sq; i++) {
                double lse = attn_cpu_row(&c, hq, hk, hv, &a, b, h, i, 1.0 / sqrt((double)c.d), orow, sc);
                const float *out = ho + ((size_t)b * c.sq + i) * c.h * c.d + (size_t)h * c.d;
                for (int x = 0; x < c.d; x++) {
                    double e = out[x] - orow[x];
                    num += e * e;
                    den += orow[x] * orow[x];
                }
                float got = hl[((size_t)b * c.h + h) * c.sq + i];
                double e = isinf(lse) ? (isinf(got) && got < 0 ? 0 : INFINITY) : fabs(got - lse);
                if (!(e <= lse_err)) lse_err = isnan(e) ? INFINITY : e;
            }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    printf("reference kernel %s d=%d causal=%d sq=%d sk=%d: rel %.2e, lse %.2e\n", bf ? "bf16" : "fp16",
           c.d, c.causal, c.sq, c.sk, rel, lse_err);
    CHECK(rel < 1e-5, "reference kernel relative error %.3e (fp32 arithmetic should give < 1e-5)", rel);
    CHECK(lse_err < 1e-4, "reference kernel lse error %.3e", lse_err);
    free(orow);
    free(sc);
    free(hq);
    free(hk);
    free(hv);
    free(ho);
    free(hl);
}

/* One configuration on one case of a B section: counted in *n, and in *ok when it is correct. */
static void count_case(fm_context *ctx, const fm_config *cfg, const attn_case *c, const char *label,
                       int *n, int *ok) {
    (*n)++;
    if (attn_run_case(ctx, cfg, c, label) >= 0) (*ok)++;
    else printf("  failed: %s\n", label);
}

/* ---- B: every configuration --------------------------------------------------------------- */
typedef struct cfg_list {
    fm_config *v;
    int n, cap;
} cfg_list;

static int add_cfg(void *user, const fm_config *c, const char *reason) {
    cfg_list *l = user;
    if (reason) return 0;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 128;
        l->v = realloc(l->v, (size_t)l->cap * sizeof *l->v);
    }
    l->v[l->n++] = *c;
    return 0;
}

typedef struct fam_walk {
    fm_context *ctx;
    const char *family;
    cfg_list *l;
} fam_walk;

static int each_problem(void *user, const fm_config *p, const char *reason) {
    (void)reason;
    fam_walk *w = user;
    char err[512];
    fm_status s = fm_generator_enumerate(w->ctx->gen, w->family, p, &w->ctx->limits, add_cfg, w->l,
                                         err, sizeof err);
    CHECK(s == FM_OK, "%s", err);
    return 0;
}

static attn_case case_of(const fm_config *c, int b, int sq, int sk, int h, int hkv, int lse) {
    attn_case x;
    memset(&x, 0, sizeof x);
    const char *dt = fm_config_str(c, "dtype");
    x.dt = dt && !strcmp(dt, "fp16") ? FM_DTYPE_FP16 : FM_DTYPE_BF16;
    x.d = (int)fm_config_int(c, "head_dim", 128);
    x.causal = (int)fm_config_int(c, "causal", 0);
    x.b = b;
    x.sq = sq;
    x.sk = sk;
    x.h = h;
    x.hkv = hkv;
    x.lse = lse;
    return x;
}

static void full_list(fm_context *ctx, const fm_config *cfg, const fm_config *problem, const char *who) {
    static const int shapes[][6] = {
        /* b, sq, sk, h, hkv, lse */
        {1, 1, 1, 2, 1, 1},       {2, 17, 17, 4, 2, 1},   {2, 1000, 1000, 4, 2, 0},
        {1, 4097, 4097, 2, 1, 1}, {1, 17, 1000, 4, 1, 1}, {1, 1000, 17, 2, 2, 1},
        {3, 129, 4097, 2, 1, 0},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const int *s = shapes[i];
        attn_case c = case_of(problem, s[0], s[1], s[2], s[3], s[4], s[5]);
        char label[300];
        snprintf(label, sizeof label, "%s b=%d sq=%d sk=%d h=%d hkv=%d %s d=%d causal=%d", who, c.b,
                 c.sq, c.sk, c.h, c.hkv, c.dt == FM_DTYPE_BF16 ? "bf16" : "fp16", c.d, c.causal);
        double rel = attn_run_case(ctx, cfg, &c, label);
        if (rel < 0) printf("  failed: %s\n", label);
    }
    attn_case c = case_of(problem, 2, 500, 500, 4, 4, 1);
    c.packed = 1;
    char label[300];
    snprintf(label, sizeof label, "%s packed qkv d=%d causal=%d", who, c.d, c.causal);
    if (attn_run_case(ctx, cfg, &c, label) < 0) printf("  failed: %s\n", label);
}

int main(void) {
    /* line by line, so that a run stopped by a time limit still shows how far it got */
    setvbuf(stdout, NULL, _IOLBF, 0);
    fm_context *ctx = NULL;
    fm_context_options o;
    memset(&o, 0, sizeof o);
    o.no_database = 1; /* B and C test kernels and defaults, not tuning data */
    fm_status s = fm_context_create_v2(&ctx, &o);
    if (s == FM_ERR_NO_DEVICE) FM_SKIP("no GPU: %s", fm_last_error(NULL));
    CHECK(s == FM_OK, "context: %s", fm_last_error(NULL));
    if (s != FM_OK) return fm_check_report();
    printf("device: %s (sm_%d, %d SMs)\n", ctx->device_name, ctx->arch, ctx->sm_count);
    const char *only = getenv("FM_TEST_FAMILY");
    const char *match = getenv("FM_TEST_MATCH");

    /* A */
    attn_case ra = {FM_DTYPE_BF16, 1, 300, 333, 2, 1, 128, 1, 1, 0, 0};
    check_reference(ctx, ra);
    attn_case rb = {FM_DTYPE_FP16, 2, 100, 17, 2, 2, 256, 1, 1, 0, 0};
    check_reference(ctx, rb);
    attn_case rc = {FM_DTYPE_BF16, 1, 65, 65, 1, 1, 64, 0, 1, 0, 0};
    check_reference(ctx, rc);

    /* B */
    char fams[512], err[512];
    pthread_mutex_lock(&ctx->lock);
    fm_generator_families(ctx->gen, "attn_fwd", fams, sizeof fams);
    pthread_mutex_unlock(&ctx->lock);
    cfg_list all = {0};
    char names[512];
    snprintf(names, sizeof names, "%s", fams);
    char *save = NULL;
    for (char *f = strtok_r(names, ",", &save); f; f = strtok_r(NULL, ",", &save)) {
        if (only && strcmp(only, f)) continue;
        fam_walk w = {ctx, f, &all};
        pthread_mutex_lock(&ctx->lock);
        CHECK(fm_generator_problems(ctx->gen, f, each_problem, &w, err, sizeof err) == FM_OK, "%s", err);
        pthread_mutex_unlock(&ctx->lock);
    }
    if (match) { /* keep only the matching configurations (nothing else is compiled) */
        int kept = 0;
        for (int i = 0; i < all.n; i++)
            if (strstr(all.v[i].name, match)) all.v[kept++] = all.v[i];
        all.n = kept;
    }
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    fm_status *st = calloc((size_t)all.n + 1, sizeof *st);
    fm_context_precompile(ctx, all.v, all.n, ncpu > 0 ? (int)ncpu : 4, st);
    int passed = 0, nsplit = 0, split_ok = 0;
    for (int i = 0; i < all.n; i++) {
        CHECK(st[i] == FM_OK, "%s does not compile", all.v[i].name);
        if (st[i] != FM_OK) continue;
        attn_case c = case_of(&all.v[i], 1, 300, 333, 2, 1, 1);
        double rel = attn_run_case(ctx, &all.v[i], &c, all.v[i].name);
        if (rel >= 0) passed++;
        else printf("  failed: %s\n", all.v[i].name);
        /* Split tail (bf16 only: the split is dtype-blind): 3 x 20 heads x 300 rows against
         * 1333 keys (GQA 4:1) is 120 (block_m 192), 180 (128) or 300 (64) tiles of 7 to 21 key
         * blocks on a 132-SM card: a partial last round, tiles split over two and three CTAs,
         * a strided phase before the split one (block_m 64 and 128), ragged rows and keys. */
        if (fm_config_int(&all.v[i], "split_tail", 0) == 1 &&
            !strcmp(fm_config_str(&all.v[i], "dtype"), "bf16")) {
            c = case_of(&all.v[i], 3, 300, 1333, 20, 5, 1);
            char label[300];
            snprintf(label, sizeof label, "%s split b=3 sq=300 sk=1333 h=20 hkv=5", all.v[i].name);
            count_case(ctx, &all.v[i], &c, label, &nsplit, &split_ok);
        }
    }
    printf("B: %d of %d configurations correct on Sq=300 Sk=333 GQA 2:1; split tail: %d of %d\n",
           passed, all.n, split_ok, nsplit);
    /* Clusters of two CTAs sharing K/V copies: more cluster tiles (3 x 4 heads x 17 of 256
     * rows) than clusters, the last one ragged for the first CTA and rows past Sq only for the
     * second, which must still copy its half of every K/V block. */
    int ncl = 0, cl_ok = 0;
    for (int i = 0; i < all.n; i++) {
        if (st[i] != FM_OK || fm_config_int(&all.v[i], "cluster", 1) == 1) continue;
        attn_case c = case_of(&all.v[i], 3, 4097, 4097, 4, 2, 1);
        char label[300];
        snprintf(label, sizeof label, "%s b=3 sq=sk=4097 h=4 hkv=2", all.v[i].name);
        count_case(ctx, &all.v[i], &c, label, &ncl, &cl_ok);
    }
    printf("B: clusters: %d of %d configurations correct on b=3 Sq=Sk=4097\n", cl_ok, ncl);
    /* Persistent CTAs running several tiles each (the cases above give each CTA at most one or
     * two): 2 x 16 heads x 1300 rows are 224-672 tiles, 1.7 to 5 per CTA on a 132-SM card,
     * so what a CTA carries from one tile to the next (the second Q slot, the pending TMA
     * store, the ring position, the paired long/short causal schedule) is exercised, with
     * ragged rows and keys and GQA 4:1. Over 1200 rows the CPU reference samples them
     * (attn_row_sampled). bf16 only: the schedule does not depend on the type. */
    int npe = 0, pe_ok = 0;
    for (int i = 0; i < all.n; i++) {
        if (st[i] != FM_OK || fm_config_int(&all.v[i], "persistent", 0) != 1 ||
            strcmp(fm_config_str(&all.v[i], "dtype"), "bf16"))
            continue;
        const int causal = (int)fm_config_int(&all.v[i], "causal", 0);
        attn_case c = case_of(&all.v[i], 2, 1300, causal ? 1300 : 1411, 16, 4, 1);
        char label[300];
        snprintf(label, sizeof label, "%s b=2 sq=1300 sk=%d h=16 hkv=4", all.v[i].name, c.sk);
        count_case(ctx, &all.v[i], &c, label, &npe, &pe_ok);
        if (npe % 100 == 0) printf("  persistent: %d checked, %d correct\n", npe, pe_ok);
    }
    printf("B: persistent, several tiles per CTA: %d of %d configurations correct\n", pe_ok, npe);
    /* Scores whose maximum keeps growing from block to block (attn_spread_keys): the running
     * maximum moves mid-row, so the rescaling of O (lazy in the sm90 kernels: only past a
     * margin) is exercised, which normal random scores hardly do. Every configuration, both
     * types (P, up to 256 with the lazy margin, is rounded to the input type). */
    int nsp = 0, sp_ok = 0;
    for (int i = 0; i < all.n; i++) {
        if (st[i] != FM_OK) continue;
        attn_case c = case_of(&all.v[i], 1, 200, 1333, 4, 2, 1);
        c.spread = 1;
        char label[300];
        snprintf(label, sizeof label, "%s spread b=1 sq=200 sk=1333 h=4 hkv=2", all.v[i].name);
        count_case(ctx, &all.v[i], &c, label, &nsp, &sp_ok);
    }
    printf("B: spread scores (the maximum moving mid-row): %d of %d configurations correct\n",
           sp_ok, nsp);
    free(st);

    /* C: the runtime's choice, then each family's default, on the full list */
    if (match) printf("C: skipped (FM_TEST_MATCH=%s)\n", match);
    for (int di = 0; di < 3 && !match; di++)
        for (int dt = 0; dt < 2; dt++)
            for (int causal = 0; causal < 2; causal++) {
                fm_config problem;
                memset(&problem, 0, sizeof problem);
                fm_config_set_str(&problem, "dtype", dt ? "fp16" : "bf16");
                fm_config_set_int(&problem, "head_dim", 64 << di);
                fm_config_set_int(&problem, "causal", causal);
                if (!only) full_list(ctx, NULL, &problem, "runtime");
                snprintf(names, sizeof names, "%s", fams);
                save = NULL;
                for (char *f = strtok_r(names, ",", &save); f; f = strtok_r(NULL, ",", &save)) {
                    if (only && strcmp(only, f)) continue;
                    fm_limits lim = ctx->limits;
                    if (!strcmp(f, "attn_fwd_sm80")) lim.arch = 80; /* its default, even on sm_90 */
                    else if (ctx->arch < 90) continue;
                    fm_config dflt;
                    pthread_mutex_lock(&ctx->lock);
                    s = fm_generator_default(ctx->gen, "attn_fwd", &problem, &lim, &dflt, err, sizeof err);
                    pthread_mutex_unlock(&ctx->lock);
                    CHECK(s == FM_OK, "%s", err);
                    if (s == FM_OK) full_list(ctx, &dflt, &problem, dflt.name);
                }
            }
    free(all.v);
    fm_context_destroy(ctx);
    return fm_check_report();
}
