/*
 * db.c - the tuning database on SQLite.
 *
 * Migrations: fm_db_migrations[i] takes user_version i to i+1. Adding migration 2 means appending
 * one string (and the same text to db/schema.sql); FM_DB_SCHEMA_VERSION follows from the array.
 *
 * Concurrency: several fmtune processes may tune into one file. WAL lets readers run beside the
 * one writer; every write is BEGIN IMMEDIATE so a writer takes the write lock before it reads
 * anything it decides on (a deferred transaction that upgrades later can fail with BUSY_SNAPSHOT
 * instead of waiting), and the 10 s busy timeout turns contention into waiting, not errors.
 */
#define _POSIX_C_SOURCE 200809L

#include "db.h"

#include <errno.h>
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <sqlite3.h>

#define FM_DB_BUSY_TIMEOUT_MS 10000

/* ---- schema -------------------------------------------------------------------------------- */
/* Length limits are byte lengths (CAST AS BLOB) so that readers can copy into the fixed buffers
 * of db.h without truncation. Key columns are NOT NULL: SQLite treats NULLs as distinct in a
 * UNIQUE index, which would let a re-import duplicate rows. */
static const char *const fm_db_migrations[] = {
    /* 1: everything */
    "CREATE TABLE devices (\n"
    "  id INTEGER PRIMARY KEY,\n"
    "  name TEXT NOT NULL CHECK (length(CAST(name AS BLOB)) BETWEEN 1 AND 127),\n"
    "  cc_major INTEGER NOT NULL,\n"
    "  cc_minor INTEGER NOT NULL,\n"
    "  sm_count INTEGER,\n"
    "  mem_bytes INTEGER,\n"
    "  driver_version INTEGER,\n"
    "  nvrtc_version INTEGER,\n"
    "  UNIQUE (name, cc_major, cc_minor)\n"
    ");\n"
    "CREATE TABLE configurations (\n"
    "  id INTEGER PRIMARY KEY,\n"
    "  family TEXT NOT NULL CHECK (length(CAST(family AS BLOB)) BETWEEN 1 AND 47),\n"
    "  name TEXT NOT NULL UNIQUE CHECK (length(CAST(name AS BLOB)) BETWEEN 1 AND 159),\n"
    "  params TEXT NOT NULL CHECK (length(CAST(params AS BLOB)) < 2304),\n"
    "  template_hash TEXT NOT NULL DEFAULT '' CHECK (length(CAST(template_hash AS BLOB)) < 64)\n"
    ");\n"
    "CREATE TABLE measurements (\n"
    "  id INTEGER PRIMARY KEY,\n"
    "  device_id INTEGER NOT NULL REFERENCES devices(id),\n"
    "  op TEXT NOT NULL CHECK (length(CAST(op AS BLOB)) BETWEEN 1 AND 31),\n"
    "  dtype TEXT NOT NULL CHECK (length(CAST(dtype AS BLOB)) BETWEEN 1 AND 15),\n"
    "  shape TEXT NOT NULL CHECK (length(CAST(shape AS BLOB)) BETWEEN 1 AND 255),\n"
    "  config_id INTEGER NOT NULL REFERENCES configurations(id),\n"
    "  status TEXT NOT NULL\n"
    "    CHECK (status IN ('ok','wrong','fault','compile_error','rejected','timeout')),\n"
    "  detail TEXT,\n"
    "  median_ms REAL,\n"
    "  min_ms REAL,\n"
    "  mean_ms REAL,\n"
    "  stddev_ms REAL,\n"
    "  runs INTEGER,\n"
    "  tflops REAL,\n"
    "  max_abs_err REAL,\n"
    "  rel_err REAL,\n"
    "  registers INTEGER,\n"
    "  spills INTEGER,\n"
    "  smem_bytes INTEGER,\n"
    "  compile_ms REAL,\n"
    "  tool_version TEXT NOT NULL DEFAULT '',\n"
    "  created_at INTEGER NOT NULL,\n"
    "  CHECK (status <> 'ok' OR median_ms > 0)\n"
    ");\n"
    "-- The natural key: what makes a re-imported row the same row. Its prefix serves the\n"
    "-- per-shape lookups (resume, best recomputation).\n"
    "CREATE UNIQUE INDEX measurements_key ON measurements\n"
    "  (device_id, op, dtype, shape, config_id, created_at, tool_version);\n"
    "CREATE INDEX measurements_config ON measurements (config_id);\n"
    "CREATE TABLE best (\n"
    "  device_id INTEGER NOT NULL REFERENCES devices(id),\n"
    "  op TEXT NOT NULL CHECK (length(CAST(op AS BLOB)) BETWEEN 1 AND 31),\n"
    "  dtype TEXT NOT NULL CHECK (length(CAST(dtype AS BLOB)) BETWEEN 1 AND 15),\n"
    "  shape TEXT NOT NULL CHECK (length(CAST(shape AS BLOB)) BETWEEN 1 AND 255),\n"
    "  config_id INTEGER NOT NULL REFERENCES configurations(id),\n"
    "  median_ms REAL NOT NULL CHECK (median_ms > 0),\n"
    "  tflops REAL,\n"
    "  updated_at INTEGER NOT NULL,\n"
    "  PRIMARY KEY (device_id, op, dtype, shape)\n"
    ") WITHOUT ROWID;\n"
    "-- Nearest-shape search scans every device's entries for one op and dtype.\n"
    "CREATE INDEX best_op ON best (op, dtype);\n",
    /* 2: append here. */
};

#define FM_DB_NMIGRATIONS ((int)(sizeof fm_db_migrations / sizeof fm_db_migrations[0]))
_Static_assert(FM_DB_NMIGRATIONS == FM_DB_SCHEMA_VERSION,
               "FM_DB_SCHEMA_VERSION must equal the number of migrations");

#define DUMP_MAGIC "-- flashmoe tuning database dump"
#define DUMP_END "-- end"

struct fm_db {
    sqlite3 *h;
    int flags;
    int version;
    char *path;
};

/* ---- errors -------------------------------------------------------------------------------- */
static fm_status seterr(char *err, size_t errlen, fm_status s, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static fm_status seterr(char *err, size_t errlen, fm_status s, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return s;
}

static fm_status status_of(int rc) {
    switch (rc & 0xff) {
    case SQLITE_NOMEM:
        return FM_ERR_OUT_OF_MEMORY;
    default:
        return FM_ERR_DATABASE;
    }
}

/* The connection's last error, attributed to `what` and the file. */
static fm_status sqlfail(const fm_db *db, char *err, size_t errlen, const char *what) {
    int rc = sqlite3_extended_errcode(db->h);
    return seterr(err, errlen, status_of(rc), "%s: %s: %s", db->path, what,
                  sqlite3_errmsg(db->h));
}

const char *fm_db_migration_sql(int version) {
    if (version < 1 || version > FM_DB_NMIGRATIONS) return NULL;
    return fm_db_migrations[version - 1];
}

int fm_db_schema_version(const fm_db *db) { return db ? db->version : 0; }
const char *fm_db_path(const fm_db *db) { return db ? db->path : NULL; }

/* ---- small statement helpers --------------------------------------------------------------- */
static fm_status prep(fm_db *db, const char *sql, sqlite3_stmt **st, char *err, size_t errlen) {
    if (sqlite3_prepare_v2(db->h, sql, -1, st, NULL) != SQLITE_OK) {
        *st = NULL;
        return sqlfail(db, err, errlen, "prepare");
    }
    return FM_OK;
}

static void bind_text(sqlite3_stmt *st, int i, const char *s) {
    if (s)
        sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT);
    else
        sqlite3_bind_null(st, i);
}

static void bind_real(sqlite3_stmt *st, int i, double v) {
    if (isnan(v))
        sqlite3_bind_null(st, i);
    else
        sqlite3_bind_double(st, i, v);
}

static void bind_count(sqlite3_stmt *st, int i, long long v) {
    if (v < 0)
        sqlite3_bind_null(st, i);
    else
        sqlite3_bind_int64(st, i, v);
}

static double col_real(sqlite3_stmt *st, int i) {
    return sqlite3_column_type(st, i) == SQLITE_NULL ? NAN : sqlite3_column_double(st, i);
}

static int col_int(sqlite3_stmt *st, int i) {
    if (sqlite3_column_type(st, i) == SQLITE_NULL) return -1;
    long long v = sqlite3_column_int64(st, i);
    return (v < -2147483647LL || v > 2147483647LL) ? -1 : (int)v;
}

static const char *col_text(sqlite3_stmt *st, int i) {
    return (const char *)sqlite3_column_text(st, i);
}

/* Copies column i into dst; the schema's length CHECKs make failure a sign of a foreign row. */
static int col_copy(sqlite3_stmt *st, int i, char *dst, size_t cap) {
    const char *s = col_text(st, i);
    size_t n = s ? strlen(s) : 0;
    if (n >= cap) {
        dst[0] = 0;
        return -1;
    }
    if (n) memcpy(dst, s, n);
    dst[n] = 0;
    return 0;
}

