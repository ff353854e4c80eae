-- datasaver fidelity fixture: a database with a wide mix of objects and awkward data, used to
-- prove that backup + restore gives back exactly what was there.
--
-- Deterministic (no random(), no now(), no volatile defaults): two loads give identical
-- content. Role-independent (no CREATE ROLE; grants only to PUBLIC). Only built-in features
-- (plpgsql, no contrib extensions). Loads in a few seconds; ~120k rows in ordinary tables.
-- Run with psql -v ON_ERROR_STOP=1 in autocommit mode (ALTER TYPE ... ADD VALUE needs it).

SET client_min_messages = warning;
SET TimeZone = 'UTC';

-- ---------------------------------------------------------------- schemas
CREATE SCHEMA app;
CREATE SCHEMA "Weird Schema";
CREATE SCHEMA "sch.ema";
CREATE SCHEMA "MiXeD";
COMMENT ON SCHEMA app IS 'application schema — ünïcödé ✓';
COMMENT ON SCHEMA "Weird Schema" IS 'a schema with a space in its name';
GRANT USAGE ON SCHEMA app TO PUBLIC;

-- ---------------------------------------------------------------- types
CREATE TYPE app.mood AS ENUM ('sad', 'ok', 'happy', 'ünï "quoted" 😀');
ALTER TYPE app.mood ADD VALUE 'meh' BEFORE 'ok';
CREATE TYPE "MiXeD"."Point3" AS (x double precision, y double precision, "Z z" double precision);
CREATE DOMAIN app.posint AS integer CONSTRAINT posint_positive CHECK (VALUE > 0);
CREATE DOMAIN app.email AS text NOT NULL CONSTRAINT email_has_at CHECK (VALUE ~ '^[^@]+@[^@]+$');
CREATE TYPE app.price_range AS RANGE (subtype = numeric);
COMMENT ON TYPE app.mood IS 'how a customer feels';
COMMENT ON DOMAIN app.email IS 'an e-mail address';

-- ---------------------------------------------------------------- functions
CREATE FUNCTION app.add(a integer, b integer DEFAULT 1) RETURNS integer
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT a + b $$;
COMMENT ON FUNCTION app.add(integer, integer) IS 'adds two integers — with ünïcode';

CREATE FUNCTION "Weird Schema"."Func With ""Quotes"""(x text) RETURNS SETOF text
    LANGUAGE sql IMMUTABLE
    AS $$ SELECT unnest(ARRAY[x, upper(x)]) $$;

CREATE PROCEDURE app.bump(INOUT n integer)
    LANGUAGE plpgsql
    AS $$ BEGIN n := n + 1; END $$;

CREATE AGGREGATE app.concat_agg(text) (sfunc = textcat, stype = text, initcond = '');

CREATE FUNCTION app.customers_before_update() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    NEW.updated := NEW.created + interval '1 day 2 hours';
    RETURN NEW;
END
$$;

CREATE FUNCTION app.orders_before_insert() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW.note IS NULL AND NEW.id % 11 = 0 THEN
        NEW.note := 'auto note for order ' || NEW.id;
    END IF;
    RETURN NEW;
END
$$;

CREATE FUNCTION app.audit_statement() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO app.audit (tbl, op, n) SELECT TG_TABLE_NAME, TG_OP, count(*) FROM new_rows;
    RETURN NULL;
END
$$;

CREATE FUNCTION app.never_called() RETURNS trigger
    LANGUAGE plpgsql
    AS $$ BEGIN RAISE EXCEPTION 'this trigger is disabled and must stay disabled'; END $$;

