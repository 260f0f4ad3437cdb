/*
 * db.h - the tuning database: devices, configurations, every measurement, and the best
 * configuration per (device, op, dtype, shape).
 *
 * Used by the library (read-only lookups) and by fmtune (writes, export, import, merge), so
 * errors go into a caller buffer `err` of `errlen` bytes (either may be NULL/0) instead of a
 * context. Nothing here needs CUDA. Not installed; not part of the public API.
 *
 * Life cycle: fm_db_open -> calls -> fm_db_close. One fm_db may be used by one thread at a time
 * (the runtime holds ctx->lock); any number of processes may write the same file at once
 * (WAL, a 10 s busy timeout, every write one BEGIN IMMEDIATE transaction).
 *
 * Strings handed out (fm_db_best fields, fm_db_measurement pointers inside a callback) fit the
 * FM_DB_*_MAX sizes below: the schema's CHECK constraints refuse anything longer on the way in.
 */
#ifndef FM_DB_H
#define FM_DB_H

#include "../runtime/flashmoe.h"

#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Schema version written to PRAGMA user_version: the number of migrations in db.c. */
#define FM_DB_SCHEMA_VERSION 1
/* Oldest schema a READONLY open accepts (the read queries work on it). Raise it when a
 * migration changes something the lookups read. */
#define FM_DB_MIN_READABLE_VERSION 1
/* PRAGMA application_id of a flashmoe database ("fmdb"). */
#define FM_DB_APPLICATION_ID 0x666d6462

/* Buffer sizes, NUL included; the schema enforces byte length < these. */
#define FM_DB_DEVICE_MAX 128
#define FM_DB_OP_MAX 32
#define FM_DB_DTYPE_MAX 16
#define FM_DB_SHAPE_MAX 256
#define FM_DB_FAMILY_MAX 48
#define FM_DB_CONFIG_MAX 160
#define FM_DB_PARAMS_MAX 2304
#define FM_DB_HASH_MAX 64

/* fm_db_open flags. */
#define FM_DB_READONLY 1 /* never creates a database nor changes one (no migration, no journal
                            switch). Reading a WAL-mode file still needs SQLite's -shm/-wal
                            beside it and creates them if absent (empty, left behind); a file
                            built with FM_DB_NO_WAL is read with nothing created. */
#define FM_DB_CREATE 2   /* create the file (and its schema) if missing; read-write */
#define FM_DB_NO_WAL 4   /* read-write in rollback-journal mode: for a file to be installed
                            read-only (a WAL file needs writable -shm/-wal beside it) */

typedef struct fm_db fm_db; /* opaque */

/* Opens (and, read-write, migrates) the database at path. A path starting with "file:" is a
 * SQLite URI. Errors: FM_ERR_DATABASE for "no database at PATH" (missing, without CREATE), a file
 * that is not SQLite, a SQLite file that is not a flashmoe database, a failed quick_check, or a
 * schema version newer than FM_DB_SCHEMA_VERSION; such a file is left untouched. */
fm_status fm_db_open(fm_db **out, const char *path, int flags, char *err, size_t errlen);
void fm_db_close(fm_db *db); /* accepts NULL */
int fm_db_schema_version(const fm_db *db); /* user_version found at open (after migrating) */
const char *fm_db_path(const fm_db *db);
/* SQL of migration `version` (1..FM_DB_SCHEMA_VERSION), NULL otherwise. db/schema.sql holds the
 * same text; tests/test_db.c checks that it does. */
const char *fm_db_migration_sql(int version);
/* PRAGMA integrity_check (full = 1) or quick_check (full = 0); FM_ERR_DATABASE with the first
 * problem in err when not "ok". */
fm_status fm_db_check(fm_db *db, int full, char *err, size_t errlen);

/* ---- writing ------------------------------------------------------------------------------ */
/* A device is keyed by (name, cc_major, cc_minor); the other fields are updated on upsert. */
typedef struct fm_db_device {
    char name[FM_DB_DEVICE_MAX]; /* cuDeviceGetName, e.g. "NVIDIA H100 80GB HBM3" */
    int cc_major, cc_minor;
    int sm_count;
    long long mem_bytes;
    int driver_version; /* cuDriverGetVersion, e.g. 13000 */
    int nvrtc_version;  /* fm_nvrtc_version(): major*1000 + minor*10 */
} fm_db_device;

