/*
 * test_db.c - the tuning database (db/db.c), no GPU needed.
 *
 * Usage: test_db [SOURCE_DIR]   (SOURCE_DIR/db/schema.sql is compared with the migrations;
 *                                without it, FM_SOURCE_DIR if defined, else that case is skipped)
 * Every case works in its own files under one temporary directory, removed at the end.
 * Prints one line per case and "N passed, N failed"; exits non-zero on any failure.
 */
#define _GNU_SOURCE /* unshare/mount for the read-only directory case (Linux) */

#include "../db/db.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifdef __linux__
#include <sched.h>
#include <sys/mount.h>
#endif

#include <sqlite3.h>

/* ---- a tiny harness -------------------------------------------------------------------------- */
static int g_case_failed;
static char g_tmp[512];
static const char *g_source_dir;

#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            printf("    line %d: CHECK(%s) failed\n", __LINE__, #cond);                        \
            g_case_failed = 1;                                                                 \
        }                                                                                      \
    } while (0)

/* Checks a status, printing the error text on mismatch. */
#define CHECK_ST(expr, want)                                                                   \
    do {                                                                                       \
        fm_status st_ = (expr);                                                                \
        if (st_ != (want)) {                                                                   \
            printf("    line %d: %s gave %s, want %s: %s\n", __LINE__, #expr,                  \
                   fm_status_name(st_), fm_status_name(want), err);                            \
            g_case_failed = 1;                                                                 \
        }                                                                                      \
    } while (0)

#define REQUIRE(cond)                                                                          \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            printf("    line %d: REQUIRE(%s) failed, case stopped\n", __LINE__, #cond);        \
            g_case_failed = 1;                                                                 \
            return;                                                                            \
        }                                                                                      \
    } while (0)

/* The library's fm_status_string lives in the runtime; this test links db.c alone. */
static const char *fm_status_name(fm_status s) {
    static const char *const n[] = {"FM_OK",          "FM_ERR_INVALID_ARGUMENT",
                                    "FM_ERR_UNSUPPORTED", "FM_ERR_NO_DEVICE",
                                    "FM_ERR_CUDA",    "FM_ERR_COMPILE",
                                    "FM_ERR_DATABASE", "FM_ERR_GENERATOR",
                                    "FM_ERR_OUT_OF_MEMORY", "FM_ERR_IO",
                                    "FM_ERR_NOT_FOUND", "FM_ERR_INTERNAL"};
    return (unsigned)s < sizeof n / sizeof n[0] ? n[s] : "?";
}

static char err[1024];

/* ---- helpers ------------------------------------------------------------------------------- */
static void tpath(char *buf, size_t len, const char *name) {
    snprintf(buf, len, "%s/%s", g_tmp, name);
}

static int exists(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0;
}

/* Whether any of PATH-wal, PATH-shm, PATH-journal exists. */
static int has_sidecar(const char *p) {
    static const char *const sfx[] = {"-wal", "-shm", "-journal"};
    char buf[800];
    for (int i = 0; i < 3; i++) {
        snprintf(buf, sizeof buf, "%s%s", p, sfx[i]);
        if (exists(buf)) return 1;
    }
    return 0;
}

static char *read_file(const char *p, size_t *n) {
    FILE *f = fopen(p, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)len + 1);
    if (b && fread(b, 1, (size_t)len, f) != (size_t)len) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (b) {
        b[len] = 0;
        if (n) *n = (size_t)len;
    }
    return b;
}

static char *export_text(fm_db *db) {
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    if (!f) return NULL;
    fm_status s = fm_db_export(db, f, err, sizeof err);
    fclose(f);
    if (s != FM_OK) {
        printf("    export failed: %s\n", err);
        free(buf);
        return NULL;
    }
    return buf;
}

static fm_db *open_new(const char *name) {
    char p[600];
    tpath(p, sizeof p, name);
    fm_db *db = NULL;
    if (fm_db_open(&db, p, FM_DB_CREATE, err, sizeof err) != FM_OK) {
        printf("    open %s: %s\n", p, err);
        return NULL;
    }
    return db;
}

static long long add_device(fm_db *db, const char *name, int major, int minor) {
    fm_db_device d;
    memset(&d, 0, sizeof d);
    snprintf(d.name, sizeof d.name, "%s", name);
    d.cc_major = major;
    d.cc_minor = minor;
    d.sm_count = 132;
    d.mem_bytes = 80LL << 30;
    d.driver_version = 13000;
    d.nvrtc_version = 13000;
    long long id = -1;
    if (fm_db_upsert_device(db, &d, &id, err, sizeof err) != FM_OK) printf("    %s\n", err);
    return id;
}

static long long add_config(fm_db *db, const char *name, const char *params) {
    long long id = -1;
    if (fm_db_upsert_config(db, "attn_fwd_sm90", name, params, "0123456789abcdef", &id, err,
                            sizeof err) != FM_OK)
        printf("    %s\n", err);
    return id;
}

/* A bf16 attention row of (device, configuration, shape, status); the rest left at defaults. */
static fm_db_measurement meas_row(long long dev, long long cfg, const char *shape,
                                  const char *status) {
    fm_db_measurement m;
    fm_db_measurement_init(&m);
    m.device_id = dev;
    m.config_id = cfg;
    m.op = "attn_fwd";
    m.dtype = "bf16";
    m.shape = shape;
    m.status = status;
    return m;
}

static fm_status add_meas(fm_db *db, long long dev, long long cfg, const char *shape,
                          const char *status, double median, long long created) {
    fm_db_measurement m = meas_row(dev, cfg, shape, status);
    m.median_ms = median;
    if (!isnan(median)) {
        m.min_ms = median * 0.98;
        m.mean_ms = median * 1.01;
        m.stddev_ms = median * 0.005;
        m.runs = 50;
        m.tflops = 100.0 / median;
        m.max_abs_err = 1.0 / 256;
        m.rel_err = 2.5e-3;
    }
    m.registers = 168;
    m.spills = 0;
    m.smem_bytes = 147456;
    m.compile_ms = 812.25;
    m.tool_version = "0.1.0";
    m.created_at = created;
    return fm_db_add_measurement(db, &m, err, sizeof err);
}

/* An "ok" row timed under sustained load (fmtune --sustained). */
static fm_status add_sustained(fm_db *db, long long dev, long long cfg, const char *shape,
                               double median, long long created) {
    fm_db_measurement m = meas_row(dev, cfg, shape, "ok");
    m.median_ms = median;
    m.tool_version = "fmtune 0.1.0" FM_DB_SUSTAINED_SUFFIX;
    m.created_at = created;
    return fm_db_add_measurement(db, &m, err, sizeof err);
}

static int count_rejected_cb(void *user, const fm_db_measurement *m) {
    if (!strcmp(m->status, "rejected") && m->detail && strstr(m->detail, "superseded by sustained") &&
        strstr(m->detail, "burst median"))
        ++*(long long *)user;
    return 0;
}

static int count_cb(void *user, const fm_db_measurement *m) {
    (void)m;
    ++*(long long *)user;
    return 0;
}

static long long count_measurements(fm_db *db, const fm_db_filter *f) {
    long long n = 0;
    if (fm_db_foreach_measurement(db, f, count_cb, &n, err, sizeof err) != FM_OK) return -1;
    return n;
}

/* Writes a plain SQLite database that is not ours. */
static int make_foreign_sqlite(const char *p, const char *sql) {
    sqlite3 *h = NULL;
    int rc = sqlite3_open(p, &h);
    if (rc == SQLITE_OK) rc = sqlite3_exec(h, sql, NULL, NULL, NULL);
    sqlite3_close(h);
    return rc == SQLITE_OK ? 0 : -1;
}