static fm_status exec(fm_db *db, const char *sql, char *err, size_t errlen) {
    char *msg = NULL;
    int rc = sqlite3_exec(db->h, sql, NULL, NULL, &msg);
    if (rc != SQLITE_OK) {
        fm_status s = seterr(err, errlen, status_of(rc), "%s: %s", db->path,
                             msg ? msg : sqlite3_errstr(rc));
        sqlite3_free(msg);
        return s;
    }
    return FM_OK;
}

static fm_status begin_write(fm_db *db, char *err, size_t errlen) {
    if (db->flags & FM_DB_READONLY)
        return seterr(err, errlen, FM_ERR_DATABASE, "%s: opened read-only", db->path);
    if (sqlite3_exec(db->h, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
        return sqlfail(db, err, errlen, "cannot start a write transaction");
    return FM_OK;
}

static fm_status commit(fm_db *db, char *err, size_t errlen) {
    if (sqlite3_exec(db->h, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        fm_status s = sqlfail(db, err, errlen, "commit");
        sqlite3_exec(db->h, "ROLLBACK", NULL, NULL, NULL);
        return s;
    }
    return FM_OK;
}

static void rollback(fm_db *db) {
    if (!sqlite3_get_autocommit(db->h)) sqlite3_exec(db->h, "ROLLBACK", NULL, NULL, NULL);
}

/* Runs a single-row integer query; -1 on error. */
static long long query_int(fm_db *db, const char *sql, int *rc_out) {
    sqlite3_stmt *st = NULL;
    long long v = -1;
    int rc = sqlite3_prepare_v2(db->h, sql, -1, &st, NULL);
    if (rc == SQLITE_OK) {
        rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            v = sqlite3_column_int64(st, 0);
            rc = SQLITE_OK;
        } else if (rc == SQLITE_DONE) {
            rc = SQLITE_OK;
        }
    }
    sqlite3_finalize(st);
    if (rc_out) *rc_out = rc;
    return v;
}

/* file: URI for `path` with query `query`, escaping every byte that could end the path. */
static char *file_uri(const char *path, const char *query) {
    size_t n = strlen(path);
    char *u = malloc(n * 3 + strlen(query) + 8);
    if (!u) return NULL;
    char *o = u;
    o += sprintf(o, "file:");
    for (const unsigned char *p = (const unsigned char *)path; *p; p++) {
        unsigned c = *p;
        int plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '/' || c == '-' || c == '_' || c == '.' || c == '~';
        if (plain)
            *o++ = (char)c;
        else
            o += sprintf(o, "%%%02X", c);
    }
    sprintf(o, "?%s", query);
    return u;
}

/* ---- open ---------------------------------------------------------------------------------- */
typedef struct probe {
    long long app_id, version, ntables, nours;
} probe;

/* Reads the identity of the file. The first read is where SQLite notices that a file is not a
 * database at all, so this also tells garbage from an empty file. */
static fm_status probe_file(fm_db *db, probe *p, int *rc_out, char *err, size_t errlen) {
    int rc = SQLITE_OK;
    /* One snapshot for all four reads: another process may commit migration 1 between two
     * autocommit reads, and (application_id 0, 4 tables) would then look like a foreign file. */
    int own_txn = sqlite3_get_autocommit(db->h);
    if (own_txn) rc = sqlite3_exec(db->h, "BEGIN", NULL, NULL, NULL);
    if (rc == SQLITE_OK) p->app_id = query_int(db, "PRAGMA application_id", &rc);
    if (rc == SQLITE_OK) p->version = query_int(db, "PRAGMA user_version", &rc);
    if (rc == SQLITE_OK)
        p->ntables = query_int(db, "SELECT count(*) FROM sqlite_schema WHERE type='table'", &rc);
    if (rc == SQLITE_OK)
        p->nours = query_int(db,
                             "SELECT count(*) FROM sqlite_schema WHERE type='table' AND name IN "
                             "('devices','configurations','measurements','best')",
                             &rc);
    if (own_txn && !sqlite3_get_autocommit(db->h)) sqlite3_exec(db->h, "COMMIT", NULL, NULL, NULL);
    if (rc_out) *rc_out = rc;
    if (rc == SQLITE_NOTADB)
        return seterr(err, errlen, FM_ERR_DATABASE,
                      "%s is not a flashmoe tuning database (not a SQLite file: %s)", db->path,
                      sqlite3_errmsg(db->h));
    if ((rc & 0xff) == SQLITE_CANTOPEN && (db->flags & FM_DB_READONLY))
        return seterr(err, errlen, FM_ERR_DATABASE,
                      "%s: cannot read: %s (a WAL-mode database in use needs write access to "
                      "its -shm/-wal files; build files to be installed with FM_DB_NO_WAL)",
                      db->path, sqlite3_errstr(rc));
    if (rc != SQLITE_OK) return sqlfail(db, err, errlen, "cannot read the database header");
    return FM_OK;
}

/* Decides from the probe whether the file is ours; `fresh` = an empty file we may initialise. */
static fm_status judge(fm_db *db, const probe *p, int *fresh, char *err, size_t errlen) {
    *fresh = 0;
    if (p->app_id == 0 && p->version == 0 && p->ntables == 0) {
        if (db->flags & FM_DB_CREATE) {
            *fresh = 1;
            return FM_OK;
        }
        return seterr(err, errlen, FM_ERR_DATABASE,
                      "%s is an empty SQLite file, not a flashmoe tuning database", db->path);
    }
    if (p->app_id != FM_DB_APPLICATION_ID)
        return seterr(err, errlen, FM_ERR_DATABASE,
                      "%s is a SQLite database but not a flashmoe tuning database "
                      "(application_id 0x%llx, expected 0x%x; %lld tables)",
                      db->path, p->app_id, FM_DB_APPLICATION_ID, p->ntables);
    if (p->version > FM_DB_SCHEMA_VERSION)
        return seterr(err, errlen, FM_ERR_DATABASE,
                      "%s has schema version %lld, newer than this build's %d: use a newer "
                      "flashmoe (or export it there and import the dump here)",
                      db->path, p->version, FM_DB_SCHEMA_VERSION);
    if (p->version >= 1 && p->nours != 4)
        return seterr(err, errlen, FM_ERR_DATABASE,
                      "%s: flashmoe schema version %lld but only %lld of its 4 tables are there",
                      db->path, p->version, p->nours);
    if ((db->flags & FM_DB_READONLY) && p->version < FM_DB_MIN_READABLE_VERSION)
        return seterr(err, errlen, FM_ERR_DATABASE,
                      "%s has schema version %lld, too old to read (need %d): open it "
                      "read-write once (fmtune db check) to upgrade it",
                      db->path, p->version, FM_DB_MIN_READABLE_VERSION);
    return FM_OK;
}

/* Runs quick_check/integrity_check; on failure err gets the first problems on one line. */
static fm_status quick_check(fm_db *db, const char *pragma, char *err, size_t errlen) {
    sqlite3_stmt *st = NULL;
    fm_status s = prep(db, pragma, &st, err, errlen);
    if (s != FM_OK) return s;
    char msg[512] = "";
    size_t used = 0;
    int rc, rows = 0, clean = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *r = col_text(st, 0);
        if (rows++ == 0 && r && strcmp(r, "ok") == 0) {
            clean = 1;
            break;
        }
        /* SQLite starts the first problem with "*** in database main ***\n"; drop that. */
        if (r && strncmp(r, "*** in database", 15) == 0) {
            const char *nl = strchr(r, '\n');
            r = nl ? nl + 1 : "";
        }
        if (used && used + 3 < sizeof msg) {
            msg[used++] = ';';
            msg[used++] = ' ';
        }
        for (; r && *r && used + 1 < sizeof msg; r++) msg[used++] = *r == '\n' ? ' ' : *r;
        msg[used] = 0;
    }
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        s = sqlfail(db, err, errlen, "integrity check");
    else if (!clean)
        s = seterr(err, errlen, FM_ERR_DATABASE, "%s is corrupt: %s", db->path,
                   rows ? msg : "(the check gave no result)");
    sqlite3_finalize(st);
    return s;
}

/* Brings the schema to FM_DB_SCHEMA_VERSION under the write lock. Another process may have
 * migrated between our probe and the lock, so the version is read again inside. */
static fm_status migrate(fm_db *db, char *err, size_t errlen) {
    fm_status s = begin_write(db, err, errlen);
    if (s != FM_OK) return s;
    probe p = {0, 0, 0, 0};
    int fresh = 0;
    s = probe_file(db, &p, NULL, err, errlen);
    if (s == FM_OK) s = judge(db, &p, &fresh, err, errlen);
    for (long long v = p.version; s == FM_OK && v < FM_DB_SCHEMA_VERSION; v++) {
        char sql[96];
        s = exec(db, fm_db_migrations[v], err, errlen);
        if (s != FM_OK) break;
        snprintf(sql, sizeof sql, "PRAGMA user_version = %lld; PRAGMA application_id = %d;",
                 v + 1, FM_DB_APPLICATION_ID);
        s = exec(db, sql, err, errlen);
    }
    if (s != FM_OK) {
        rollback(db);
        return s;
    }
    s = commit(db, err, errlen);
    if (s == FM_OK) db->version = FM_DB_SCHEMA_VERSION;
    return s;
}

/* journal_mode changes need a moment of exclusive access; a writer busy in another process can
 * refuse it without invoking the busy handler, so retry for as long as the busy timeout. */
static fm_status set_journal(fm_db *db, const char *mode, char *err, size_t errlen) {
    char sql[48];
    snprintf(sql, sizeof sql, "PRAGMA journal_mode=%s", mode);
    for (int tries = 0;; tries++) {
        sqlite3_stmt *st = NULL;
        int rc = sqlite3_prepare_v2(db->h, sql, -1, &st, NULL);
        if (rc == SQLITE_OK) {
            rc = sqlite3_step(st);
            if (rc == SQLITE_ROW) rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
        if (rc == SQLITE_OK) return FM_OK;
        if ((rc & 0xff) != SQLITE_BUSY && (rc & 0xff) != SQLITE_LOCKED)
            return sqlfail(db, err, errlen, "cannot set the journal mode");
        if (tries * 10 >= FM_DB_BUSY_TIMEOUT_MS)
            return sqlfail(db, err, errlen, "cannot set the journal mode");
        sqlite3_sleep(10);
    }
}

fm_status fm_db_open(fm_db **out, const char *path, int flags, char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    if (!out || !path || !*path)
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT, "fm_db_open: no path");
    *out = NULL;
    if ((flags & ~(FM_DB_READONLY | FM_DB_CREATE | FM_DB_NO_WAL)) ||
        ((flags & FM_DB_READONLY) && (flags & (FM_DB_CREATE | FM_DB_NO_WAL))))
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                      "fm_db_open: bad flags 0x%x (READONLY excludes CREATE and NO_WAL)", flags);

    /* SQLite's own message for a missing file is "unable to open database file"; say what it
     * means. A URI names its file indirectly, so leave those to SQLite. */
    int is_uri = strncmp(path, "file:", 5) == 0;
    struct stat sb;
    if (!is_uri && !(flags & FM_DB_CREATE) && stat(path, &sb) != 0)
        return seterr(err, errlen, FM_ERR_DATABASE, "no database at %s", path);
    if (!is_uri && stat(path, &sb) == 0 && !S_ISREG(sb.st_mode))
        return seterr(err, errlen, FM_ERR_DATABASE, "%s is not a regular file", path);

    fm_db *db = calloc(1, sizeof *db);
    if (!db) return seterr(err, errlen, FM_ERR_OUT_OF_MEMORY, "fm_db_open: out of memory");
    db->flags = flags;
    db->path = strdup(path);
    if (!db->path) {
        free(db);
        return seterr(err, errlen, FM_ERR_OUT_OF_MEMORY, "fm_db_open: out of memory");
    }
    int oflags = SQLITE_OPEN_URI | SQLITE_OPEN_FULLMUTEX |
                 ((flags & FM_DB_READONLY) ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE) |
                 ((flags & FM_DB_CREATE) ? SQLITE_OPEN_CREATE : 0);
    fm_status s = FM_OK;
    int rc = sqlite3_open_v2(path, &db->h, oflags, NULL);
    if (rc != SQLITE_OK) {
        s = seterr(err, errlen, status_of(rc), "cannot open %s: %s", path,
                   db->h ? sqlite3_errmsg(db->h) : sqlite3_errstr(rc));
        goto fail;
    }
    sqlite3_extended_result_codes(db->h, 1);
    sqlite3_busy_timeout(db->h, FM_DB_BUSY_TIMEOUT_MS);

    probe p = {0, 0, 0, 0};
    int fresh = 0, prc = SQLITE_OK;
    s = probe_file(db, &p, &prc, err, errlen);
    if (s != FM_OK && (flags & FM_DB_READONLY) && (prc & 0xff) == SQLITE_CANTOPEN && !is_uri) {
        /* A WAL-mode file whose -shm cannot be created: typically the shipped database installed
         * in a read-only directory. With no -wal beside it and no way to create one, no process
         * can be writing it, so SQLite may read it as immutable (no locks, no -shm). */
        char wal[4096];
        snprintf(wal, sizeof wal, "%s-wal", path);
        if (strlen(path) + 5 < sizeof wal && stat(wal, &sb) != 0) {
            char *uri = file_uri(path, "immutable=1");
            sqlite3_close(db->h);
            db->h = NULL;
            rc = uri ? sqlite3_open_v2(uri, &db->h, oflags, NULL) : SQLITE_NOMEM;
            free(uri);
            if (rc != SQLITE_OK) {
                s = seterr(err, errlen, status_of(rc), "cannot open %s: %s", path,
                           db->h ? sqlite3_errmsg(db->h) : sqlite3_errstr(rc));
                goto fail;
            }
            sqlite3_extended_result_codes(db->h, 1);
            s = probe_file(db, &p, NULL, err, errlen);
        }
    }
    if (s == FM_OK) s = judge(db, &p, &fresh, err, errlen);
    /* A fresh file has nothing to check; anything else is read by someone, so a torn page must
     * surface here as a clear error rather than as a wrong lookup later. */
    if (s == FM_OK && !fresh) s = quick_check(db, "PRAGMA quick_check(3)", err, errlen);
    if (s != FM_OK) goto fail;
    db->version = (int)p.version;

    if (!(flags & FM_DB_READONLY)) {
        s = exec(db, "PRAGMA foreign_keys=ON", err, errlen);
        /* WAL makes a commit one append; NORMAL skips the fsync per commit (a power cut may lose
         * the last commits, never consistency), which matters when 4 tuners commit per result. */
        if (s == FM_OK)
            s = set_journal(db, (flags & FM_DB_NO_WAL) ? "DELETE" : "WAL", err, errlen);
        if (s == FM_OK)
            s = exec(db, (flags & FM_DB_NO_WAL) ? "PRAGMA synchronous=FULL"
                                                : "PRAGMA synchronous=NORMAL",
                     err, errlen);
        if (s == FM_OK && (fresh || p.version < FM_DB_SCHEMA_VERSION))
            s = migrate(db, err, errlen);
        if (s != FM_OK) goto fail;
    }
    *out = db;
    return FM_OK;

fail:
    sqlite3_close(db->h);
    free(db->path);
    free(db);
    return s;
}

