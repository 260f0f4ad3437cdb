/*
 * test_select.c - which configuration the runtime serves: exact tuned entry, user database before
 * the shipped one, nearest tuned shape (same head dim and causality only), another device of the
 * same architecture, then the per-architecture default; and argument validation. Runs without a
 * GPU: the context is assembled by hand, as fm_context_create would on an H100.
 */
#define _GNU_SOURCE
#include "check.h"
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir[256];

/* One measured configuration (given whole: family, name, every parameter) of type dtype. */
static void add_measured(const char *path, const char *device, int cc, const char *family,
                         const char *config, const char *params, const char *dtype,
                         const char *shape, double ms) {
    char err[512] = "";
    fm_db *db = NULL;
    CHECK(fm_db_open(&db, path, FM_DB_CREATE, err, sizeof err) == FM_OK, "%s", err);
    if (!db) return;
    fm_db_device d;
    memset(&d, 0, sizeof d);
    snprintf(d.name, sizeof d.name, "%s", device);
    d.cc_major = cc / 10;
    d.cc_minor = cc % 10;
    d.sm_count = 132;
    long long did = 0, cid = 0;
    CHECK(fm_db_upsert_device(db, &d, &did, err, sizeof err) == FM_OK, "%s", err);
    CHECK(fm_db_upsert_config(db, family, config, params, "0123456789abcdef", &cid, err,
                              sizeof err) == FM_OK, "%s", err);
    fm_db_measurement m;
    fm_db_measurement_init(&m);
    m.device_id = did;
    m.config_id = cid;
    m.op = "attn_fwd";
    m.dtype = dtype;
    m.shape = shape;
    m.status = "ok";
    m.median_ms = ms;
    m.runs = 10;
    CHECK(fm_db_add_measurement(db, &m, err, sizeof err) == FM_OK, "%s", err);
    fm_db_close(db);
}

/* A bf16 sm80 entry named `config`, its parameters spelled from the name (enough for the
 * runtime to load it). */
static void add(const char *path, const char *device, int cc, const char *shape,
                const char *config, double ms) {
    char params[256];
    long long bm = 0;
    sscanf(strstr(config, "_m") + 2, "%lld", &bm);
    snprintf(params, sizeof params, "dtype=bf16,head_dim=%d,causal=%d,block_m=%lld",
             strstr(config, "_d64_") ? 64 : strstr(config, "_d256_") ? 256 : 128,
             strstr(config, "_c1_") ? 1 : 0, bm);
    add_measured(path, device, cc, "attn_fwd_sm80", config, params, "bf16", shape, ms);
}

/* An entry of type dtype for configuration c, on an sm_90 device. */
static void add_config(const char *path, const char *device, const char *dtype, const char *shape,
                       const fm_config *c, double ms) {
    char params[2304];
    fm_config_params_string(c, params, sizeof params);
    add_measured(path, device, 90, c->family, c->name, params, dtype, shape, ms);
}

static fm_context *fake_context(const char *user, const char *shipped) {
    fm_context *ctx = calloc(1, sizeof *ctx);
    snprintf(ctx->device_name, sizeof ctx->device_name, "NVIDIA H100 80GB HBM3");
    ctx->arch = 90;
    ctx->sm_count = 132;
    fm_arch_limits(90, &ctx->limits);
    pthread_mutex_init(&ctx->lock, NULL);
    char err[512];
    CHECK(fm_generator_open(&ctx->gen, err, sizeof err) == FM_OK, "%s", err);
    if (user && access(user, F_OK) == 0)
        CHECK(fm_db_open(&ctx->db_user, user, FM_DB_READONLY, err, sizeof err) == FM_OK, "%s", err);
    if (shipped && access(shipped, F_OK) == 0)
        CHECK(fm_db_open(&ctx->db_shipped, shipped, FM_DB_READONLY, err, sizeof err) == FM_OK, "%s", err);
    return ctx;
}

