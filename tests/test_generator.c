/*
 * test_generator.c - the Lua generator: spaces enumerate, cull with reasons, name uniquely,
 * render deterministic self-contained sources; bad requests fail with a message.
 */
#define _GNU_SOURCE
#include "check.h"
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct acc {
    int kept, culled, empty_reason;
    char names[4096][160];
    int n;
    int dup;
    fm_config first, last_culled;
} acc;

static int collect(void *user, const fm_config *c, const char *reason) {
    acc *a = user;
    if (reason) {
        a->culled++;
        if (!reason[0]) a->empty_reason++;
        a->last_culled = *c;
        return 0;
    }
    if (!a->kept) a->first = *c;
    a->kept++;
    for (int i = 0; i < a->n; i++)
        if (!strcmp(a->names[i], c->name)) a->dup++;
    if (a->n < 4096) snprintf(a->names[a->n++], sizeof a->names[0], "%s", c->name);
    return 0;
}

typedef struct probs {
    fm_generator *g;
    const char *family;
    const fm_limits *lim;
    int problems, with_kept;
    acc *a;
} probs;

static int each_problem(void *user, const fm_config *p, const char *reason) {
    (void)reason;
    probs *pp = user;
    char err[512] = "";
    acc *a = pp->a;
    int before = a->kept;
    fm_status s = fm_generator_enumerate(pp->g, pp->family, p, pp->lim, collect, a, err, sizeof err);
    CHECK(s == FM_OK, "%s: %s", pp->family, err);
    pp->problems++;
    pp->with_kept += a->kept > before;
    return 0;
}

/* The ptxas report as NVRTC words it (each line prefixed) and as nvcc does: a spill must be seen
 * in both, or the tuner's static rejection of spilling variants silently never fires. */
static void test_ptxas_log(void) {
    const char *nvrtc =
        "ptxas info    : Function properties for fm_a\n"
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 32 registers, used 0 barriers\n"
        "ptxas info    : Function properties for fm_b\n"
        "ptxas         .     56 bytes stack frame, 56 bytes spill stores, 48 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 1 barriers, 56 bytes cumulative stack size\n";
    fm_compile_info a;
    memset(&a, 0, sizeof a);
    fm_parse_ptxas_log(nvrtc, &a);
    CHECK(a.registers == 168 && a.spill_stores == 56 && a.spill_loads == 48 && a.stack_bytes == 56,
          "NVRTC log: regs %d spills %d/%d stack %d", a.registers, a.spill_stores, a.spill_loads,
          a.stack_bytes);
    CHECK(!a.wgmma_serialized, "a log without the warning reads as serialised wgmma");
    const char *serial =
        "ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are "
        "serialized due to insufficient register resources for the wgmma pipeline in the "
        "function 'fm_a'\n"
        "ptxas info    : Used 168 registers, used 16 barriers\n";
    fm_compile_info w;
    memset(&w, 0, sizeof w);
    fm_parse_ptxas_log(serial, &w);
    CHECK(w.wgmma_serialized && w.registers == 168, "serialised wgmma not read from the log");
    const char *nvcc = "ptxas info    : Function properties for fm_c\n"
                       "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
                       "ptxas info    : Used 255 registers, 1024 bytes smem\n";
    fm_compile_info b;
    memset(&b, 0, sizeof b);
    fm_parse_ptxas_log(nvcc, &b);
    CHECK(b.registers == 255 && b.spill_stores == 4 && b.spill_loads == 4 && b.stack_bytes == 8 &&
              b.static_smem == 1024,
          "nvcc log: regs %d spills %d/%d stack %d smem %d", b.registers, b.spill_stores,
          b.spill_loads, b.stack_bytes, b.static_smem);
}

/* The problem part of an sm90 attention configuration (bf16, d128, not causal). */
static void attn_sm90_problem(fm_config *c) {
    memset(c, 0, sizeof *c);
    snprintf(c->family, sizeof c->family, "attn_fwd_sm90");
    fm_config_set_str(c, "dtype", "bf16");
    fm_config_set_int(c, "head_dim", 128);
    fm_config_set_int(c, "causal", 0);
}

/* A configuration stored before an axis existed (its parameters lack it) still names and renders
 * as the same kernel: the axis declares the default it implicitly had. */