/* A fixture: device, three configs, two shapes, one failure, one multi-line detail. */
static void fill_a(fm_db *db) {
    long long dev = add_device(db, "NVIDIA H100 80GB HBM3", 9, 0);
    long long c1 = add_config(db, "attn_fwd_sm90_bf16_d128_m128_n128_s2", "block_m=128,block_n=128");
    long long c2 = add_config(db, "attn_fwd_sm90_bf16_d128_m128_n176_s2", "block_m=128,block_n=176");
    long long c3 = add_config(db, "attn_fwd_sm90_bf16_d128_m192_n128_s2", "block_m=192,block_n=128");
    const char *s1 = "b=8,sq=4096,sk=4096,h=16,hkv=16,d=128,causal=0";
    const char *s2 = "b=8,sq=4096,sk=4096,h=16,hkv=16,d=128,causal=1";
    add_meas(db, dev, c1, s1, "ok", 1.75, 1764000000);
    add_meas(db, dev, c2, s1, "ok", 1.5, 1764000001);
    add_meas(db, dev, c3, s1, "wrong", 1.2, 1764000002);
    add_meas(db, dev, c1, s2, "ok", 1.0 / 3.0, 1764000003);
    fm_db_measurement m = meas_row(dev, c3, s2, "compile_error");
    m.detail = "line 1: error: 'x' undefined\n\tline 2\r\x7f tab's end";
    m.rel_err = INFINITY;
    m.created_at = 1764000004;
    m.tool_version = "0.1.0";
    if (fm_db_add_measurement(db, &m, err, sizeof err) != FM_OK) printf("    %s\n", err);
}

/* ---- cases ---------------------------------------------------------------------------------- */
static void case_schema_version(void) {
    char p[600];
    tpath(p, sizeof p, "schema.db");
    fm_db *db = NULL;
    CHECK_ST(fm_db_open(&db, p, FM_DB_CREATE, err, sizeof err), FM_OK);
    REQUIRE(db);
    CHECK(fm_db_schema_version(db) == FM_DB_SCHEMA_VERSION);
    CHECK(strcmp(fm_db_path(db), p) == 0);
    CHECK_ST(fm_db_check(db, 1, err, sizeof err), FM_OK);
    fm_db_close(db);
    fm_db_close(NULL);

    /* What is on disk: user_version, application_id, WAL, the four tables. */
    sqlite3 *h = NULL;
    REQUIRE(sqlite3_open_v2(p, &h, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK);
    sqlite3_stmt *st = NULL;
    const char *q = "SELECT (SELECT user_version FROM pragma_user_version),"
                    "(SELECT application_id FROM pragma_application_id),"
                    "(SELECT journal_mode FROM pragma_journal_mode),"
                    "(SELECT count(*) FROM sqlite_schema WHERE type='table')";
    REQUIRE(sqlite3_prepare_v2(h, q, -1, &st, NULL) == SQLITE_OK);
    REQUIRE(sqlite3_step(st) == SQLITE_ROW);
    CHECK(sqlite3_column_int(st, 0) == FM_DB_SCHEMA_VERSION);
    CHECK(sqlite3_column_int(st, 1) == FM_DB_APPLICATION_ID);
    CHECK(strcmp((const char *)sqlite3_column_text(st, 2), "wal") == 0);
    CHECK(sqlite3_column_int(st, 3) == 4);
    sqlite3_finalize(st);
    sqlite3_close(h);

    /* Read-only reopen works; writes through it are refused. */
    CHECK_ST(fm_db_open(&db, p, FM_DB_READONLY, err, sizeof err), FM_OK);
    REQUIRE(db);
    CHECK(fm_db_schema_version(db) == FM_DB_SCHEMA_VERSION);
    long long id = 0;
    CHECK_ST(fm_db_upsert_config(db, "f", "n", "", NULL, &id, err, sizeof err), FM_ERR_DATABASE);
    CHECK(strstr(err, "read-only") != NULL);
    fm_db_close(db);

    /* Bad flag combinations. */
    CHECK_ST(fm_db_open(&db, p, FM_DB_READONLY | FM_DB_CREATE, err, sizeof err),
             FM_ERR_INVALID_ARGUMENT);
    CHECK(db == NULL);
    CHECK(fm_db_migration_sql(0) == NULL);
    CHECK(fm_db_migration_sql(FM_DB_SCHEMA_VERSION + 1) == NULL);
    CHECK(fm_db_migration_sql(1) && strstr(fm_db_migration_sql(1), "CREATE TABLE best"));
}

static void case_schema_sql_matches(void) {
    if (!g_source_dir) {
        printf("    skipped: no source dir given (test_db SOURCE_DIR)\n");
        return;
    }
    char p[600];
    snprintf(p, sizeof p, "%s/db/schema.sql", g_source_dir);
    char *text = read_file(p, NULL);
    REQUIRE(text);
    for (int v = 1; v <= FM_DB_SCHEMA_VERSION; v++) {
        const char *m = fm_db_migration_sql(v);
        if (!strstr(text, m)) {
            printf("    %s does not contain migration %d verbatim\n", p, v);
            g_case_failed = 1;
        }
    }
    free(text);
}

static void case_shape_get(void) {
    const char *s = "b=8,sq=4096,sk=512,h=16,hkv=2,d=128,causal=0,neg=-3,bad=12x,empty=";
    long long v = -99;
    CHECK(fm_shape_get(s, "b", &v) == 1 && v == 8);
    CHECK(fm_shape_get(s, "sq", &v) == 1 && v == 4096);
    CHECK(fm_shape_get(s, "sk", &v) == 1 && v == 512);
    CHECK(fm_shape_get(s, "hkv", &v) == 1 && v == 2);
    CHECK(fm_shape_get(s, "h", &v) == 1 && v == 16); /* not confused with hkv */
    CHECK(fm_shape_get(s, "causal", &v) == 1 && v == 0);
    CHECK(fm_shape_get(s, "neg", &v) == 1 && v == -3);
    v = 7;
    CHECK(fm_shape_get(s, "s", &v) == 0 && v == 7); /* prefix of sq/sk, not a key */
    CHECK(fm_shape_get(s, "bad", &v) == -1);
    CHECK(fm_shape_get(s, "empty", &v) == -1);
    CHECK(fm_shape_get("", "b", &v) == 0);
    CHECK(fm_shape_get("t=99999999999", "t", &v) == 1 && v == 99999999999LL);
    CHECK(fm_shape_get("t=99999999999999999999", "t", &v) == -1); /* overflow */
    CHECK(fm_shape_get(NULL, "b", &v) == 0);
}

static void case_upserts(void) {
    fm_db *db = open_new("upsert.db");
    REQUIRE(db);
    long long a = add_device(db, "NVIDIA H100 80GB HBM3", 9, 0);
    long long b = add_device(db, "NVIDIA H100 80GB HBM3", 9, 0);
    long long c = add_device(db, "NVIDIA H200", 9, 0);
    CHECK(a > 0 && a == b && c > 0 && c != a);
    fm_db_device d;
    memset(&d, 0, sizeof d);
    snprintf(d.name, sizeof d.name, "NVIDIA H100 80GB HBM3");
    d.cc_major = 9;
    d.driver_version = 13010;
    long long id = 0;
    CHECK_ST(fm_db_upsert_device(db, &d, &id, err, sizeof err), FM_OK);
    CHECK(id == a);

    long long c1 = add_config(db, "cfg_a", "block_m=64");
    long long c2 = 0;
    CHECK_ST(fm_db_upsert_config(db, "attn_fwd_sm90", "cfg_a", "block_m=64", "ffff", &c2, err,
                                 sizeof err),
             FM_OK);
    CHECK(c1 > 0 && c1 == c2);
    char longname[300];
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    CHECK_ST(fm_db_upsert_config(db, "attn_fwd_sm90", longname, "", NULL, &c2, err, sizeof err),
             FM_ERR_INVALID_ARGUMENT);
    CHECK_ST(fm_db_upsert_config(db, NULL, "cfg_b", "", NULL, &c2, err, sizeof err),
             FM_ERR_INVALID_ARGUMENT);
    fm_db_close(db);
}

static void case_measurements_and_best(void) {
    fm_db *db = open_new("best.db");
    REQUIRE(db);
    long long dev = add_device(db, "NVIDIA H100 80GB HBM3", 9, 0);
    long long c1 = add_config(db, "cfg_1", "block_m=128,block_n=64");
    long long c2 = add_config(db, "cfg_2", "block_m=128,block_n=128");
    long long c3 = add_config(db, "cfg_3", "block_m=64,block_n=64");
    const char *s = "b=8,sq=4096,sk=4096,h=16,hkv=16,d=128,causal=0";
    fm_db_best b;

    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16", s, &b, err,
                               sizeof err),
             FM_ERR_NOT_FOUND);
    CHECK(strstr(err, s) != NULL);

    CHECK_ST(add_meas(db, dev, c1, s, "ok", 2.0, 100), FM_OK);
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16", s, &b, err,
                               sizeof err),
             FM_OK);
    CHECK(strcmp(b.config_name, "cfg_1") == 0 && b.median_ms == 2.0 && b.updated_at == 100);
    CHECK(strcmp(b.family, "attn_fwd_sm90") == 0 && strcmp(b.params, "block_m=128,block_n=64") == 0);
    CHECK(strcmp(b.shape, s) == 0 && b.cc_major == 9 && b.cc_minor == 0);
    CHECK(fabs(b.tflops - 50.0) < 1e-12);

    /* Faster: replaces. Slower: does not. A failure, however "fast", never does. */
    CHECK_ST(add_meas(db, dev, c2, s, "ok", 1.5, 101), FM_OK);
    CHECK_ST(add_meas(db, dev, c3, s, "ok", 1.8, 102), FM_OK);
    CHECK_ST(add_meas(db, dev, c3, s, "wrong", 0.5, 103), FM_OK);
    CHECK_ST(add_meas(db, dev, c3, s, "fault", NAN, 104), FM_OK);
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16", s, &b, err,
                               sizeof err),
             FM_OK);
    CHECK(strcmp(b.config_name, "cfg_2") == 0 && b.median_ms == 1.5);
    /* A tie on median goes to the smaller config name, whatever the arrival order. */
    CHECK_ST(add_meas(db, dev, c1, s, "ok", 1.5, 105), FM_OK);
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16", s, &b, err,
                               sizeof err),
             FM_OK);
    CHECK(strcmp(b.config_name, "cfg_1") == 0 && b.median_ms == 1.5 && b.updated_at == 105);

    /* The same natural key again replaces the row (not a duplicate) and re-derives best:
     * cfg_1's 1.5 ms at t=105 becomes a failure, so cfg_2 wins again. */
    CHECK_ST(add_meas(db, dev, c1, s, "timeout", NAN, 105), FM_OK);
    fm_db_filter f = {0};
    f.config_name = "cfg_1";
    CHECK(count_measurements(db, &f) == 2);
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16", s, &b, err,
                               sizeof err),
             FM_OK);
    CHECK(strcmp(b.config_name, "cfg_2") == 0 && b.median_ms == 1.5);

    /* Invalid input. */
    CHECK_ST(add_meas(db, dev, c1, s, "ok", NAN, 200), FM_ERR_INVALID_ARGUMENT);
    CHECK_ST(add_meas(db, dev, c1, s, "ok", 0.0, 200), FM_ERR_INVALID_ARGUMENT);
    CHECK_ST(add_meas(db, dev, c1, s, "great", 1.0, 200), FM_ERR_INVALID_ARGUMENT);
    CHECK_ST(add_meas(db, dev + 1000, c1, s, "ok", 1.0, 200), FM_ERR_INVALID_ARGUMENT);
    CHECK_ST(add_meas(db, dev, c1 + 1000, s, "ok", 1.0, 200), FM_ERR_INVALID_ARGUMENT);
    CHECK_ST(add_meas(db, dev, c1, "", "ok", 1.0, 200), FM_ERR_INVALID_ARGUMENT);

    /* Filters and fields on the way out. */
    CHECK(count_measurements(db, NULL) == 6);
    memset(&f, 0, sizeof f);
    f.status = "ok";
    CHECK(count_measurements(db, &f) == 3);
    f.device_name = "NVIDIA H200";
    CHECK(count_measurements(db, &f) == 0);

    /* best is a function of the measurements: a full rebuild changes nothing. */
    char *before = export_text(db);
    CHECK_ST(fm_db_recompute_best(db, err, sizeof err), FM_OK);
    char *after = export_text(db);
    CHECK(before && after && strcmp(before, after) == 0);
    free(before);
    free(after);
    fm_db_close(db);
}