void fm_db_close(fm_db *db) {
    if (!db) return;
    sqlite3_close(db->h); /* every statement is finalized by the call that made it */
    free(db->path);
    free(db);
}

fm_status fm_db_check(fm_db *db, int full, char *err, size_t errlen) {
    if (!db) return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT, "fm_db_check: no database");
    return quick_check(db, full ? "PRAGMA integrity_check(3)" : "PRAGMA quick_check(3)", err,
                       errlen);
}

/* ---- writing ------------------------------------------------------------------------------- */
static int len_ok(const char *s, size_t max) { return s && *s && strlen(s) < max; }

/* The end of a single-row upsert in its own write transaction: steps the bound INSERT ...
 * RETURNING id statement (s: how preparing and binding went), finalizes it, and commits or rolls
 * back. */
static fm_status finish_upsert(fm_db *db, sqlite3_stmt *st, fm_status s, long long *id,
                               const char *what, char *err, size_t errlen) {
    if (s == FM_OK) {
        if (sqlite3_step(st) == SQLITE_ROW) {
            if (id) *id = sqlite3_column_int64(st, 0);
        } else {
            s = sqlfail(db, err, errlen, what);
        }
    }
    sqlite3_finalize(st);
    if (s != FM_OK) {
        rollback(db);
        return s;
    }
    return commit(db, err, errlen);
}

fm_status fm_db_upsert_device(fm_db *db, const fm_db_device *d, long long *id, char *err,
                              size_t errlen) {
    if (!db || !d || !memchr(d->name, 0, sizeof d->name) || !d->name[0])
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT, "fm_db_upsert_device: no device name");
    fm_status s = begin_write(db, err, errlen);
    if (s != FM_OK) return s;
    sqlite3_stmt *st = NULL;
    s = prep(db,
             "INSERT INTO devices(name,cc_major,cc_minor,sm_count,mem_bytes,driver_version,"
             "nvrtc_version) VALUES(?1,?2,?3,?4,?5,?6,?7) "
             "ON CONFLICT(name,cc_major,cc_minor) DO UPDATE SET sm_count=excluded.sm_count,"
             "mem_bytes=excluded.mem_bytes,driver_version=excluded.driver_version,"
             "nvrtc_version=excluded.nvrtc_version RETURNING id",
             &st, err, errlen);
    if (s == FM_OK) {
        sqlite3_bind_text(st, 1, d->name, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int(st, 2, d->cc_major);
        sqlite3_bind_int(st, 3, d->cc_minor);
        bind_count(st, 4, d->sm_count);
        bind_count(st, 5, d->mem_bytes);
        bind_count(st, 6, d->driver_version);
        bind_count(st, 7, d->nvrtc_version);
    }
    return finish_upsert(db, st, s, id, "cannot record device", err, errlen);
}

