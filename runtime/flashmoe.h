/*
 * flashmoe.h - the one public header of libflashmoe.
 *
 * flashmoe serves tuned attention-forward and fused mixture-of-experts kernels for the GPU in hand.
 * Every call returns an fm_status; on failure fm_last_error(ctx) gives a message naming the cause.
 * The library never prints and never exits. A context may be used from several threads at once.
 *
 * Life cycle: fm_context_create -> fm_attention_fwd / fm_moe_fwd ... -> fm_context_destroy.
 * Tensors are device pointers owned by the caller; strides are in elements, not bytes.
 */
#ifndef FLASHMOE_H
#define FLASHMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FM_VERSION_MAJOR 0
#define FM_VERSION_MINOR 1
#define FM_VERSION_PATCH 0
#define FM_VERSION_NUMBER (FM_VERSION_MAJOR * 10000 + FM_VERSION_MINOR * 100 + FM_VERSION_PATCH)
#define FM_VERSION_STRING "0.1.0"

/* Status codes. Values are pinned: new codes are only ever appended. */
typedef enum fm_status {
    FM_OK = 0,
    FM_ERR_INVALID_ARGUMENT = 1, /* a shape, stride, pointer or flag the call cannot accept */
    FM_ERR_UNSUPPORTED = 2,      /* valid in general, not supported here (dtype, head dim, arch) */
    FM_ERR_NO_DEVICE = 3,        /* no CUDA driver or no GPU */
    FM_ERR_CUDA = 4,             /* the CUDA driver returned an error */
    FM_ERR_COMPILE = 5,          /* NVRTC failed; the message carries its log */
    FM_ERR_DATABASE = 6,         /* the tuning database is missing, corrupt or unwritable */
    FM_ERR_GENERATOR = 7,        /* the Lua generator failed */
    FM_ERR_OUT_OF_MEMORY = 8,
    FM_ERR_IO = 9,
    FM_ERR_NOT_FOUND = 10,
    FM_ERR_INTERNAL = 11
} fm_status;

typedef enum fm_dtype { FM_DTYPE_BF16 = 0, FM_DTYPE_FP16 = 1 } fm_dtype;

typedef struct fm_context fm_context; /* opaque */

/* Options for fm_context_create_v2. Zero-initialise, then set what you need. */
typedef struct fm_context_options {
    int device;              /* CUDA device ordinal */
    const char *db_path;     /* tuning database; NULL: $FLASHMOE_DB, else the installed default */
    const char *cache_dir;   /* compiled-kernel cache; NULL: $FLASHMOE_CACHE_DIR, else
                                $XDG_CACHE_HOME/flashmoe or ~/.cache/flashmoe; "" disables it */
    int no_database;         /* 1: never open a database (per-architecture defaults only) */
} fm_context_options;

/* Creates a context on device `device` with default options. Uses the device's primary context,
 * so it works beside the CUDA runtime (and frameworks built on it) on the same streams. */
fm_status fm_context_create(fm_context **out, int device);
fm_status fm_context_create_v2(fm_context **out, const fm_context_options *opts);
void fm_context_destroy(fm_context *ctx); /* accepts NULL */

/* Message for the last error returned on this context by the calling thread ("" if none).
 * fm_last_error(NULL) gives the message of a failed fm_context_create in this thread. */
const char *fm_last_error(const fm_context *ctx);
const char *fm_status_string(fm_status s);
const char *fm_version(void);        /* run-time version string, e.g. "0.1.0" */
int fm_version_number(void);

/* Attention forward: O = softmax(scale * Q K^T [+ causal mask]) V per (batch, head).
 * Q [B, Sq, H, D], K and V [B, Sk, Hkv, D], O [B, Sq, H, D]; the head dim is contiguous
 * (stride 1) and the other strides are given in elements. H must be a multiple of Hkv (GQA/MQA).
 * Causal masking is aligned to the bottom right: query i sees keys j <= i + Sk - Sq.
 * lse, if not NULL, receives log-sum-exp (natural log, of the scaled scores) as fp32 [B, H, Sq].
 * Pointers must be 16-byte aligned and every stride but the head dim's a multiple of 8.
 * workspace (optional, NULL for none): device scratch of fm_attention_workspace_size bytes, whose
 * use must be ordered with the stream (it is not shared between concurrent calls). With it,
 * configurations that split the last round of tiles over all SMs can do so; without it they
 * run unsplit. */