static int first_cb(void *user, const fm_db_measurement *m) {
    fm_db_measurement *out = user;
    out->median_ms = m->median_ms;
    out->runs = m->runs;
    out->registers = m->registers;
    out->created_at = m->created_at;
    out->cc_major = m->cc_major;
    out->id = (m->detail == NULL) + 2 * (strcmp(m->config_name, "attn_fwd_sm90_bf16_d128_m128_n128_s2") == 0) +
              4 * (strcmp(m->family, "attn_fwd_sm90") == 0) +
              8 * (strcmp(m->device_name, "NVIDIA H100 80GB HBM3") == 0) +
              16 * (isnan(m->compile_ms) == 0);
    return 1; /* stop after the first */
}

static void case_has_measurement_and_foreach(void) {
    fm_db *db = open_new("resume.db");
    REQUIRE(db);
    fill_a(db);
    const char *dn = "NVIDIA H100 80GB HBM3";
    const char *s1 = "b=8,sq=4096,sk=4096,h=16,hkv=16,d=128,causal=0";
    int found = -1;
    CHECK_ST(fm_db_has_measurement(db, dn, "attn_fwd", "bf16", s1,
                                   "attn_fwd_sm90_bf16_d128_m128_n128_s2", &found, err, sizeof err),
             FM_OK);
    CHECK(found == 1);
    /* A failed attempt counts: resuming must not retry a kernel that faulted. */
    CHECK_ST(fm_db_has_measurement(db, dn, "attn_fwd", "bf16", s1,
                                   "attn_fwd_sm90_bf16_d128_m192_n128_s2", &found, err, sizeof err),
             FM_OK);
    CHECK(found == 1);
    CHECK_ST(fm_db_has_measurement(db, dn, "attn_fwd", "bf16", "b=1", "attn_fwd_sm90_bf16_d128_m128_n128_s2",
                                   &found, err, sizeof err),
             FM_OK);
    CHECK(found == 0);
    CHECK_ST(fm_db_has_measurement(db, "NVIDIA H200", "attn_fwd", "bf16", s1,
                                   "attn_fwd_sm90_bf16_d128_m128_n128_s2", &found, err, sizeof err),
             FM_OK);
    CHECK(found == 0);
    CHECK_ST(fm_db_has_measurement(db, dn, "attn_fwd", "fp16", s1,
                                   "attn_fwd_sm90_bf16_d128_m128_n128_s2", &found, err, sizeof err),
             FM_OK);
    CHECK(found == 0);
    CHECK_ST(fm_db_has_measurement(db, dn, "attn_fwd", "bf16", s1, "no_such_config", &found, err,
                                   sizeof err),
             FM_OK);
    CHECK(found == 0);

    /* The first measurement in export order, its fields read back. */
    fm_db_measurement m;
    fm_db_measurement_init(&m);
    fm_db_filter f = {0};
    f.shape = s1;
    CHECK_ST(fm_db_foreach_measurement(db, &f, first_cb, &m, err, sizeof err), FM_OK);
    CHECK(m.median_ms == 1.75 && m.runs == 50 && m.registers == 168 &&
          m.created_at == 1764000000 && m.cc_major == 9);
    CHECK(m.id == 31);
    fm_db_close(db);
}

typedef struct best_list {
    int n;
    char names[8][FM_DB_CONFIG_MAX];
    char devices[8][FM_DB_DEVICE_MAX];
} best_list;

static int best_cb(void *user, const fm_db_best *b) {
    best_list *l = user;
    if (l->n < 8) {
        snprintf(l->names[l->n], FM_DB_CONFIG_MAX, "%s", b->config_name);
        snprintf(l->devices[l->n], FM_DB_DEVICE_MAX, "%s", b->device_name);
    }
    l->n++;
    return 0;
}