-- ---------------------------------------------------------------- customers
CREATE TABLE app.customers (
    id       bigint GENERATED ALWAYS AS IDENTITY (START WITH 1000 INCREMENT BY 3) PRIMARY KEY,
    email    app.email,
    name     text NOT NULL,
    mood     app.mood,
    created  timestamptz NOT NULL,
    updated  timestamptz,
    score    numeric(12,4) CONSTRAINT score_non_negative CHECK (score >= 0),
    prefs    jsonb NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT customers_email_key UNIQUE (email)
);
COMMENT ON TABLE app.customers IS 'customers; name may hold any script: 😀 مرحبا שלום';
COMMENT ON COLUMN app.customers.prefs IS 'free-form preferences';
CREATE INDEX customers_lower_name_idx ON app.customers (lower(name));
CREATE INDEX customers_prefs_gin ON app.customers USING gin (prefs jsonb_path_ops);
CREATE INDEX customers_happy_idx ON app.customers (created) WHERE mood = 'happy';
CREATE TRIGGER customers_bu BEFORE UPDATE ON app.customers
    FOR EACH ROW EXECUTE FUNCTION app.customers_before_update();
CREATE TRIGGER customers_never BEFORE DELETE ON app.customers
    FOR EACH ROW EXECUTE FUNCTION app.never_called();
ALTER TABLE app.customers DISABLE TRIGGER customers_never;
GRANT SELECT ON app.customers TO PUBLIC;

INSERT INTO app.customers (email, name, mood, created, score, prefs)
SELECT 'user' || i || '@example.com',
       CASE WHEN i % 97 = 0 THEN 'Zoë ' || i || ' 😀'
            WHEN i % 89 = 0 THEN 'مرحبا ' || i
            WHEN i % 83 = 0 THEN 'e' || U&'\0301' || ' combining ' || i
            ELSE 'Customer ' || i END,
       ('{sad,meh,ok,happy,NULL}'::app.mood[])[1 + i % 5],
       timestamptz '2020-01-01 00:00:00+00' + i * interval '37 minutes 13.123456 seconds',
       round((i * 7919 % 100000) / 7.0, 4),
       jsonb_build_object('lang', (ARRAY['en', 'de', 'fr', 'ar'])[1 + i % 4], 'n', i,
                          'tags', jsonb_build_array(i % 3, 'x' || (i % 7)))
FROM generate_series(1, 5000) AS i;

-- Fires customers_bu: updated = created + 1 day 2 hours (and moves the tuples physically).
UPDATE app.customers SET score = score + 1 WHERE id % 7 = 0;

-- ---------------------------------------------------------------- orders
CREATE TABLE app.orders (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES app.customers (id) ON DELETE CASCADE,
    status      text NOT NULL DEFAULT 'open'
                CONSTRAINT orders_status_check CHECK (status IN ('open', 'paid', 'shipped', 'cancelled')),
    placed_at   timestamptz NOT NULL,
    note        text,
    total       numeric(14,2) NOT NULL DEFAULT 0
);
CREATE INDEX orders_customer_idx ON app.orders (customer_id);
CREATE INDEX orders_open_idx ON app.orders (placed_at) WHERE status = 'open';
ALTER TABLE app.orders ALTER COLUMN status SET STATISTICS 500;
CREATE STATISTICS app.orders_customer_status (dependencies, ndistinct) ON customer_id, status FROM app.orders;
CREATE TRIGGER orders_bi BEFORE INSERT ON app.orders
    FOR EACH ROW EXECUTE FUNCTION app.orders_before_insert();

INSERT INTO app.orders (customer_id, status, placed_at, note)
SELECT 1000 + 3 * ((i * 7919) % 5000),
       (ARRAY['open', 'paid', 'shipped', 'cancelled'])[1 + i % 4],
       timestamptz '2021-01-01 00:00:00+00' + i * interval '9 minutes 0.5 seconds',
       CASE WHEN i % 13 = 0 THEN ''
            WHEN i % 17 = 0 THEN E'multi\nline\ttab \\ backslash \\. "quotes" ''single'''
            ELSE NULL END
FROM generate_series(1, 25000) AS i;

