/*
 * tune.c - the tuning engine.
 *
 * The tuner process never touches CUDA. It renders and compiles (NVRTC needs no GPU) on several
 * threads into the on-disk kernel cache, then hands the list of variants to a worker process
 * that owns the GPU: the worker sets up inputs and the reference once, then checks and times the
 * variants one by one and reports each result on a pipe. A variant that faults poisons only the
 * worker's CUDA context: the tuner records the fault for the variant the worker had announced,
 * starts a new worker and goes on with the next one. Every result is recorded in the database as
 * it arrives, so an interrupted run resumes where it stopped.
 */
#define _GNU_SOURCE
#include "tune.h"
#include "testdata.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct variant {
    fm_config cfg;
    fm_rendered r;            /* source freed after compiling; metadata kept */
    fm_compile_info ci;
    int compiled;             /* 1 ok, -1 failed */
    char *log;                /* compile log on failure */
    int skip;                 /* already in the database (resume) */
    char status[16];          /* "" until decided */
    char detail[256];
    double median, min, mean, stddev, tflops, max_err, rel_err;
    int runs;
    int sustained;            /* timed under sustained load (recorded with that tool version) */
} variant;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- device probe ------------------------------------------------------------------------ */

void fm_probe_gpu(fm_probe *p) {
    memset(p, 0, sizeof *p);
    int fd[2];
    if (pipe(fd)) {
        snprintf(p->why, sizeof p->why, "cannot create a pipe: %s", strerror(errno));
        return;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        fm_probe q;
        memset(&q, 0, sizeof q);
        const fm_driver *d = fm_driver_get(q.why, sizeof q.why);
        CUdevice dev;
        if (d && d->cuDeviceGet(&dev, 0) == CUDA_SUCCESS) {
            q.present = 1;
            d->cuDeviceGetName(q.name, sizeof q.name, dev);
            d->cuDeviceGetAttribute(&q.cc_major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
            d->cuDeviceGetAttribute(&q.cc_minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
            d->cuDeviceGetAttribute(&q.sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
            d->cuDeviceGetAttribute(&q.smem_optin,
                                    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev);
            d->cuDeviceGetAttribute(&q.l2_bytes, CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, dev);
            d->cuDriverGetVersion(&q.driver_version);
            size_t mem = 0;
            d->cuDeviceTotalMem(&mem, dev);
            q.mem_bytes = (long long)mem;
        }
        ssize_t w = write(fd[1], &q, sizeof q);
        _exit(w == (ssize_t)sizeof q ? 0 : 1);
    }
    close(fd[1]);
    if (pid < 0) {
        close(fd[0]);
        snprintf(p->why, sizeof p->why, "cannot fork: %s", strerror(errno));
        return;
    }
    ssize_t n = read(fd[0], p, sizeof *p);
    close(fd[0]);
    int st = 0;
    waitpid(pid, &st, 0);
    if (n != (ssize_t)sizeof *p) {
        memset(p, 0, sizeof *p);
        snprintf(p->why, sizeof p->why, "the device probe died (signal %d)",
                 WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    }
}

int fm_gpu_arch(const char *want) {
    if (!want) return 0;
    if (!strcasecmp(want, "h100") || !strcasecmp(want, "h200") || !strcasecmp(want, "h800") ||
        !strcasecmp(want, "h20") || !strcasecmp(want, "gh200"))
        return 90;
    if (!strcasecmp(want, "a100") || !strcasecmp(want, "a800")) return 80;
    return 0;
}

/* --gpu h100 matches "NVIDIA H100 80GB HBM3" but not "NVIDIA H200"; a longer value matches any
 * card whose name contains it (case-insensitive); "auto" matches anything. */
int fm_gpu_matches(const char *want, const char *name) {
    if (!want || !strcasecmp(want, "auto")) return 1;
    size_t wl = strlen(want);
    for (const char *p = name; *p; p++) {
        if (strncasecmp(p, want, wl) != 0) continue;
        /* the fragment must not continue as a longer model number: H100 vs H1000 */
        if (isdigit((unsigned char)want[wl - 1]) && isdigit((unsigned char)p[wl])) continue;
        return 1;
    }
    return 0;
}

/* ---- enumeration ------------------------------------------------------------------------- */

typedef struct enum_acc {
    variant *v;
    int n, cap;
    int culled;
    char reasons[16][160];
    int reason_count[16];
    int nreasons;
} enum_acc;

static int collect(void *user, const fm_config *c, const char *reason) {
    enum_acc *a = user;
    if (reason) {
        a->culled++;
        int i;
        for (i = 0; i < a->nreasons; i++)
            if (!strcmp(a->reasons[i], reason)) break;
        if (i == a->nreasons && a->nreasons < 16) {
            snprintf(a->reasons[i], sizeof a->reasons[i], "%s", reason);
            a->nreasons++;
        }
        if (i < 16) a->reason_count[i]++;
        return 0;
    }
    if (a->n == a->cap) {
        int cap = a->cap ? a->cap * 2 : 64;
        variant *nv = realloc(a->v, (size_t)cap * sizeof *nv);
        if (!nv) return 1;
        a->v = nv;
        a->cap = cap;
    }
    memset(&a->v[a->n], 0, sizeof a->v[a->n]);
    a->v[a->n++].cfg = *c;
    return 0;
}

/* ---- compiling ------------------------------------------------------------------------------ */

typedef struct compile_job {
    variant *v;
    int n;
    int next;
    int arch;
    fm_jit *jit;
    pthread_mutex_t lock;
    int done;
    double t0;
    int tty; /* progress line only on a terminal */
} compile_job;

static void *compile_worker(void *arg) {
    compile_job *j = arg;
    for (;;) {
        pthread_mutex_lock(&j->lock);
        int i = j->next < j->n ? j->next++ : -1;
        pthread_mutex_unlock(&j->lock);
        if (i < 0) break;
        variant *v = &j->v[i];
        if (v->skip || v->compiled) continue;
        void *cubin = NULL;
        size_t size = 0;
        fm_status s = fm_jit_compile(j->jit, v->cfg.name, &v->r, j->arch, &cubin, &size, &v->ci,
                                     &v->log);
        free(cubin);
        fm_rendered_free(&v->r);
        v->compiled = s == FM_OK ? 1 : -1;
        if (s == FM_OK) {
            free(v->log);
            v->log = NULL;
        }
        pthread_mutex_lock(&j->lock);
        j->done++;
        if (j->tty) fprintf(stderr, "\r  compiled %d/%d (%.0f s)   ", j->done, j->n, now_s() - j->t0);
        pthread_mutex_unlock(&j->lock);
    }
    return NULL;
}

/* ---- the worker process ------------------------------------------------------------------ */

static int cuda_is_sticky(fm_status s) { return s == FM_ERR_CUDA; }

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Sustained-load timing, in the child, of variants already checked (burst phase): rounds in which
 * every variant in turn runs back to back for about sustain_ms (no L2 flush, no pause: what a
 * serving loop does), the order reversed every other round so that no variant always inherits
 * another's power state; a variant's time is the median over the rounds of (elapsed / launches).
 * The card's clocks settle where its power limit puts them, which for memory-heavy kernels
 * ranks variants differently from short bursts at boost clocks (bench/NOTES.md: on an H100 the
 * DeepSeek-V3 MoE layer at T = 4096 ran 8% faster with a tile that was 5% slower in bursts).
 * Writes "R i ok median min mean stddev rounds 0 0 detail" per variant. */
static void sustained_timing(FILE *out, const fm_tune_opts *o, fm_context *ctx, void *state,
                             variant *v, const int *idx, int n, CUstream stream, CUevent e0,
                             CUevent e1) {
    const fm_driver *d = ctx->drv;
    const int rounds = o->sustain_rounds;
    const fm_loaded **k = calloc((size_t)n, sizeof *k);
    double *tr = calloc((size_t)n * (size_t)rounds, sizeof *tr);
    long long *launches = calloc((size_t)n, sizeof *launches);
    if (!k || !tr || !launches) _exit(14);
    for (int q = 0; q < n; q++) {
        if (fm_context_load(ctx, &v[idx[q]].cfg, &k[q]) != FM_OK) {
            fprintf(out, "R %d fault 0 0 0 0 0 0 0 %s\n", idx[q], fm_last_error(ctx));
            k[q] = NULL;
        }
    }
    fm_context_enter(ctx);
    for (int r = 0; r < rounds; r++) {
        for (int qq = 0; qq < n; qq++) {
            const int q = (r & 1) ? n - 1 - qq : qq;
            if (!k[q]) continue;
            float ms = 0;
            int bad = 0;
            /* two launches to size the turn */
            d->cuEventRecord(e0, stream);
            for (int w = 0; w < 2 && !bad; w++)
                bad = o->op->run(ctx, state, k[q], w, stream) != FM_OK;
            d->cuEventRecord(e1, stream);
            if (bad || d->cuEventSynchronize(e1) != CUDA_SUCCESS ||
                d->cuEventElapsedTime(&ms, e0, e1) != CUDA_SUCCESS || !(ms > 0)) {
                fprintf(out, "R %d fault 0 0 0 0 0 0 0 failed under sustained load: %s\n", idx[q],
                        fm_last_error(ctx));
                _exit(3);
            }
            long long cnt = (long long)(o->sustain_ms / (ms / 2.0));
            if (cnt < 2) cnt = 2;
            if (cnt > 200000) cnt = 200000;
            d->cuEventRecord(e0, stream);
            for (long long c = 0; c < cnt && !bad; c++)
                bad = o->op->run(ctx, state, k[q], (int)(c % 1024), stream) != FM_OK;
            d->cuEventRecord(e1, stream);
            if (bad || d->cuEventSynchronize(e1) != CUDA_SUCCESS ||
                d->cuEventElapsedTime(&ms, e0, e1) != CUDA_SUCCESS) {
                fprintf(out, "R %d fault 0 0 0 0 0 0 0 failed under sustained load: %s\n", idx[q],
                        fm_last_error(ctx));
                _exit(3);
            }
            tr[(size_t)q * rounds + r] = ms / (double)cnt;
            launches[q] += cnt;
        }
    }
    fm_context_leave(ctx);
    for (int q = 0; q < n; q++) {
        if (!k[q]) continue;
        double *x = tr + (size_t)q * rounds, sum = 0, sq = 0;
        for (int r = 0; r < rounds; r++) sum += x[r];
        const double mean = sum / rounds;
        for (int r = 0; r < rounds; r++) sq += (x[r] - mean) * (x[r] - mean);
        qsort(x, (size_t)rounds, sizeof *x, cmp_double);
        const double med = rounds % 2 ? x[rounds / 2] : 0.5 * (x[rounds / 2 - 1] + x[rounds / 2]);
        fprintf(out, "R %d ok %.6f %.6f %.6f %.6f %d 0 0 sustained load: %d rounds of %.0f ms, %lld launches\n",
                idx[q], med, x[0], mean, rounds > 1 ? sqrt(sq / (rounds - 1)) : 0.0, rounds,
                rounds, o->sustain_ms, launches[q]);
    }
    free(k);
    free(tr);
    free(launches);
}

/* Runs in the child. Writes "B i" before variant i and "R i status ..." after it. */
static void worker_main(int out_fd, const fm_tune_opts *o, variant *v, const int *idx, int n,
                        double deadline) {
    FILE *out = fdopen(out_fd, "w");
    if (!out) _exit(10);
    setvbuf(out, NULL, _IOLBF, 0);
    fm_context_options co;
    memset(&co, 0, sizeof co);
    co.cache_dir = o->cache_dir;
    co.no_database = 1;
    fm_context *ctx = NULL;
    if (fm_context_create_v2(&ctx, &co) != FM_OK) {
        fprintf(out, "S context: %s\n", fm_last_error(NULL));
        _exit(11);
    }
    /* the worker is single-threaded: its context stays current for its whole life, so that the
     * op's allocations and copies need not enter it one by one */
    if (fm_context_enter(ctx) != FM_OK) {
        fprintf(out, "S context: %s\n", fm_last_error(ctx));
        _exit(11);
    }
    char err[1024] = "";
    void *state = NULL;
    fm_status s = o->op->setup(ctx, &o->prob, &state, err, sizeof err);
    if (s != FM_OK) {
        fprintf(out, "S setup: %s\n", err);
        _exit(12);
    }
    const fm_driver *d = ctx->drv;
    CUstream stream = NULL;
    CUevent e0 = NULL, e1 = NULL;
    CUdeviceptr flush = 0;
    int l2 = 0;
    fm_context_enter(ctx);
    d->cuDeviceGetAttribute(&l2, CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, ctx->dev);
    size_t flush_bytes = (size_t)(l2 > 0 ? l2 : 64 << 20) * 2;
    if (d->cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING) != CUDA_SUCCESS ||
        d->cuEventCreate(&e0, CU_EVENT_DEFAULT) != CUDA_SUCCESS ||
        d->cuEventCreate(&e1, CU_EVENT_DEFAULT) != CUDA_SUCCESS ||
        d->cuMemAlloc(&flush, flush_bytes) != CUDA_SUCCESS) {
        fprintf(out, "S cannot create streams, events or the L2 flush buffer\n");
        _exit(13);
    }
    fm_context_leave(ctx);
    double flops = o->op->flops(&o->prob);
    int runs = o->runs > 0 ? o->runs : 30;
    const char *crash_env = getenv("FMTUNE_TEST_CRASH");
    int crash_at = crash_env ? atoi(crash_env) : -1;
    double *t = calloc((size_t)runs, sizeof *t);
    if (!t) _exit(14);
    if (o->sustain_rounds > 0) {
        sustained_timing(out, o, ctx, state, v, idx, n, stream, e0, e1);
        free(t);
        o->op->teardown(state);
        fm_context_destroy(ctx);
        fclose(out);
        _exit(0);
    }

    for (int q = 0; q < n; q++) {
        int i = idx[q];
        if (deadline > 0 && now_s() > deadline) {
            fprintf(out, "R %d skipped 0 0 0 0 0 0 0 time budget used up\n", i);
            continue;
        }
        fprintf(out, "B %d\n", i);
        /* FMTUNE_TEST_CRASH=q kills each worker inside its q-th variant (from 0), so tests can check
         * that a variant that takes its process down is recorded as a fault and tuning goes on. */
        if (crash_at == q) raise(SIGSEGV);
        const fm_loaded *k = NULL;
        s = fm_context_load(ctx, &v[i].cfg, &k);
        if (s != FM_OK) {
            const char *m = fm_last_error(ctx);
            char line[200];
            snprintf(line, sizeof line, "%s", m);
            for (char *c = line; *c; c++)
                if (*c == '\n') *c = ' ';
            fprintf(out, "R %d %s 0 0 0 0 0 0 0 %s\n", i,
                    s == FM_ERR_COMPILE ? "compile_error" : "fault", line);
            if (cuda_is_sticky(s)) _exit(3);
            continue;
        }
        fm_check chk;
        memset(&chk, 0, sizeof chk);
        fm_context_enter(ctx);
        s = o->op->poison(state, stream);
        if (s == FM_OK) s = o->op->run(ctx, state, k, 0, stream);
        CUresult cr = s == FM_OK ? d->cuStreamSynchronize(stream) : CUDA_SUCCESS;
        fm_context_leave(ctx);
        if (s != FM_OK || cr != CUDA_SUCCESS) {
            char b[200];
            const char *m = s != FM_OK ? fm_last_error(ctx) : fm_driver_error_text(cr, b, sizeof b);
            fprintf(out, "R %d fault 0 0 0 0 0 0 0 %s\n", i, m);
            _exit(3); /* the context may be poisoned: start afresh */
        }
        fm_context_enter(ctx);
        s = o->op->check(state, &chk);
        fm_context_leave(ctx);
        if (s != FM_OK) {
            fprintf(out, "R %d fault 0 0 0 0 0 0 0 reading the output back failed\n", i);
            _exit(3);
        }
        if (!chk.ok) {
            fprintf(out, "R %d wrong 0 0 0 0 0 %.3e %.3e %s\n", i, chk.max_abs_err, chk.rel_err,
                    chk.detail);
            continue;
        }
        /* Timing: warm up, then `runs` launches each preceded by an L2 flush (outside the
         * events), median reported. Inputs rotate where the op keeps several copies. */
        fm_context_enter(ctx);
        int bad = 0;
        float ms = 0;
        /* Warm-up long enough (about 100 ms of GPU time) that the clocks settle where a sustained
         * workload runs them: short bursts time a card at boost clocks, 10% above what a
         * benchmark sees (bench/NOTES.md). */
        d->cuEventRecord(e0, stream);
        for (int w = 0; w < 3 && !bad; w++) bad = o->op->run(ctx, state, k, w, stream) != FM_OK;
        d->cuEventRecord(e1, stream);
        if (!bad && d->cuEventSynchronize(e1) == CUDA_SUCCESS &&
            d->cuEventElapsedTime(&ms, e0, e1) == CUDA_SUCCESS && ms > 0) {
            int more = (int)(100.0 / (ms / 3.0));
            if (more > 500) more = 500;
            for (int w = 0; w < more && !bad; w++)
                bad = o->op->run(ctx, state, k, w, stream) != FM_OK;
        }
        int r;
        for (r = 0; r < runs && !bad; r++) {
            d->cuMemsetD32Async(flush, (unsigned)r, flush_bytes / 4, stream);
            d->cuEventRecord(e0, stream);
            bad = o->op->run(ctx, state, k, r + 1, stream) != FM_OK;
            d->cuEventRecord(e1, stream);
            if (d->cuEventSynchronize(e1) != CUDA_SUCCESS ||
                d->cuEventElapsedTime(&ms, e0, e1) != CUDA_SUCCESS)
                bad = 1;
            t[r] = ms;
        }
        fm_context_leave(ctx);
        if (bad) {
            fprintf(out, "R %d fault 0 0 0 0 0 0 0 failed while timing: %s\n", i, fm_last_error(ctx));
            _exit(3);
        }
        double sum = 0, sq = 0;
        for (int j = 0; j < r; j++) sum += t[j];
        double mean = sum / r;
        for (int j = 0; j < r; j++) sq += (t[j] - mean) * (t[j] - mean);
        qsort(t, (size_t)r, sizeof *t, cmp_double);
        double med = r % 2 ? t[r / 2] : 0.5 * (t[r / 2 - 1] + t[r / 2]);
        fprintf(out, "R %d ok %.6f %.6f %.6f %.6f %d %.3e %.3e %s\n", i, med, t[0], mean,
                r > 1 ? sqrt(sq / (r - 1)) : 0.0, r, chk.max_abs_err, chk.rel_err, chk.detail);
        (void)flops;
    }
    free(t);
    o->op->teardown(state);
    fm_context_destroy(ctx);
    fclose(out);
    _exit(0);
}

/* ---- recording ---------------------------------------------------------------------------- */

typedef struct recorder {
    fm_db *db;
    long long device_id;
    const fm_tune_opts *o;
    const char *device_name;
    double flops;
} recorder;

static void record(recorder *rc, variant *v) {
    if (!rc->db) return;
    char err[512] = "", params[1024];
    long long cid = 0;
    fm_config_params_string(&v->cfg, params, sizeof params);
    if (fm_db_upsert_config(rc->db, v->cfg.family, v->cfg.name, params, v->r.template_hash, &cid,
                            err, sizeof err) != FM_OK) {
        fprintf(stderr, "\nfmtune: database: %s\n", err);
        return;
    }
    fm_db_measurement m;
    fm_db_measurement_init(&m);
    m.device_id = rc->device_id;
    m.config_id = cid;
    m.op = rc->o->op->name;
    m.dtype = rc->o->prob.dtype;
    m.shape = rc->o->prob.shape;
    m.status = v->status;
    m.detail = v->detail[0] ? v->detail : NULL;
    if (!strcmp(v->status, "ok")) {
        m.median_ms = v->median;
        m.min_ms = v->min;
        m.mean_ms = v->mean;
        m.stddev_ms = v->stddev;
        m.runs = v->runs;
        m.tflops = v->tflops;
    }
    if (!strcmp(v->status, "ok") || !strcmp(v->status, "wrong")) {
        m.max_abs_err = v->max_err;
        m.rel_err = v->rel_err;
    }
    if (v->compiled == 1) {
        m.registers = v->ci.registers;
        m.spills = v->ci.spill_stores + v->ci.spill_loads;
        m.compile_ms = v->ci.compile_ms;
    }
    m.smem_bytes = v->r.smem_bytes;
    m.tool_version = v->sustained ? "fmtune " FM_VERSION_STRING FM_DB_SUSTAINED_SUFFIX
                                  : "fmtune " FM_VERSION_STRING;
    if (fm_db_add_measurement(rc->db, &m, err, sizeof err) != FM_OK)
        fprintf(stderr, "\nfmtune: database: %s\n", err);
}

static void progress(const variant *v, int done, int total) {
    if (!strcmp(v->status, "ok"))
        fprintf(stderr, "[%3d/%d] %-58s %9.4f ms %7.1f TFLOP/s  rel %.1e\n", done, total,
                v->cfg.name, v->median, v->tflops, v->rel_err);
    else
        fprintf(stderr, "[%3d/%d] %-58s %-13s %.90s\n", done, total, v->cfg.name, v->status,
                v->detail);
}

/* Parses one result line into v. Returns the variant index, or -1. */
static int parse_result(char *line, variant *v, int nv, double flops) {
    int i = -1, runs = 0, pos = 0;
    char status[16];
    double med, mn, mean, sd, maxe, rel;
    if (sscanf(line, "R %d %15s %lf %lf %lf %lf %d %lf %lf %n", &i, status, &med, &mn, &mean, &sd,
               &runs, &maxe, &rel, &pos) < 9 || i < 0 || i >= nv)
        return -1;
    variant *x = &v[i];
    snprintf(x->status, sizeof x->status, "%s", status);
    snprintf(x->detail, sizeof x->detail, "%s", line + pos);
    x->median = med;
    x->min = mn;
    x->mean = mean;
    x->stddev = sd;
    x->runs = runs;
    x->max_err = maxe;
    x->rel_err = rel;
    x->tflops = med > 0 ? flops / (med * 1e-3) / 1e12 : 0;
    return i;
}

/* Starts a worker: this same program, exec'ed afresh (`fmtune --worker`), so that it inherits no
 * state from the tuner (a fork alone would carry over whatever NVRTC or the driver set up here,
 * and cuInit refuses to run in such a child). The job goes down its stdin as lines:
 *   OP name | PROB dtype shape params | RUNS n | CACHE dir | DEADLINE t | V idx family name params
 * (and SUSTAIN rounds ms for the sustained-load timing) and the results come back on *rfd[0]. */
static pid_t spawn_worker(const fm_tune_opts *o, const variant *v, const int *idx, int n,
                          double deadline, int rfd[2]) {
    int in[2];
    if (pipe(rfd)) return -1;
    if (pipe(in)) {
        close(rfd[0]);
        close(rfd[1]);
        return -1;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(rfd[1], 1);
        close(in[0]);
        close(in[1]);
        close(rfd[0]);
        close(rfd[1]);
        execl("/proc/self/exe", "fmtune", "--worker", (char *)NULL);
        _exit(127);
    }
    close(in[0]);
    close(rfd[1]);
    if (pid < 0) {
        close(in[1]);
        close(rfd[0]);
        return -1;
    }
    FILE *f = fdopen(in[1], "w");
    if (!f) {
        close(in[1]);
        return pid; /* the worker sees an empty job and exits; the caller sees no results */
    }
    char params[1024];
    fm_config_params_string(&o->prob.p, params, sizeof params);
    fprintf(f, "OP %s\nPROB %s %s %s\nRUNS %d\nCACHE %s\nDEADLINE %.6f\n", o->op->name,
            o->prob.dtype, o->prob.shape, params, o->runs, o->cache_dir[0] ? o->cache_dir : "-",
            deadline);
    if (o->sustain_rounds > 0) fprintf(f, "SUSTAIN %d %.3f\n", o->sustain_rounds, o->sustain_ms);
    for (int q = 0; q < n; q++) {
        fm_config_params_string(&v[idx[q]].cfg, params, sizeof params);
        fprintf(f, "V %d %s %s %s\n", idx[q], v[idx[q]].cfg.family, v[idx[q]].cfg.name, params);
    }
    fprintf(f, "END\n");
    fclose(f);
    return pid;
}

int fm_tune_worker(void) {
    fm_tune_opts o;
    memset(&o, 0, sizeof o);
    char line[4096], a[256], b[512], c[2048];
    variant *v = NULL;
    int *idx = NULL, n = 0, cap = 0, maxi = -1;
    double deadline = 0;
    typedef struct { int i; fm_config cfg; } item;
    item *items = NULL;
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (!strncmp(line, "OP ", 3)) {
            o.op = !strcmp(line + 3, fm_op_moe.name) ? &fm_op_moe : &fm_op_attn_fwd;
        } else if (sscanf(line, "PROB %255s %511s %2047s", a, b, c) == 3) {
            snprintf(o.prob.dtype, sizeof o.prob.dtype, "%.*s", (int)sizeof o.prob.dtype - 1, a);
            snprintf(o.prob.shape, sizeof o.prob.shape, "%.*s", (int)sizeof o.prob.shape - 1, b);
            fm_config_parse_params(&o.prob.p, c);
        } else if (!strncmp(line, "RUNS ", 5)) {
            o.runs = atoi(line + 5);
        } else if (!strncmp(line, "CACHE ", 6)) {
            snprintf(o.cache_dir, sizeof o.cache_dir, "%.*s", (int)sizeof o.cache_dir - 1,
                     strcmp(line + 6, "-") ? line + 6 : "");
        } else if (!strncmp(line, "DEADLINE ", 9)) {
            deadline = atof(line + 9);
        } else if (sscanf(line, "SUSTAIN %d %lf", &o.sustain_rounds, &o.sustain_ms) == 2) {
            if (o.sustain_rounds < 1 || !(o.sustain_ms > 0)) return 2;
        } else if (!strncmp(line, "V ", 2)) {
            int i = -1;
            if (sscanf(line, "V %d %255s %511s %2047s", &i, a, b, c) != 4 || i < 0) return 2;
            if (n == cap) {
                cap = cap ? 2 * cap : 64;
                items = realloc(items, (size_t)cap * sizeof *items);
                if (!items) return 3;
            }
            memset(&items[n], 0, sizeof items[n]);
            items[n].i = i;
            snprintf(items[n].cfg.family, sizeof items[n].cfg.family, "%.*s",
                     (int)sizeof items[n].cfg.family - 1, a);
            snprintf(items[n].cfg.name, sizeof items[n].cfg.name, "%.*s",
                     (int)sizeof items[n].cfg.name - 1, b);
            if (fm_config_parse_params(&items[n].cfg, c)) return 2;
            if (i > maxi) maxi = i;
            n++;
        } else if (!strcmp(line, "END")) {
            break;
        }
    }
    if (!o.op || n == 0) return 2;
    v = calloc((size_t)maxi + 1, sizeof *v);
    idx = calloc((size_t)n, sizeof *idx);
    if (!v || !idx) return 3;
    for (int q = 0; q < n; q++) {
        v[items[q].i].cfg = items[q].cfg;
        idx[q] = items[q].i;
    }
    free(items);
    worker_main(1, &o, v, idx, n, deadline); /* exits */
    return 0;
}

/* The tuner's side of a worker's pipe: polls once a second, splits what arrives into lines and
 * hands each to on_line; on_idle runs after every quiet second. Returns when the worker closes
 * its end or a callback returns nonzero (the caller then settles with the worker). */
static void read_worker(int fd, int (*on_line)(void *user, char *line), int (*on_idle)(void *user),
                        void *user) {
    char buf[8192];
    size_t have = 0;
    for (;;) {
        struct pollfd pfd = {fd, POLLIN, 0};
        int pr = poll(&pfd, 1, 1000);
        if (pr == 0) {
            if (on_idle(user)) return;
            continue;
        }
        if (pr < 0 && errno == EINTR) continue;
        ssize_t n = read(fd, buf + have, sizeof buf - 1 - have);
        if (n <= 0) return;
        have += (size_t)n;
        buf[have] = 0;
        char *line = buf, *nl;
        while ((nl = strchr(line, '\n'))) {
            *nl = 0;
            if (on_line(user, line)) return;
            line = nl + 1;
        }
        have = strlen(line);
        memmove(buf, line, have + 1);
    }
}

/* What measure() follows while one worker runs. */
typedef struct measuring {
    variant *v;
    int nv, ntodo;
    double flops, limit, began;
    recorder *rc;
    pid_t pid;
    int current, done, ok, start, finished_all, setup_failures;
} measuring;

static int measuring_line(void *user, char *line) {
    measuring *m = user;
    if (line[0] == 'B') {
        m->current = atoi(line + 2);
        m->began = now_s();
    } else if (line[0] == 'R') {
        int i = parse_result(line, m->v, m->nv, m->flops);
        if (i >= 0) {
            if (strcmp(m->v[i].status, "skipped")) {
                record(m->rc, &m->v[i]);
                m->ok += !strcmp(m->v[i].status, "ok");
            }
            progress(&m->v[i], ++m->done, m->ntodo);
            m->start++;
            if (m->start == m->ntodo) m->finished_all = 1;
        }
        m->current = -1;
    } else if (line[0] == 'S') {
        fprintf(stderr, "fmtune: worker: %s\n", line + 2);
        m->setup_failures++;
    }
    return 0;
}

/* A variant past its time limit: killed, recorded as a timeout. */
static int measuring_idle(void *user) {
    measuring *m = user;
    if (m->current < 0 || now_s() - m->began <= m->limit) return 0;
    kill(m->pid, SIGKILL);
    variant *x = &m->v[m->current];
    snprintf(x->status, sizeof x->status, "timeout");
    snprintf(x->detail, sizeof x->detail, "no result after %.0f s", m->limit);
    return 1;
}

/* Measures the variants listed in todo (indices into v), restarting the worker after faults.
 * Returns the number measured "ok". */
static int measure(const fm_tune_opts *o, variant *v, int nv, int *todo, int ntodo, recorder *rc) {
    double deadline = o->budget_s > 0 ? now_s() + o->budget_s : 0;
    measuring m;
    memset(&m, 0, sizeof m);
    m.v = v;
    m.nv = nv;
    m.ntodo = ntodo;
    m.rc = rc;
    m.flops = o->op->flops(&o->prob);
    m.limit = o->variant_timeout_s > 0 ? o->variant_timeout_s : 300;
    while (m.start < ntodo) {
        int fd[2];
        m.pid = spawn_worker(o, v, todo + m.start, ntodo - m.start, deadline, fd);
        if (m.pid < 0) return m.ok;
        m.current = -1;
        m.finished_all = 0;
        m.began = now_s();
        read_worker(fd[0], measuring_line, measuring_idle, &m);
        close(fd[0]);
        int st = 0;
        waitpid(m.pid, &st, 0);
        if (m.finished_all) break;
        if (m.current >= 0) {
            /* the worker died inside variant `current` without reporting it */
            variant *x = &v[m.current];
            if (!x->status[0]) {
                snprintf(x->status, sizeof x->status, "fault");
                snprintf(x->detail, sizeof x->detail, "worker died (%s %d) while running it",
                         WIFSIGNALED(st) ? "signal" : "exit code",
                         WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
            }
            record(rc, x);
            progress(x, ++m.done, ntodo);
            m.start++;
        } else if (m.setup_failures) {
            fprintf(stderr, "fmtune: the worker could not set up the problem; giving up\n");
            break;
        }
        if (m.setup_failures > 2) break;
    }
    return m.ok;
}

/* ---- reporting ------------------------------------------------------------------------------ */

static int cmp_variant(const void *a, const void *b) {
    const variant *x = *(variant *const *)a, *y = *(variant *const *)b;
    int xo = !strcmp(x->status, "ok"), yo = !strcmp(y->status, "ok");
    if (xo != yo) return yo - xo;
    if (xo) return x->median < y->median ? -1 : x->median > y->median;
    return strcmp(x->cfg.name, y->cfg.name);
}

/* What sustained_phase() follows while its worker runs. */
typedef struct sustaining {
    variant *sv;
    int nv;
    double flops, limit;
    pid_t pid;
} sustaining;

static int sustaining_line(void *user, char *line) {
    sustaining *st = user;
    if (line[0] == 'R') parse_result(line, st->sv, st->nv, st->flops);
    else if (line[0] == 'S') fprintf(stderr, "fmtune: worker: %s\n", line + 2);
    return 0;
}

static int sustaining_idle(void *user) {
    sustaining *st = user;
    if (now_s() <= st->limit) return 0;
    kill(st->pid, SIGKILL);
    fprintf(stderr, "fmtune: sustained timing took too long; stopped\n");
    return 1;
}

/* The database's rows of the shape being tuned, for the sustained phase: each resumed variant's
 * fastest burst-timed "ok" row (its median becomes the variant's, to rank it with this run's),
 * and the variant holding the fastest sustained-load row. */
typedef struct db_rows {
    variant *v;
    int nv;
    int *burst_ok;   /* per variant: 1 when the database gave it a burst median */
    int sus_best;    /* index of the variant with the fastest sustained row, or -1 */
    double sus_ms, sus_err, sus_rel;
} db_rows;

static int ends_with(const char *s, const char *suffix) {
    const size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

static int db_row(void *user, const fm_db_measurement *m) {
    db_rows *a = user;
    if (!m->config_name || !(m->median_ms > 0)) return 0;
    int i = 0;
    while (i < a->nv && strcmp(a->v[i].cfg.name, m->config_name)) i++;
    if (i == a->nv) return 0; /* not in this run's space (another family, --match) */
    if (m->tool_version && ends_with(m->tool_version, FM_DB_SUSTAINED_SUFFIX)) {
        if (a->sus_best < 0 || m->median_ms < a->sus_ms) {
            a->sus_best = i;
            a->sus_ms = m->median_ms;
            a->sus_err = m->max_abs_err;
            a->sus_rel = m->rel_err;
        }
        return 0;
    }
    variant *x = &a->v[i];
    if (!x->skip || (a->burst_ok[i] && x->median <= m->median_ms)) return 0;
    a->burst_ok[i] = 1;
    x->median = m->median_ms;
    x->max_err = m->max_abs_err;
    x->rel_err = m->rel_err;
    return 0;
}

static int cmp_median(const void *a, const void *b) {
    const variant *x = *(variant *const *)a, *y = *(variant *const *)b;
    if (x->median != y->median) return x->median < y->median ? -1 : 1;
    return strcmp(x->cfg.name, y->cfg.name);
}

/* Sustained phase (--sustained K, on by default): the K fastest burst-timed variants, timed
 * again under sustained load in one worker (see sustained_timing) and recorded with the
 * sustained tool version; then every burst timing of the shape on this card is superseded
 * (fm_db_supersede_burst), so that best is the fastest under load. Prints the comparison.
 * The candidates are this run's correct variants and, when resuming, the variants whose burst
 * timings the database holds and no sustained phase has superseded yet (a database tuned in
 * bursts is re-ranked under load by running the same command again). The variant that is best
 * under load so far joins them, so that a newcomer is compared with it in the same rounds. */
static void sustained_phase(const fm_tune_opts *o, variant *v, int nv, recorder *rc) {
    variant **order = calloc((size_t)nv + 1, sizeof *order);
    variant *sv = calloc((size_t)nv + 1, sizeof *sv);
    int *sel = calloc((size_t)nv + 1, sizeof *sel);
    db_rows dr = {v, nv, calloc((size_t)nv + 1, sizeof(int)), -1, 0, 0, 0};
    int k = 0, k_burst = 0;
    if (!order || !sv || !sel || !dr.burst_ok) goto done;
    if (rc->db) {
        char err[512] = "";
        fm_db_filter f;
        memset(&f, 0, sizeof f);
        f.device_name = rc->device_name;
        f.op = o->op->name;
        f.dtype = o->prob.dtype;
        f.shape = o->prob.shape;
        f.status = "ok";
        if (fm_db_foreach_measurement(rc->db, &f, db_row, &dr, err, sizeof err) != FM_OK)
            fprintf(stderr, "fmtune: database: %s\n", err);
    }
    int nok = 0, fresh = 0;
    for (int i = 0; i < nv; i++) {
        const int now = !v[i].skip && !strcmp(v[i].status, "ok");
        fresh += now;
        if (now || dr.burst_ok[i]) order[nok++] = &v[i];
    }
    /* Nothing timed in bursts since the last sustained phase: the ranking under load stands. */
    if (nok == 0 || (fresh == 0 && nok + (dr.sus_best >= 0) < 2)) {
        fprintf(stderr, "fmtune: no burst timing of this shape left to re-rank under sustained "
                "load%s\n", dr.sus_best >= 0 ? " (its best is already chosen under load)" : "");
        goto done;
    }
    qsort(order, (size_t)nok, sizeof *order, cmp_median);
    k = k_burst = nok < o->sustained ? nok : o->sustained;
    for (int q = 0; q < k; q++) sel[q] = (int)(order[q] - v);
    if (dr.sus_best >= 0) {
        int in = 0;
        for (int q = 0; q < k; q++) in |= sel[q] == dr.sus_best;
        if (!in) {
            /* re-timed without a burst median of its own; its errors from its sustained row */
            sel[k++] = dr.sus_best;
            v[dr.sus_best].max_err = dr.sus_err;
            v[dr.sus_best].rel_err = dr.sus_rel;
        }
    }
    if (k < 2) goto done;
    for (int q = 0; q < k; q++) {
        sv[sel[q]] = v[sel[q]];
        sv[sel[q]].status[0] = 0;
    }
    fm_tune_opts so = *o;
    so.sustain_rounds = 4;
    so.sustain_ms = 250;
    fprintf(stderr, "fmtune: timing the %d fastest%s under sustained load (%d rounds of %.0f ms)\n",
            k_burst, k > k_burst ? " and the best under load so far" : "", so.sustain_rounds,
            so.sustain_ms);
    int fd[2];
    /* Rows of earlier sustained phases (this card model, other machines or days) are older
     * than this; this phase re-times the best among them in the same rounds. */
    const long long phase_start = (long long)time(NULL);
    sustaining st = {sv, nv, o->op->flops(&o->prob), 0, -1};
    st.pid = k >= 2 ? spawn_worker(&so, v, sel, k, 0, fd) : -1;
    if (st.pid > 0) {
        st.limit = now_s() + 120 + k * so.sustain_rounds * (so.sustain_ms * 1e-3) * 4;
        read_worker(fd[0], sustaining_line, sustaining_idle, &st);
        close(fd[0]);
        waitpid(st.pid, NULL, 0);
    }
    int recorded = 0;
    fprintf(stderr, "\n%-4s %-60s %10s %12s\n", "", "configuration (sustained load)", "burst ms",
            "sustained ms");
    for (int q = 0; q < k; q++) {
        variant *x = &sv[sel[q]];
        char burst[32] = "-"; /* the best under load so far has no burst timing left */
        if (q < k_burst) snprintf(burst, sizeof burst, "%.4f", v[sel[q]].median);
        if (strcmp(x->status, "ok")) {
            fprintf(stderr, "%-4s %-60s %10s %12s %.60s\n", "-", x->cfg.name, burst,
                    x->status[0] ? x->status : "no result", x->detail);
            continue;
        }
        x->sustained = 1;
        x->max_err = v[sel[q]].max_err; /* checked in the burst phase */
        x->rel_err = v[sel[q]].rel_err;
        record(rc, x);
        recorded++;
        fprintf(stderr, "%-4d %-60s %10s %12.4f\n", q + 1, x->cfg.name, burst, x->median);
    }
    if (recorded && rc->db) {
        char err[512] = "";
        int changed = 0, older = 0;
        if (fm_db_supersede_sustained(rc->db, rc->device_id, o->op->name, o->prob.dtype,
                                      o->prob.shape, phase_start, &older, err,
                                      sizeof err) != FM_OK)
            fprintf(stderr, "fmtune: database: %s\n", err);
        else if (older)
            fprintf(stderr, "fmtune: %d sustained-load timings of earlier runs superseded: this "
                    "run's rounds decide\n", older);
        if (fm_db_supersede_burst(rc->db, rc->device_id, o->op->name, o->prob.dtype,
                                  o->prob.shape, &changed, err, sizeof err) != FM_OK)
            fprintf(stderr, "fmtune: database: %s\n", err);
        else
            fprintf(stderr, "fmtune: %d burst timings of this shape superseded; best is chosen "
                    "among the sustained ones\n", changed);
    }
done:
    free(order);
    free(sv);
    free(sel);
    free(dr.burst_ok);
}

static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            fprintf(f, "\\u%04x", *s);
        else
            fputc(*s, f);
    }
    fputc('"', f);
}

typedef struct show_acc {
    int n;
} show_acc;

static int show_measurement(void *user, const fm_db_measurement *m) {
    show_acc *a = user;
    if (a->n++ == 0)
        fprintf(stderr, "  %-58s %-8s %10s %9s\n", "configuration", "status", "median ms", "TFLOP/s");
    if (a->n > 20) return 0;
    fprintf(stderr, "  %-58s %-8s %10.4f %9.1f\n", m->config_name, m->status,
            isnan(m->median_ms) ? 0.0 : m->median_ms, isnan(m->tflops) ? 0.0 : m->tflops);
    return 0;
}

/* What the database holds for this shape (read-only; nothing is created). */
static void show_db_for_shape(const fm_tune_opts *o, const char *device) {
    char err[512] = "";
    fm_db *db = NULL;
    if (access(o->db_path, F_OK) != 0) {
        fprintf(stderr, "database %s: does not exist yet\n", o->db_path);
        return;
    }
    if (fm_db_open(&db, o->db_path, FM_DB_READONLY, err, sizeof err) != FM_OK) {
        fprintf(stderr, "database %s: %s\n", o->db_path, err);
        return;
    }
    fm_db_filter f;
    memset(&f, 0, sizeof f);
    f.device_name = device;
    f.op = o->op->name;
    f.dtype = o->prob.dtype;
    f.shape = o->prob.shape;
    show_acc a = {0};
    fprintf(stderr, "database %s holds for %s %s %s%s%s:\n", o->db_path, o->op->name,
            o->prob.dtype, o->prob.shape, device ? " on " : "", device ? device : "");
    fm_db_foreach_measurement(db, &f, show_measurement, &a, err, sizeof err);
    if (!a.n) fprintf(stderr, "  nothing\n");
    fm_db_close(db);
}

static int gcd_int(int a, int b) {
    while (b) {
        int t = a % b;
        a = b;
        b = t;
    }
    return a;
}

void fm_tune_spread_order(int *idx, int n) {
    if (n < 3) return;
    /* the coprime stride nearest to the golden section (1 is coprime with n: this ends) */
    const int s0 = (int)(0.618034 * n + 0.5);
    int s = s0;
    for (int d = 1; gcd_int(s, n) != 1; d++) {
        if (s0 - d >= 1 && gcd_int(s0 - d, n) == 1) s = s0 - d;
        else if (s0 + d < n) s = s0 + d;
    }
    int *tmp = malloc((size_t)n * sizeof *tmp);
    if (!tmp) return; /* keep the enumeration order */
    for (int k = 0; k < n; k++) tmp[k] = idx[(int)((long long)k * s % n)];
    memcpy(idx, tmp, (size_t)n * sizeof *tmp);
    free(tmp);
}

/* ---- the whole run ------------------------------------------------------------------------ */

int fm_tune(const fm_tune_opts *o) {
    double t_start = now_s();
    char err[1024] = "";
    /* An existing database must be readable before any work is spent: a corrupt file is an
     * error now, not after an hour of tuning. */
    if (access(o->db_path, F_OK) == 0) {
        fm_db *check = NULL;
        if (fm_db_open(&check, o->db_path, FM_DB_READONLY, err, sizeof err) != FM_OK) {
            fprintf(stderr, "fmtune: database %s: %s\n", o->db_path, err);
            return FM_EXIT_DATABASE;
        }
        fm_db_close(check);
    }
    fm_probe pr;
    fm_probe_gpu(&pr);
    int arch;
    fm_limits lim;
    if (pr.present) {
        if (!fm_gpu_matches(o->gpu, pr.name)) {
            fprintf(stderr, "fmtune: --gpu %s does not match the GPU present (%s); use --gpu auto "
                    "or name this card\n", o->gpu, pr.name);
            return FM_EXIT_MISMATCH;
        }
        arch = pr.cc_major * 10 + pr.cc_minor;
        fm_arch_limits(arch, &lim);
        if (pr.smem_optin > 0) lim.smem_per_block = pr.smem_optin;
    } else {
        arch = fm_gpu_arch(o->gpu);
        if (!arch) arch = 90;
        fm_arch_limits(arch, &lim);
    }

    fm_generator *gen = NULL;
    if (fm_generator_open(&gen, err, sizeof err) != FM_OK) {
        fprintf(stderr, "fmtune: %s\n", err);
        return FM_EXIT_USAGE;
    }
    /* enumerate every family of the op */
    enum_acc acc;
    memset(&acc, 0, sizeof acc);
    char fams[512];
    snprintf(fams, sizeof fams, "%s", o->families ? o->families : o->op->families);
    int nfam = 0;
    char *save = NULL;
    for (char *f = strtok_r(fams, ",", &save); f; f = strtok_r(NULL, ",", &save)) {
        fm_status s = fm_generator_enumerate(gen, f, &o->prob.p, &lim, collect, &acc, err, sizeof err);
        if (s != FM_OK) {
            fprintf(stderr, "fmtune: %s\n", err);
            fm_generator_close(gen);
            free(acc.v);
            return FM_EXIT_USAGE;
        }
        nfam++;
    }
    fprintf(stderr, "fmtune: %s %s %s on %s (sm_%d): %d variants in %d families, %d culled\n",
            o->op->name, o->prob.dtype, o->prob.shape, pr.present ? pr.name : "no GPU", arch,
            acc.n, nfam, acc.culled);
    for (int i = 0; i < acc.nreasons; i++)
        fprintf(stderr, "  culled %3d: %s\n", acc.reason_count[i], acc.reasons[i]);
    variant *v = acc.v;
    int nv = acc.n;
    if (o->match && o->match[0]) { /* keep the matching variants, in enumeration order */
        int kept = 0;
        for (int i = 0; i < nv; i++) {
            if (strstr(v[i].cfg.name, o->match)) {
                if (kept != i) v[kept] = v[i];
                kept++;
            } else {
                fm_rendered_free(&v[i].r);
            }
        }
        fprintf(stderr, "fmtune: --match %s: %d of %d variants\n", o->match, kept, nv);
        nv = kept;
        if (nv == 0) {
            fprintf(stderr, "fmtune: no variant name contains \"%s\" (fmtune list shows them)\n",
                    o->match);
            fm_generator_close(gen);
            free(acc.v);
            return FM_EXIT_USAGE;
        }
    }
    if (o->max_variants > 0 && nv > o->max_variants) {
        for (int i = o->max_variants; i < nv; i++) fm_rendered_free(&v[i].r);
        nv = o->max_variants;
    }

    /* database: opened for writing only when there is something to measure */
    recorder rc;
    memset(&rc, 0, sizeof rc);
    rc.o = o;
    rc.device_name = pr.name;
    if (pr.present) {
        if (fm_db_open(&rc.db, o->db_path, FM_DB_CREATE, err, sizeof err) != FM_OK) {
            fprintf(stderr, "fmtune: database %s: %s\n", o->db_path, err);
            fm_generator_close(gen);
            free(v);
            return FM_EXIT_DATABASE;
        }
        fm_db_device dv;
        memset(&dv, 0, sizeof dv);
        snprintf(dv.name, sizeof dv.name, "%s", pr.name);
        dv.cc_major = pr.cc_major;
        dv.cc_minor = pr.cc_minor;
        dv.sm_count = pr.sm_count;
        dv.mem_bytes = pr.mem_bytes;
        dv.driver_version = pr.driver_version;
        dv.nvrtc_version = fm_nvrtc_version();
        if (fm_db_upsert_device(rc.db, &dv, &rc.device_id, err, sizeof err) != FM_OK) {
            fprintf(stderr, "fmtune: database %s: %s\n", o->db_path, err);
            fm_db_close(rc.db);
            fm_generator_close(gen);
            free(v);
            return FM_EXIT_DATABASE;
        }
        if (!o->retune)
            for (int i = 0; i < nv; i++) {
                int found = 0;
                fm_db_has_measurement(rc.db, pr.name, o->op->name, o->prob.dtype, o->prob.shape,
                                      v[i].cfg.name, &found, err, sizeof err);
                /* --rerank: nothing new is timed; the sustained phase takes the candidates
                 * from the database's rows */
                v[i].skip = found || o->rerank;
            }
    }

    /* render (one Lua state, so sequential) and compile (NVRTC, in parallel) */
    int nskip = 0, nrender_fail = 0;
    for (int i = 0; i < nv; i++) {
        nskip += v[i].skip;
        if (fm_generator_render(gen, &v[i].cfg, &v[i].r, err, sizeof err) != FM_OK) {
            v[i].compiled = -1;
            v[i].log = strdup(err);
            nrender_fail++;
        }
    }
    fm_generator_close(gen);
    if (o->rerank)
        fprintf(stderr, "fmtune: --rerank: nothing new is timed; the fastest variants %s holds "
                "for this shape are timed under sustained load\n", o->db_path);
    else if (nskip)
        fprintf(stderr, "fmtune: %d of %d variants already measured in %s (resuming; --retune "
                "measures them again)\n", nskip, nv, o->db_path);
    fm_jit *jit = NULL;
    fm_jit_open(&jit, o->cache_dir);
    compile_job cj = {v, nv, 0, arch, jit, PTHREAD_MUTEX_INITIALIZER, 0, now_s(), isatty(2)};
    int jobs = o->jobs > 0 ? o->jobs : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (jobs < 1) jobs = 1;
    if (jobs > 64) jobs = 64;
    pthread_t th[64];
    int started = 0;
    for (int i = 0; i < jobs; i++)
        if (pthread_create(&th[i], NULL, compile_worker, &cj) == 0) started++;
    if (!started) compile_worker(&cj);
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    fm_jit_close(jit);
    double compile_wall = now_s() - cj.t0;
    if (cj.tty) fprintf(stderr, "\n");

    /* static rejection */
    int ncompiled = 0, nfailed = 0, nrejected = 0;
    double compile_sum = 0;
    int *todo = calloc((size_t)nv + 1, sizeof *todo);
    int ntodo = 0;
    for (int i = 0; i < nv; i++) {
        variant *x = &v[i];
        if (x->skip) continue;
        if (x->compiled != 1) {
            nfailed++;
            snprintf(x->status, sizeof x->status, "compile_error");
            snprintf(x->detail, sizeof x->detail, "%.255s", x->log ? x->log : "");
            fprintf(stderr, "compile error in %s:\n%.2000s\n", x->cfg.name, x->log ? x->log : "");
            record(&rc, x);
            continue;
        }
        ncompiled++;
        if (!x->ci.from_cache) compile_sum += x->ci.compile_ms;
        if (x->ci.spill_stores || x->ci.spill_loads) {
            nrejected++;
            snprintf(x->status, sizeof x->status, "rejected");
            snprintf(x->detail, sizeof x->detail, "spills: %d bytes stored, %d loaded (%d registers)",
                     x->ci.spill_stores, x->ci.spill_loads, x->ci.registers);
            record(&rc, x);
            continue;
        }
        if (x->ci.wgmma_serialized) {
            /* every product would wait for the previous one: never worth timing */
            nrejected++;
            snprintf(x->status, sizeof x->status, "rejected");
            snprintf(x->detail, sizeof x->detail,
                     "ptxas serialised its wgmma (%d registers)", x->ci.registers);
            record(&rc, x);
            continue;
        }
        if (x->r.smem_bytes + x->ci.static_smem > lim.smem_per_block) {
            nrejected++;
            snprintf(x->status, sizeof x->status, "rejected");
            snprintf(x->detail, sizeof x->detail, "shared memory %d + %d > %d",
                     x->r.smem_bytes, x->ci.static_smem, lim.smem_per_block);
            record(&rc, x);
            continue;
        }
        todo[ntodo++] = i;
    }
    int fresh = 0;
    for (int i = 0; i < nv; i++) fresh += v[i].compiled == 1 && !v[i].ci.from_cache;
    fprintf(stderr, "fmtune: compiled %d (%d fresh, %.0f ms each on average, %.1f s wall on %d "
            "threads), %d failed, %d rejected statically (spills or shared memory)\n",
            ncompiled, fresh, fresh ? compile_sum / fresh : 0.0, compile_wall, jobs, nfailed,
            nrejected);

    int rc_exit = FM_EXIT_OK;
    if (!pr.present) {
        fprintf(stderr, "fmtune: would time %d variants of %s %s %s\n", ntodo, o->op->name,
                o->prob.dtype, o->prob.shape);
        show_db_for_shape(o, NULL);
        fprintf(stderr, "tuning wall time %.1f s\n", now_s() - t_start);
        fprintf(stderr, "fmtune: no GPU to measure on: %s\n", pr.why);
        for (int i = 0; i < nv; i++) {
            free(v[i].log);
            fm_rendered_free(&v[i].r);
        }
        free(todo);
        free(acc.v);
        return FM_EXIT_NO_GPU;
    } else {
        double t_measure = now_s();
        /* A budget may stop the measuring early. In enumeration order that cut the later
         * families and pipelines out entirely (on an H200, Mixtral-8x7B at T = 16384 kept a
         * cp.async tile at 24.1 ms; the warp-specialised one it never reached ran 19.4 ms). */
        if (o->budget_s > 0) fm_tune_spread_order(todo, ntodo);
        int ok = ntodo ? measure(o, v, nv, todo, ntodo, &rc) : 0;
        if (o->sustained >= 2) sustained_phase(o, v, nv, &rc);
        int nskipped = 0;
        for (int q = 0; q < ntodo; q++) nskipped += !strcmp(v[todo[q]].status, "skipped");
        fprintf(stderr, "fmtune: measured %d variants in %.1f s, %d correct%s", ntodo - nskipped,
                now_s() - t_measure, ok, nskipped ? "" : "\n");
        if (nskipped) fprintf(stderr, ", %d not reached within --budget\n", nskipped);
        if (ntodo && !ok && !nskip) rc_exit = FM_EXIT_FAILED;
    }

    /* summary */
    variant **order = calloc((size_t)nv + 1, sizeof *order);
    int no = 0;
    for (int i = 0; i < nv; i++)
        if (v[i].status[0]) order[no++] = &v[i];
    qsort(order, (size_t)no, sizeof *order, cmp_variant);
    if (pr.present && no) {
        printf("\n%-4s %-60s %-13s %10s %9s %9s %5s\n", "rank", "configuration", "status",
               "median ms", "TFLOP/s", "rel err", "regs");
        for (int i = 0; i < no; i++) {
            variant *x = order[i];
            if (!strcmp(x->status, "ok"))
                printf("%-4d %-60s %-13s %10.4f %9.1f %9.1e %5d\n", i + 1, x->cfg.name, x->status,
                       x->median, x->tflops, x->rel_err, x->ci.registers);
            else
                printf("%-4s %-60s %-13s %.60s\n", "-", x->cfg.name, x->status, x->detail);
        }
    }
    if (rc.db) {
        fm_db_best b;
        if (fm_db_lookup_best(rc.db, pr.name, o->op->name, o->prob.dtype, o->prob.shape, &b, err,
                              sizeof err) == FM_OK)
            printf("\nbest for %s %s %s on %s: %s  %.4f ms  %.1f TFLOP/s  (recorded in %s)\n",
                   o->op->name, o->prob.dtype, o->prob.shape, pr.name, b.config_name, b.median_ms,
                   b.tflops, o->db_path);
    }
    printf("tuning wall time %.1f s\n", now_s() - t_start);
    if (o->json) {
        printf("{\"op\":");
        json_str(stdout, o->op->name);
        printf(",\"dtype\":");
        json_str(stdout, o->prob.dtype);
        printf(",\"shape\":");
        json_str(stdout, o->prob.shape);
        printf(",\"device\":");
        json_str(stdout, pr.present ? pr.name : "");
        printf(",\"variants\":[");
        for (int i = 0; i < no; i++) {
            variant *x = order[i];
            printf("%s{\"config\":", i ? "," : "");
            json_str(stdout, x->cfg.name);
            printf(",\"status\":");
            json_str(stdout, x->status);
            printf(",\"median_ms\":%.6f,\"tflops\":%.3f,\"rel_err\":%.3e,\"registers\":%d,"
                   "\"compile_ms\":%.1f}",
                   x->median, x->tflops, x->rel_err, x->ci.registers, x->ci.compile_ms);
        }
        printf("]}\n");
    }
    for (int i = 0; i < nv; i++) {
        free(v[i].log);
        fm_rendered_free(&v[i].r);
    }
    free(order);
    free(todo);
    free(acc.v);
    fm_db_close(rc.db);
    return rc_exit;
}