static void test_stored_before_axis(fm_generator *g) {
    char err[1024] = "";
    fm_config c;
    attn_sm90_problem(&c);
    const char *ax[][2] = {{"block_m", "128"}, {"block_n", "128"}, {"stages", "2"},
                           {"consumer_wgs", "2"}, {"pingpong", "1"}, {"intra_overlap", "1"},
                           {"persistent", "1"}, {"producer_regs", "24"}};
    for (size_t i = 0; i < sizeof ax / sizeof ax[0]; i++)
        fm_config_set_int(&c, ax[i][0], atoll(ax[i][1]));
    CHECK(fm_generator_name(g, &c, err, sizeof err) == FM_OK, "name without ctas_per_sm/q_stages: %s",
          err);
    CHECK(strcmp(c.name, "attn_fwd_sm90_bf16_d128_c0_m128_n128_s2_wg2_pp1_io1_p1_r24") == 0,
          "name %s", c.name);
    fm_rendered r;
    memset(&r, 0, sizeof r);
    CHECK(fm_generator_render(g, &c, &r, err, sizeof err) == FM_OK, "render: %s", err);
    fm_rendered_free(&r);
    /* an axis without a default is still required */
    fm_config d;
    attn_sm90_problem(&d);
    CHECK(fm_generator_name(g, &d, err, sizeof err) != FM_OK && strstr(err, "missing"),
          "a configuration without block_m named: %s", d.name);
}

/* Every configuration the shipped database serves still names as stored and renders: axes added
 * since it was tuned must keep its entries valid (else the runtime silently falls back to the
 * default for those shapes). */
typedef struct shipped_acc {
    fm_generator *g;
    int n;
} shipped_acc;

static int check_shipped_best(void *user, const fm_db_best *b) {
    shipped_acc *sa = (shipped_acc *)user;
    char err[1024] = "";
    fm_config c;
    memset(&c, 0, sizeof c);
    snprintf(c.family, sizeof c.family, "%s", b->family);
    CHECK(fm_config_parse_params(&c, b->params) == 0, "%s: params %s", b->config_name, b->params);
    fm_status s = fm_generator_name(sa->g, &c, err, sizeof err);
    CHECK(s == FM_OK && strcmp(c.name, b->config_name) == 0, "%s (%s %s) names as %s: %s",
          b->config_name, b->device_name, b->shape, c.name, err);
    fm_rendered r;
    memset(&r, 0, sizeof r);
    CHECK(fm_generator_render(sa->g, &c, &r, err, sizeof err) == FM_OK, "%s: %s", b->config_name,
          err);
    fm_rendered_free(&r);
    sa->n++;
    return 0;
}

static void test_shipped_db(fm_generator *g) {
    const char *path = getenv("FLASHMOE_SHIPPED_DB");
    if (!path || !*path) {
        printf("shipped database: FLASHMOE_SHIPPED_DB not set, not checked\n");
        return;
    }
    char err[1024] = "";
    fm_db *db = NULL;
    CHECK(fm_db_open(&db, path, FM_DB_READONLY, err, sizeof err) == FM_OK, "%s: %s", path, err);
    if (!db) return;
    shipped_acc sa = {g, 0};
    CHECK(fm_db_foreach_best(db, NULL, NULL, NULL, check_shipped_best, &sa, err, sizeof err) ==
              FM_OK,
          "%s", err);
    CHECK(sa.n > 0, "the shipped database %s has no best entries", path);
    printf("shipped database: %d best entries name and render\n", sa.n);
    fm_db_close(db);
}

/* Launch facts: a number both the kernel's build and the host's launch need is stated once, by
 * the family (generator/moe_gemm_sm90.lua, merge_rows): the render's launch table and the
 * define the kernel is compiled with agree, for each variant that has it, and it is absent
 * (0) where the variant does not merge. */
