/*
 * test_compile_all.c - every kept configuration of every family's default space renders and
 * compiles with NVRTC for sm_80 and sm_90 (sm_90a for families that need it), without spilling.
 * Configurations that differ only in launch parameters (the MoE raster, split-K, combine mode)
 * render the same source: each distinct source is compiled once and its result stands for all
 * of them. Prints the number of variants and the compile time per compiled source.
 * Also rejects configurations whose wgmma ptxas serialises (every product then waits for the
 * previous one). FM_TEST_FAMILY=name restricts the run to one family (all are checked by default).
 */
#define _GNU_SOURCE
#include "check.h"
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct item {
    fm_config cfg;
    fm_rendered r;
    int arch;
    int same_as;            /* index of the earlier item with the same source and target, or -1 */
    unsigned long long key; /* FNV-1a of the source, entry and target */
    int ok;
    fm_compile_info ci;
    char *log;
} item;

typedef struct list {
    item *v;
    int n, cap;
    int arch;
} list;

static int add(void *user, const fm_config *c, const char *reason) {
    list *l = user;
    if (reason) return 0;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 256;
        l->v = realloc(l->v, (size_t)l->cap * sizeof *l->v);
        if (!l->v) return 1;
    }
    memset(&l->v[l->n], 0, sizeof l->v[0]);
    l->v[l->n].cfg = *c;
    l->v[l->n].arch = l->arch;
    l->n++;
    return 0;
}

typedef struct per_family {
    fm_generator *g;
    const char *family;
    const fm_limits *lim;
    list *l;
} per_family;

static int each_problem(void *user, const fm_config *p, const char *reason) {
    (void)reason;
    per_family *pf = user;
    char err[512];
    if (fm_generator_enumerate(pf->g, pf->family, p, pf->lim, add, pf->l, err, sizeof err) != FM_OK)
        CHECK(0, "%s", err);
    return 0;
}

/* The source past the generator's two naming lines ("// flashmoe NAME" and the FM_CONFIG_NAME
 * define), which differ between configurations that compile the same code; the whole source if
 * anything else refers to the name. */
static const char *body_of(const char *src) {
    const char *p = src;
    if (strncmp(p, "// flashmoe ", 12) != 0) return src;
    for (int lines = 0; lines < 2 && p; lines++) {
        p = strchr(p, '\n');
        if (p) p++;
    }
    return p && !strstr(p, "FM_CONFIG_NAME") ? p : src;
}

static unsigned long long fnv1a(unsigned long long h, const char *s) {
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static struct {
    list *l;
    int next;
    pthread_mutex_t lock;
    fm_jit *jit;
} work = {NULL, 0, PTHREAD_MUTEX_INITIALIZER, NULL};

static void *worker(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&work.lock);
        int i = work.next < work.l->n ? work.next++ : -1;
        pthread_mutex_unlock(&work.lock);
        if (i < 0) return NULL;
        item *it = &work.l->v[i];
        if (it->same_as >= 0) continue;
        void *cubin = NULL;
        size_t size = 0;
        it->ok = fm_jit_compile(work.jit, it->cfg.name, &it->r, it->arch, &cubin, &size, &it->ci,
                                &it->log) == FM_OK && size > 0;
        free(cubin);
    }
}

