/*
 * error.c - status strings and the per-(context, thread) last-error message.
 *
 * The message is thread-local so that two threads sharing a context each see the error of their
 * own last call. It is keyed by the context pointer: a thread that switches between contexts sees
 * the message only for the context that failed.
 */
#include "internal.h"

#include <stdio.h>

static _Thread_local const fm_context *tl_ctx;
static _Thread_local char tl_msg[4096];

fm_status fm_set_errorv(const fm_context *ctx, fm_status s, const char *fmt, va_list ap) {
    tl_ctx = ctx;
    vsnprintf(tl_msg, sizeof tl_msg, fmt, ap);
    return s;
}

fm_status fm_set_error(const fm_context *ctx, fm_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fm_set_errorv(ctx, s, fmt, ap);
    va_end(ap);
    return s;
}

fm_status fm_cuda_error(const fm_context *ctx, const fm_driver *drv, CUresult r, const char *what) {
    (void)drv;
    char buf[256];
    fm_driver_error_text(r, buf, sizeof buf);
    return fm_set_error(ctx, r == CUDA_ERROR_OUT_OF_MEMORY ? FM_ERR_OUT_OF_MEMORY : FM_ERR_CUDA,
                        "%s: %s", what, buf);
}

const char *fm_last_error(const fm_context *ctx) {
    if (tl_ctx != ctx) return "";
    return tl_msg;
}

const char *fm_status_string(fm_status s) {
    switch (s) {
    case FM_OK: return "ok";
    case FM_ERR_INVALID_ARGUMENT: return "invalid argument";
    case FM_ERR_UNSUPPORTED: return "unsupported";
    case FM_ERR_NO_DEVICE: return "no device";
    case FM_ERR_CUDA: return "CUDA error";
    case FM_ERR_COMPILE: return "compile error";
    case FM_ERR_DATABASE: return "database error";
    case FM_ERR_GENERATOR: return "generator error";
    case FM_ERR_OUT_OF_MEMORY: return "out of memory";
    case FM_ERR_IO: return "I/O error";
    case FM_ERR_NOT_FOUND: return "not found";
    case FM_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

const char *fm_version(void) { return FM_VERSION_STRING; }
int fm_version_number(void) { return FM_VERSION_NUMBER; }
