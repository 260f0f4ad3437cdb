/*
 * context.c - the opaque fm_context: device, generator, JIT, databases, loaded kernels.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef FM_SHIPPED_DB_PATH
#define FM_SHIPPED_DB_PATH ""
#endif

static void home_path(char *buf, size_t len, const char *xdg_var, const char *fallback,
                      const char *leaf) {
    const char *xdg = getenv(xdg_var);
    const char *home = getenv("HOME");
    if (xdg && xdg[0])
        snprintf(buf, len, "%s/flashmoe%s", xdg, leaf);
    else if (home && home[0])
        snprintf(buf, len, "%s/%s/flashmoe%s", home, fallback, leaf);
    else
        snprintf(buf, len, "/tmp/flashmoe%s", leaf);
}

void fm_default_user_db_path(char *buf, size_t len) {
    const char *e = getenv("FLASHMOE_DB");
    if (e && e[0])
        snprintf(buf, len, "%s", e);
    else
        home_path(buf, len, "XDG_DATA_HOME", ".local/share", "/tuning.sqlite");
}

void fm_default_shipped_db_path(char *buf, size_t len) {
    const char *e = getenv("FLASHMOE_SHIPPED_DB");
    snprintf(buf, len, "%s", e && e[0] ? e : FM_SHIPPED_DB_PATH);
}

void fm_default_cache_dir(char *buf, size_t len) {
    const char *e = getenv("FLASHMOE_CACHE_DIR");
    if (e)
        snprintf(buf, len, "%s", e);
    else
        home_path(buf, len, "XDG_CACHE_HOME", ".cache", "");
}

/* The opt-in shared memory per block of each architecture, for enumeration without a device. */
void fm_arch_limits(int arch, fm_limits *lim) {
    lim->arch = arch;
    lim->regs_per_sm = 65536;
    switch (arch) {
    case 80: lim->smem_per_block = 166912; break; /* A100: 163 KB */
    case 86:
    case 89: lim->smem_per_block = 101376; break; /* 99 KB */
    case 90: lim->smem_per_block = 232448; break; /* H100/H200: 227 KB */
    default: lim->smem_per_block = arch >= 100 ? 232448 : 101376; break;
    }
}

fm_status fm_context_enter(fm_context *ctx) {
    CUresult r = ctx->drv->cuCtxPushCurrent(ctx->cuctx);
    return r == CUDA_SUCCESS ? FM_OK : fm_cuda_error(ctx, ctx->drv, r, "cuCtxPushCurrent");
}

void fm_context_leave(fm_context *ctx) {
    CUcontext dummy;
    ctx->drv->cuCtxPopCurrent(&dummy);
}

static fm_status open_db(fm_context *ctx, fm_db **db, const char *path, int must_exist) {
    *db = NULL;
    if (!path[0]) return FM_OK;
    if (access(path, F_OK) != 0) {
        if (!must_exist) return FM_OK;
        return fm_set_error(NULL, FM_ERR_DATABASE, "no tuning database at %s", path);
    }
    char err[512] = "";
    fm_status s = fm_db_open(db, path, FM_DB_READONLY, err, sizeof err);
    if (s != FM_OK) return fm_set_error(NULL, s, "tuning database %s: %s", path, err);
    (void)ctx;
    return FM_OK;
}

fm_status fm_context_create(fm_context **out, int device) {
    fm_context_options o;
    memset(&o, 0, sizeof o);
    o.device = device;
    return fm_context_create_v2(out, &o);
}

