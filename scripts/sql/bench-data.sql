-- Benchmark data for bench/backup.sh: realistic entropy, unlike pgbench (whose
-- data compresses ~60x).  Generated inside Postgres with generate_series.
--
--   psql -v ON_ERROR_STOP=1 -v units=N -v part=PART -f bench-data.sql
--
-- One unit is roughly 1 MB of table data (heap + TOAST, before indexes).
-- part = setup | accounts | events | documents | measurements | blobs | finish
-- (the loader runs the table parts in parallel sessions after setup).
--
-- Mix by size: events (jsonb logs) ~42%, measurements (numerics, timestamps)
-- ~21%, documents (prose in a Zipf-distributed made-up vocabulary) ~20%,
-- accounts ~11%, blobs (bytea of random bytes, like already-compressed files) ~5%.
-- The pg_dump -Z0 archive compresses about 3.5x with zstd -3 or gzip -6
-- (prose ~3.2x, jsonb ~4.4x, numerics ~3.9x, bytea ~1.9x as hex in the dump);
-- pgbench data, by contrast, compresses ~60x.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;

SELECT :'part' = 'setup' AS is_setup,
       :'part' = 'accounts' AS is_accounts,
       :'part' = 'events' AS is_events,
       :'part' = 'documents' AS is_documents,
       :'part' = 'measurements' AS is_measurements,
       :'part' = 'blobs' AS is_blobs,
       :'part' = 'finish' AS is_finish
\gset

-- ------------------------------------------------------------------ setup
\if :is_setup
DROP SCHEMA IF EXISTS bench_gen CASCADE;
CREATE SCHEMA bench_gen;
SELECT setseed(0.17);

-- ~20k made-up words from syllables.
CREATE TABLE bench_gen.words AS
SELECT i, (SELECT string_agg(sy[1 + floor(random() * array_length(sy, 1))::int + 0 * k], '')
           FROM generate_series(0, (i % 3) + (i % 7 = 0)::int) k) AS w
FROM generate_series(0, 19999) i,
     (SELECT string_to_array('ka ri to ne ma su lo vi de an er in on ur ba ce fi go hu ja ke lu mo ni po qu ra se ti va we xi yo ze '
                             'str tra pre con ment ing tion ver sal dor lin gen ber mar ton sta ple', ' ') AS sy) a;
ALTER TABLE bench_gen.words ADD PRIMARY KEY (i);