static void test_launch_facts(fm_generator *g) {
    const struct {
        const char *params;
        long long merge_rows;
    } v[] = {
        {"dtype=bf16,pipe=ws,block_m=128,block_n=256,stages=4,group_m=0,split_k=1,combine=slot,"
         "ws_grid=tiles,x_stages=3,ws_cluster=1,ws_tail=merge", 48},
        {"dtype=fp16,pipe=ws,block_m=128,block_n=256,stages=4,group_m=8,split_k=1,combine=slot,"
         "ws_grid=tiles,x_stages=3,ws_cluster=2,ws_tail=merge", 32},
        {"dtype=bf16,pipe=ws,block_m=128,block_n=256,stages=4,group_m=0,split_k=1,combine=slot,"
         "ws_grid=tiles,x_stages=3,ws_cluster=1,ws_tail=tile", 0},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        char err[1024] = "";
        fm_config c;
        memset(&c, 0, sizeof c);
        snprintf(c.family, sizeof c.family, "moe_gemm_sm90");
        CHECK(fm_config_parse_params(&c, v[i].params) == 0, "parse %s", v[i].params);
        CHECK(fm_generator_name(g, &c, err, sizeof err) == FM_OK, "name: %s", err);
        fm_rendered r;
        memset(&r, 0, sizeof r);
        CHECK(fm_generator_render(g, &c, &r, err, sizeof err) == FM_OK, "render %s: %s", c.name,
              err);
        if (!r.source) continue;
        const long long got = fm_config_int(&r.launch, "merge_rows", -1);
        CHECK(got == v[i].merge_rows, "%s: launch merge_rows %lld, expected %lld", c.name, got,
              v[i].merge_rows);
        /* the first definition wins: the generator's, or else the template's default of 0 */
        const char *d = strstr(r.source, "#define FM_WS_MERGE ");
        CHECK(d && atoll(d + strlen("#define FM_WS_MERGE ")) == v[i].merge_rows,
              "%s: the source's FM_WS_MERGE does not match the launch facts (%lld)", c.name,
              v[i].merge_rows);
        fm_rendered_free(&r);
    }
}