fm_status fm_context_create_v2(fm_context **out, const fm_context_options *opts) {
    if (!out || !opts) return fm_set_error(NULL, FM_ERR_INVALID_ARGUMENT, "NULL argument");
    *out = NULL;
    char why[256] = "";
    const fm_driver *drv = fm_driver_get(why, sizeof why);
    if (!drv) return fm_set_error(NULL, FM_ERR_NO_DEVICE, "%s", why);
    int count = 0;
    drv->cuDeviceGetCount(&count);
    if (opts->device < 0 || opts->device >= count)
        return fm_set_error(NULL, FM_ERR_INVALID_ARGUMENT, "device %d does not exist (%d present)",
                            opts->device, count);
    fm_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return fm_set_error(NULL, FM_ERR_OUT_OF_MEMORY, "out of host memory");
    ctx->drv = drv;
    ctx->device_ordinal = opts->device;
    pthread_mutex_init(&ctx->lock, NULL);
    fm_status s = FM_OK;
    CUresult r = drv->cuDeviceGet(&ctx->dev, opts->device);
    if (r == CUDA_SUCCESS) r = drv->cuDevicePrimaryCtxRetain(&ctx->cuctx, ctx->dev);
    if (r != CUDA_SUCCESS) {
        s = fm_cuda_error(NULL, drv, r, "opening the device");
        pthread_mutex_destroy(&ctx->lock);
        free(ctx);
        return s;
    }
    int major = 0, minor = 0, smem = 0;
    drv->cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, ctx->dev);
    drv->cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, ctx->dev);
    drv->cuDeviceGetAttribute(&ctx->sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, ctx->dev);
    drv->cuDeviceGetAttribute(&smem, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                              ctx->dev);
    drv->cuDeviceGetName(ctx->device_name, (int)sizeof ctx->device_name, ctx->dev);
    ctx->arch = major * 10 + minor;
    fm_arch_limits(ctx->arch, &ctx->limits);
    if (smem > 0) ctx->limits.smem_per_block = smem;

    char err[512] = "";
    if (fm_generator_open(&ctx->gen, err, sizeof err) != FM_OK) {
        s = fm_set_error(NULL, FM_ERR_GENERATOR, "%s", err);
        goto fail;
    }
    char cache[1024];
    if (opts->cache_dir)
        snprintf(cache, sizeof cache, "%s", opts->cache_dir);
    else
        fm_default_cache_dir(cache, sizeof cache);
    if ((s = fm_jit_open(&ctx->jit, cache)) != FM_OK) {
        fm_set_error(NULL, s, "cannot set up the JIT");
        goto fail;
    }
    if (!opts->no_database) {
        if (opts->db_path)
            snprintf(ctx->db_user_path, sizeof ctx->db_user_path, "%s", opts->db_path);
        else
            fm_default_user_db_path(ctx->db_user_path, sizeof ctx->db_user_path);
        fm_default_shipped_db_path(ctx->db_shipped_path, sizeof ctx->db_shipped_path);
        /* A database the caller named must exist; the default ones may be absent. */
        if ((s = open_db(ctx, &ctx->db_user, ctx->db_user_path, opts->db_path != NULL)) != FM_OK)
            goto fail;
        if ((s = open_db(ctx, &ctx->db_shipped, ctx->db_shipped_path, 0)) != FM_OK) goto fail;
    }
    *out = ctx;
    return FM_OK;
fail:
    fm_context_destroy(ctx);
    return s;
}

void fm_context_destroy(fm_context *ctx) {
    if (!ctx) return;
    int entered = ctx->cuctx && fm_context_enter(ctx) == FM_OK;
    for (fm_loaded *k = ctx->loaded, *n; k; k = n) {
        n = k->next;
        if (entered) ctx->drv->cuModuleUnload(k->module);
        free(k);
    }
    if (entered) fm_context_leave(ctx);
    fm_select_forget(ctx);
    if (ctx->cuctx) ctx->drv->cuDevicePrimaryCtxRelease(ctx->dev);
    fm_generator_close(ctx->gen);
    fm_jit_close(ctx->jit);
    fm_db_close(ctx->db_user);
    fm_db_close(ctx->db_shipped);
    pthread_mutex_destroy(&ctx->lock);
    free(ctx);
}