static void case_round_trip(void) {
    fm_db *a = open_new("rt_a.db");
    fm_db *b = open_new("rt_b.db");
    REQUIRE(a && b);
    fill_a(a);
    char *t1 = export_text(a);
    REQUIRE(t1);
    /* Shape of the text: header, one INSERT per row, escapes. */
    char hdr[96];
    snprintf(hdr, sizeof hdr, "-- flashmoe tuning database dump, schema version %d\n",
             FM_DB_SCHEMA_VERSION);
    CHECK(strncmp(t1, hdr, strlen(hdr)) == 0);
    int inserts = 0;
    for (const char *p = t1; (p = strstr(p, "\nINSERT ")) != NULL; p++) inserts++;
    CHECK(inserts == 1 + 3 + 5 + 2);
    CHECK(strstr(t1, "||char(10)||") != NULL);
    CHECK(strstr(t1, "tab''s end") != NULL);
    CHECK(strstr(t1, "1e999") != NULL);
    CHECK(strstr(t1, ",1.75,") != NULL);
    CHECK(strstr(t1, ",0.333333333333333,") != NULL);

    CHECK_ST(fm_db_import(b, t1, err, sizeof err), FM_OK);
    char *t2 = export_text(b);
    CHECK(t2 && strcmp(t1, t2) == 0);
    if (t2 && strcmp(t1, t2) != 0) printf("---- first\n%s---- second\n%s", t1, t2);
    /* Idempotent: the same dump again adds nothing, into either database. */
    CHECK_ST(fm_db_import(b, t1, err, sizeof err), FM_OK);
    CHECK_ST(fm_db_import(a, t1, err, sizeof err), FM_OK);
    char *t3 = export_text(b);
    char *t4 = export_text(a);
    CHECK(t3 && strcmp(t1, t3) == 0);
    CHECK(t4 && strcmp(t1, t4) == 0);
    CHECK(count_measurements(b, NULL) == 5);

    fm_db_best best;
    CHECK_ST(fm_db_lookup_best(b, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16",
                               "b=8,sq=4096,sk=4096,h=16,hkv=16,d=128,causal=0", &best, err,
                               sizeof err),
             FM_OK);
    CHECK(strcmp(best.config_name, "attn_fwd_sm90_bf16_d128_m128_n176_s2") == 0);

    free(t1);
    free(t2);
    free(t3);
    free(t4);
    fm_db_close(a);
    fm_db_close(b);
}

static int detail_cb(void *user, const fm_db_measurement *m) {
    snprintf(user, 256, "%s", m->detail ? m->detail : "(null)");
    return 0;
}

static void case_detail_bytes(void) {
    fm_db *a = open_new("detail_a.db");
    fm_db *b = open_new("detail_b.db");
    REQUIRE(a && b);
    fill_a(a);
    char *t = export_text(a);
    REQUIRE(t);
    CHECK_ST(fm_db_import(b, t, err, sizeof err), FM_OK);
    char got[256] = "";
    fm_db_filter f = {0};
    f.status = "compile_error";
    CHECK_ST(fm_db_foreach_measurement(b, &f, detail_cb, got, err, sizeof err), FM_OK);
    CHECK(strcmp(got, "line 1: error: 'x' undefined\n\tline 2\r\x7f tab's end") == 0);
    free(t);
    fm_db_close(a);
    fm_db_close(b);
}

static void case_import_rejects(void) {
    fm_db *db = open_new("reject.db");
    REQUIRE(db);
    fill_a(db);
    char *before = export_text(db);
    REQUIRE(before);
    char hdr[96];
    snprintf(hdr, sizeof hdr, "-- flashmoe tuning database dump, schema version %d\n",
             FM_DB_SCHEMA_VERSION);
    char text[2048];

    CHECK_ST(fm_db_import(db, "DROP TABLE devices;", err, sizeof err), FM_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err, "not a flashmoe dump") != NULL);

    /* A dump cut short at a line boundary: refused, nothing lands. */
    char *cut = strdup(before);
    REQUIRE(cut);
    char *mp = strstr(cut, "-- best\n");
    REQUIRE(mp);
    mp[0] = 0;
    CHECK_ST(fm_db_import(db, cut, err, sizeof err), FM_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err, "truncated") != NULL);
    free(cut);

    snprintf(text, sizeof text, "%s-- devices\nDROP TABLE best;\n-- end\n", hdr);
    CHECK_ST(fm_db_import(db, text, err, sizeof err), FM_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err, "line 5") == NULL && strstr(err, "line 3") != NULL);

    snprintf(text, sizeof text, "%sDELETE FROM measurements;\n-- end\n", hdr);
    CHECK_ST(fm_db_import(db, text, err, sizeof err), FM_ERR_INVALID_ARGUMENT);
    snprintf(text, sizeof text, "%sATTACH DATABASE '/tmp/x' AS y;\n-- end\n", hdr);
    CHECK_ST(fm_db_import(db, text, err, sizeof err), FM_ERR_INVALID_ARGUMENT);
    snprintf(text, sizeof text, "%sPRAGMA user_version=5;\n-- end\n", hdr);
    CHECK_ST(fm_db_import(db, text, err, sizeof err), FM_ERR_INVALID_ARGUMENT);
    snprintf(text, sizeof text,
             "%sINSERT INTO configurations(family,name,params) VALUES('f',hex(randomblob(4)),'');\n-- end\n",
             hdr);
    CHECK_ST(fm_db_import(db, text, err, sizeof err), FM_ERR_INVALID_ARGUMENT);

    /* A row whose device is missing: the whole dump is refused, nothing lands. */
    snprintf(text, sizeof text,
             "%sINSERT INTO configurations(family,name,params,template_hash) "
             "VALUES('f','new_cfg','','') ON CONFLICT DO NOTHING; \n"
             "INSERT INTO measurements(device_id,op,dtype,shape,config_id,status,"
             "created_at) VALUES((SELECT id FROM devices WHERE name='nope' AND cc_major=9 AND "
             "cc_minor=0),'attn_fwd','bf16','b=1',(SELECT id FROM configurations WHERE "
             "name='new_cfg'),'fault',1) ON CONFLICT DO NOTHING;\n-- end\n",
             hdr);
    CHECK_ST(fm_db_import(db, text, err, sizeof err), FM_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err, "line 3") != NULL && strstr(err, "device_id") != NULL);
    /* OR IGNORE would have dropped that row silently, OR REPLACE could overwrite: refused. */
    snprintf(text, sizeof text,
             "%sINSERT OR IGNORE INTO configurations(family,name,params,template_hash) "
             "VALUES('f','new_cfg','','');\n-- end\n",
             hdr);
    CHECK_ST(fm_db_import(db, text, err, sizeof err), FM_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err, "line 2") != NULL);
    snprintf(text, sizeof text,
             "%sREPLACE INTO configurations(family,name,params,template_hash) "
             "VALUES('f','new_cfg','','');\n-- end\n",
             hdr);
    CHECK_ST(fm_db_import(db, text, err, sizeof err), FM_ERR_INVALID_ARGUMENT);

    /* A dump from the future. */
    snprintf(text, sizeof text, "-- flashmoe tuning database dump, schema version %d\n",
             FM_DB_SCHEMA_VERSION + 1);
    CHECK_ST(fm_db_import(db, text, err, sizeof err), FM_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err, "newer") != NULL);

    char *after = export_text(db);
    CHECK(after && strcmp(before, after) == 0);
    /* An empty dump (header only, like the initial db/shipped.sql) is fine. */
    snprintf(text, sizeof text, "%s-- devices\n-- end\n", hdr);
    CHECK_ST(fm_db_import(db, text, err, sizeof err), FM_OK);
    free(before);
    free(after);
    fm_db_close(db);
}

