/*
 * tune.h - the tuning engine behind `fmtune`: enumerate, compile, isolate, check, time, record.
 */
#ifndef FM_TUNE_H
#define FM_TUNE_H

#include "op.h"

typedef struct fm_tune_opts {
    const fm_op *op;
    fm_problem prob;
    const char *gpu;          /* "h100", "h200", "auto" or a name fragment */
    char db_path[1024];
    char cache_dir[1024];
    const char *families;     /* NULL: every family of the op */
    const char *match;        /* NULL: every variant; else only names containing it */
    int max_variants;         /* 0: all */
    double budget_s;          /* 0: none; time for the measuring phase */
    int jobs;                 /* compile threads; 0: number of CPUs */
    int runs;                 /* timed runs per variant (median over them) */
    int json;
    int retune;               /* measure again even what the database already holds */
    int rerank;               /* time nothing new: only re-rank under sustained load what the
                               * database already holds for the shape */
    double variant_timeout_s; /* a variant running longer is killed and recorded "timeout" */
    int sustained;            /* 0, or K >= 2: re-time the K fastest under sustained load */
    int sustain_rounds;       /* worker side: rounds of the sustained timing (0: burst mode) */
    double sustain_ms;        /* worker side: length of one variant's turn in a round */
} fm_tune_opts;

/* Exit codes of fmtune. */
enum {
    FM_EXIT_OK = 0,
    FM_EXIT_NO_GPU = 1,     /* compiled everything, measured nothing */
    FM_EXIT_USAGE = 2,      /* bad flags or shape: nothing written */
    FM_EXIT_MISMATCH = 3,   /* --gpu does not match the card: nothing written */
    FM_EXIT_DATABASE = 4,   /* missing, corrupt or unwritable database */
    FM_EXIT_FAILED = 5      /* nothing passed the correctness check */
};

int fm_tune(const fm_tune_opts *o);
/* `fmtune --worker`: runs a measuring job read from stdin (see tune.c). */
int fm_tune_worker(void);

/* Information about GPU 0 gathered in a short-lived child process, so that the tuner process
 * itself never initialises CUDA (a CUDA context does not survive fork). */
typedef struct fm_probe {
    int present;
    char why[256];
    char name[128];
    int cc_major, cc_minor, sm_count, smem_optin, l2_bytes, driver_version;
    long long mem_bytes;
} fm_probe;
void fm_probe_gpu(fm_probe *p);
/* 1 when --gpu `want` matches the probed card; *arch gets the architecture `want` implies
 * (90 for h100/h200), 0 if unknown. */
int fm_gpu_matches(const char *want, const char *name);
int fm_gpu_arch(const char *want);

/* Reorders idx[0..n) for measuring under --budget: idx[(k * s) mod n], with s the stride
 * nearest to 0.618 n that is coprime with n, so that any prefix samples the whole enumeration
 * (whose order nests the axes: neighbours differ in the innermost axis, whole families and
 * pipelines come one after the other) rather than its first part. A permutation; n < 3 is left
 * as it is. */
void fm_tune_spread_order(int *idx, int n);

#endif