/* Called with ctx->lock held. */
static fm_status load_locked(fm_context *ctx, const fm_config *c, const fm_loaded **out) {
    for (fm_loaded *k = ctx->loaded; k; k = k->next)
        if (strcmp(k->name, c->name) == 0) {
            *out = k;
            return FM_OK;
        }
    char err[1024] = "";
    fm_rendered r;
    fm_status s = fm_generator_render(ctx->gen, c, &r, err, sizeof err);
    if (s != FM_OK) return fm_set_error(ctx, s, "%s", err);
    if (r.min_arch > ctx->arch) {
        fm_rendered_free(&r);
        return fm_set_error(ctx, FM_ERR_UNSUPPORTED, "%s needs sm_%d, device is sm_%d", c->name,
                            r.min_arch, ctx->arch);
    }
    if (r.smem_bytes > ctx->limits.smem_per_block) {
        fm_rendered_free(&r);
        return fm_set_error(ctx, FM_ERR_UNSUPPORTED, "%s needs %d bytes of shared memory, device "
                            "allows %d", c->name, r.smem_bytes, ctx->limits.smem_per_block);
    }
    void *cubin = NULL;
    size_t size = 0;
    fm_compile_info info;
    char *log = NULL;
    s = fm_jit_compile(ctx->jit, c->name, &r, ctx->arch, &cubin, &size, &info, &log);
    if (s != FM_OK) {
        fm_set_error(ctx, s, "NVRTC failed on %s:\n%s", c->name, log ? log : "(no log)");
        free(log);
        fm_rendered_free(&r);
        return s;
    }
    free(log);
    fm_loaded *k = calloc(1, sizeof *k);
    if (!k) {
        free(cubin);
        fm_rendered_free(&r);
        return fm_set_error(ctx, FM_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    snprintf(k->name, sizeof k->name, "%s", c->name);
    k->cfg = *c;
    k->threads = r.threads;
    k->smem_bytes = r.smem_bytes;
    k->launch = r.launch;
    const fm_driver *d = ctx->drv;
    if ((s = fm_context_enter(ctx)) == FM_OK) {
        CUresult cr = d->cuModuleLoadData(&k->module, cubin);
        if (cr == CUDA_SUCCESS) cr = d->cuModuleGetFunction(&k->fn, k->module, r.entry);
        if (cr == CUDA_SUCCESS && r.smem_bytes > 48 * 1024)
            cr = d->cuFuncSetAttribute(k->fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       r.smem_bytes);
        if (cr != CUDA_SUCCESS) {
            char what[256];
            snprintf(what, sizeof what, "loading %s", c->name);
            s = fm_cuda_error(ctx, d, cr, what);
            if (k->module) d->cuModuleUnload(k->module);
        }
        fm_context_leave(ctx);
    }
    free(cubin);
    fm_rendered_free(&r);
    if (s != FM_OK) {
        free(k);
        return s;
    }
    k->next = ctx->loaded;
    ctx->loaded = k;
    *out = k;
    return FM_OK;
}

fm_status fm_context_load(fm_context *ctx, const fm_config *c, const fm_loaded **out) {
    pthread_mutex_lock(&ctx->lock);
    fm_status s = load_locked(ctx, c, out);
    pthread_mutex_unlock(&ctx->lock);
    return s;
}

/* ---- compiling many configurations at once ------------------------------------------------ */

typedef struct precompile {
    fm_context *ctx;
    fm_rendered *r;
    const fm_config *cfgs;
    fm_status *status;
    int n, next;
    pthread_mutex_t lock;
} precompile;

static void *precompile_worker(void *arg) {
    precompile *p = arg;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        int i = p->next < p->n ? p->next++ : -1;
        pthread_mutex_unlock(&p->lock);
        if (i < 0) return NULL;
        if (p->status[i] != FM_OK) continue;
        void *cubin = NULL;
        size_t size = 0;
        fm_compile_info info;
        p->status[i] = fm_jit_compile(p->ctx->jit, p->cfgs[i].name, &p->r[i], p->ctx->arch, &cubin,
                                      &size, &info, NULL);
        free(cubin);
    }
}

/* Renders and compiles n configurations on `threads` threads into the JIT caches, so that the
 * fm_context_load calls that follow only load. status[i] (if not NULL) gets each result. */
fm_status fm_context_precompile(fm_context *ctx, const fm_config *cfgs, int n, int threads,
                                fm_status *status) {
    fm_rendered *r = calloc((size_t)n + 1, sizeof *r);
    fm_status *st = status ? status : calloc((size_t)n + 1, sizeof *st);
    if (!r || !st) {
        free(r);
        if (!status) free(st);
        return fm_set_error(ctx, FM_ERR_OUT_OF_MEMORY, "out of host memory");
    }
    char err[512];
    pthread_mutex_lock(&ctx->lock); /* the Lua state is not thread-safe */
    for (int i = 0; i < n; i++) st[i] = fm_generator_render(ctx->gen, &cfgs[i], &r[i], err, sizeof err);
    pthread_mutex_unlock(&ctx->lock);
    precompile p = {ctx, r, cfgs, st, n, 0, PTHREAD_MUTEX_INITIALIZER};
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    pthread_t th[64];
    int started = 0;
    for (int i = 0; i < threads; i++)
        if (pthread_create(&th[i], NULL, precompile_worker, &p) == 0) started++;
    if (!started) precompile_worker(&p);
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    fm_status worst = FM_OK;
    for (int i = 0; i < n; i++) {
        fm_rendered_free(&r[i]);
        if (st[i] != FM_OK) worst = st[i];
    }
    free(r);
    if (!status) free(st);
    return worst;
}
