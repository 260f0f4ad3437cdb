-- schema.sql - the flashmoe tuning database schema, for reading.
--
-- The authority is the migration list in db/db.c (fm_db_migrations), applied in order on every
-- read-write open; PRAGMA user_version holds how many have run and PRAGMA application_id is
-- 0x666d6462 ("fmdb"). Each migration below is the exact text db.c runs; tests/test_db.c fails if
-- the two drift apart. To change the schema, append a migration to both, never edit one.
--
-- best is derived: for each (device, op, dtype, shape), the "ok" measurement first in the order
-- (median_ms, configuration name, created_at). fm_db_add_measurement keeps it up to date;
-- fm_db_recompute_best rebuilds it.

-- migration 1
CREATE TABLE devices (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL CHECK (length(CAST(name AS BLOB)) BETWEEN 1 AND 127),
  cc_major INTEGER NOT NULL,
  cc_minor INTEGER NOT NULL,
  sm_count INTEGER,
  mem_bytes INTEGER,
  driver_version INTEGER,
  nvrtc_version INTEGER,
  UNIQUE (name, cc_major, cc_minor)
);
CREATE TABLE configurations (
  id INTEGER PRIMARY KEY,
  family TEXT NOT NULL CHECK (length(CAST(family AS BLOB)) BETWEEN 1 AND 47),
  name TEXT NOT NULL UNIQUE CHECK (length(CAST(name AS BLOB)) BETWEEN 1 AND 159),
  params TEXT NOT NULL CHECK (length(CAST(params AS BLOB)) < 2304),
  template_hash TEXT NOT NULL DEFAULT '' CHECK (length(CAST(template_hash AS BLOB)) < 64)
);
CREATE TABLE measurements (
  id INTEGER PRIMARY KEY,
  device_id INTEGER NOT NULL REFERENCES devices(id),
  op TEXT NOT NULL CHECK (length(CAST(op AS BLOB)) BETWEEN 1 AND 31),
  dtype TEXT NOT NULL CHECK (length(CAST(dtype AS BLOB)) BETWEEN 1 AND 15),
  shape TEXT NOT NULL CHECK (length(CAST(shape AS BLOB)) BETWEEN 1 AND 255),
  config_id INTEGER NOT NULL REFERENCES configurations(id),
  status TEXT NOT NULL
    CHECK (status IN ('ok','wrong','fault','compile_error','rejected','timeout')),
  detail TEXT,
  median_ms REAL,
  min_ms REAL,
  mean_ms REAL,
  stddev_ms REAL,
  runs INTEGER,
  tflops REAL,
  max_abs_err REAL,
  rel_err REAL,
  registers INTEGER,
  spills INTEGER,
  smem_bytes INTEGER,
  compile_ms REAL,
  tool_version TEXT NOT NULL DEFAULT '',
  created_at INTEGER NOT NULL,
  CHECK (status <> 'ok' OR median_ms > 0)
);
-- The natural key: what makes a re-imported row the same row. Its prefix serves the
-- per-shape lookups (resume, best recomputation).
CREATE UNIQUE INDEX measurements_key ON measurements
  (device_id, op, dtype, shape, config_id, created_at, tool_version);
CREATE INDEX measurements_config ON measurements (config_id);
CREATE TABLE best (
  device_id INTEGER NOT NULL REFERENCES devices(id),
  op TEXT NOT NULL CHECK (length(CAST(op AS BLOB)) BETWEEN 1 AND 31),
  dtype TEXT NOT NULL CHECK (length(CAST(dtype AS BLOB)) BETWEEN 1 AND 15),
  shape TEXT NOT NULL CHECK (length(CAST(shape AS BLOB)) BETWEEN 1 AND 255),
  config_id INTEGER NOT NULL REFERENCES configurations(id),
  median_ms REAL NOT NULL CHECK (median_ms > 0),
  tflops REAL,
  updated_at INTEGER NOT NULL,
  PRIMARY KEY (device_id, op, dtype, shape)
) WITHOUT ROWID;
-- Nearest-shape search scans every device's entries for one op and dtype.
CREATE INDEX best_op ON best (op, dtype);