static void free_context(fm_context *ctx) {
    fm_select_forget(ctx);
    fm_generator_close(ctx->gen);
    fm_db_close(ctx->db_user);
    fm_db_close(ctx->db_shipped);
    pthread_mutex_destroy(&ctx->lock);
    free(ctx);
}

static fm_attention_args args(int b, int s, int d, int causal) {
    fm_attention_args a;
    memset(&a, 0, sizeof a);
    a.dtype = FM_DTYPE_BF16;
    a.batch = b;
    a.seqlen_q = a.seqlen_k = s;
    a.heads = a.kv_heads = 16;
    a.head_dim = d;
    a.causal = causal;
    a.q = a.k = a.v = a.o = (void *)(size_t)0x100000;
    fm_attention_args_contiguous(&a);
    return a;
}

static fm_selection pick(fm_context *ctx, fm_attention_args a) {
    fm_selection s;
    memset(&s, 0, sizeof s);
    fm_status st = fm_attention_select(ctx, &a, &s);
    CHECK(st == FM_OK, "select: %s", fm_last_error(ctx));
    return s;
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/fm_select_XXXXXX");
    if (!mkdtemp(dir)) return 1;
    char user[300], shipped[300];
    snprintf(user, sizeof user, "%s/user.sqlite", dir);
    snprintf(shipped, sizeof shipped, "%s/shipped.sqlite", dir);
    const char *h100 = "NVIDIA H100 80GB HBM3";

    /* 1. nothing tuned: the per-architecture default */
    fm_context *ctx = fake_context(NULL, NULL);
    fm_selection s = pick(ctx, args(8, 4096, 128, 0));
    CHECK(s.source == FM_SOURCE_DEFAULT, "source %d", s.source);
    CHECK(s.config[0] != 0, "no default config");
    free_context(ctx);

    /* 2. exact entry in the shipped database */
    add(shipped, h100, 90, "b=8,sq=4096,sk=4096,h=16,hkv=16,d=128,causal=0",
        "attn_fwd_sm80_bf16_d128_c0_m128_n64_w4_s2", 2.0);
    add(shipped, h100, 90, "b=8,sq=1024,sk=1024,h=16,hkv=16,d=128,causal=0",
        "attn_fwd_sm80_bf16_d128_c0_m64_n64_w4_s2", 0.5);
    ctx = fake_context(user, shipped);
    s = pick(ctx, args(8, 4096, 128, 0));
    CHECK(s.source == FM_SOURCE_EXACT, "source %d", s.source);
    CHECK(!strcmp(s.config, "attn_fwd_sm80_bf16_d128_c0_m128_n64_w4_s2"), "got %s", s.config);

    /* 3. nearest: 2048 is nearer 1024 than 4096? |log2(2)| both: tie broken by first seen;
     *    3500 is nearest 4096, 1100 nearest 1024 */
    s = pick(ctx, args(8, 3500, 128, 0));
    CHECK(s.source == FM_SOURCE_NEAREST, "source %d", s.source);
    CHECK(!strcmp(s.config, "attn_fwd_sm80_bf16_d128_c0_m128_n64_w4_s2"), "got %s", s.config);
    CHECK(!strcmp(s.tuned_shape, "b=8,sq=4096,sk=4096,h=16,hkv=16,d=128,causal=0"), "%s", s.tuned_shape);
    s = pick(ctx, args(8, 1100, 128, 0));
    CHECK(!strcmp(s.config, "attn_fwd_sm80_bf16_d128_c0_m64_n64_w4_s2"), "got %s", s.config);

    /* 4. other head dim or causality never stands in */
    s = pick(ctx, args(8, 4096, 64, 0));
    CHECK(s.source == FM_SOURCE_DEFAULT, "d=64 served from d=128 data (%s)", s.config);
    s = pick(ctx, args(8, 4096, 128, 1));
    CHECK(s.source == FM_SOURCE_DEFAULT, "causal served from non-causal data (%s)", s.config);
    free_context(ctx);

    /* 5. the user's database wins over the shipped one */
    add(user, h100, 90, "b=8,sq=4096,sk=4096,h=16,hkv=16,d=128,causal=0",
        "attn_fwd_sm80_bf16_d128_c0_m64_n32_w4_s3", 1.5);
    ctx = fake_context(user, shipped);
    s = pick(ctx, args(8, 4096, 128, 0));
    CHECK(s.source == FM_SOURCE_EXACT && !strcmp(s.config, "attn_fwd_sm80_bf16_d128_c0_m64_n32_w4_s3"),
          "got %s (%d)", s.config, s.source);
    free_context(ctx);

    /* 6. another device of the same architecture stands in; another architecture does not */
    char other[300];
    snprintf(other, sizeof other, "%s/other.sqlite", dir);
    add(other, "NVIDIA H200", 90, "b=4,sq=2048,sk=2048,h=16,hkv=16,d=256,causal=1",
        "attn_fwd_sm80_bf16_d256_c1_m64_n32_w4_s2", 1.0);
    add(other, "NVIDIA A100-SXM4-80GB", 80, "b=4,sq=2048,sk=2048,h=16,hkv=16,d=64,causal=1",
        "attn_fwd_sm80_bf16_d64_c1_m64_n64_w4_s2", 1.0);
    ctx = fake_context(other, NULL);
    s = pick(ctx, args(4, 2048, 256, 1));
    CHECK(s.source == FM_SOURCE_NEAREST && !strcmp(s.config, "attn_fwd_sm80_bf16_d256_c1_m64_n32_w4_s2"),
          "H200 entry not used for the H100: %s (%d)", s.config, s.source);
    s = pick(ctx, args(4, 2048, 64, 1));
    CHECK(s.source == FM_SOURCE_DEFAULT, "A100 entry used on an H100: %s", s.config);

    free_context(ctx);

    /* 6b. the other 16-bit type stands in after every entry of the call's own type, with its
     *     configuration renamed for this type; an entry of the own type, even of another shape,
     *     comes first */
    {
        char sib[300], err[512] = "";
        snprintf(sib, sizeof sib, "%s/sibling.sqlite", dir);
        ctx = fake_context(NULL, NULL);
        fm_config prob, bf, fp;
        memset(&prob, 0, sizeof prob);
        fm_config_set_str(&prob, "dtype", "bf16");
        fm_config_set_int(&prob, "head_dim", 128);
        fm_config_set_int(&prob, "causal", 0);
        CHECK(fm_generator_default(ctx->gen, "attn_fwd", &prob, &ctx->limits, &bf, err,
                                   sizeof err) == FM_OK, "%s", err);
        fp = bf;
        fm_config_set_str(&fp, "dtype", "fp16");
        CHECK(fm_generator_name(ctx->gen, &fp, err, sizeof err) == FM_OK, "%s", err);
        free_context(ctx);
        const char *sh = "b=2,sq=2048,sk=2048,h=16,hkv=16,d=128,causal=0";
        add_config(sib, h100, "bf16", sh, &bf, 1.0);
        ctx = fake_context(sib, NULL);
        s = pick(ctx, args(2, 2048, 128, 0));
        CHECK(s.source == FM_SOURCE_EXACT && !strcmp(s.config, bf.name), "bf16: %s (%d)",
              s.config, s.source);
        fm_attention_args a16 = args(2, 2048, 128, 0);
        a16.dtype = FM_DTYPE_FP16;
        s = pick(ctx, a16);
        CHECK(s.source == FM_SOURCE_OTHER_DTYPE && !strcmp(s.config, fp.name) &&
                  !strcmp(s.tuned_shape, sh),
              "fp16 not served the bf16 entry as fp16: %s (%d, %s), expected %s", s.config,
              s.source, s.tuned_shape, fp.name);
        CHECK(strstr(s.config, "bf16") == NULL, "fp16 served a bf16 kernel: %s", s.config);
        free_context(ctx);
        /* an fp16 entry of another shape (nearest) wins over the bf16 entry of this shape */
        fm_config fp2 = fp;
        add_config(sib, h100, "fp16", "b=2,sq=8192,sk=8192,h=16,hkv=16,d=128,causal=0", &fp2,
                   4.0);
        ctx = fake_context(sib, NULL);
        s = pick(ctx, a16);
        CHECK(s.source == FM_SOURCE_NEAREST, "fp16 data of another shape did not come first (%d)",
              s.source);
        free_context(ctx);
    }
    ctx = fake_context(other, NULL);

    /* 7. validation: clear errors, nothing selected */
    fm_attention_args a = args(1, 128, 96, 0);
    fm_selection none;
    CHECK(fm_attention_select(ctx, &a, &none) == FM_ERR_UNSUPPORTED, "head dim 96 accepted");
    CHECK(strstr(fm_last_error(ctx), "head_dim 96") != NULL, "message: %s", fm_last_error(ctx));
    a = args(1, 128, 128, 0);
    a.q = (void *)(size_t)0x100008;
    CHECK(fm_attention_select(ctx, &a, &none) == FM_ERR_INVALID_ARGUMENT, "misaligned q accepted");
    CHECK(strstr(fm_last_error(ctx), "16-byte aligned") != NULL, "message: %s", fm_last_error(ctx));
    a = args(1, 128, 128, 0);
    a.kv_heads = 5;
    CHECK(fm_attention_select(ctx, &a, &none) == FM_ERR_INVALID_ARGUMENT, "heads 16 / kv 5 accepted");
    a = args(1, 128, 128, 0);
    a.k_stride[1] = 100;
    CHECK(fm_attention_select(ctx, &a, &none) == FM_ERR_INVALID_ARGUMENT, "stride 100 accepted");
    a = args(0, 128, 128, 0);
    CHECK(fm_attention_select(ctx, &a, &none) == FM_ERR_INVALID_ARGUMENT, "batch 0 accepted");
    a = args(1, 128, 128, 0);
    a.dtype = (fm_dtype)7;
    CHECK(fm_attention_select(ctx, &a, &none) == FM_ERR_UNSUPPORTED, "dtype 7 accepted");
    a = args(1, 128, 128, 0);
    a.v = NULL;
    CHECK(fm_attention_select(ctx, &a, &none) == FM_ERR_INVALID_ARGUMENT, "NULL v accepted");
    /* workspace: size from the device (132 SMs x 3 warpgroups x 128 threads x (D/2 + 4) floats
     * after the flags, 132 x 3 words rounded up to 256 bytes), too small or misaligned rejected */
    size_t ws = 0;
    a = args(1, 128, 128, 0);
    CHECK(fm_attention_workspace_size(ctx, &a, &ws) == FM_OK && ws == 1792 + 132 * 3 * 128 * 68 * 4,
          "workspace size %zu", ws);
    a.workspace = (void *)(size_t)0x200000;
    a.workspace_bytes = ws - 1;
    CHECK(fm_attention_select(ctx, &a, &none) == FM_ERR_INVALID_ARGUMENT, "short workspace accepted");
    CHECK(strstr(fm_last_error(ctx), "workspace_bytes") != NULL, "message: %s", fm_last_error(ctx));
    a.workspace_bytes = ws;
    a.workspace = (void *)(size_t)0x200008;
    CHECK(fm_attention_select(ctx, &a, &none) == FM_ERR_INVALID_ARGUMENT, "misaligned workspace accepted");
    a.workspace = (void *)(size_t)0x200000;
    CHECK(fm_attention_select(ctx, &a, &none) == FM_OK, "good workspace rejected: %s", fm_last_error(ctx));
    a.head_dim = 96;
    CHECK(fm_attention_workspace_size(ctx, &a, &ws) == FM_ERR_UNSUPPORTED, "workspace for d=96");
    free_context(ctx);

    /* 8. no device: context creation says so */
    fm_context *real = NULL;
    char why[256];
    if (!fm_driver_get(why, sizeof why)) {
        CHECK(fm_context_create(&real, 0) == FM_ERR_NO_DEVICE, "context without a GPU");
        CHECK(real == NULL && fm_last_error(NULL)[0] != 0, "no message: '%s'", fm_last_error(NULL));
    }
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd)) return 1;
    return fm_check_report();
}