fm_status fm_db_upsert_config(fm_db *db, const char *family, const char *name, const char *params,
                              const char *template_hash, long long *id, char *err,
                              size_t errlen) {
    if (!db || !len_ok(family, FM_DB_FAMILY_MAX) || !len_ok(name, FM_DB_CONFIG_MAX) ||
        !params || strlen(params) >= FM_DB_PARAMS_MAX ||
        (template_hash && strlen(template_hash) >= FM_DB_HASH_MAX))
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                      "fm_db_upsert_config: family, name and params are required and must fit "
                      "%d, %d and %d bytes (name: %.60s)",
                      FM_DB_FAMILY_MAX - 1, FM_DB_CONFIG_MAX - 1, FM_DB_PARAMS_MAX - 1,
                      name ? name : "(null)");
    fm_status s = begin_write(db, err, errlen);
    if (s != FM_OK) return s;
    sqlite3_stmt *st = NULL;
    s = prep(db,
             "INSERT INTO configurations(family,name,params,template_hash) VALUES(?1,?2,?3,?4) "
             "ON CONFLICT(name) DO UPDATE SET family=excluded.family,params=excluded.params,"
             "template_hash=excluded.template_hash RETURNING id",
             &st, err, errlen);
    if (s == FM_OK) {
        sqlite3_bind_text(st, 1, family, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 2, name, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 3, params, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 4, template_hash ? template_hash : "", -1, SQLITE_TRANSIENT);
    }
    return finish_upsert(db, st, s, id, "cannot record configuration", err, errlen);
}

void fm_db_measurement_init(fm_db_measurement *m) {
    memset(m, 0, sizeof *m);
    m->median_ms = m->min_ms = m->mean_ms = m->stddev_ms = NAN;
    m->tflops = m->max_abs_err = m->rel_err = m->compile_ms = NAN;
    m->runs = m->registers = m->spills = m->smem_bytes = -1;
    m->cc_major = m->cc_minor = -1;
}

static int status_ok(const char *s) {
    static const char *const all[] = {"ok",       "wrong",    "fault",
                                      "compile_error", "rejected", "timeout"};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (strcmp(s, all[i]) == 0) return 1;
    return 0;
}

/* The best-entry order, (median_ms, config name, created_at) ascending, is spelled once for the
 * whole-table rebuild and the per-key rebuild below, and once as a row-value comparison in
 * add_best_sql; the three must agree so that best is a function of the measurements no matter in
 * which order they arrived (one tuner, four tuners, a merge). */
#define BEST_ORDER "m.median_ms, c.name, m.created_at, m.tflops DESC, m.tool_version"

static const char add_best_sql[] =
    "INSERT INTO best(device_id,op,dtype,shape,config_id,median_ms,tflops,updated_at) "
    "VALUES(?1,?2,?3,?4,?5,?6,?7,?8) ON CONFLICT(device_id,op,dtype,shape) DO UPDATE SET "
    "config_id=excluded.config_id,median_ms=excluded.median_ms,tflops=excluded.tflops,"
    "updated_at=excluded.updated_at WHERE "
    "(excluded.median_ms,(SELECT name FROM configurations WHERE id=excluded.config_id),"
    "excluded.updated_at) < "
    "(best.median_ms,(SELECT name FROM configurations WHERE id=best.config_id),best.updated_at)";

static const char key_best_sql[] =
    "DELETE FROM best WHERE device_id=?1 AND op=?2 AND dtype=?3 AND shape=?4;"
    "INSERT INTO best(device_id,op,dtype,shape,config_id,median_ms,tflops,updated_at) "
    "SELECT m.device_id,m.op,m.dtype,m.shape,m.config_id,m.median_ms,m.tflops,m.created_at "
    "FROM measurements m JOIN configurations c ON c.id=m.config_id WHERE m.status='ok' AND "
    "m.device_id=?1 AND m.op=?2 AND m.dtype=?3 AND m.shape=?4 ORDER BY " BEST_ORDER " LIMIT 1";

static const char all_best_sql[] =
    "DELETE FROM best WHERE EXISTS (SELECT 1 FROM measurements m WHERE m.status='ok' AND "
    "m.device_id=best.device_id AND m.op=best.op AND m.dtype=best.dtype AND m.shape=best.shape);"
    "INSERT INTO best(device_id,op,dtype,shape,config_id,median_ms,tflops,updated_at) "
    "SELECT device_id,op,dtype,shape,config_id,median_ms,tflops,created_at FROM ("
    "SELECT m.device_id,m.op,m.dtype,m.shape,m.config_id,m.median_ms,m.tflops,m.created_at,"
    "row_number() OVER (PARTITION BY m.device_id,m.op,m.dtype,m.shape ORDER BY " BEST_ORDER
    ") AS rn FROM measurements m JOIN configurations c ON c.id=m.config_id WHERE m.status='ok') "
    "WHERE rn=1";

/* Runs the two statements of key_best_sql with the key bound. */
static fm_status recompute_key(fm_db *db, long long dev, const char *op, const char *dtype,
                               const char *shape, char *err, size_t errlen) {
    const char *sql = key_best_sql;
    while (*sql) {
        sqlite3_stmt *st = NULL;
        const char *tail = NULL;
        if (sqlite3_prepare_v2(db->h, sql, -1, &st, &tail) != SQLITE_OK)
            return sqlfail(db, err, errlen, "prepare");
        sqlite3_bind_int64(st, 1, dev);
        sqlite3_bind_text(st, 2, op, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 3, dtype, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 4, shape, -1, SQLITE_TRANSIENT);
        int rc = sqlite3_step(st);
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE) return sqlfail(db, err, errlen, "cannot recompute best");
        sql = tail;
    }
    return FM_OK;
}

fm_status fm_db_add_measurement(fm_db *db, const fm_db_measurement *m, char *err, size_t errlen) {
    if (!db || !m)
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT, "fm_db_add_measurement: no input");
    if (!len_ok(m->op, FM_DB_OP_MAX) || !len_ok(m->dtype, FM_DB_DTYPE_MAX) ||
        !len_ok(m->shape, FM_DB_SHAPE_MAX))
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                      "fm_db_add_measurement: op, dtype and shape are required and must fit %d, "
                      "%d and %d bytes",
                      FM_DB_OP_MAX - 1, FM_DB_DTYPE_MAX - 1, FM_DB_SHAPE_MAX - 1);
    if (!m->status || !status_ok(m->status))
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                      "fm_db_add_measurement: status '%s' is not one of ok, wrong, fault, "
                      "compile_error, rejected, timeout",
                      m->status ? m->status : "(null)");
    int ok = strcmp(m->status, "ok") == 0;
    if (ok && !(m->median_ms > 0))
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                      "fm_db_add_measurement: status ok needs median_ms > 0 (shape %s)",
                      m->shape);
    long long created = m->created_at ? m->created_at : (long long)time(NULL);
    const char *tv = m->tool_version ? m->tool_version : "";

    fm_status s = begin_write(db, err, errlen);
    if (s != FM_OK) return s;
    sqlite3_stmt *st = NULL;
    int existed = 0;
    s = prep(db,
             "SELECT 1 FROM measurements WHERE device_id=?1 AND op=?2 AND dtype=?3 AND shape=?4 "
             "AND config_id=?5 AND created_at=?6 AND tool_version=?7",
             &st, err, errlen);
    if (s == FM_OK) {
        sqlite3_bind_int64(st, 1, m->device_id);
        sqlite3_bind_text(st, 2, m->op, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 3, m->dtype, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 4, m->shape, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 5, m->config_id);
        sqlite3_bind_int64(st, 6, created);
        sqlite3_bind_text(st, 7, tv, -1, SQLITE_TRANSIENT);
        int rc = sqlite3_step(st);
        if (rc == SQLITE_ROW)
            existed = 1;
        else if (rc != SQLITE_DONE)
            s = sqlfail(db, err, errlen, "cannot read measurements");
        sqlite3_finalize(st);
    }
    if (s == FM_OK)
        s = prep(db,
                 "INSERT INTO measurements(device_id,op,dtype,shape,config_id,status,detail,"
                 "median_ms,min_ms,mean_ms,stddev_ms,runs,tflops,max_abs_err,rel_err,registers,"
                 "spills,smem_bytes,compile_ms,tool_version,created_at) VALUES(?1,?2,?3,?4,?5,?6,"
                 "?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,?21) "
                 "ON CONFLICT(device_id,op,dtype,shape,config_id,created_at,tool_version) DO "
                 "UPDATE SET status=excluded.status,detail=excluded.detail,"
                 "median_ms=excluded.median_ms,min_ms=excluded.min_ms,mean_ms=excluded.mean_ms,"
                 "stddev_ms=excluded.stddev_ms,runs=excluded.runs,tflops=excluded.tflops,"
                 "max_abs_err=excluded.max_abs_err,rel_err=excluded.rel_err,"
                 "registers=excluded.registers,spills=excluded.spills,"
                 "smem_bytes=excluded.smem_bytes,compile_ms=excluded.compile_ms",
                 &st, err, errlen);
    if (s == FM_OK) {
        sqlite3_bind_int64(st, 1, m->device_id);
        sqlite3_bind_text(st, 2, m->op, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 3, m->dtype, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 4, m->shape, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 5, m->config_id);
        sqlite3_bind_text(st, 6, m->status, -1, SQLITE_TRANSIENT);
        bind_text(st, 7, m->detail);
        bind_real(st, 8, m->median_ms);
        bind_real(st, 9, m->min_ms);
        bind_real(st, 10, m->mean_ms);
        bind_real(st, 11, m->stddev_ms);
        bind_count(st, 12, m->runs);
        bind_real(st, 13, m->tflops);
        bind_real(st, 14, m->max_abs_err);
        bind_real(st, 15, m->rel_err);
        bind_count(st, 16, m->registers);
        bind_count(st, 17, m->spills);
        bind_count(st, 18, m->smem_bytes);
        bind_real(st, 19, m->compile_ms);
        sqlite3_bind_text(st, 20, tv, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 21, created);
        int rc = sqlite3_step(st);
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE) {
            if ((rc & 0xff) == SQLITE_CONSTRAINT)
                s = seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                           "%s: cannot record measurement (device_id %lld, config_id %lld, "
                           "shape %s): %s",
                           db->path, m->device_id, m->config_id, m->shape,
                           sqlite3_errmsg(db->h));
            else
                s = sqlfail(db, err, errlen, "cannot record measurement");
        }
    }
    if (s == FM_OK && existed) {
        /* The row's values changed under an unchanged key: the best may have been this row. */
        s = recompute_key(db, m->device_id, m->op, m->dtype, m->shape, err, errlen);
    } else if (s == FM_OK && ok) {
        s = prep(db, add_best_sql, &st, err, errlen);
        if (s == FM_OK) {
            sqlite3_bind_int64(st, 1, m->device_id);
            sqlite3_bind_text(st, 2, m->op, -1, SQLITE_TRANSIENT);
            sqlite3_bind_text(st, 3, m->dtype, -1, SQLITE_TRANSIENT);
            sqlite3_bind_text(st, 4, m->shape, -1, SQLITE_TRANSIENT);
            sqlite3_bind_int64(st, 5, m->config_id);
            sqlite3_bind_double(st, 6, m->median_ms);
            bind_real(st, 7, m->tflops);
            sqlite3_bind_int64(st, 8, created);
            if (sqlite3_step(st) != SQLITE_DONE) s = sqlfail(db, err, errlen, "cannot update best");
            sqlite3_finalize(st);
        }
    }
    if (s != FM_OK) {
        rollback(db);
        return s;
    }
    return commit(db, err, errlen);
}