CREATE TABLE app.order_lines (
    order_id   bigint NOT NULL REFERENCES app.orders (id) ON DELETE CASCADE,
    line_no    integer NOT NULL,
    sku        text NOT NULL,
    qty        app.posint NOT NULL,
    unit_price numeric(12,2) NOT NULL,
    amount     numeric GENERATED ALWAYS AS (qty * unit_price) STORED,
    PRIMARY KEY (order_id, line_no)
);
INSERT INTO app.order_lines (order_id, line_no, sku, qty, unit_price)
SELECT o, l, 'SKU-' || lpad(((o * 31 + l * 7) % 10000)::text, 5, '0'), 1 + (o + l) % 9, ((o * 13 + l) % 100000) / 100.0
FROM generate_series(1, 25000) AS o, generate_series(1, 2) AS l
WHERE l = 1 OR o % 2 = 0;

UPDATE app.orders o SET total = s.total
FROM (SELECT order_id, sum(amount) AS total FROM app.order_lines GROUP BY order_id) s
WHERE s.order_id = o.id;

CREATE TABLE app.audit (
    id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tbl text NOT NULL,
    op  text NOT NULL,
    n   bigint NOT NULL
);

CREATE TABLE app.shipments (
    id       integer PRIMARY KEY,
    order_id bigint NOT NULL,
    line_no  integer NOT NULL,
    carrier  text,
    CONSTRAINT shipments_line_fk FOREIGN KEY (order_id, line_no)
        REFERENCES app.order_lines (order_id, line_no) DEFERRABLE INITIALLY DEFERRED
);
CREATE TRIGGER shipments_audit AFTER INSERT ON app.shipments
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION app.audit_statement();
ALTER TABLE app.shipments ENABLE ROW LEVEL SECURITY;
CREATE POLICY shipments_read ON app.shipments FOR SELECT TO PUBLIC USING (carrier IS NOT NULL);
INSERT INTO app.shipments SELECT i, i * 2, 1, (ARRAY['DHL', 'UPS', NULL])[1 + i % 3] FROM generate_series(1, 2000) AS i;
INSERT INTO app.shipments SELECT i, i * 2, 2, 'Ünïcode Pöst' FROM generate_series(2001, 2500) AS i;

-- ---------------------------------------------------------------- every data type
CREATE TABLE app.everything (
    id          integer PRIMARY KEY,
    c_bool      boolean,
    c_int2      smallint,
    c_int4      integer,
    c_int8      bigint,
    c_num       numeric(40,20),
    c_numfree   numeric,
    c_real      real,
    c_double    double precision,
    c_text      text,
    c_varchar   varchar(64),
    c_char      char(8),
    c_bytea     bytea,
    c_ts        timestamp,
    c_tstz      timestamptz,
    c_date      date,
    c_time      time,
    c_timetz    timetz,
    c_interval  interval,
    c_uuid      uuid,
    c_inet      inet,
    c_cidr      cidr,
    c_macaddr   macaddr,
    c_json      json,
    c_jsonb     jsonb,
    c_int_arr   integer[],
    c_text_arr  text[],
    c_point3    "MiXeD"."Point3",
    c_mood      app.mood,
    c_bits      bit varying(16),
    c_range     int4range,
    c_tsrange   tstzrange,
    c_prange    app.price_range,
    c_point     point
);
ALTER TABLE app.everything ALTER COLUMN c_text SET STORAGE EXTERNAL;
CREATE INDEX everything_jsonb_gin ON app.everything USING gin (c_jsonb);
CREATE UNIQUE INDEX everything_uuid_key ON app.everything (c_uuid);
CREATE INDEX everything_expr_idx ON app.everything ((c_int4 % 100), lower(c_varchar));