fm_status fm_db_upsert_device(fm_db *db, const fm_db_device *d, long long *id, char *err,
                              size_t errlen);
/* A configuration is keyed by its canonical name; family, params ("k=v,k=v") and template_hash
 * are updated to the given values (the current generator is the authority). */
fm_status fm_db_upsert_config(fm_db *db, const char *family, const char *name, const char *params,
                              const char *template_hash, long long *id, char *err, size_t errlen);

/* One attempt to run one configuration on one shape. Absent values: NaN for doubles, a negative
 * number for ints, NULL for strings (stored as SQL NULL). Start from fm_db_measurement_init. */
typedef struct fm_db_measurement {
    long long device_id; /* from fm_db_upsert_device */
    long long config_id; /* from fm_db_upsert_config */
    const char *op;      /* "attn_fwd", "moe_fwd", ... */
    const char *dtype;   /* "bf16", "fp16" */
    const char *shape;   /* canonical "k=v,..." string, an opaque key */
    const char *status;  /* "ok", "wrong", "fault", "compile_error", "rejected", "timeout" */
    const char *detail;  /* why it failed, a log excerpt, ... (may be NULL) */
    double median_ms, min_ms, mean_ms, stddev_ms; /* "ok" needs median_ms > 0 */
    int runs;
    double tflops, max_abs_err, rel_err;
    int registers, spills, smem_bytes;
    double compile_ms;
    const char *tool_version; /* NULL: "" */
    long long created_at;     /* unix seconds; 0: now */
    /* Filled by fm_db_foreach_measurement (valid during the callback); ignored when adding. */
    long long id;
    const char *device_name, *config_name, *family, *params;
    int cc_major, cc_minor;
} fm_db_measurement;

/* Every double NaN, every int -1, every pointer NULL, ids and created_at 0. */
void fm_db_measurement_init(fm_db_measurement *m);

/* Records m, and in the same transaction makes it the best for (device, op, dtype, shape) when
 * status is "ok" and it beats the current best. "Beats" is the order used everywhere:
 * (median_ms, config name, created_at) ascending. Adding the same natural key again
 * (device, op, dtype, shape, config, created_at, tool_version) replaces that row's values and
 * recomputes that key's best. */
fm_status fm_db_add_measurement(fm_db *db, const fm_db_measurement *m, char *err, size_t errlen);

/* Rebuilds best from the "ok" measurements, for every key that has one; best rows of keys with no
 * "ok" measurement (imported from a dump that carried only best rows) are kept. */
fm_status fm_db_recompute_best(fm_db *db, char *err, size_t errlen);

/* The tuner's sustained-load mode (fmtune --sustained): every "ok" measurement of (device, op,
 * dtype, shape) whose tool_version does not end in " sustained" becomes "rejected" with a detail
 * that keeps its median ("superseded by sustained-load timing"), so that best is chosen among
 * the sustained-load timings only (burst timings of other variants run at boost clocks and
 * would otherwise always win); best is recomputed for that key. *changed gets the row count. */
#define FM_DB_SUSTAINED_SUFFIX " sustained"
fm_status fm_db_supersede_burst(fm_db *db, long long device_id, const char *op, const char *dtype,
                                const char *shape, int *changed, char *err, size_t errlen);

/* The end of a sustained-load phase: that phase timed the best under load so far together with
 * the newcomers, in the same rounds, so its rows decide the key. Every "ok" sustained-load row of
 * (device, op, dtype, shape) created before `since` (the phase's start, seconds) becomes
 * "rejected" ("superseded by a later sustained-load phase"): an older, faster figure of the same
 * card model, taken on another machine or at another temperature, can no longer outrank a
 * variant that beat that configuration in the same rounds. Best is recomputed for the key.
 * *changed gets the row count. */
#define FM_DB_SUPERSEDED_SUSTAINED "superseded by a later sustained-load phase"
fm_status fm_db_supersede_sustained(fm_db *db, long long device_id, const char *op,
                                    const char *dtype, const char *shape, long long since,
                                    int *changed, char *err, size_t errlen);