int main(void) {
    test_ptxas_log();
    char err[1024] = "";
    fm_generator *g = NULL;
    CHECK(fm_generator_open(&g, err, sizeof err) == FM_OK, "open: %s", err);
    if (!g) return fm_check_report();
    test_stored_before_axis(g);
    test_launch_facts(g);
    test_shipped_db(g);

    char fams[512] = "";
    CHECK(fm_generator_families(g, "attn_fwd", fams, sizeof fams) == FM_OK, "%s", fams);
    CHECK(strstr(fams, "attn_fwd_sm80") != NULL, "families: %s", fams);

    /* 1. every attention family enumerates every problem of its default space, keeps something
     *    for each, culls with a non-empty reason, and names every kept configuration uniquely */
    fm_limits lim;
    fm_arch_limits(90, &lim);
    char *save = NULL;
    for (char *f = strtok_r(fams, ",", &save); f; f = strtok_r(NULL, ",", &save)) {
        acc *a = calloc(1, sizeof *a);
        probs pp = {g, f, &lim, 0, 0, a};
        CHECK(fm_generator_problems(g, f, each_problem, &pp, err, sizeof err) == FM_OK, "%s", err);
        printf("%s: %d problems, %d kept, %d culled\n", f, pp.problems, a->kept, a->culled);
        CHECK(pp.problems == 12, "%s: %d problems (2 dtypes x 3 head dims x 2)", f, pp.problems);
        CHECK(pp.with_kept == pp.problems, "%s: only %d of %d problems keep a variant", f,
              pp.with_kept, pp.problems);
        CHECK(a->culled > 0, "%s culls nothing: constraints not applied?", f);
        CHECK(a->empty_reason == 0, "%s: %d culls without a reason", f, a->empty_reason);
        CHECK(a->dup == 0, "%s: %d duplicate names", f, a->dup);

        /* 2. render: deterministic, self-contained, with the parameters as defines */
        fm_rendered r1, r2;
        CHECK(fm_generator_render(g, &a->first, &r1, err, sizeof err) == FM_OK, "%s", err);
        CHECK(fm_generator_render(g, &a->first, &r2, err, sizeof err) == FM_OK, "%s", err);
        if (r1.source && r2.source) {
            CHECK(strcmp(r1.source, r2.source) == 0, "render is not deterministic");
            CHECK(strstr(r1.source, "#include \"") == NULL, "quoted include left in the source");
            CHECK(strstr(r1.source, "#include <") == NULL, "system include in a kernel source");
            CHECK(strstr(r1.source, a->first.name) != NULL, "config name not in the source");
            CHECK(strlen(r1.template_hash) == 16, "template hash '%s'", r1.template_hash);
            CHECK(r1.threads > 0 && r1.threads <= 1024, "threads %d", r1.threads);
            CHECK(r1.smem_bytes >= 0 && r1.smem_bytes <= lim.smem_per_block, "smem %d",
                  r1.smem_bytes);
            CHECK(r1.entry[0] != 0, "no entry point");
        }
        fm_rendered_free(&r1);
        fm_rendered_free(&r2);

        /* 3. a culled configuration cannot be rendered: the constraint names why */
        if (a->culled) {
            fm_rendered r3;
            fm_status s = fm_generator_render(g, &a->last_culled, &r3, err, sizeof err);
            CHECK(s == FM_ERR_GENERATOR, "culled %s rendered", a->last_culled.name);
            CHECK(strstr(err, "violates a constraint") != NULL, "message: %s", err);
        }

        /* 4. naming round trip: the name is a function of the parameters */
        fm_config c = a->first;
        c.name[0] = 0;
        CHECK(fm_generator_name(g, &c, err, sizeof err) == FM_OK, "%s", err);
        CHECK(!strcmp(c.name, a->first.name), "%s != %s", c.name, a->first.name);
        free(a);
    }

    /* 5. smaller devices cull more: sm_80's 163 KB against sm_90's 227 KB */
    {
        fm_config p;
        memset(&p, 0, sizeof p);
        fm_config_set_str(&p, "dtype", "bf16");
        fm_config_set_int(&p, "head_dim", 256);
        fm_config_set_int(&p, "causal", 0);
        fm_limits l80, l86;
        fm_arch_limits(80, &l80);
        fm_arch_limits(86, &l86);
        acc *a80 = calloc(1, sizeof *a80), *a86 = calloc(1, sizeof *a86);
        CHECK(fm_generator_enumerate(g, "attn_fwd_sm80", &p, &l80, collect, a80, err, sizeof err) == FM_OK, "%s", err);
        CHECK(fm_generator_enumerate(g, "attn_fwd_sm80", &p, &l86, collect, a86, err, sizeof err) == FM_OK, "%s", err);
        CHECK(a86->kept < a80->kept, "sm_86 keeps %d, sm_80 keeps %d", a86->kept, a80->kept);
        /* a family needing sm_90 culls everything on sm_80, saying why */
        if (strstr(fams, "") && fm_generator_enumerate(g, "attn_fwd_sm90", &p, &l80, collect, a80, err, sizeof err) == FM_OK)
            CHECK(a80->last_culled.name[0] != 0, "sm90 family on sm_80 culled nothing");
        free(a80);
        free(a86);
    }

    /* 6. errors: unknown family, missing problem field, default for an op */
    {
        fm_config p;
        memset(&p, 0, sizeof p);
        acc *a = calloc(1, sizeof *a);
        CHECK(fm_generator_enumerate(g, "no_such_family", &p, &lim, collect, a, err, sizeof err) ==
                  FM_ERR_GENERATOR, "unknown family accepted");
        CHECK(strstr(err, "unknown kernel family") != NULL, "message: %s", err);
        CHECK(fm_generator_enumerate(g, "attn_fwd_sm80", &p, &lim, collect, a, err, sizeof err) ==
                  FM_ERR_GENERATOR, "missing problem accepted");
        CHECK(strstr(err, "missing") != NULL, "message: %s", err);
        free(a);
        fm_config_set_str(&p, "dtype", "fp16");
        fm_config_set_int(&p, "head_dim", 128);
        fm_config_set_int(&p, "causal", 1);
        fm_config d;
        fm_limits l80;
        fm_arch_limits(80, &l80);
        CHECK(fm_generator_default(g, "attn_fwd", &p, &l80, &d, err, sizeof err) == FM_OK, "%s", err);
        CHECK(!strcmp(d.family, "attn_fwd_sm80"), "sm_80 default family %s", d.family);
        CHECK(fm_generator_default(g, "attn_fwd", &p, &lim, &d, err, sizeof err) == FM_OK, "%s", err);
        printf("sm_90 default: %s\n", d.name);
        CHECK(fm_config_int(&d, "causal", -1) == 1 && fm_config_int(&d, "head_dim", 0) == 128,
              "default does not carry the problem: %s", d.name);
    }
    fm_generator_close(g);
    return fm_check_report();
}