INSERT INTO app.everything
SELECT i,
       CASE i % 3 WHEN 0 THEN true WHEN 1 THEN false END,
       (i % 65536 - 32768)::smallint,
       (i * 2654435761 % 2147483647)::integer,
       i::bigint * 1000000007 * CASE WHEN i % 2 = 0 THEN -1 ELSE 1 END,
       (i::numeric * 1234567.89012345678901234567) / 7,
       (i::numeric ^ 3) / 13,
       (i / 7.0)::real,
       sqrt(i::double precision) * pi(),
       CASE WHEN i % 10 = 0 THEN NULL
            WHEN i % 10 = 1 THEN ''
            WHEN i % 1000 = 7 THEN repeat(md5(i::text), 200)
            ELSE md5(i::text) || repeat('é', i % 5) END,
       'v' || i,
       (i % 100)::text,
       decode(md5(i::text), 'hex') || int4send(i),
       timestamp '2000-01-01 00:00:00' + i * interval '1 hour 1 second',
       timestamptz '1999-12-31 23:59:59.999999+00' + i * interval '17 minutes 0.000001 seconds',
       date '1970-01-01' + i,
       time '00:00' + i * interval '1.5 seconds',
       (time '00:00' + i * interval '1 minute')::timetz,
       make_interval(years => i % 3, months => i % 12, days => i % 31, hours => i % 24, mins => i % 60, secs => (i % 60) / 8.0),
       md5('u' || i)::uuid,
       CASE WHEN i % 5 = 0 THEN ('2001:db8::' || to_hex(i))::inet
            ELSE ('10.' || (i / 65536) % 256 || '.' || (i / 256) % 256 || '.' || i % 256)::inet END,
       ('10.' || i % 256 || '.0.0/16')::cidr,
       lpad(to_hex(i), 12, '0')::macaddr,
       ('{"i": ' || i || ', "s": "x' || i || '",  "dup": 1, "dup": 2}')::json,
       jsonb_build_object('i', i, 'f', i / 3.0, 'arr', jsonb_build_array(i, 'two', NULL, true),
                          'nested', jsonb_build_object('k', md5(i::text))),
       CASE WHEN i % 7 = 0 THEN '{}'::integer[]
            WHEN i % 11 = 0 THEN ARRAY[[i, 1], [2, 3]]
            ELSE ARRAY[i, i + 1, NULL, -i] END,
       ARRAY['a' || i, 'with,comma', 'with"quote', E'back\\slash', NULL, '', '{braces}'],
       ROW(i, i / 2.0, -i)::"MiXeD"."Point3",
       ('{sad,meh,ok,happy}'::app.mood[])[1 + i % 4],
       (i % 65536)::bit(16)::bit varying(16),
       int4range(i, i + i % 10),
       CASE WHEN i % 3 = 0 THEN '(,)'::tstzrange
            ELSE tstzrange(timestamptz '2020-01-01 00:00:00+00' + i * interval '1 hour', NULL) END,
       app.price_range(i / 100.0, i / 10.0, '[]'),
       point(i, -i / 3.0)
FROM generate_series(1, 20000) AS i;

-- All NULL (except the key).
INSERT INTO app.everything (id) VALUES (1000001);
-- Empty values (not NULL).
INSERT INTO app.everything (id, c_text, c_varchar, c_char, c_bytea, c_json, c_jsonb, c_int_arr, c_text_arr, c_range, c_interval)
VALUES (1000002, '', '', '', ''::bytea, '""', '{}', '{}', '{}', 'empty', '0 seconds');
-- Extremes.
INSERT INTO app.everything (id, c_bool, c_int2, c_int4, c_int8, c_num, c_numfree, c_real, c_double,
                            c_ts, c_tstz, c_date, c_time, c_timetz, c_interval, c_inet, c_cidr, c_jsonb, c_range)