/* Marks rows of one key "rejected" with the UPDATE `sql` (?1-?4 the key, ?5 the sustained-load
 * suffix, ?6 `since` where the statement has it), then recomputes that key's best; one
 * transaction. */
static fm_status supersede_key(fm_db *db, const char *what, const char *sql, long long device_id,
                               const char *op, const char *dtype, const char *shape,
                               long long since, int *changed, char *err, size_t errlen) {
    if (changed) *changed = 0;
    if (!db || !len_ok(op, FM_DB_OP_MAX) || !len_ok(dtype, FM_DB_DTYPE_MAX) ||
        !len_ok(shape, FM_DB_SHAPE_MAX))
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                      "%s: db, op, dtype and shape are required", what);
    fm_status s = begin_write(db, err, errlen);
    if (s != FM_OK) return s;
    sqlite3_stmt *st = NULL;
    s = prep(db, sql, &st, err, errlen);
    if (s == FM_OK) {
        sqlite3_bind_int64(st, 1, device_id);
        sqlite3_bind_text(st, 2, op, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 3, dtype, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 4, shape, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 5, FM_DB_SUSTAINED_SUFFIX, -1, SQLITE_STATIC);
        if (sqlite3_bind_parameter_count(st) >= 6) sqlite3_bind_int64(st, 6, since);
        int rc = sqlite3_step(st);
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE) s = sqlfail(db, err, errlen, "cannot supersede measurements");
        else if (changed) *changed = sqlite3_changes(db->h);
    }
    if (s == FM_OK) s = recompute_key(db, device_id, op, dtype, shape, err, errlen);
    if (s != FM_OK) {
        rollback(db);
        return s;
    }
    return commit(db, err, errlen);
}

fm_status fm_db_supersede_burst(fm_db *db, long long device_id, const char *op, const char *dtype,
                                const char *shape, int *changed, char *err, size_t errlen) {
    return supersede_key(
        db, "fm_db_supersede_burst",
        "UPDATE measurements SET status='rejected',detail='superseded by sustained-load "
        "timing (burst median '||printf('%.4f',median_ms)||' ms)' WHERE device_id=?1 AND "
        "op=?2 AND dtype=?3 AND shape=?4 AND status='ok' AND "
        "substr(tool_version,-length(?5))<>?5",
        device_id, op, dtype, shape, 0, changed, err, errlen);
}

fm_status fm_db_supersede_sustained(fm_db *db, long long device_id, const char *op,
                                    const char *dtype, const char *shape, long long since,
                                    int *changed, char *err, size_t errlen) {
    return supersede_key(
        db, "fm_db_supersede_sustained",
        "UPDATE measurements SET status='rejected',detail='" FM_DB_SUPERSEDED_SUSTAINED
        " (median '||printf('%.4f',median_ms)||' ms)' WHERE device_id=?1 AND op=?2 AND "
        "dtype=?3 AND shape=?4 AND status='ok' AND substr(tool_version,-length(?5))=?5 AND "
        "created_at<?6",
        device_id, op, dtype, shape, since, changed, err, errlen);
}

static fm_status recompute_all(fm_db *db, char *err, size_t errlen) {
    return exec(db, all_best_sql, err, errlen);
}

/* After rows arrive from elsewhere (import, merge): a key with sustained-load timings is decided
 * among them, as fm_db_supersede_burst does for the tuner, whichever side its burst rows came
 * from. Without this a merge let an older burst median win over the sustained re-tune of the
 * same key (bench/NOTES.md, eleventh session). */
static const char supersede_all_sql[] =
    "UPDATE measurements SET status='rejected',detail='superseded by sustained-load timing "
    "(burst median '||printf('%.4f',median_ms)||' ms)' WHERE status='ok' AND "
    "substr(tool_version,-length('" FM_DB_SUSTAINED_SUFFIX "'))<>'" FM_DB_SUSTAINED_SUFFIX "' "
    "AND EXISTS (SELECT 1 FROM measurements s WHERE s.status='ok' AND "
    "s.device_id=measurements.device_id AND s.op=measurements.op AND "
    "s.dtype=measurements.dtype AND s.shape=measurements.shape AND "
    "substr(s.tool_version,-length('" FM_DB_SUSTAINED_SUFFIX "'))='" FM_DB_SUSTAINED_SUFFIX "')";

/* The end of an import or merge: sustained timings first, then best. */
static fm_status settle_arrivals(fm_db *db, char *err, size_t errlen) {
    fm_status s = exec(db, supersede_all_sql, err, errlen);
    return s == FM_OK ? recompute_all(db, err, errlen) : s;
}

fm_status fm_db_recompute_best(fm_db *db, char *err, size_t errlen) {
    if (!db) return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT, "fm_db_recompute_best: no db");
    fm_status s = begin_write(db, err, errlen);
    if (s != FM_OK) return s;
    s = recompute_all(db, err, errlen);
    if (s != FM_OK) {
        rollback(db);
        return s;
    }
    return commit(db, err, errlen);
}

/* ---- reading ------------------------------------------------------------------------------- */
fm_status fm_db_has_measurement(fm_db *db, const char *device_name, const char *op,
                                const char *dtype, const char *shape, const char *config_name,
                                int *found, char *err, size_t errlen) {
    if (!db || !device_name || !op || !dtype || !shape || !config_name || !found)
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                      "fm_db_has_measurement: every argument is required");
    *found = 0;
    sqlite3_stmt *st = NULL;
    fm_status s = prep(db,
                       "SELECT EXISTS(SELECT 1 FROM measurements m WHERE "
                       "m.device_id IN (SELECT id FROM devices WHERE name=?1) AND m.op=?2 AND "
                       "m.dtype=?3 AND m.shape=?4 AND "
                       "m.config_id=(SELECT id FROM configurations WHERE name=?5))",
                       &st, err, errlen);
    if (s != FM_OK) return s;
    bind_text(st, 1, device_name);
    bind_text(st, 2, op);
    bind_text(st, 3, dtype);
    bind_text(st, 4, shape);
    bind_text(st, 5, config_name);
    if (sqlite3_step(st) == SQLITE_ROW)
        *found = sqlite3_column_int(st, 0) != 0;
    else
        s = sqlfail(db, err, errlen, "cannot read measurements");
    sqlite3_finalize(st);
    return s;
}

#define BEST_SELECT                                                                            \
    "SELECT d.name,d.cc_major,d.cc_minor,b.op,b.dtype,b.shape,c.name,c.family,c.params,"       \
    "b.median_ms,b.tflops,b.updated_at FROM best b JOIN devices d ON d.id=b.device_id "        \
    "JOIN configurations c ON c.id=b.config_id "