static void case_merge(void) {
    fm_db *a = open_new("merge_a.db");
    fm_db *c = open_new("merge_c.db");
    REQUIRE(a && c);
    fill_a(a);
    const char *s1 = "b=8,sq=4096,sk=4096,h=16,hkv=16,d=128,causal=0";
    /* c: a new device, and on the H100 a faster config for s1 plus a copy of one of a's rows.
     * Ids differ between the files on purpose (configs created in another order). */
    long long h200 = add_device(c, "NVIDIA H200", 9, 0);
    long long cx = add_config(c, "attn_fwd_sm90_bf16_d128_m128_n64_s3", "block_m=128,block_n=64");
    long long c1 = add_config(c, "attn_fwd_sm90_bf16_d128_m128_n128_s2", "block_m=128,block_n=128");
    long long h100 = add_device(c, "NVIDIA H100 80GB HBM3", 9, 0);
    CHECK_ST(add_meas(c, h100, cx, s1, "ok", 1.25, 1764100000), FM_OK);
    CHECK_ST(add_meas(c, h100, c1, s1, "ok", 1.75, 1764000000), FM_OK); /* = a's row */
    CHECK_ST(add_meas(c, h200, c1, s1, "ok", 1.6, 1764100001), FM_OK);
    fm_db_close(c);

    char p[600];
    tpath(p, sizeof p, "merge_c.db");
    size_t n0 = 0, n1 = 0;
    char *bytes0 = read_file(p, &n0);
    CHECK_ST(fm_db_merge(a, p, err, sizeof err), FM_OK);
    char *bytes1 = read_file(p, &n1);
    CHECK(bytes0 && bytes1 && n0 == n1 && memcmp(bytes0, bytes1, n0) == 0); /* source untouched */
    free(bytes0);
    free(bytes1);

    CHECK(count_measurements(a, NULL) == 5 + 2);
    fm_db_best b;
    CHECK_ST(fm_db_lookup_best(a, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16", s1, &b, err,
                               sizeof err),
             FM_OK);
    CHECK(strcmp(b.config_name, "attn_fwd_sm90_bf16_d128_m128_n64_s3") == 0 && b.median_ms == 1.25);
    CHECK_ST(fm_db_lookup_best(a, "NVIDIA H200", "attn_fwd", "bf16", s1, &b, err, sizeof err),
             FM_OK);
    CHECK(strcmp(b.config_name, "attn_fwd_sm90_bf16_d128_m128_n128_s2") == 0);

    best_list l;
    memset(&l, 0, sizeof l);
    CHECK_ST(fm_db_foreach_best(a, NULL, "attn_fwd", "bf16", best_cb, &l, err, sizeof err), FM_OK);
    CHECK(l.n == 3);
    CHECK(strcmp(l.devices[0], "NVIDIA H100 80GB HBM3") == 0 &&
          strcmp(l.devices[2], "NVIDIA H200") == 0);
    memset(&l, 0, sizeof l);
    CHECK_ST(fm_db_foreach_best(a, "NVIDIA H200", NULL, NULL, best_cb, &l, err, sizeof err), FM_OK);
    CHECK(l.n == 1);

    /* Merging again is a no-op; merge == import of the other's dump. */
    char *t1 = export_text(a);
    CHECK_ST(fm_db_merge(a, p, err, sizeof err), FM_OK);
    char *t2 = export_text(a);
    CHECK(t1 && t2 && strcmp(t1, t2) == 0);
    fm_db *d = open_new("merge_d.db");
    fm_db *c2 = NULL;
    CHECK_ST(fm_db_open(&c2, p, FM_DB_READONLY, err, sizeof err), FM_OK);
    REQUIRE(d && c2);
    char *tc = export_text(c2);
    fm_db_close(c2);
    tpath(p, sizeof p, "merge_a.db");
    CHECK_ST(fm_db_merge(d, p, err, sizeof err), FM_OK);
    CHECK_ST(fm_db_import(d, tc, err, sizeof err), FM_OK);
    char *t3 = export_text(d);
    CHECK(t3 && strcmp(t1, t3) == 0);

    /* Merging a non-flashmoe file fails cleanly. */
    tpath(p, sizeof p, "merge_foreign.db");
    REQUIRE(make_foreign_sqlite(p, "CREATE TABLE t(x); INSERT INTO t VALUES(1);") == 0);
    CHECK_ST(fm_db_merge(a, p, err, sizeof err), FM_ERR_DATABASE);
    char *t4 = export_text(a);
    CHECK(t4 && strcmp(t1, t4) == 0);
    free(t1);
    free(t2);
    free(t3);
    free(t4);
    free(tc);
    fm_db_close(a);
    fm_db_close(d);
}

/* Each open mode on a file that is not ours: FM_ERR_DATABASE, file byte-identical, no sidecar. */
static void check_refused(const char *p, const char *want) {
    static const int modes[] = {FM_DB_READONLY, 0, FM_DB_CREATE, FM_DB_CREATE | FM_DB_NO_WAL};
    size_t n0 = 0, n1 = 0;
    char *b0 = read_file(p, &n0);
    for (int i = 0; i < 4; i++) {
        fm_db *db = NULL;
        err[0] = 0;
        CHECK_ST(fm_db_open(&db, p, modes[i], err, sizeof err), FM_ERR_DATABASE);
        CHECK(db == NULL);
        if (!strstr(err, want)) {
            printf("    mode %d: message \"%s\" lacks \"%s\"\n", modes[i], err, want);
            g_case_failed = 1;
        }
        fm_db_close(db);
    }
    char *b1 = read_file(p, &n1);
    CHECK(b0 && b1 && n0 == n1 && memcmp(b0, b1, n0) == 0);
    CHECK(!has_sidecar(p));
    free(b0);
    free(b1);
}

static void case_corrupt_files(void) {
    char p[600];
    /* Random bytes. */
    tpath(p, sizeof p, "random.db");
    FILE *f = fopen(p, "wb");
    REQUIRE(f);
    unsigned x = 12345;
    for (int i = 0; i < 8192; i++) {
        x = x * 1103515245u + 12345u;
        fputc((int)(x >> 16) & 0xff, f);
    }
    fclose(f);
    check_refused(p, "not a SQLite file");

    /* A valid SQLite file with someone else's tables. */
    tpath(p, sizeof p, "foreign.db");
    REQUIRE(make_foreign_sqlite(p, "CREATE TABLE devices(a,b); INSERT INTO devices VALUES(1,2);") ==
            0);
    check_refused(p, "not a flashmoe tuning database");

    /* Ours, but from a newer schema. */
    tpath(p, sizeof p, "future.db");
    fm_db *db = NULL;
    CHECK_ST(fm_db_open(&db, p, FM_DB_CREATE, err, sizeof err), FM_OK);
    fm_db_close(db);
    REQUIRE(make_foreign_sqlite(p, "PRAGMA user_version=99; PRAGMA journal_mode=DELETE;") == 0);
    check_refused(p, "newer");

    /* Ours with a table missing. */
    tpath(p, sizeof p, "partial.db");
    CHECK_ST(fm_db_open(&db, p, FM_DB_CREATE | FM_DB_NO_WAL, err, sizeof err), FM_OK);
    fm_db_close(db);
    REQUIRE(make_foreign_sqlite(p, "DROP TABLE best;") == 0);
    check_refused(p, "only 3 of its 4 tables");

    /* An empty SQLite file (no tables): only CREATE may initialise it. */
    tpath(p, sizeof p, "empty.db");
    f = fopen(p, "wb");
    REQUIRE(f);
    fclose(f);
    CHECK_ST(fm_db_open(&db, p, FM_DB_READONLY, err, sizeof err), FM_ERR_DATABASE);
    CHECK(strstr(err, "empty") != NULL);
    CHECK_ST(fm_db_open(&db, p, 0, err, sizeof err), FM_ERR_DATABASE);
    CHECK_ST(fm_db_open(&db, p, FM_DB_CREATE, err, sizeof err), FM_OK);
    CHECK(db && fm_db_schema_version(db) == FM_DB_SCHEMA_VERSION);
    fm_db_close(db);

    /* Ours, with a page of the measurements table overwritten: quick_check catches it. */
    tpath(p, sizeof p, "torn.db");
    /* WAL (no fsync per commit); the last close checkpoints everything into the file. */
    CHECK_ST(fm_db_open(&db, p, FM_DB_CREATE, err, sizeof err), FM_OK);
    REQUIRE(db);
    long long dev = add_device(db, "NVIDIA H100 80GB HBM3", 9, 0);
    long long cfg = add_config(db, "cfg", "");
    for (int i = 0; i < 300; i++) {
        char shape[64];
        snprintf(shape, sizeof shape, "b=%d,sq=4096", i);
        add_meas(db, dev, cfg, shape, "ok", 1.0 + i, 1000 + i);
    }
    fm_db_close(db);
    REQUIRE(!has_sidecar(p));
    FILE *g = fopen(p, "r+b");
    REQUIRE(g);
    fseek(g, 0, SEEK_END);
    long size = ftell(g);
    REQUIRE(size > 8 * 4096);
    /* Page 6 onward holds measurement rows; garble its b-tree header and cells. */
    fseek(g, 5 * 4096, SEEK_SET);
    for (int i = 0; i < 4096; i++) fputc((i * 37 + 11) & 0xff, g);
    fclose(g);
    CHECK_ST(fm_db_open(&db, p, FM_DB_READONLY, err, sizeof err), FM_ERR_DATABASE);
    CHECK(db == NULL);
    CHECK(strstr(err, "corrupt") != NULL || strstr(err, "malformed") != NULL);
    if (getenv("FM_TEST_VERBOSE")) printf("    torn file: %s\n", err);
    fm_db_close(db);
}