-- 200k sentences of 4-18 words; common words are far more frequent (pow(random, 8)).
CREATE TABLE bench_gen.sentences AS
SELECT s AS i,
       (SELECT upper(left(x, 1)) || substr(x, 2) || (ARRAY['.', '.', '.', '?', '!'])[1 + s % 5]
        FROM (SELECT string_agg((SELECT w.w FROM bench_gen.words w WHERE w.i = r.r), ' ' ORDER BY r.k) AS x
              -- OFFSET 0 keeps each random index fixed (a volatile expression
              -- in the lookup's WHERE would be re-evaluated for every row scanned).
              FROM (SELECT k, floor(pow(random(), 8) * 20000)::int AS r
                    FROM generate_series(1, 4 + s % 15) k OFFSET 0) r) q) AS t
FROM generate_series(0, 199999) s;
ALTER TABLE bench_gen.sentences ADD PRIMARY KEY (i);

CREATE TABLE accounts (
    id           bigint PRIMARY KEY,
    external_id  text NOT NULL,
    name         text NOT NULL,
    email        text NOT NULL,
    country      char(2) NOT NULL,
    plan         text NOT NULL,
    created_at   timestamptz NOT NULL,
    balance      numeric(14, 2) NOT NULL,
    active       boolean NOT NULL,
    settings     jsonb NOT NULL
);
CREATE TABLE events (
    id           bigint PRIMARY KEY,
    account_id   bigint NOT NULL,
    occurred_at  timestamptz NOT NULL,
    kind         text NOT NULL,
    payload      jsonb NOT NULL
);
CREATE TABLE documents (
    id           bigint PRIMARY KEY,
    account_id   bigint NOT NULL,
    title        text NOT NULL,
    body         text NOT NULL,
    lang         text NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz,
    score        double precision NOT NULL,
    word_count   int NOT NULL
);
CREATE TABLE measurements (
    id           bigint PRIMARY KEY,
    sensor       text NOT NULL,
    ts           timestamptz NOT NULL,
    value        double precision NOT NULL,
    reading      numeric(12, 4) NOT NULL,
    quality      smallint NOT NULL
);
CREATE TABLE blobs (
    id           bigint PRIMARY KEY,
    account_id   bigint NOT NULL,
    sha          text NOT NULL,
    mime         text NOT NULL,
    content      bytea NOT NULL
);
-- Uncompressed storage for bytea, like already-compressed files (images, PDFs).
ALTER TABLE blobs ALTER COLUMN content SET STORAGE EXTERNAL;
\endif

-- ------------------------------------------------------------------ accounts (~11%)
\if :is_accounts
SELECT setseed(0.21);
INSERT INTO accounts
SELECT g,
       md5('acct' || g),
       initcap(w1.w) || ' ' || initcap(w2.w),
       w1.w || '.' || w2.w || (g % 1000) || '@' || w3.w || (ARRAY['.com', '.net', '.io', '.de', '.org'])[1 + g % 5],
       (ARRAY['DE','FR','US','GB','PL','JP','NG','IT','BR','SE','TR','KR','IN','MX','ES'])[1 + floor(random() * 15)::int],
       (ARRAY['free', 'free', 'free', 'pro', 'pro', 'team', 'enterprise'])[1 + floor(random() * 7)::int],
       timestamptz '2015-01-01 00:00:00+00' + random() * interval '3000 days',
       round((random() * 100000 - 20000)::numeric, 2),
       random() < 0.85,
       jsonb_build_object('theme', (ARRAY['dark', 'light', 'auto'])[1 + floor(random() * 3)::int],
                          'notifications', jsonb_build_object('email', random() < 0.6, 'sms', random() < 0.1),
                          'timezone', (ARRAY['Europe/Berlin','America/New_York','Asia/Tokyo','UTC','Africa/Lagos'])[1 + floor(random() * 5)::int],
                          'api_key_prefix', left(md5(random()::text), 8))
FROM generate_series(1, (:units * 380)::bigint) g
JOIN bench_gen.words w1 ON w1.i = (g * 7919) % 20000
JOIN bench_gen.words w2 ON w2.i = (g * 104729) % 20000
JOIN bench_gen.words w3 ON w3.i = (g * 31) % 2000;
\endif

-- ------------------------------------------------------------------ events (~42%)
\if :is_events
SELECT setseed(0.33);
INSERT INTO events
SELECT g,
       1 + floor(random() * (:units * 380))::bigint,
       timestamptz '2023-01-01 00:00:00+00' + g * interval '1 second' * 0.7 + random() * interval '1 second',
       (ARRAY['login', 'logout', 'page_view', 'page_view', 'page_view', 'search', 'add_to_cart', 'checkout', 'api_call', 'api_call', 'error'])[1 + floor(random() * 11)::int],
       jsonb_build_object(
           -- clients come from a limited pool of addresses; routes from a Zipf-ish set
           'ip', '10.' || (g % 7) || '.' || ((g / 7) % 40) || '.' || (floor(random() * 30)::int + 1),
           'path', '/' || w3.w || '/' || w1.w || CASE WHEN random() < 0.5 THEN '/' || floor(random() * 100000)::int ELSE '' END,
           'user_agent', (ARRAY['Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0',
                                'Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15',
                                'Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0',
                                'curl/8.4.0', 'python-requests/2.31.0'])[1 + floor(random() * 5)::int],
           'status', (ARRAY[200, 200, 200, 200, 201, 204, 301, 400, 401, 404, 500])[1 + floor(random() * 11)::int],
           'duration_ms', round((random() * random() * 3000)::numeric, 2),
           'request_id', md5(random()::text),
           'tags', jsonb_build_array(w3.w, w2.w))
FROM generate_series(1, (:units * 1190)::bigint) g
CROSS JOIN LATERAL (SELECT floor(pow(random(), 2) * 20000)::int + 0 * g AS r OFFSET 0) r1
JOIN bench_gen.words w1 ON w1.i = r1.r
JOIN bench_gen.words w2 ON w2.i = (g * 7) % 300
JOIN bench_gen.words w3 ON w3.i = (g * 13) % 40;
\endif

-- ------------------------------------------------------------------ documents (~20%)
\if :is_documents
SELECT setseed(0.45);
INSERT INTO documents
SELECT g,
       1 + floor(random() * (:units * 380))::bigint,
       rtrim(t.t, '.?!'),
       b.body,
       (ARRAY['en', 'en', 'en', 'de', 'fr', 'es', 'pt'])[1 + floor(random() * 7)::int],
       c.created,
       CASE WHEN random() < 0.4 THEN c.created + random() * interval '200 days' END,
       random() * 5,
       length(b.body) - length(replace(b.body, ' ', '')) + 1
FROM generate_series(1, (:units * 200)::bigint) g
JOIN bench_gen.sentences t ON t.i = (g * 7919) % 200000
CROSS JOIN LATERAL (
    SELECT string_agg((SELECT s.t FROM bench_gen.sentences s WHERE s.i = r.r),
                      CASE WHEN r.para THEN E'\n\n' ELSE ' ' END ORDER BY r.k) AS body
    FROM (SELECT k, floor(pow(random(), 4) * 200000)::int AS r, random() < 0.15 AS para
          FROM generate_series(1, 1 + floor(pow(random(), 2) * 40)::int + 0 * g) k OFFSET 0) r
) b
CROSS JOIN LATERAL (SELECT timestamptz '2018-01-01 00:00:00+00' + random() * interval '2000 days' + 0 * g * interval '1 s' AS created
                    OFFSET 0) c;
\endif

-- ------------------------------------------------------------------ measurements (~21%)
\if :is_measurements
SELECT setseed(0.57);
INSERT INTO measurements
SELECT g,
       'sensor-' || lpad((g % 5000)::text, 4, '0') || '-' || (ARRAY['temp', 'humidity', 'pressure', 'co2'])[1 + (g % 4)::int],
       timestamptz '2024-01-01 00:00:00+00' + (g / 5000) * interval '1 minute' + random() * interval '50 seconds',
       round((20 + 10 * sin(g / 5000.0) + random() * 3)::numeric, 2)::double precision,
       round((1000 + 50 * cos(g / 20000.0) + random())::numeric, 4),
       (random() * 100)::smallint
FROM generate_series(1, (:units * 2190)::bigint) g;
\endif

-- ------------------------------------------------------------------ blobs (~5%)
\if :is_blobs
SELECT setseed(0.69);
INSERT INTO blobs
SELECT g,
       1 + floor(random() * (:units * 380))::bigint,
       md5(g::text) || md5((g + 1)::text),
       (ARRAY['image/jpeg', 'image/png', 'application/pdf', 'application/zip'])[1 + floor(random() * 4)::int],
       (SELECT decode(string_agg(md5(random()::text || k), ''), 'hex')
        FROM generate_series(1, 8 + floor(random() * 150)::int + 0 * g) k)
FROM generate_series(1, (:units * 30)::bigint) g;
\endif

-- ------------------------------------------------------------------ finish
\if :is_finish
DROP SCHEMA bench_gen CASCADE;
CREATE INDEX events_account_idx ON events (account_id);
CREATE INDEX documents_account_idx ON documents (account_id, created_at);
CREATE INDEX measurements_sensor_ts_idx ON measurements (sensor, ts);
CREATE INDEX blobs_account_idx ON blobs (account_id);
\endif
