/*
 * fm_serve_check DB B S D H HKV CAUSAL - a program using only the public C API (plus the test
 * reference) after fmtune: the shape must be served from the database (exact entry, the
 * configuration the database names best), and the result must be right.
 */
#include "attn_cpu.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: fm_serve_check DB B S D H HKV CAUSAL\n");
        return 2;
    }
    fm_context_options o;
    memset(&o, 0, sizeof o);
    o.db_path = argv[1];
    fm_context *ctx = NULL;
    fm_status s = fm_context_create_v2(&ctx, &o);
    if (s == FM_ERR_NO_DEVICE) FM_SKIP("no GPU: %s", fm_last_error(NULL));
    CHECK(s == FM_OK, "context: %s", fm_last_error(NULL));
    if (s != FM_OK) return fm_check_report();
    attn_case c;
    memset(&c, 0, sizeof c);
    c.dt = FM_DTYPE_BF16;
    c.b = atoi(argv[2]);
    c.sq = c.sk = atoi(argv[3]);
    c.d = atoi(argv[4]);
    c.h = atoi(argv[5]);
    c.hkv = atoi(argv[6]);
    c.causal = atoi(argv[7]);
    c.lse = 1;
    fm_attention_args a;
    memset(&a, 0, sizeof a);
    a.dtype = c.dt;
    a.batch = c.b;
    a.seqlen_q = a.seqlen_k = c.sq;
    a.heads = c.h;
    a.kv_heads = c.hkv;
    a.head_dim = c.d;
    a.causal = c.causal;
    a.q = a.k = a.v = a.o = (void *)(uintptr_t)0x1000;
    fm_attention_args_contiguous(&a);
    fm_selection sel;
    s = fm_attention_select(ctx, &a, &sel);
    CHECK(s == FM_OK, "select: %s", fm_last_error(ctx));
    printf("served %s (source %s, tuned shape %s)\n", sel.config,
           sel.source == FM_SOURCE_EXACT         ? "exact"
           : sel.source == FM_SOURCE_NEAREST     ? "nearest"
           : sel.source == FM_SOURCE_OTHER_DTYPE ? "other dtype"
                                                 : "default",
           sel.tuned_shape);
    CHECK(sel.source == FM_SOURCE_EXACT, "the tuned shape was not served from the database");
    /* the configuration is the database's best */
    fm_db *db = NULL;
    char err[512];
    fm_db_best b;
    CHECK(fm_db_open(&db, argv[1], FM_DB_READONLY, err, sizeof err) == FM_OK, "%s", err);
    char shape[160];
    fm_attn_shape(&a, shape, sizeof shape);
    CHECK(db && fm_db_lookup_best(db, ctx->device_name, "attn_fwd", "bf16", shape, &b, err, sizeof err) == FM_OK,
          "%s", err);
    CHECK(!strcmp(b.config_name, sel.config), "served %s, database best %s", sel.config, b.config_name);
    fm_db_close(db);
    /* and it computes the right thing through fm_attention_fwd */
    double rel = attn_run_case(ctx, NULL, &c, "served configuration");
    printf("relative error %.3e\n", rel);
    fm_context_destroy(ctx);
    return fm_check_report();
}