/* ---- reading ------------------------------------------------------------------------------- */
/* *found = 1 when any measurement (any status) exists for this device name, op, dtype, shape and
 * configuration name: the tuner skips it when resuming. */
fm_status fm_db_has_measurement(fm_db *db, const char *device_name, const char *op,
                                const char *dtype, const char *shape, const char *config_name,
                                int *found, char *err, size_t errlen);

typedef struct fm_db_best {
    char device_name[FM_DB_DEVICE_MAX];
    int cc_major, cc_minor;
    char op[FM_DB_OP_MAX];
    char dtype[FM_DB_DTYPE_MAX];
    char shape[FM_DB_SHAPE_MAX];
    char config_name[FM_DB_CONFIG_MAX];
    char family[FM_DB_FAMILY_MAX];
    char params[FM_DB_PARAMS_MAX];
    double median_ms;
    double tflops;        /* NaN when not recorded */
    long long updated_at; /* created_at of the winning measurement */
} fm_db_best;

/* Exact lookup. FM_ERR_NOT_FOUND (err says what was looked for) when there is no entry. */
fm_status fm_db_lookup_best(fm_db *db, const char *device_name, const char *op, const char *dtype,
                            const char *shape, fm_db_best *out, char *err, size_t errlen);

/* Return non-zero from a callback to stop early (the call still returns FM_OK). Callbacks must
 * not write to the same fm_db. */
typedef int (*fm_db_best_cb)(void *user, const fm_db_best *b);
typedef int (*fm_db_measurement_cb)(void *user, const fm_db_measurement *m);

/* Every best entry for op and dtype, on device_name; NULL for any of the three means any.
 * Ordered by device name, compute capability, op, dtype, shape. */
fm_status fm_db_foreach_best(fm_db *db, const char *device_name, const char *op,
                             const char *dtype, fm_db_best_cb cb, void *user, char *err,
                             size_t errlen);

/* Selects measurements; a NULL field matches anything. Zero-initialise, set what you need. */
typedef struct fm_db_filter {
    const char *device_name, *op, *dtype, *shape, *config_name, *status;
} fm_db_filter;

/* filter NULL: all. Ordered as in the export (device, op, dtype, shape, config, created_at). */
fm_status fm_db_foreach_measurement(fm_db *db, const fm_db_filter *filter, fm_db_measurement_cb cb,
                                    void *user, char *err, size_t errlen);

/* ---- text dumps and merging ---------------------------------------------------------------- */
/* Writes the whole database as SQL text: a header comment naming the schema version, then one
 * INSERT per line for devices, configurations, measurements, best, each in key order. Ids never
 * appear: rows refer to each other by natural key through subselects, so the dump applies to any
 * database. Deterministic: the same content gives the same bytes (diffable, reviewable). */
fm_status fm_db_export(fm_db *db, FILE *out, char *err, size_t errlen);

/* Applies a dump made by fm_db_export (of this or an older schema version) in one transaction,
 * then recomputes best. A key that now has sustained-load timings (FM_DB_SUSTAINED_SUFFIX) is
 * decided among them: its burst rows are superseded as fm_db_supersede_burst does, whichever
 * side they came from. Idempotent: rows already present (by natural key) are kept, so applying
 * the same dump twice changes nothing. Only plain "INSERT INTO" one of the four tables is
 * accepted (checked by SQLite's authorizer); any other statement, a row naming a device or
 * configuration the dump lacks, a missing header or a missing final "-- end" line (a truncated
 * dump) is FM_ERR_INVALID_ARGUMENT naming the dump line, and nothing is applied. */
fm_status fm_db_import(fm_db *db, const char *sql_text, char *err, size_t errlen);

/* Merges the rows of the flashmoe database at other_path (opened read-only; must have the same
 * schema version) the same way as an import (sustained-load timings decide their keys), then
 * recomputes best. */
fm_status fm_db_merge(fm_db *db, const char *other_path, char *err, size_t errlen);

/* ---- shapes -------------------------------------------------------------------------------- */
/* Integer value of `key` in a canonical shape string "k=v,k=v,...".
 * Returns 1 and sets *out when present, 0 when absent, -1 when present but not an integer. */
int fm_shape_get(const char *shape, const char *key, long long *out);

#ifdef __cplusplus
}
#endif
#endif /* FM_DB_H */