static int fill_best(sqlite3_stmt *st, fm_db_best *b) {
    int bad = 0;
    bad |= col_copy(st, 0, b->device_name, sizeof b->device_name);
    b->cc_major = col_int(st, 1);
    b->cc_minor = col_int(st, 2);
    bad |= col_copy(st, 3, b->op, sizeof b->op);
    bad |= col_copy(st, 4, b->dtype, sizeof b->dtype);
    bad |= col_copy(st, 5, b->shape, sizeof b->shape);
    bad |= col_copy(st, 6, b->config_name, sizeof b->config_name);
    bad |= col_copy(st, 7, b->family, sizeof b->family);
    bad |= col_copy(st, 8, b->params, sizeof b->params);
    b->median_ms = col_real(st, 9);
    b->tflops = col_real(st, 10);
    b->updated_at = sqlite3_column_int64(st, 11);
    return bad;
}

fm_status fm_db_lookup_best(fm_db *db, const char *device_name, const char *op, const char *dtype,
                            const char *shape, fm_db_best *out, char *err, size_t errlen) {
    if (!db || !device_name || !op || !dtype || !shape || !out)
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                      "fm_db_lookup_best: every argument is required");
    sqlite3_stmt *st = NULL;
    /* Two devices may share a name across compute capabilities only in odd setups (a renamed
     * board); take the newest architecture, deterministically. */
    fm_status s = prep(db,
                       BEST_SELECT "WHERE d.name=?1 AND b.op=?2 AND b.dtype=?3 AND b.shape=?4 "
                                   "ORDER BY d.cc_major DESC, d.cc_minor DESC LIMIT 1",
                       &st, err, errlen);
    if (s != FM_OK) return s;
    bind_text(st, 1, device_name);
    bind_text(st, 2, op);
    bind_text(st, 3, dtype);
    bind_text(st, 4, shape);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        if (fill_best(st, out))
            s = seterr(err, errlen, FM_ERR_DATABASE, "%s: oversized value in best entry",
                       db->path);
    } else if (rc == SQLITE_DONE) {
        s = seterr(err, errlen, FM_ERR_NOT_FOUND, "no tuned entry for %s %s %s on %s", op, dtype,
                   shape, device_name);
    } else {
        s = sqlfail(db, err, errlen, "cannot read best");
    }
    sqlite3_finalize(st);
    return s;
}

fm_status fm_db_foreach_best(fm_db *db, const char *device_name, const char *op,
                             const char *dtype, fm_db_best_cb cb, void *user, char *err,
                             size_t errlen) {
    if (!db || !cb)
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT, "fm_db_foreach_best: no callback");
    sqlite3_stmt *st = NULL;
    fm_status s = prep(db,
                       BEST_SELECT "WHERE (?1 IS NULL OR d.name=?1) AND (?2 IS NULL OR b.op=?2) "
                                   "AND (?3 IS NULL OR b.dtype=?3) ORDER BY d.name,d.cc_major,"
                                   "d.cc_minor,b.op,b.dtype,b.shape",
                       &st, err, errlen);
    if (s != FM_OK) return s;
    bind_text(st, 1, device_name);
    bind_text(st, 2, op);
    bind_text(st, 3, dtype);
    fm_db_best *b = malloc(sizeof *b); /* 3 KiB: keep it off small thread stacks */
    if (!b) s = seterr(err, errlen, FM_ERR_OUT_OF_MEMORY, "fm_db_foreach_best: out of memory");
    int rc = SQLITE_DONE;
    while (s == FM_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (fill_best(st, b)) {
            s = seterr(err, errlen, FM_ERR_DATABASE, "%s: oversized value in best entry",
                       db->path);
            break;
        }
        if (cb(user, b)) break;
    }
    if (s == FM_OK && rc != SQLITE_ROW && rc != SQLITE_DONE)
        s = sqlfail(db, err, errlen, "cannot read best");
    free(b);
    sqlite3_finalize(st);
    return s;
}

#define MEAS_COLS                                                                              \
    "m.op,m.dtype,m.shape,m.status,m.detail,m.median_ms,m.min_ms,m.mean_ms,m.stddev_ms,m.runs," \
    "m.tflops,m.max_abs_err,m.rel_err,m.registers,m.spills,m.smem_bytes,m.compile_ms,"         \
    "m.tool_version,m.created_at"
#define MEAS_FROM                                                                              \
    " FROM measurements m JOIN devices d ON d.id=m.device_id "                                 \
    "JOIN configurations c ON c.id=m.config_id "
#define MEAS_ORDER                                                                             \
    " ORDER BY d.name,d.cc_major,d.cc_minor,m.op,m.dtype,m.shape,c.name,m.created_at,"         \
    "m.tool_version"

fm_status fm_db_foreach_measurement(fm_db *db, const fm_db_filter *f, fm_db_measurement_cb cb,
                                    void *user, char *err, size_t errlen) {
    if (!db || !cb)
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                      "fm_db_foreach_measurement: no callback");
    fm_db_filter none = {0};
    if (!f) f = &none;
    sqlite3_stmt *st = NULL;
    fm_status s = prep(db,
                       "SELECT " MEAS_COLS ",m.id,m.device_id,m.config_id,d.name,d.cc_major,"
                       "d.cc_minor,c.name,c.family,c.params" MEAS_FROM
                       "WHERE (?1 IS NULL OR d.name=?1) AND (?2 IS NULL OR m.op=?2) AND "
                       "(?3 IS NULL OR m.dtype=?3) AND (?4 IS NULL OR m.shape=?4) AND "
                       "(?5 IS NULL OR c.name=?5) AND (?6 IS NULL OR m.status=?6)" MEAS_ORDER,
                       &st, err, errlen);
    if (s != FM_OK) return s;
    bind_text(st, 1, f->device_name);
    bind_text(st, 2, f->op);
    bind_text(st, 3, f->dtype);
    bind_text(st, 4, f->shape);
    bind_text(st, 5, f->config_name);
    bind_text(st, 6, f->status);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fm_db_measurement m;
        fm_db_measurement_init(&m);
        m.op = col_text(st, 0);
        m.dtype = col_text(st, 1);
        m.shape = col_text(st, 2);
        m.status = col_text(st, 3);
        m.detail = col_text(st, 4);
        m.median_ms = col_real(st, 5);
        m.min_ms = col_real(st, 6);
        m.mean_ms = col_real(st, 7);
        m.stddev_ms = col_real(st, 8);
        m.runs = col_int(st, 9);
        m.tflops = col_real(st, 10);
        m.max_abs_err = col_real(st, 11);
        m.rel_err = col_real(st, 12);
        m.registers = col_int(st, 13);
        m.spills = col_int(st, 14);
        m.smem_bytes = col_int(st, 15);
        m.compile_ms = col_real(st, 16);
        m.tool_version = col_text(st, 17);
        m.created_at = sqlite3_column_int64(st, 18);
        m.id = sqlite3_column_int64(st, 19);
        m.device_id = sqlite3_column_int64(st, 20);
        m.config_id = sqlite3_column_int64(st, 21);
        m.device_name = col_text(st, 22);
        m.cc_major = col_int(st, 23);
        m.cc_minor = col_int(st, 24);
        m.config_name = col_text(st, 25);
        m.family = col_text(st, 26);
        m.params = col_text(st, 27);
        if (cb(user, &m)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    if (rc != SQLITE_DONE) s = sqlfail(db, err, errlen, "cannot read measurements");
    sqlite3_finalize(st);
    return s;
}

/* ---- export -------------------------------------------------------------------------------- */
/* One SQL literal for column i. Text keeps one row per line: control bytes become ||char(N)||
 * (SQL string literals have no escapes). Reals use 15 significant digits: any parser within an
 * ulp of the decimal gives a double that prints back to the same 15 digits, so export -> import
 * -> export is byte-identical even though SQLite's text-to-double is not guaranteed to be
 * correctly rounded at 17 digits; 15 digits is far below timing noise. The caller switches to
 * the C locale so that the decimal point is a '.'. */
static void put_value(FILE *f, sqlite3_stmt *st, int i) {
    switch (sqlite3_column_type(st, i)) {
    case SQLITE_NULL:
        fputs("NULL", f);
        break;
    case SQLITE_INTEGER:
        fprintf(f, "%lld", (long long)sqlite3_column_int64(st, i));
        break;
    case SQLITE_FLOAT: {
        double v = sqlite3_column_double(st, i);
        char buf[40];
        if (isinf(v)) {
            fputs(v > 0 ? "1e999" : "-1e999", f);
            break;
        }
        snprintf(buf, sizeof buf, "%.15g", v);
        /* Keep it a real on the way back in: "2" would be read as an integer. */
        if (!strpbrk(buf, ".eEn")) strcat(buf, ".0");
        fputs(buf, f);
        break;
    }
    case SQLITE_BLOB: {
        const unsigned char *p = sqlite3_column_blob(st, i);
        int n = sqlite3_column_bytes(st, i);
        fputs("X'", f);
        for (int k = 0; k < n; k++) fprintf(f, "%02x", p[k]);
        fputc('\'', f);
        break;
    }
    default: {
        const unsigned char *s = sqlite3_column_text(st, i);
        int n = sqlite3_column_bytes(st, i);
        int inq = 0, any = 0;
        for (int k = 0; k < n; k++) {
            unsigned char c = s[k];
            if (c < 0x20 || c == 0x7f) {
                if (inq) fputc('\'', f);
                fprintf(f, "%schar(%u)", any ? "||" : "", (unsigned)c);
                inq = 0;
                any = 1;
                continue;
            }
            if (!inq) {
                fputs(any ? "||'" : "'", f);
                inq = 1;
                any = 1;
            }
            if (c == '\'') fputc('\'', f);
            fputc(c, f);
        }
        if (inq)
            fputc('\'', f);
        else if (!any)
            fputs("''", f);
        break;
    }
    }
}

