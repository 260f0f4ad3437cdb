/*
 * op.h - what the tuner needs to know about one operation (attention forward, MoE, ...).
 *
 * The tuner core (enumerate, compile, isolate, check, time, record) is generic; each operation
 * supplies one fm_op: how to parse its shape, which families implement it, how to build inputs
 * and a reference on the GPU, how to run one configuration and how to judge its output.
 * Everything in setup/run/check runs inside the isolated worker process, so a faulting variant
 * cannot take the tuner down.
 */
#ifndef FM_TUNER_OP_H
#define FM_TUNER_OP_H

#include "../runtime/internal.h"

typedef struct fm_op fm_op;

/* The problem being tuned, as a parameter bag (dtype, head_dim, batch, ...); the generator sees
 * the same bag, so family `problem` fields (dtype, head_dim, causal, ...) are keys of it. */
typedef struct fm_problem {
    fm_config p;        /* family "" ; params: every problem field */
    char shape[160];    /* canonical shape key for the database, e.g. "b=8,sq=4096,...,causal=0" */
    char dtype[8];      /* "bf16" / "fp16" */
} fm_problem;

typedef struct fm_check {
    double max_abs_err, rel_err; /* rel_err = ||out - ref|| / ||ref|| */
    int unwritten;               /* outputs still holding the poison value */
    int nonfinite;               /* NaN/Inf where the reference is finite */
    int ok;
    char detail[160];
} fm_check;

struct fm_op {
    const char *name;          /* "attn_fwd" */
    const char *families;      /* families implementing it, comma separated, best-first */
    /* Parses --shape (and the op's flags already stored in prob->p by the CLI) into prob.
     * Writes a one-line reason into err on a bad shape. */
    fm_status (*parse)(fm_problem *prob, const char *shape_arg, char *err, size_t errlen);
    double (*flops)(const fm_problem *prob);
    /* Worker side: allocate inputs (fresh random data), compute the reference once. */
    fm_status (*setup)(fm_context *ctx, const fm_problem *prob, void **state, char *err,
                       size_t errlen);
    /* Fill outputs with a poison pattern (before a checked run). */
    fm_status (*poison)(void *state, CUstream s);
    /* Run configuration k once on stream s (no synchronisation). `rot` selects one of several
     * input copies so that timing does not run out of L2 (setup decides how many). */
    fm_status (*run)(fm_context *ctx, void *state, const fm_loaded *k, int rot, CUstream s);
    fm_status (*check)(void *state, fm_check *out);
    void (*teardown)(void *state);
};

extern const fm_op fm_op_attn_fwd;
extern const fm_op fm_op_moe;

#endif