VALUES (1000003, true, -32768, -2147483648, -9223372036854775808,
        '-99999999999999999999.99999999999999999999', 'NaN', 'NaN', 'NaN',
        '-infinity', '-infinity', '-infinity', '00:00:00', '00:00:00+14:59', '-177999999 years',
        '::', '0.0.0.0/0', '{"big": 1e300, "tiny": -1e-300, "prec": 3.141592653589793238462643383279502884197}', '[-2147483648,2147483647)'),
       (1000004, false, 32767, 2147483647, 9223372036854775807,
        '99999999999999999999.99999999999999999999', 'Infinity', 'Infinity', 'Infinity',
        'infinity', 'infinity', 'infinity', '24:00:00', '23:59:59.999999-15:59', '177999999 years',
        'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128', '::/0', '[]', '(,)'),
       (1000005, NULL, 0, 0, 0, '-0.00000000000000000001', '-Infinity', '-Infinity', '-Infinity',
        '4713-01-01 00:00:00 BC', '0044-03-15 12:00:00+00 BC', '5874897-12-31', '23:59:59.999999', '12:34:56.789+05:30',
        '-1 years -2 mons +3 days -04:05:06.789', '192.168.1.1/24', '192.168.0.0/16', 'null', NULL),
       (1000006, NULL, NULL, NULL, NULL, '0', '1.000000000000000000000000000000000000000000000000000000000001',
        '1.17549435e-38', '2.2250738585072014e-308', '2000-02-29 23:59:59.999999', '2000-02-29 23:59:59.999999+00',
        '2000-02-29', NULL, NULL, '1 microsecond', NULL, NULL, '"just a string"', NULL),
       (1000007, NULL, NULL, NULL, NULL, NULL, '-0', '-0', '-0', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
        '{"a": {"b": {"c": {"d": [1, [2, [3, [4, [5]]]]]}}}}', NULL);