static void case_missing_file(void) {
    char p[600];
    tpath(p, sizeof p, "missing.db");
    fm_db *db = (fm_db *)&db; /* must be reset to NULL */
    CHECK_ST(fm_db_open(&db, p, FM_DB_READONLY, err, sizeof err), FM_ERR_DATABASE);
    CHECK(db == NULL);
    CHECK(strstr(err, "no database at") && strstr(err, p));
    CHECK(!exists(p) && !has_sidecar(p));
    CHECK_ST(fm_db_open(&db, p, 0, err, sizeof err), FM_ERR_DATABASE);
    CHECK(!exists(p) && !has_sidecar(p));
    /* A directory that does not exist, even with CREATE. */
    tpath(p, sizeof p, "no/such/dir.db");
    CHECK_ST(fm_db_open(&db, p, FM_DB_CREATE, err, sizeof err), FM_ERR_DATABASE);
    CHECK(strstr(err, "cannot open") != NULL);
    CHECK_ST(fm_db_open(&db, NULL, FM_DB_CREATE, err, sizeof err), FM_ERR_INVALID_ARGUMENT);
}

static void case_readonly_leaves_no_trace(void) {
    /* The installed file: built with NO_WAL, then only read. */
    char p[600];
    tpath(p, sizeof p, "installed.db");
    fm_db *db = NULL;
    CHECK_ST(fm_db_open(&db, p, FM_DB_CREATE | FM_DB_NO_WAL, err, sizeof err), FM_OK);
    REQUIRE(db);
    fill_a(db);
    fm_db_close(db);
    CHECK(!has_sidecar(p));
    size_t n0 = 0, n1 = 0;
    char *b0 = read_file(p, &n0);
    CHECK_ST(fm_db_open(&db, p, FM_DB_READONLY, err, sizeof err), FM_OK);
    REQUIRE(db);
    fm_db_best b;
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16",
                               "b=8,sq=4096,sk=4096,h=16,hkv=16,d=128,causal=0", &b, err,
                               sizeof err),
             FM_OK);
    CHECK(!has_sidecar(p));
    fm_db_close(db);
    char *b1 = read_file(p, &n1);
    CHECK(b0 && b1 && n0 == n1 && memcmp(b0, b1, n0) == 0);
    CHECK(!has_sidecar(p));
    free(b0);
    free(b1);
}

/* The installed case: the shipped file in a directory nobody may write. Runs in a child with its
 * own mount namespace (propagation private, so nothing leaks to the host) where the directory is
 * bind-mounted read-only; where that is not permitted (no CAP_SYS_ADMIN) it says so and passes. */
static int ro_child(const char *dir, const char *ro, const char *file) {
#ifdef __linux__
    if (unshare(CLONE_NEWNS) != 0) return 77;
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) return 77;
    if (mount(dir, ro, NULL, MS_BIND, NULL) != 0) return 77;
    if (mount(NULL, ro, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) != 0) return 77;
    char p[700], e[512];
    snprintf(p, sizeof p, "%s/%s", ro, file);
    fm_db *db = NULL;
    if (fm_db_open(&db, p, FM_DB_READONLY, e, sizeof e) != FM_OK) {
        fprintf(stderr, "    read-only dir, %s: %s\n", file, e);
        return 1;
    }
    fm_db_best b;
    fm_status s = fm_db_lookup_best(db, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16",
                                    "b=8,sq=4096,sk=4096,h=16,hkv=16,d=128,causal=0", &b, e,
                                    sizeof e);
    fm_db_close(db);
    if (s != FM_OK) {
        fprintf(stderr, "    read-only dir, %s: %s\n", file, e);
        return 1;
    }
    return 0;
#else
    (void)dir;
    (void)ro;
    (void)file;
    return 77;
#endif
}

static void case_readonly_directory(void) {
    char dir[600], ro[600], p[700];
    tpath(dir, sizeof dir, "installdir");
    tpath(ro, sizeof ro, "installdir_ro");
    REQUIRE(mkdir(dir, 0755) == 0 && mkdir(ro, 0755) == 0);
    /* One file built for installing (rollback journal), one left in WAL mode. */
    static const char *const files[] = {"nowal.sqlite", "wal.sqlite"};
    for (int i = 0; i < 2; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        fm_db *db = NULL;
        CHECK_ST(fm_db_open(&db, p, FM_DB_CREATE | (i == 0 ? FM_DB_NO_WAL : 0), err, sizeof err),
                 FM_OK);
        REQUIRE(db);
        fill_a(db);
        fm_db_close(db);
        REQUIRE(!has_sidecar(p));
    }
    for (int i = 0; i < 2; i++) {
        fflush(stdout);
        pid_t pid = fork();
        REQUIRE(pid >= 0);
        if (pid == 0) _exit(ro_child(dir, ro, files[i]));
        int st = 0;
        REQUIRE(waitpid(pid, &st, 0) == pid && WIFEXITED(st));
        if (WEXITSTATUS(st) == 77) {
            printf("    skipped: cannot mount a read-only directory here (needs CAP_SYS_ADMIN)\n");
            return;
        }
        CHECK(WEXITSTATUS(st) == 0);
    }
}

#define NPROC 4
#define PER_PROC 200

/* One writer process: its own connection, its own rows, shared device and configs. */
static int writer(const char *p, int proc) {
    fm_db *db = NULL;
    char e[512];
    if (fm_db_open(&db, p, FM_DB_CREATE, e, sizeof e) != FM_OK) {
        fprintf(stderr, "writer %d: %s\n", proc, e);
        return 1;
    }
    fm_db_device d;
    memset(&d, 0, sizeof d);
    snprintf(d.name, sizeof d.name, "NVIDIA H100 80GB HBM3");
    d.cc_major = 9;
    long long dev = 0;
    if (fm_db_upsert_device(db, &d, &dev, e, sizeof e) != FM_OK) goto fail;
    for (int i = 0; i < PER_PROC; i++) {
        char name[32], shape[64];
        long long cfg = 0;
        snprintf(name, sizeof name, "cfg_%d", i % 10);
        if (fm_db_upsert_config(db, "attn_fwd_sm90", name, "block_m=64", "", &cfg, e, sizeof e) !=
            FM_OK)
            goto fail;
        /* Four writers race on 50 shared shapes: best is updated under contention. */
        snprintf(shape, sizeof shape, "b=%d,sq=%d", i % 50, proc);
        fm_db_measurement m;
        fm_db_measurement_init(&m);
        m.device_id = dev;
        m.config_id = cfg;
        m.op = "attn_fwd";
        m.dtype = "bf16";
        m.shape = i % 3 ? shape : "b=1,shared=1";
        m.status = "ok";
        m.median_ms = 1.0 + ((proc * 7919 + i * 104729) % 1000) / 100.0;
        m.created_at = 1000000 + proc * 1000 + i;
        if (fm_db_add_measurement(db, &m, e, sizeof e) != FM_OK) goto fail;
    }
    fm_db_close(db);
    return 0;
fail:
    fprintf(stderr, "writer %d: %s\n", proc, e);
    fm_db_close(db);
    return 1;
}

