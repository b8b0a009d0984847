-- statehouse-store schema for Postgres. Expiry uses the server's clock
-- (clock_timestamp()), so every instance agrees on it whatever their clocks.

CREATE TABLE IF NOT EXISTS sh_kv (
    key        text        NOT NULL PRIMARY KEY,
    value      bytea       NOT NULL,
    version    bigint      NOT NULL,
    expires_at timestamptz             -- NULL = no expiry
);

CREATE TABLE IF NOT EXISTS sh_map (
    key        text        NOT NULL PRIMARY KEY,
    version    bigint      NOT NULL,
    expires_at timestamptz
);

CREATE TABLE IF NOT EXISTS sh_map_field (
    key     text   NOT NULL,
    field   text   NOT NULL,
    value   bytea  NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (key, field)
);

CREATE TABLE IF NOT EXISTS sh_counter (
    key        text        NOT NULL PRIMARY KEY,
    value      bigint      NOT NULL,
    expires_at timestamptz
);

CREATE INDEX IF NOT EXISTS sh_kv_expiry ON sh_kv (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS sh_map_expiry ON sh_map (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS sh_counter_expiry ON sh_counter (expires_at) WHERE expires_at IS NOT NULL;

-- Versions: max(previous + 1, now in microseconds), so a key deleted and
-- written again never reuses an old version.
CREATE OR REPLACE FUNCTION sh_now_us() RETURNS bigint LANGUAGE sql VOLATILE AS $$
    SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
$$;

-- One atomic patch of a field map, in one round trip.
-- p_existence: 0 any, 1 must exist, 2 must not exist.
-- p_cond_versions[i] < 0 means "field must be absent".
-- p_op_kinds[i]: 's' set (p_op_values[i]), 'd' remove, 'i' add p_op_deltas[i].
-- Returns {0, version, counters...}, or {-1} exists, {-2} not found,
-- {-3, i} condition i failed. A non-integer field raises SQLSTATE SH001; a
-- map over p_max_bytes (> 0) after the changes raises SH002 with the size as
-- its message. Raising rolls the whole call back.
CREATE OR REPLACE FUNCTION sh_map_patch(
    p_key text, p_ttl_ms bigint, p_existence int,
    p_cond_fields text[], p_cond_versions bigint[],
    p_op_kinds text[], p_op_fields text[], p_op_values bytea[], p_op_deltas bigint[],
    p_max_bytes bigint
) RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    v_now     timestamptz := clock_timestamp();
    v_row     sh_map%ROWTYPE;
    v_live    boolean;
    v_ver     bigint;
    v_version bigint;
    v_val     bytea;
    v_txt     text;
    v_n       bigint;
    v_size    bigint;
    v_out     bigint[] := '{}';
BEGIN
    SELECT * INTO v_row FROM sh_map WHERE key = p_key FOR UPDATE;
    IF NOT FOUND THEN
        IF p_existence = 1 THEN RETURN ARRAY[-2]::bigint[]; END IF;
        -- A placeholder that counts as expired, so there is a row to lock;
        -- a concurrent creator waits here on the primary key.
        INSERT INTO sh_map (key, version, expires_at) VALUES (p_key, 0, '-infinity')
            ON CONFLICT (key) DO NOTHING;
        SELECT * INTO v_row FROM sh_map WHERE key = p_key FOR UPDATE;
    END IF;
    v_live := v_row.expires_at IS NULL OR v_row.expires_at > v_now;
    IF p_existence = 1 AND NOT v_live THEN RETURN ARRAY[-2]::bigint[]; END IF;
    IF p_existence = 2 AND v_live THEN RETURN ARRAY[-1]::bigint[]; END IF;
    IF NOT v_live THEN
        -- Fields of an expired map must not leak into the new one.
        DELETE FROM sh_map_field WHERE key = p_key;
    END IF;

    FOR i IN 1 .. coalesce(array_length(p_cond_fields, 1), 0) LOOP
        SELECT version INTO v_ver FROM sh_map_field WHERE key = p_key AND field = p_cond_fields[i];
        IF p_cond_versions[i] < 0 THEN
            IF FOUND THEN RETURN ARRAY[-3, i]::bigint[]; END IF;
        ELSIF NOT FOUND OR v_ver <> p_cond_versions[i] THEN
            RETURN ARRAY[-3, i]::bigint[];
        END IF;
    END LOOP;

    v_version := GREATEST(v_row.version + 1, sh_now_us());
    FOR i IN 1 .. coalesce(array_length(p_op_kinds, 1), 0) LOOP
        IF p_op_kinds[i] = 's' THEN
            INSERT INTO sh_map_field (key, field, value, version)
                VALUES (p_key, p_op_fields[i], p_op_values[i], v_version)
                ON CONFLICT (key, field) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version;
        ELSIF p_op_kinds[i] = 'd' THEN
            DELETE FROM sh_map_field WHERE key = p_key AND field = p_op_fields[i];
        ELSE
            SELECT value INTO v_val FROM sh_map_field WHERE key = p_key AND field = p_op_fields[i];
            IF FOUND THEN
                v_txt := encode(v_val, 'escape');
                IF v_txt !~ '^-?[0-9]{1,18}$' THEN
                    RAISE EXCEPTION 'field % is not an integer', p_op_fields[i] USING ERRCODE = 'SH001';
                END IF;
                v_n := v_txt::bigint + p_op_deltas[i];
            ELSE
                v_n := p_op_deltas[i];
            END IF;
            INSERT INTO sh_map_field (key, field, value, version)
                VALUES (p_key, p_op_fields[i], convert_to(v_n::text, 'UTF8'), v_version)
                ON CONFLICT (key, field) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version;
            v_out := v_out || v_n;
        END IF;
    END LOOP;

    IF p_max_bytes > 0 THEN
        SELECT COALESCE(SUM(octet_length(field) + octet_length(value)), 0) INTO v_size
            FROM sh_map_field WHERE key = p_key;
        IF v_size > p_max_bytes THEN
            RAISE EXCEPTION USING ERRCODE = 'SH002', MESSAGE = v_size::text;
        END IF;
    END IF;

    UPDATE sh_map SET
        version = v_version,
        expires_at = CASE
            WHEN p_ttl_ms > 0 THEN v_now + p_ttl_ms * interval '1 millisecond'
            WHEN v_live THEN expires_at
            ELSE NULL
        END
    WHERE key = p_key;
    RETURN ARRAY[0, v_version] || v_out;
END
$$;

-- Deletes a map and its fields under the map row's lock, so a patch running
-- at the same time either finishes first or finds the map gone. With
-- p_only_expired (the purge), a map that a concurrent patch brought back to
-- life after the purge chose it is left alone: the check happens under the
-- lock, on the latest row.
CREATE OR REPLACE FUNCTION sh_map_delete(p_key text, p_only_expired boolean DEFAULT false)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_row sh_map%ROWTYPE;
BEGIN
    SELECT * INTO v_row FROM sh_map WHERE key = p_key FOR UPDATE;
    IF NOT FOUND THEN RETURN false; END IF;
    IF p_only_expired AND (v_row.expires_at IS NULL OR v_row.expires_at > clock_timestamp()) THEN
        RETURN false;
    END IF;
    DELETE FROM sh_map_field WHERE key = p_key;
    DELETE FROM sh_map WHERE key = p_key;
    RETURN v_row.expires_at IS NULL OR v_row.expires_at > clock_timestamp();
END
$$;
