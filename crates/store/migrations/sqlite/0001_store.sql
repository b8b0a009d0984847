-- statehouse-store schema for SQLite. Idempotent (IF NOT EXISTS) because two
-- processes opening a new file at once may both run it.
CREATE TABLE IF NOT EXISTS sh_kv (
    key        TEXT    NOT NULL PRIMARY KEY,
    value      BLOB    NOT NULL,
    version    INTEGER NOT NULL,
    expires_at INTEGER            -- Unix ms; NULL = no expiry
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS sh_map (
    key        TEXT    NOT NULL PRIMARY KEY,
    version    INTEGER NOT NULL,
    expires_at INTEGER
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS sh_map_field (
    key     TEXT    NOT NULL,
    field   TEXT    NOT NULL,
    value   BLOB    NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (key, field)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS sh_counter (
    key        TEXT    NOT NULL PRIMARY KEY,
    value      INTEGER NOT NULL,
    expires_at INTEGER
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS sh_kv_expiry ON sh_kv (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS sh_map_expiry ON sh_map (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS sh_counter_expiry ON sh_counter (expires_at) WHERE expires_at IS NOT NULL;