static void case_concurrent_writers(void) {
    char p[600];
    tpath(p, sizeof p, "concurrent.db");
    /* The file does not exist yet: the writers also race to create and migrate it. */
    pid_t pids[NPROC];
    fflush(stdout);
    fflush(stderr);
    for (int i = 0; i < NPROC; i++) {
        pids[i] = fork();
        REQUIRE(pids[i] >= 0);
        if (pids[i] == 0) _exit(writer(p, i));
    }
    int ok = 1;
    for (int i = 0; i < NPROC; i++) {
        int st = 0;
        if (waitpid(pids[i], &st, 0) != pids[i] || !WIFEXITED(st) || WEXITSTATUS(st) != 0) ok = 0;
    }
    CHECK(ok);
    fm_db *db = NULL;
    CHECK_ST(fm_db_open(&db, p, 0, err, sizeof err), FM_OK);
    REQUIRE(db);
    CHECK(count_measurements(db, NULL) == NPROC * PER_PROC);
    CHECK_ST(fm_db_check(db, 1, err, sizeof err), FM_OK);
    /* The incrementally kept best equals the one rebuilt from scratch. */
    char *t1 = export_text(db);
    CHECK_ST(fm_db_recompute_best(db, err, sizeof err), FM_OK);
    char *t2 = export_text(db);
    CHECK(t1 && t2 && strcmp(t1, t2) == 0);
    best_list l;
    memset(&l, 0, sizeof l);
    CHECK_ST(fm_db_foreach_best(db, NULL, NULL, NULL, best_cb, &l, err, sizeof err), FM_OK);
    CHECK(l.n == 1 + NPROC * 50);
    free(t1);
    free(t2);
    fm_db_close(db);
}

/* ---- main ----------------------------------------------------------------------------------- */
typedef struct test_case {
    const char *name;
    void (*fn)(void);
} test_case;

/* fmtune --sustained: burst rows of the key become "rejected" (median kept in the detail), the
 * sustained rows stay, best is the fastest sustained one even though a burst row was faster;
 * other keys and other devices are untouched. */
static void case_supersede_burst(void) {
    fm_db *db = open_new("sustained.db");
    REQUIRE(db);
    long long dev = add_device(db, "NVIDIA H100 80GB HBM3", 9, 0);
    long long dev2 = add_device(db, "NVIDIA H200", 9, 0);
    long long c1 = add_config(db, "cfg_1", "block_m=128");
    long long c2 = add_config(db, "cfg_2", "block_m=192");
    const char *s = "t=4096,e=256,k=8,h=7168,i=2048", *other = "t=1024,e=256,k=8,h=7168,i=2048";
    CHECK_ST(add_meas(db, dev, c1, s, "ok", 6.9, 100), FM_OK);
    CHECK_ST(add_meas(db, dev, c2, s, "ok", 7.3, 100), FM_OK);
    CHECK_ST(add_meas(db, dev, c1, other, "ok", 3.3, 100), FM_OK);
    CHECK_ST(add_meas(db, dev2, c1, s, "ok", 6.6, 100), FM_OK);
    CHECK_ST(add_sustained(db, dev, c1, s, 10.1, 101), FM_OK);
    CHECK_ST(add_sustained(db, dev, c2, s, 9.3, 101), FM_OK);
    fm_db_best b;
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16", s, &b, err, sizeof err),
             FM_OK);
    CHECK(strcmp(b.config_name, "cfg_1") == 0 && b.median_ms == 6.9); /* the burst row, before */
    int changed = -1;
    CHECK_ST(fm_db_supersede_burst(db, dev, "attn_fwd", "bf16", s, &changed, err, sizeof err), FM_OK);
    CHECK(changed == 2);
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16", s, &b, err, sizeof err),
             FM_OK);
    CHECK(strcmp(b.config_name, "cfg_2") == 0 && b.median_ms == 9.3);
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16", other, &b, err,
                               sizeof err),
             FM_OK);
    CHECK(b.median_ms == 3.3);
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H200", "attn_fwd", "bf16", s, &b, err, sizeof err), FM_OK);
    CHECK(b.median_ms == 6.6);
    /* the superseded rows keep their numbers in the detail, and stay out of a full recompute */
    fm_db_filter f;
    memset(&f, 0, sizeof f);
    f.device_name = "NVIDIA H100 80GB HBM3";
    f.shape = s;
    long long nrej = 0;
    CHECK_ST(fm_db_foreach_measurement(db, &f, count_rejected_cb, &nrej, err, sizeof err), FM_OK);
    CHECK(nrej == 2);
    CHECK_ST(fm_db_recompute_best(db, err, sizeof err), FM_OK);
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16", s, &b, err, sizeof err),
             FM_OK);
    CHECK(strcmp(b.config_name, "cfg_2") == 0);
    /* again: nothing left to supersede */
    CHECK_ST(fm_db_supersede_burst(db, dev, "attn_fwd", "bf16", s, &changed, err, sizeof err), FM_OK);
    CHECK(changed == 0);
    CHECK_ST(fm_db_supersede_burst(db, dev, "attn_fwd", "", s, &changed, err, sizeof err),
             FM_ERR_INVALID_ARGUMENT);
    fm_db_close(db);
}

/* A merge (or import) brings sustained-load timings of a key whose burst rows the other side
 * holds, in either direction: the key is decided among the sustained rows, the burst rows are
 * superseded (their medians kept in the detail), other keys stay as they were. */
static void case_merge_sustained(void) {
    const char *s = "t=4096,e=256,k=8,h=7168,i=2048", *other = "t=1024,e=256,k=8,h=7168,i=2048";
    for (int dir = 0; dir < 2; dir++) {
        /* dir 0: the burst rows are in the target, the sustained one arrives; dir 1: reverse */
        fm_db *a = open_new(dir ? "msus_a1.db" : "msus_a0.db");
        fm_db *o = open_new(dir ? "msus_o1.db" : "msus_o0.db");
        REQUIRE(a && o);
        fm_db *burst = dir ? o : a, *sus = dir ? a : o;
        long long dv = add_device(burst, "NVIDIA H200", 9, 0);
        long long c1 = add_config(burst, "cfg_fast_burst", "block_m=128");
        CHECK_ST(add_meas(burst, dv, c1, s, "ok", 6.1, 100), FM_OK);
        CHECK_ST(add_meas(burst, dv, c1, other, "ok", 2.0, 100), FM_OK);
        long long dv2 = add_device(sus, "NVIDIA H200", 9, 0);
        long long c2 = add_config(sus, "cfg_sustained", "block_m=192");
        CHECK_ST(add_sustained(sus, dv2, c2, s, 6.9, 200), FM_OK);
        fm_db_close(o);
        char p[600];
        tpath(p, sizeof p, dir ? "msus_o1.db" : "msus_o0.db");
        CHECK_ST(fm_db_merge(a, p, err, sizeof err), FM_OK);
        fm_db_best b;
        CHECK_ST(fm_db_lookup_best(a, "NVIDIA H200", "attn_fwd", "bf16", s, &b, err, sizeof err),
                 FM_OK);
        CHECK(strcmp(b.config_name, "cfg_sustained") == 0 && b.median_ms == 6.9);
        CHECK_ST(fm_db_lookup_best(a, "NVIDIA H200", "attn_fwd", "bf16", other, &b, err,
                                   sizeof err),
                 FM_OK);
        CHECK(strcmp(b.config_name, "cfg_fast_burst") == 0 && b.median_ms == 2.0);
        fm_db_filter f;
        memset(&f, 0, sizeof f);
        f.shape = s;
        long long nrej = 0;
        CHECK_ST(fm_db_foreach_measurement(a, &f, count_rejected_cb, &nrej, err, sizeof err),
                 FM_OK);
        CHECK(nrej == 1);
        fm_db_close(a);
    }
}

