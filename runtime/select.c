/*
 * select.c - which configuration serves a call.
 *
 * Order (CLBlast-like, with the user's data first):
 *   1. the exact tuned best for this device and shape, in the user's database, then the shipped one;
 *   2. the nearest tuned shape of this device (the operation's distance decides what may stand in);
 *   3. the nearest tuned shape of any device of the same architecture (an H200 entry for an H100);
 *   4. steps 1-3 for the other 16-bit type (bf16 data for an fp16 call and the other way round),
 *      the configuration taken over with this call's type: the kernels of the two types differ
 *      only in their element conversions (same tiles, pipelines and tensor-core rate), so the
 *      configuration tuned for one is a far better guess for the other than the default;
 *   5. the operation's per-architecture default.
 * The answer is remembered per (op, dtype, shape) for the life of the context (ctx->memo), so
 * the database is read once per new shape, not once per call.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct fm_memo {
    char key[200];
    fm_config cfg;
    fm_selection sel;
    struct fm_memo *next;
};

void fm_select_forget(fm_context *ctx) {
    for (struct fm_memo *m = ctx->memo, *n; m; m = n) {
        n = m->next;
        free(m);
    }
    ctx->memo = NULL;
}

typedef struct nearest {
    fm_shape_distance dist;
    const char *want;
    const char *skip_device; /* pass 3: other devices only */
    int arch;                /* pass 3: same architecture only */
    double best;
    fm_db_best hit;
    int found;
} nearest;

static int consider(void *user, const fm_db_best *b) {
    nearest *n = user;
    if (n->skip_device && strcmp(b->device_name, n->skip_device) == 0) return 0;
    if (n->arch && b->cc_major * 10 + b->cc_minor != n->arch) return 0;
    double d = n->dist ? n->dist(n->want, b->shape) : -1.0;
    if (d < 0) return 0;
    if (!n->found || d < n->best) {
        n->best = d;
        n->hit = *b;
        n->found = 1;
    }
    return 0;
}

static fm_status from_best(fm_context *ctx, const fm_db_best *b, fm_config *out) {
    memset(out, 0, sizeof *out);
    snprintf(out->family, sizeof out->family, "%s", b->family);
    snprintf(out->name, sizeof out->name, "%s", b->config_name);
    if (fm_config_parse_params(out, b->params))
        return fm_set_error(ctx, FM_ERR_DATABASE, "database entry %s has unreadable parameters '%s'",
                            b->config_name, b->params);
    return FM_OK;
}

static fm_status lookup(fm_context *ctx, const char *op, const char *dtype, const char *shape,
                        fm_shape_distance dist, fm_config *out, fm_selection *sel, int *found) {
    fm_db *dbs[2] = {ctx->db_user, ctx->db_shipped};
    char err[512] = "";
    *found = 0;
    for (int i = 0; i < 2; i++) {
        if (!dbs[i]) continue;
        fm_db_best b;
        fm_status s = fm_db_lookup_best(dbs[i], ctx->device_name, op, dtype, shape, &b, err,
                                        sizeof err);
        if (s == FM_OK) {
            sel->source = FM_SOURCE_EXACT;
            snprintf(sel->tuned_shape, sizeof sel->tuned_shape, "%s", b.shape);
            *found = 1;
            return from_best(ctx, &b, out);
        }
        if (s != FM_ERR_NOT_FOUND) return fm_set_error(ctx, s, "tuning database: %s", err);
    }
    for (int pass = 0; pass < 2; pass++) {
        nearest n;
        memset(&n, 0, sizeof n);
        n.dist = dist;
        n.want = shape;
        n.skip_device = pass ? ctx->device_name : NULL;
        n.arch = pass ? ctx->arch : 0;
        for (int i = 0; i < 2; i++) {
            if (!dbs[i]) continue;
            fm_status s = fm_db_foreach_best(dbs[i], pass ? NULL : ctx->device_name, op, dtype,
                                             consider, &n, err, sizeof err);
            if (s != FM_OK) return fm_set_error(ctx, s, "tuning database: %s", err);
            if (n.found && pass == 0 && i == 0) break; /* the user's own data wins */
        }
        if (n.found) {
            sel->source = FM_SOURCE_NEAREST;
            snprintf(sel->tuned_shape, sizeof sel->tuned_shape, "%s", n.hit.shape);
            *found = 1;
            return from_best(ctx, &n.hit, out);
        }
    }
    return FM_OK;
}

/* The other 16-bit element type, or NULL. */
static const char *sibling_dtype(const char *dtype) {
    if (strcmp(dtype, "bf16") == 0) return "fp16";
    if (strcmp(dtype, "fp16") == 0) return "bf16";
    return NULL;
}

/* Step 4 (see the header): the other type's entry as a configuration of `dtype`, named anew.
 * *found stays 0 when there is none, or when the family does not name it in this type (a
 * configuration the generator no longer has); the default serves then. */
static fm_status lookup_sibling(fm_context *ctx, const char *op, const char *dtype,
                                const char *shape, fm_shape_distance dist, fm_config *out,
                                fm_selection *sel, int *found) {
    const char *sib = sibling_dtype(dtype);
    *found = 0;
    if (!sib) return FM_OK;
    fm_config c;
    fm_status s = lookup(ctx, op, sib, shape, dist, &c, sel, found);
    if (s != FM_OK || !*found) return s;
    char err[512] = "";
    if (fm_config_set_str(&c, "dtype", dtype) != 0 ||
        fm_generator_name(ctx->gen, &c, err, sizeof err) != FM_OK) {
        *found = 0;
        return FM_OK;
    }
    sel->source = FM_SOURCE_OTHER_DTYPE;
    *out = c;
    return FM_OK;
}

fm_status fm_select(fm_context *ctx, const char *op, const char *dtype, const char *shape,
                    fm_shape_distance dist, const fm_config *dflt, fm_config *out,
                    fm_selection *sel) {
    char key[200];
    snprintf(key, sizeof key, "%s|%s|%s", op, dtype, shape);
    fm_selection local;
    if (!sel) sel = &local;
    memset(sel, 0, sizeof *sel);

    pthread_mutex_lock(&ctx->lock); /* guards the memo and the SQLite connections */
    for (struct fm_memo *m = ctx->memo; m; m = m->next)
        if (strcmp(m->key, key) == 0) {
            *out = m->cfg;
            *sel = m->sel;
            pthread_mutex_unlock(&ctx->lock);
            return FM_OK;
        }
    int found = 0;
    fm_status s = lookup(ctx, op, dtype, shape, dist, out, sel, &found);
    if (s == FM_OK && !found) s = lookup_sibling(ctx, op, dtype, shape, dist, out, sel, &found);
    if (s != FM_OK) {
        pthread_mutex_unlock(&ctx->lock);
        return s;
    }
    if (!found) {
        *out = *dflt;
        sel->source = FM_SOURCE_DEFAULT;
        sel->tuned_shape[0] = 0;
    }
    snprintf(sel->config, sizeof sel->config, "%s", out->name);

    struct fm_memo *m = calloc(1, sizeof *m);
    if (m) { /* without memory we only lose the memo */
        snprintf(m->key, sizeof m->key, "%s", key);
        m->cfg = *out;
        m->sel = *sel;
        m->next = ctx->memo;
        ctx->memo = m;
    }
    pthread_mutex_unlock(&ctx->lock);
    return FM_OK;
}