-- Text with every awkward thing COPY has to escape, and many scripts.
INSERT INTO app.everything (id, c_text, c_varchar, c_json, c_jsonb, c_text_arr, c_mood)
VALUES (1000010, E'tab\there\nnewline\rcarriage\\backslash\\.\n\\.\nend', E'line1\nline2',
        '{"esc": "\n\t\"\\\u00e9\ud83d\ude00"}', '{"esc": "\n\t\"\\\u00e9\ud83d\ude00", "": "empty key"}',
        ARRAY[E'\t', E'\n', E'\\', '"', '''', 'NULL', 'null', ' spaces '], 'ünï "quoted" 😀'),
       (1000011, '😀👍🏽👨‍👩‍👧 مرحبا بالعالم שלום עולם e' || U&'\0301' || 'a' || U&'\0308' || ' 漢字 かな Ελληνικά Кириллица '
        || U&'\202E' || 'RTL override' || U&'\202C' || ' zero' || U&'\200B' || 'width' || U&'\FEFF',
        'Ünïcödé', '{"emoji": "😀"}', '{"emoji": "😀", "rtl": "שלום"}', ARRAY['😀', 'مرحبا', '漢字'], 'meh'),
       (1000012, repeat('x', 1000000), repeat('y', 64), NULL, NULL, NULL, NULL);
-- All 256 byte values.
INSERT INTO app.everything (id, c_bytea)
SELECT 1000020, decode(string_agg(lpad(to_hex(b), 2, '0'), '' ORDER BY b), 'hex') FROM generate_series(0, 255) AS b;
INSERT INTO app.everything (id, c_bytea)
SELECT 1000021, decode(string_agg(lpad(to_hex(255 - b), 2, '0'), '' ORDER BY b), 'hex') FROM generate_series(0, 255) AS b;

-- ---------------------------------------------------------------- partitioned table
CREATE TABLE app.events (
    id      bigint NOT NULL,
    at      date NOT NULL,
    kind    text NOT NULL,
    payload jsonb,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
CREATE TABLE app.events_2023 PARTITION OF app.events FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE app.events_2024 PARTITION OF app.events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE app.events_2025 PARTITION OF app.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')
    PARTITION BY RANGE (at);
CREATE TABLE app.events_2025_h1 PARTITION OF app.events_2025 FOR VALUES FROM ('2025-01-01') TO ('2025-07-01');
CREATE TABLE app.events_2025_rest PARTITION OF app.events_2025 DEFAULT;
CREATE TABLE app.events_default PARTITION OF app.events DEFAULT;
CREATE INDEX events_kind_idx ON app.events (kind);
COMMENT ON TABLE app.events IS 'range-partitioned by date, 2025 sub-partitioned by half-year';
INSERT INTO app.events
SELECT i, date '2022-07-01' + (i % 1400), (ARRAY['click', 'view', 'buy'])[1 + i % 3],
       CASE WHEN i % 4 = 0 THEN NULL ELSE jsonb_build_object('i', i, 'k', i % 17) END
FROM generate_series(1, 30000) AS i;

CREATE TABLE app.event_refs (
    id       integer PRIMARY KEY,
    event_id bigint NOT NULL,
    event_at date NOT NULL,
    FOREIGN KEY (event_id, event_at) REFERENCES app.events (id, at)
);
INSERT INTO app.event_refs SELECT i, i * 10, date '2022-07-01' + ((i * 10) % 1400) FROM generate_series(1, 1000) AS i;

-- ---------------------------------------------------------------- exclusion constraint
CREATE TABLE app.reservations (
    id     integer PRIMARY KEY,
    room   text NOT NULL,
    during tstzrange NOT NULL,
    CONSTRAINT reservations_no_overlap EXCLUDE USING gist (during WITH &&)
);
INSERT INTO app.reservations
SELECT i, 'room ' || (i % 5),
       tstzrange(timestamptz '2024-01-01 00:00:00+00' + i * interval '2 hours',
                 timestamptz '2024-01-01 00:00:00+00' + i * interval '2 hours' + interval '90 minutes')
FROM generate_series(1, 500) AS i;

-- ---------------------------------------------------------------- odd tables
CREATE UNLOGGED TABLE app.scratch (k integer PRIMARY KEY, v text);
INSERT INTO app.scratch SELECT i, 'scratch ' || i FROM generate_series(1, 100) AS i;

CREATE TABLE app.no_columns ();
INSERT INTO app.no_columns DEFAULT VALUES;
INSERT INTO app.no_columns DEFAULT VALUES;
INSERT INTO app.no_columns DEFAULT VALUES;

CREATE TABLE app.empty_table (id integer PRIMARY KEY, v text);

-- ---------------------------------------------------------------- awkward names
CREATE TABLE "Weird Schema"."Table With Spaces" (
    "Column A"   integer PRIMARY KEY,
    "select"     text,
    "MiXeD Case" jsonb,
    "quote""d"   text,
    "ünïcode 😀" text
);
COMMENT ON COLUMN "Weird Schema"."Table With Spaces"."quote""d" IS 'column name with a double quote';
INSERT INTO "Weird Schema"."Table With Spaces"
SELECT i, 'sel ' || i, jsonb_build_object('Key With Space', i), CASE WHEN i % 2 = 0 THEN 'q"' || i END, '😀' || i
FROM generate_series(1, 3000) AS i;

CREATE TABLE "sch.ema"."dotted.table" (
    id    serial PRIMARY KEY,
    "a.b" integer UNIQUE,
    "c""d" text
);
INSERT INTO "sch.ema"."dotted.table" ("a.b", "c""d") SELECT i * 2, 'dotted ' || i FROM generate_series(1, 1000) AS i;

CREATE TABLE "MiXeD"."CamelTable" (
    "Id"  integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    "Ref" integer REFERENCES "Weird Schema"."Table With Spaces" ("Column A"),
    "Val" "MiXeD"."Point3"
);
INSERT INTO "MiXeD"."CamelTable" ("Ref", "Val") SELECT i, ROW(i, i, i)::"MiXeD"."Point3" FROM generate_series(1, 300) AS i;

CREATE TABLE "MiXeD"."Ünïcode Täble 😀" (k text PRIMARY KEY, v text);
INSERT INTO "MiXeD"."Ünïcode Täble 😀" VALUES ('ключ', 'значение'), ('键', '值'), ('🔑', '🎁'), ('', 'empty key');

-- ---------------------------------------------------------------- sequences
CREATE SEQUENCE app.big_seq AS bigint INCREMENT BY 7 MINVALUE -100 MAXVALUE 9223372036854775000 START WITH 1 CACHE 1 CYCLE;
SELECT setval('app.big_seq', 9223372036854000000, true);
CREATE SEQUENCE "Weird Schema"."Seq ""Quoted""" AS integer INCREMENT BY -3 MINVALUE -1000000 MAXVALUE 0 START WITH -5;
SELECT setval('"Weird Schema"."Seq ""Quoted"""', -999, false);
CREATE SEQUENCE app.unused_seq;
CREATE SEQUENCE app.used_seq START WITH 42;
SELECT nextval('app.used_seq') FROM generate_series(1, 3);
COMMENT ON SEQUENCE app.big_seq IS 'near the top of bigint';

-- ---------------------------------------------------------------- views
CREATE VIEW app.customer_order_stats AS
    SELECT c.id, c.email, count(o.id) AS orders, coalesce(sum(o.total), 0) AS spent
    FROM app.customers c LEFT JOIN app.orders o ON o.customer_id = c.id
    GROUP BY c.id, c.email;
COMMENT ON VIEW app.customer_order_stats IS 'orders per customer';
GRANT SELECT ON app.customer_order_stats TO PUBLIC;

CREATE VIEW "Weird Schema"."View ""Q""" AS
    SELECT "Column A", "select" FROM "Weird Schema"."Table With Spaces" WHERE "Column A" % 2 = 0
    WITH CASCADED CHECK OPTION;

CREATE MATERIALIZED VIEW app.daily_totals AS
    SELECT (placed_at AT TIME ZONE 'UTC')::date AS day, count(*) AS n, sum(total) AS total
    FROM app.orders GROUP BY 1
    WITH DATA;
CREATE UNIQUE INDEX daily_totals_day ON app.daily_totals (day);
COMMENT ON MATERIALIZED VIEW app.daily_totals IS 'populated materialized view';

CREATE MATERIALIZED VIEW app.never_refreshed AS SELECT id FROM app.customers WITH NO DATA;

-- ---------------------------------------------------------------- large objects
CREATE TABLE app.documents (id integer PRIMARY KEY, name text NOT NULL, blob oid NOT NULL);
DO $$
DECLARE
    o oid;
BEGIN
    o := lo_from_bytea(0, (SELECT decode(string_agg(lpad(to_hex(b), 2, '0'), '' ORDER BY b), 'hex')
                           FROM generate_series(0, 255) AS b));
    EXECUTE format('COMMENT ON LARGE OBJECT %s IS %L', o, 'all 256 byte values');
    INSERT INTO app.documents VALUES (1, 'all bytes', o);
    o := lo_from_bytea(0, (SELECT string_agg(decode(md5(i::text), 'hex'), ''::bytea ORDER BY i)
                           FROM generate_series(1, 65536) AS i));
    INSERT INTO app.documents VALUES (2, '1 MiB of md5s', o);
    o := lo_from_bytea(0, ''::bytea);
    INSERT INTO app.documents VALUES (3, 'empty', o);
    o := lo_from_bytea(0, convert_to('ünïcödé 😀 text in a large object', 'UTF8'));
    INSERT INTO app.documents VALUES (4, 'text', o);
END
$$;

-- Data created by the statement-level audit trigger above, plus one more statement.
INSERT INTO app.shipments VALUES (9999, 4, 1, 'late');

CALL app.bump(1);