static int count_later_phase_cb(void *user, const fm_db_measurement *m) {
    if (!strcmp(m->status, "rejected") && m->detail &&
        !strncmp(m->detail, FM_DB_SUPERSEDED_SUSTAINED, strlen(FM_DB_SUPERSEDED_SUSTAINED)))
        ++*(long long *)user;
    return 0;
}

/* A second sustained phase (another machine of the same model, slower by a few percent) re-times
 * the incumbent with a newcomer that beats it in the same rounds: the newcomer must become best
 * even though the incumbent's older row (taken on the faster machine) is faster than both. Other
 * keys and devices keep their rows. Then the same through a merge: the target still holds the
 * older row as "ok"; the source's supersession carries over. */
static void case_supersede_sustained(void) {
    const char *s = "b=8,sq=2048,sk=2048,h=16,hkv=16,d=128,causal=0",
               *other = "b=4,sq=4096,sk=4096,h=16,hkv=16,d=128,causal=0";
    fm_db *db = open_new("phase.db");
    fm_db *old = open_new("phase_old.db");
    REQUIRE(db && old);
    long long dev = add_device(db, "NVIDIA H200", 9, 0);
    long long dev2 = add_device(db, "NVIDIA H100 80GB HBM3", 9, 0);
    long long inc = add_config(db, "cfg_incumbent", "q_regs=0");
    long long nc = add_config(db, "cfg_newcomer", "q_regs=1");
    long long odev = add_device(old, "NVIDIA H200", 9, 0);
    long long oinc = add_config(old, "cfg_incumbent", "q_regs=0");
    /* phase 1 (created 1000): the incumbent on a fast machine */
    CHECK_ST(add_sustained(db, dev, inc, s, 0.4435, 1000), FM_OK);
    CHECK_ST(add_sustained(old, odev, oinc, s, 0.4435, 1000), FM_OK);
    CHECK_ST(add_sustained(db, dev, inc, other, 0.8400, 1000), FM_OK);
    CHECK_ST(add_sustained(db, dev2, inc, s, 0.4300, 1000), FM_OK);
    /* phase 2 (created 2000): both, in the same rounds, on a slower machine */
    CHECK_ST(add_sustained(db, dev, inc, s, 0.4573, 2000), FM_OK);
    CHECK_ST(add_sustained(db, dev, nc, s, 0.4456, 2000), FM_OK);
    fm_db_best b;
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H200", "attn_fwd", "bf16", s, &b, err, sizeof err), FM_OK);
    CHECK(strcmp(b.config_name, "cfg_incumbent") == 0 && b.median_ms == 0.4435); /* before */
    int changed = -1;
    CHECK_ST(fm_db_supersede_sustained(db, dev, "attn_fwd", "bf16", s, 2000, &changed, err,
                                       sizeof err),
             FM_OK);
    CHECK(changed == 1);
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H200", "attn_fwd", "bf16", s, &b, err, sizeof err), FM_OK);
    CHECK(strcmp(b.config_name, "cfg_newcomer") == 0 && b.median_ms == 0.4456);
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H200", "attn_fwd", "bf16", other, &b, err, sizeof err),
             FM_OK);
    CHECK(b.median_ms == 0.8400);
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H100 80GB HBM3", "attn_fwd", "bf16", s, &b, err,
                               sizeof err),
             FM_OK);
    CHECK(b.median_ms == 0.4300);
    /* the whole database recomputed: the decision stands */
    CHECK_ST(fm_db_recompute_best(db, err, sizeof err), FM_OK);
    CHECK_ST(fm_db_lookup_best(db, "NVIDIA H200", "attn_fwd", "bf16", s, &b, err, sizeof err), FM_OK);
    CHECK(strcmp(b.config_name, "cfg_newcomer") == 0);
    /* idempotent */
    CHECK_ST(fm_db_supersede_sustained(db, dev, "attn_fwd", "bf16", s, 2000, &changed, err,
                                       sizeof err),
             FM_OK);
    CHECK(changed == 0);
    CHECK_ST(fm_db_supersede_sustained(db, dev, "", "bf16", s, 2000, &changed, err, sizeof err),
             FM_ERR_INVALID_ARGUMENT);
    fm_db_close(db);
    /* merge the re-tuned database into one that holds only phase 1 */
    char p[600];
    tpath(p, sizeof p, "phase.db");
    CHECK_ST(fm_db_merge(old, p, err, sizeof err), FM_OK);
    CHECK_ST(fm_db_lookup_best(old, "NVIDIA H200", "attn_fwd", "bf16", s, &b, err, sizeof err),
             FM_OK);
    CHECK(strcmp(b.config_name, "cfg_newcomer") == 0 && b.median_ms == 0.4456);
    fm_db_filter f;
    memset(&f, 0, sizeof f);
    f.device_name = "NVIDIA H200";
    f.shape = s;
    long long nrej = 0;
    CHECK_ST(fm_db_foreach_measurement(old, &f, count_later_phase_cb, &nrej, err, sizeof err),
             FM_OK);
    CHECK(nrej == 1);
    fm_db_close(old);
}

static const test_case cases[] = {
    {"schema version, application id, WAL", case_schema_version},
    {"db/schema.sql matches the migrations", case_schema_sql_matches},
    {"fm_shape_get", case_shape_get},
    {"device and configuration upserts", case_upserts},
    {"measurements keep best", case_measurements_and_best},
    {"has_measurement (resume) and foreach", case_has_measurement_and_foreach},
    {"export, import, export: identical", case_round_trip},
    {"control bytes in text survive a dump", case_detail_bytes},
    {"import refuses what is not a dump", case_import_rejects},
    {"merge two databases, best recomputed", case_merge},
    {"corrupt and foreign files refused untouched", case_corrupt_files},
    {"missing file", case_missing_file},
    {"read-only open writes nothing", case_readonly_leaves_no_trace},
    {"4 concurrent writer processes", case_concurrent_writers},
    {"read-only open in a read-only directory", case_readonly_directory},
    {"sustained-load timings supersede burst timings", case_supersede_burst},
    {"a merge brings sustained timings: they decide the key", case_merge_sustained},
    {"a later sustained phase decides the key (and through a merge)", case_supersede_sustained},
};

static void rm_tree(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char p[1024];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        struct stat sb;
        if (lstat(p, &sb) == 0 && S_ISDIR(sb.st_mode))
            rm_tree(p);
        else
            unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

int main(int argc, char **argv) {
    g_source_dir = argc > 1 ? argv[1] : NULL;
#ifdef FM_SOURCE_DIR
    if (!g_source_dir) g_source_dir = FM_SOURCE_DIR;
#endif
    const char *base = getenv("TMPDIR");
    snprintf(g_tmp, sizeof g_tmp, "%s/fm_test_db_XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(g_tmp)) {
        printf("cannot create a temporary directory: %s\n", strerror(errno));
        return 1;
    }
    int passed = 0, failed = 0;
    int n = (int)(sizeof cases / sizeof cases[0]);
    for (int i = 0; i < n; i++) {
        g_case_failed = 0;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        cases[i].fn();
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
        printf("%s %d - %s (%.0f ms)\n", g_case_failed ? "FAIL" : "ok", i + 1, cases[i].name, ms);
        fflush(stdout);
        if (g_case_failed)
            failed++;
        else
            passed++;
    }
    if (failed)
        printf("files kept in %s\n", g_tmp);
    else
        rm_tree(g_tmp);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