int main(void) {
    char err[1024] = "";
    if (!fm_nvrtc_version()) FM_SKIP("NVRTC is not available");
    fm_generator *g = NULL;
    CHECK(fm_generator_open(&g, err, sizeof err) == FM_OK, "%s", err);
    if (!g) return fm_check_report();
    char fams[1024];
    CHECK(fm_generator_families(g, NULL, fams, sizeof fams) == FM_OK, "%s", fams);
    list l = {0};
    const int archs[2] = {80, 90};
    for (int a = 0; a < 2; a++) {
        fm_limits lim;
        fm_arch_limits(archs[a], &lim);
        l.arch = archs[a];
        char names[1024];
        snprintf(names, sizeof names, "%s", fams);
        char *save = NULL;
        const char *only = getenv("FM_TEST_FAMILY");
        for (char *f = strtok_r(names, ",", &save); f; f = strtok_r(NULL, ",", &save)) {
            if (only && *only && strcmp(only, f)) continue;
            per_family pf = {g, f, &lim, &l};
            CHECK(fm_generator_problems(g, f, each_problem, &pf, err, sizeof err) == FM_OK, "%s", err);
        }
    }
    for (int i = 0; i < l.n; i++)
        CHECK(fm_generator_render(g, &l.v[i].cfg, &l.v[i].r, err, sizeof err) == FM_OK, "%s", err);
    fm_generator_close(g);
    int distinct = 0;
    for (int i = 0; i < l.n; i++) {
        item *it = &l.v[i];
        it->key = fnv1a(fnv1a(fnv1a(14695981039346656037ull,
                                    it->r.source ? body_of(it->r.source) : ""),
                              it->r.entry),
                        it->r.arch_suffix) ^ (unsigned long long)it->arch;
        it->same_as = -1;
        for (int j = 0; j < i && it->r.source; j++) {
            const item *o = &l.v[j];
            if (o->same_as < 0 && o->key == it->key && o->arch == it->arch && o->r.source &&
                !strcmp(o->r.entry, it->r.entry) && !strcmp(o->r.arch_suffix, it->r.arch_suffix) &&
                !strcmp(body_of(o->r.source), body_of(it->r.source))) {
                it->same_as = j;
                break;
            }
        }
        distinct += it->same_as < 0;
    }

    fm_jit_open(&work.jit, NULL); /* no disk cache: this test is about compiling */
    work.l = &l;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int nth = ncpu > 0 ? (int)ncpu : 1;
    if (nth > 32) nth = 32;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_t th[32];
    for (int i = 0; i < nth; i++) pthread_create(&th[i], NULL, worker, NULL);
    for (int i = 0; i < nth; i++) pthread_join(th[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double wall = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);

    /* per family and architecture: count, mean and max compile time, max registers */
    double sum = 0;
    for (int i = 0; i < l.n; i++) { /* a repeated source has its first compilation's result */
        item *it = &l.v[i];
        if (it->same_as < 0) continue;
        const item *o = &l.v[it->same_as];
        it->ok = o->ok;
        it->ci = o->ci;
        it->ci.compile_ms = 0;
    }
    for (int i = 0; i < l.n; i++) {
        item *it = &l.v[i];
        CHECK(it->ok, "%s for sm_%d%s:\n%.3000s", it->cfg.name, it->arch, it->r.arch_suffix,
              it->log ? it->log : "");
        CHECK(it->ci.spill_stores == 0 && it->ci.spill_loads == 0,
              "%s sm_%d spills (%d/%d bytes, %d registers): cull it in the generator",
              it->cfg.name, it->arch, it->ci.spill_stores, it->ci.spill_loads, it->ci.registers);
        CHECK(!it->ci.wgmma_serialized,
              "%s sm_%d: ptxas serialised its wgmma (%d registers); cull it in the generator",
              it->cfg.name, it->arch, it->ci.registers);
        sum += it->ci.compile_ms;
    }
    printf("%-16s %-5s %8s %8s %12s %12s %9s\n", "family", "arch", "variants", "sources",
           "mean ms", "max ms", "max regs");
    for (int i = 0; i < l.n; i++) {
        int seen = 0;
        for (int j = 0; j < i; j++)
            seen |= !strcmp(l.v[j].cfg.family, l.v[i].cfg.family) && l.v[j].arch == l.v[i].arch;
        if (seen) continue;
        int n = 0, nsrc = 0, regs = 0;
        double s = 0, mx = 0;
        for (int j = i; j < l.n; j++) {
            if (strcmp(l.v[j].cfg.family, l.v[i].cfg.family) || l.v[j].arch != l.v[i].arch) continue;
            n++;
            nsrc += l.v[j].same_as < 0;
            s += l.v[j].ci.compile_ms;
            if (l.v[j].ci.compile_ms > mx) mx = l.v[j].ci.compile_ms;
            if (l.v[j].ci.registers > regs) regs = l.v[j].ci.registers;
        }
        printf("%-16s sm_%d %8d %8d %12.0f %12.0f %9d\n", l.v[i].cfg.family, l.v[i].arch, n, nsrc,
               nsrc ? s / nsrc : 0.0, mx, regs);
    }
    printf("compiled %d variants (%d distinct sources) in %.1f s wall on %d threads (%.0f ms per "
           "source)\n",
           l.n, distinct, wall, nth, distinct ? sum / distinct : 0.0);
    CHECK(l.n > 0, "nothing to compile");
    for (int i = 0; i < l.n; i++) {
        fm_rendered_free(&l.v[i].r);
        free(l.v[i].log);
    }
    free(l.v);
    fm_jit_close(work.jit);
    return fm_check_report();
}