/* Writes `tmpl` with each '@' replaced by the next column, starting at column 0. */
static void put_row(FILE *f, sqlite3_stmt *st, const char *tmpl) {
    int i = 0;
    for (const char *p = tmpl; *p; p++) {
        if (*p == '@')
            put_value(f, st, i++);
        else
            fputc(*p, f);
    }
    fputc('\n', f);
}

typedef struct dump_part {
    const char *title, *query, *row;
} dump_part;

#define DEV_REF "(SELECT id FROM devices WHERE name=@ AND cc_major=@ AND cc_minor=@)"
#define CFG_REF "(SELECT id FROM configurations WHERE name=@)"
/* Not INSERT OR IGNORE: IGNORE also swallows NOT NULL and CHECK failures, so a row whose device
 * is missing from the dump (subselect NULL) would vanish silently. DO NOTHING covers only the
 * uniqueness conflicts that make re-imports idempotent; anything else aborts the import. */
#define NOTHING " ON CONFLICT DO NOTHING;"

static const dump_part dump_parts[] = {
    {"devices",
     "SELECT name,cc_major,cc_minor,sm_count,mem_bytes,driver_version,nvrtc_version FROM devices "
     "ORDER BY name,cc_major,cc_minor",
     "INSERT INTO devices(name,cc_major,cc_minor,sm_count,mem_bytes,driver_version,"
     "nvrtc_version) VALUES(@,@,@,@,@,@,@)" NOTHING},
    {"configurations",
     "SELECT family,name,params,template_hash FROM configurations ORDER BY name",
     "INSERT INTO configurations(family,name,params,template_hash) VALUES(@,@,@,@)" NOTHING},
    {"measurements",
     "SELECT d.name,d.cc_major,d.cc_minor,m.op,m.dtype,m.shape,c.name,m.status,m.detail,"
     "m.median_ms,m.min_ms,m.mean_ms,m.stddev_ms,m.runs,m.tflops,m.max_abs_err,m.rel_err,"
     "m.registers,m.spills,m.smem_bytes,m.compile_ms,m.tool_version,m.created_at" MEAS_FROM
         MEAS_ORDER,
     "INSERT INTO measurements(device_id,op,dtype,shape,config_id,status,detail,"
     "median_ms,min_ms,mean_ms,stddev_ms,runs,tflops,max_abs_err,rel_err,registers,spills,"
     "smem_bytes,compile_ms,tool_version,created_at) VALUES(" DEV_REF ",@,@,@," CFG_REF
     ",@,@,@,@,@,@,@,@,@,@,@,@,@,@,@,@)" NOTHING},
    {"best",
     "SELECT d.name,d.cc_major,d.cc_minor,b.op,b.dtype,b.shape,c.name,b.median_ms,b.tflops,"
     "b.updated_at FROM best b JOIN devices d ON d.id=b.device_id JOIN configurations c ON "
     "c.id=b.config_id ORDER BY d.name,d.cc_major,d.cc_minor,b.op,b.dtype,b.shape",
     "INSERT INTO best(device_id,op,dtype,shape,config_id,median_ms,tflops,updated_at) "
     "VALUES(" DEV_REF ",@,@,@," CFG_REF ",@,@,@)" NOTHING},
};

fm_status fm_db_export(fm_db *db, FILE *out, char *err, size_t errlen) {
    if (!db || !out) return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT, "fm_db_export: no output");
    /* One read transaction: a consistent snapshot even while tuners keep writing. */
    if (sqlite3_exec(db->h, "BEGIN", NULL, NULL, NULL) != SQLITE_OK)
        return sqlfail(db, err, errlen, "cannot start a read transaction");
    locale_t c_loc = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    locale_t old = c_loc ? uselocale(c_loc) : (locale_t)0;
    fm_status s = FM_OK;

    fprintf(out, DUMP_MAGIC ", schema version %d\n", db->version);
    fputs("-- One row per line, rows in key order; rows refer to each other by natural key.\n"
          "-- Apply with fm_db_import (fmtune db import): re-applying changes nothing.\n",
          out);
    for (size_t p = 0; p < sizeof dump_parts / sizeof dump_parts[0] && s == FM_OK; p++) {
        sqlite3_stmt *st = NULL;
        s = prep(db, dump_parts[p].query, &st, err, errlen);
        if (s != FM_OK) break;
        fprintf(out, "-- %s\n", dump_parts[p].title);
        int rc;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) put_row(out, st, dump_parts[p].row);
        if (rc != SQLITE_DONE) s = sqlfail(db, err, errlen, "cannot read for export");
        sqlite3_finalize(st);
    }
    fputs(DUMP_END "\n", out);

    if (c_loc) {
        uselocale(old);
        freelocale(c_loc);
    }
    sqlite3_exec(db->h, "COMMIT", NULL, NULL, NULL);
    if (s == FM_OK && (fflush(out) != 0 || ferror(out)))
        s = seterr(err, errlen, FM_ERR_IO, "fm_db_export: write failed: %s", strerror(errno));
    return s;
}

/* ---- import -------------------------------------------------------------------------------- */
/* A dump is data, but it is SQL: whatever arrives as "a dump" (a user's contribution, a file
 * picked by mistake) must not drop tables or attach files. The authorizer is consulted while each
 * statement is prepared and allows exactly what fm_db_export writes: INSERT into our four tables,
 * reads for the id subselects, and char() for control bytes in text. */
static int import_auth(void *user, int action, const char *a, const char *b, const char *dbn,
                       const char *trigger) {
    (void)user;
    (void)trigger;
    int ours = a && (strcmp(a, "devices") == 0 || strcmp(a, "configurations") == 0 ||
                     strcmp(a, "measurements") == 0 || strcmp(a, "best") == 0);
    switch (action) {
    case SQLITE_INSERT:
        return ours && dbn && strcmp(dbn, "main") == 0 ? SQLITE_OK : SQLITE_DENY;
    case SQLITE_READ:
        return dbn && strcmp(dbn, "main") == 0 ? SQLITE_OK : SQLITE_DENY;
    case SQLITE_SELECT:
        return SQLITE_OK;
    case SQLITE_FUNCTION:
        return b && sqlite3_stricmp(b, "char") == 0 ? SQLITE_OK : SQLITE_DENY;
    default:
        return SQLITE_DENY;
    }
}

/* Skips blanks and "--" comment lines, so that error messages name the statement's own line. */
static const char *skip_blank(const char *p) {
    for (;;) {
        while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
        if (p[0] != '-' || p[1] != '-') return p;
        const char *eol = strchr(p, '\n');
        p = eol ? eol : p + strlen(p);
    }
}

static int line_of(const char *text, const char *at) {
    int line = 1;
    for (const char *p = text; p < at; p++)
        if (*p == '\n') line++;
    return line;
}

/* Parses the header line; returns the dump's schema version or -1. */
static int dump_version(const char *text) {
    size_t n = strlen(DUMP_MAGIC);
    if (strncmp(text, DUMP_MAGIC, n) != 0) return -1;
    const char *eol = strchr(text, '\n');
    const char *v = strstr(text, "schema version ");
    if (!v || (eol && v > eol)) return -1;
    char *end = NULL;
    long ver = strtol(v + strlen("schema version "), &end, 10);
    if (end == v + strlen("schema version ") || ver < 1 || ver > 1000000) return -1;
    return (int)ver;
}

/* Whether the last non-blank line is the "-- end" that fm_db_export writes last: a dump cut at
 * a line boundary (a truncated copy, a bad merge) would otherwise import as a silent subset. */