typedef struct fm_attention_args {
    fm_dtype dtype;
    int batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim;
    int causal;
    float softmax_scale; /* 0: 1/sqrt(head_dim) */
    const void *q, *k, *v;
    void *o;
    float *lse;
    int64_t q_stride[3]; /* batch, seq, head */
    int64_t k_stride[3];
    int64_t v_stride[3];
    int64_t o_stride[3];
    void *workspace;
    size_t workspace_bytes;
} fm_attention_args;

/* Workspace that lets fm_attention_fwd split tiles (depends on the device and head dim only). */
fm_status fm_attention_workspace_size(fm_context *ctx, const fm_attention_args *args,
                                      size_t *bytes);

/* Fills the strides of a contiguous [B, S, H, D] layout. */
void fm_attention_args_contiguous(fm_attention_args *a);

/* stream is a CUstream / cudaStream_t (NULL: the legacy default stream). */
fm_status fm_attention_fwd(fm_context *ctx, const fm_attention_args *args, void *stream);

/* What fm_attention_fwd would run for these arguments, without running it. */
/* How the configuration was found: the tuned entry of this device, shape and type; the nearest
 * tuned shape of this device or of another of the same architecture; the default of the
 * architecture; or (OTHER_DTYPE) the entry found those ways for the other 16-bit type (bf16 for
 * an fp16 call and the other way round), run in this call's type. */
typedef enum fm_source {
    FM_SOURCE_EXACT = 0,
    FM_SOURCE_NEAREST = 1,
    FM_SOURCE_DEFAULT = 2,
    FM_SOURCE_OTHER_DTYPE = 3
} fm_source;
typedef struct fm_selection {
    char config[160];  /* canonical configuration name */
    fm_source source;  /* how it was found */
    char tuned_shape[256]; /* the tuned shape it came from ("" for the default) */
} fm_selection;
fm_status fm_attention_select(fm_context *ctx, const fm_attention_args *args, fm_selection *out);

/* Mixture of experts forward (see fm_moe_args). */
typedef enum fm_moe_routing {
    FM_MOE_ROUTING_SOFTMAX_TOPK = 0, /* softmax over E, top-k, optional renormalisation */
    FM_MOE_ROUTING_SIGMOID_GROUPED = 1 /* DeepSeek-V3: sigmoid + bias, grouped top-k, scaling */
} fm_moe_routing;

typedef struct fm_moe_args {
    fm_dtype dtype;
    int tokens, hidden, intermediate, experts, topk;
    fm_moe_routing routing;
    int renormalize;              /* softmax routing: renormalise the top-k weights */
    int n_group, topk_group;      /* sigmoid routing: groups and groups kept */
    float routed_scaling_factor;  /* sigmoid routing: multiplies the weights (0: 1.0) */
    const void *hidden_states;    /* [T, H] */
    const float *router_logits;   /* [T, E] fp32 */
    const float *correction_bias; /* [E] fp32, sigmoid routing only (may be NULL) */
    const void *w13;              /* [E, 2*I, H]: gate rows 0..I-1, up rows I..2I-1 */
    const void *w2;               /* [E, H, I] */
    void *out;                    /* [T, H] */
    int32_t *topk_ids;            /* optional [T, topk] out */
    float *topk_weights;          /* optional [T, topk] out */
    void *workspace;              /* device scratch of fm_moe_workspace_size bytes */
    size_t workspace_bytes;
} fm_moe_args;

fm_status fm_moe_workspace_size(fm_context *ctx, const fm_moe_args *args, size_t *bytes);
fm_status fm_moe_fwd(fm_context *ctx, const fm_moe_args *args, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* FLASHMOE_H */