static int has_trailer(const char *text) {
    const char *e = text + strlen(text);
    while (e > text && (e[-1] == '\n' || e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t')) e--;
    const char *b = e;
    while (b > text && b[-1] != '\n') b--;
    return (size_t)(e - b) == strlen(DUMP_END) && memcmp(b, DUMP_END, strlen(DUMP_END)) == 0;
}

fm_status fm_db_import(fm_db *db, const char *text, char *err, size_t errlen) {
    if (!db || !text) return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT, "fm_db_import: no text");
    int ver = dump_version(text);
    if (ver < 0)
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                      "not a flashmoe dump: the first line must be \"" DUMP_MAGIC
                      ", schema version N\"");
    if (ver > FM_DB_SCHEMA_VERSION)
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                      "the dump has schema version %d, newer than this build's %d", ver,
                      FM_DB_SCHEMA_VERSION);
    if (!has_trailer(text))
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                      "the dump does not end with its \"" DUMP_END "\" line (truncated?)");
    fm_status s = begin_write(db, err, errlen);
    if (s != FM_OK) return s;
    sqlite3_set_authorizer(db->h, import_auth, NULL);
    const char *sql = skip_blank(text);
    while (s == FM_OK && *sql) {
        sqlite3_stmt *st = NULL;
        const char *tail = NULL;
        int rc = sqlite3_prepare_v2(db->h, sql, -1, &st, &tail);
        if (rc != SQLITE_OK) {
            int auth = (rc & 0xff) == SQLITE_AUTH;
            s = seterr(err, errlen, (rc & 0xff) == SQLITE_NOMEM ? FM_ERR_OUT_OF_MEMORY
                                                                 : FM_ERR_INVALID_ARGUMENT,
                       "dump line %d: %s%s", line_of(text, sql), sqlite3_errmsg(db->h),
                       auth ? " (a dump may only INSERT into devices, configurations, "
                              "measurements and best)"
                            : "");
            break;
        }
        if (!st) { /* only whitespace or comments were left */
            sql = skip_blank(tail);
            continue;
        }
        /* The authorizer cannot see a conflict clause: OR IGNORE would drop a row whose device
         * is missing without a word, OR REPLACE would overwrite rows. Only the plain form that
         * fm_db_export writes is accepted. */
        if (sqlite3_strnicmp(sql, "INSERT INTO ", 12) != 0) {
            s = seterr(err, errlen, FM_ERR_INVALID_ARGUMENT,
                       "dump line %d: only \"INSERT INTO ...\" statements are accepted",
                       line_of(text, sql));
            sqlite3_finalize(st);
            break;
        }
        do rc = sqlite3_step(st);
        while (rc == SQLITE_ROW);
        if (rc != SQLITE_DONE) {
            int cons = (rc & 0xff) == SQLITE_CONSTRAINT;
            s = seterr(err, errlen, cons ? FM_ERR_INVALID_ARGUMENT : status_of(rc),
                       "dump line %d: %s%s", line_of(text, sql), sqlite3_errmsg(db->h),
                       cons ? " (a device or configuration the row names is missing from the "
                              "dump, or a value is out of range)"
                            : "");
        }
        sqlite3_finalize(st);
        sql = skip_blank(tail);
    }
    sqlite3_set_authorizer(db->h, NULL, NULL);
    if (s == FM_OK) s = settle_arrivals(db, err, errlen);
    if (s != FM_OK) {
        rollback(db);
        return s;
    }
    return commit(db, err, errlen);
}

/* ---- merge --------------------------------------------------------------------------------- */
/* The same natural-key matching as an imported dump, done table to table. */
static const char merge_sql[] =
    "INSERT INTO main.devices(name,cc_major,cc_minor,sm_count,mem_bytes,"
    "driver_version,nvrtc_version) SELECT name,cc_major,cc_minor,sm_count,mem_bytes,"
    "driver_version,nvrtc_version FROM fm_src.devices WHERE true ORDER BY name,cc_major,cc_minor"
    NOTHING
    "INSERT INTO main.configurations(family,name,params,template_hash) "
    "SELECT family,name,params,template_hash FROM fm_src.configurations WHERE true ORDER BY name"
    NOTHING
    "INSERT INTO main.measurements(device_id,op,dtype,shape,config_id,status,detail,"
    "median_ms,min_ms,mean_ms,stddev_ms,runs,tflops,max_abs_err,rel_err,registers,spills,"
    "smem_bytes,compile_ms,tool_version,created_at) "
    "SELECT md.id,m.op,m.dtype,m.shape,mc.id,m.status,m.detail,m.median_ms,m.min_ms,m.mean_ms,"
    "m.stddev_ms,m.runs,m.tflops,m.max_abs_err,m.rel_err,m.registers,m.spills,m.smem_bytes,"
    "m.compile_ms,m.tool_version,m.created_at FROM fm_src.measurements m "
    "JOIN fm_src.devices sd ON sd.id=m.device_id "
    "JOIN main.devices md ON md.name=sd.name AND md.cc_major=sd.cc_major AND "
    "md.cc_minor=sd.cc_minor "
    "JOIN fm_src.configurations sc ON sc.id=m.config_id "
    "JOIN main.configurations mc ON mc.name=sc.name "
    "WHERE true ORDER BY md.id,m.op,m.dtype,m.shape,mc.id,m.created_at,m.tool_version" NOTHING
    /* A row the other side superseded with a later sustained-load phase is superseded here too
     * (rows present on both sides keep this side's copy, status included). */
    "UPDATE main.measurements SET status='rejected',detail='" FM_DB_SUPERSEDED_SUSTAINED
    " (merged)' WHERE status='ok' AND EXISTS (SELECT 1 FROM fm_src.measurements m "
    "JOIN fm_src.devices sd ON sd.id=m.device_id "
    "JOIN main.devices md ON md.name=sd.name AND md.cc_major=sd.cc_major AND "
    "md.cc_minor=sd.cc_minor "
    "JOIN fm_src.configurations sc ON sc.id=m.config_id "
    "JOIN main.configurations mc ON mc.name=sc.name "
    "WHERE m.status='rejected' AND substr(m.detail,1,length('" FM_DB_SUPERSEDED_SUSTAINED "'))='"
    FM_DB_SUPERSEDED_SUSTAINED "' AND md.id=measurements.device_id AND "
    "m.op=measurements.op AND m.dtype=measurements.dtype AND m.shape=measurements.shape AND "
    "mc.id=measurements.config_id AND m.created_at=measurements.created_at AND "
    "m.tool_version=measurements.tool_version);"
    "INSERT INTO main.best(device_id,op,dtype,shape,config_id,median_ms,tflops,"
    "updated_at) SELECT md.id,b.op,b.dtype,b.shape,mc.id,b.median_ms,b.tflops,b.updated_at "
    "FROM fm_src.best b JOIN fm_src.devices sd ON sd.id=b.device_id "
    "JOIN main.devices md ON md.name=sd.name AND md.cc_major=sd.cc_major AND "
    "md.cc_minor=sd.cc_minor "
    "JOIN fm_src.configurations sc ON sc.id=b.config_id "
    "JOIN main.configurations mc ON mc.name=sc.name WHERE true" NOTHING;

fm_status fm_db_merge(fm_db *db, const char *other_path, char *err, size_t errlen) {
    if (!db || !other_path)
        return seterr(err, errlen, FM_ERR_INVALID_ARGUMENT, "fm_db_merge: no path");
    if (db->flags & FM_DB_READONLY)
        return seterr(err, errlen, FM_ERR_DATABASE, "%s: opened read-only", db->path);
    /* Validate the other file the way any open does (ours? intact? which version?). */
    fm_db *o = NULL;
    fm_status s = fm_db_open(&o, other_path, FM_DB_READONLY, err, errlen);
    if (s != FM_OK) return s;
    int over = o->version;
    fm_db_close(o);
    if (over != db->version)
        return seterr(err, errlen, FM_ERR_DATABASE,
                      "%s has schema version %d, %s has %d: open it read-write once to "
                      "upgrade it, or export it and import the dump",
                      other_path, over, db->path, db->version);

    char *uri = strncmp(other_path, "file:", 5) == 0 ? strdup(other_path)
                                                      : file_uri(other_path, "mode=ro");
    if (!uri) return seterr(err, errlen, FM_ERR_OUT_OF_MEMORY, "fm_db_merge: out of memory");
    sqlite3_stmt *st = NULL;
    s = prep(db, "ATTACH DATABASE ?1 AS fm_src", &st, err, errlen);
    if (s == FM_OK) {
        sqlite3_bind_text(st, 1, uri, -1, SQLITE_TRANSIENT);
        if (sqlite3_step(st) != SQLITE_DONE) s = sqlfail(db, err, errlen, "cannot attach");
        sqlite3_finalize(st);
    }
    free(uri);
    if (s != FM_OK) return s;
    s = begin_write(db, err, errlen); /* ATTACH cannot run inside a transaction */
    if (s == FM_OK) {
        s = exec(db, merge_sql, err, errlen);
        if (s == FM_OK) s = settle_arrivals(db, err, errlen);
        if (s == FM_OK)
            s = commit(db, err, errlen);
        else
            rollback(db);
    }
    sqlite3_exec(db->h, "DETACH DATABASE fm_src", NULL, NULL, NULL);
    return s;
}

/* ---- shapes -------------------------------------------------------------------------------- */
int fm_shape_get(const char *shape, const char *key, long long *out) {
    if (!shape || !key || !*key) return 0;
    size_t kl = strlen(key);
    const char *p = shape;
    while (*p) {
        const char *end = strchr(p, ',');
        if (!end) end = p + strlen(p);
        const char *eq = memchr(p, '=', (size_t)(end - p));
        if (eq && (size_t)(eq - p) == kl && memcmp(p, key, kl) == 0) {
            const char *v = eq + 1;
            if (v == end) return -1;
            errno = 0;
            char *stop = NULL;
            long long x = strtoll(v, &stop, 10);
            /* strtoll skips leading blanks; a canonical shape has none. */
            if (stop != end || errno || *v == ' ' || *v == '\t' || *v == '+') return -1;
            if (out) *out = x;
            return 1;
        }
        p = *end ? end + 1 : end;
    }
    return 0;
}
