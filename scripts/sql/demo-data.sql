-- Sample data for deploy/quickstart.sh: a small shop (customers, products,
-- orders, order lines, an event log) with realistic text, jsonb, numerics,
-- timestamps, a view, indexes, constraints and sequences.  Deterministic
-- (setseed), a few MB.  Run with: psql -v ON_ERROR_STOP=1 -f demo-data.sql
\set ON_ERROR_STOP 1
SELECT setseed(0.42);

CREATE TABLE customers (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL UNIQUE,
    country     char(2) NOT NULL,
    created_at  timestamptz NOT NULL,
    profile     jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE products (
    id          serial PRIMARY KEY,
    sku         text NOT NULL UNIQUE,
    title       text NOT NULL,
    price       numeric(10, 2) NOT NULL CHECK (price >= 0),
    attributes  jsonb NOT NULL
);

CREATE TABLE orders (
    id           bigserial PRIMARY KEY,
    customer_id  bigint NOT NULL REFERENCES customers (id),
    ordered_at   timestamptz NOT NULL,
    status       text NOT NULL CHECK (status IN ('new', 'paid', 'shipped', 'delivered', 'cancelled')),
    shipping     jsonb NOT NULL,
    note         text
);

CREATE TABLE order_items (
    order_id    bigint NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    line        int NOT NULL,
    product_id  int NOT NULL REFERENCES products (id),
    quantity    int NOT NULL CHECK (quantity > 0),
    unit_price  numeric(10, 2) NOT NULL,
    PRIMARY KEY (order_id, line)
);

CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL,
    kind        text NOT NULL,
    payload     jsonb NOT NULL
);

-- Vocabulary used to build names and text.
CREATE TEMP TABLE first_names(i int, v text);
INSERT INTO first_names
SELECT row_number() OVER () - 1, v FROM unnest(ARRAY[
  'Ana','Ben','Chloé','David','Elif','Farid','Greta','Hiroshi','Ingrid','Jonas','Kavya','Luis',
  'María','Nils','Olga','Pedro','Quinn','Rania','Sofia','Tomasz','Uma','Viktor','Wen','Yusuf','Zoë']) v;
CREATE TEMP TABLE last_names(i int, v text);
INSERT INTO last_names
SELECT row_number() OVER () - 1, v FROM unnest(ARRAY[
  'Müller','Smith','García','Kowalski','Nakamura','Okafor','Rossi','Dubois','Novák','Jensen',
  'Silva','Andersson','Öztürk','Petrov','Haddad','Kim','Nguyen','O''Brien','Fischer','Costa']) v;
CREATE TEMP TABLE words(i int, v text);
INSERT INTO words
SELECT row_number() OVER () - 1, v FROM unnest(string_to_array(
  'please deliver before noon leave the parcel at reception call me when you arrive gift wrap '
  'fragile handle with care back door ring twice the blue house next to bakery invoice required '
  'for company address second floor weekend delivery preferred thanks a lot urgent order '
  'replacement for damaged item customer support ticket express shipping no plastic packaging', ' ')) v;

INSERT INTO customers (name, email, country, created_at, profile)
SELECT f.v || ' ' || l.v,
       lower(translate(f.v, 'éëüöçñáí', 'eeuocnai')) || '.' || lower(translate(l.v, 'éëüöçñáí''', 'eeuocnai')) || g || '@example.' ||
           (ARRAY['com','org','net','de','fr','io'])[1 + g % 6],
       (ARRAY['DE','FR','US','GB','PL','JP','NG','IT','BR','SE','TR','KR'])[1 + (g * 7) % 12],
       timestamptz '2021-01-01 00:00:00+00' + (random() * interval '1000 days'),
       jsonb_build_object(
           'newsletter', random() < 0.3,
           'language', (ARRAY['en','de','fr','es','ja'])[1 + floor(random() * 5)::int],
           'tags', to_jsonb(ARRAY(SELECT (ARRAY['vip','b2b','returning','new','wholesale'])[1 + floor(random() * 5)::int]
                                  FROM generate_series(1, 1 + g % 3))),
           'phone', '+' || (10 + floor(random() * 89)::int) || ' ' || lpad(floor(random() * 1e9)::bigint::text, 9, '0'))
FROM generate_series(1, 5000) g
JOIN first_names f ON f.i = g % 25
JOIN last_names l ON l.i = (g / 25) % 20;

INSERT INTO products (sku, title, price, attributes)
SELECT 'SKU-' || lpad(g::text, 5, '0'),
       initcap((ARRAY['ergonomic','rustic','sleek','durable','compact','vintage','smart'])[1 + g % 7] || ' ' ||
               (ARRAY['steel','wooden','cotton','granite','rubber','leather','glass','bamboo'])[1 + (g / 7) % 8] || ' ' ||
               (ARRAY['chair','lamp','mug','backpack','keyboard','table','bottle','jacket','clock','speaker'])[1 + (g / 56) % 10]),
       round((2 + random() * 498)::numeric, 2),
       jsonb_build_object('weight_g', floor(random() * 5000)::int,
                          'color', (ARRAY['red','green','blue','black','white','oak'])[1 + floor(random() * 6)::int],
                          'dimensions', jsonb_build_object('w', floor(random() * 100)::int, 'h', floor(random() * 100)::int),
                          'in_stock', random() < 0.8)
FROM generate_series(1, 400) g;

INSERT INTO orders (customer_id, ordered_at, status, shipping, note)
SELECT 1 + floor(random() * 5000)::int,
       timestamptz '2022-01-01 00:00:00+00' + (random() * interval '700 days'),
       (ARRAY['new','paid','shipped','delivered','delivered','delivered','cancelled'])[1 + floor(random() * 7)::int],
       jsonb_build_object('street', (10 + g % 190) || ' ' || (ARRAY['Main St','Rue de la Paix','Hauptstraße','Via Roma','Calle Mayor'])[1 + g % 5],
                          'city', (ARRAY['Berlin','Paris','Austin','Kraków','Osaka','Lagos','Milano'])[1 + (g * 3) % 7],
                          'zip', lpad((floor(random() * 99999))::int::text, 5, '0'),
                          'carrier', (ARRAY['dhl','ups','fedex','post'])[1 + g % 4]),
       CASE WHEN random() < 0.35 THEN
           (SELECT string_agg(w.v, ' ') FROM generate_series(1, 3 + g % 9) k
              JOIN words w ON w.i = (k * 7 + g * 13) % 60)
       END
FROM generate_series(1, 20000) g;

INSERT INTO order_items (order_id, line, product_id, quantity, unit_price)
SELECT o.id, l, p.id, 1 + floor(random() * 4)::int, p.price
FROM orders o
CROSS JOIN LATERAL generate_series(1, 1 + (o.id % 4)::int) l
JOIN products p ON p.id = 1 + ((o.id * 31 + l * 17) % 400);

INSERT INTO events (at, kind, payload)
SELECT timestamptz '2023-01-01 00:00:00+00' + g * interval '37 seconds',
       (ARRAY['login','logout','view','add_to_cart','checkout','refund'])[1 + g % 6],
       jsonb_build_object('customer_id', 1 + floor(random() * 5000)::int,
                          'ip', '10.' || (g % 256) || '.' || floor(random() * 256)::int || '.' || floor(random() * 256)::int,
                          'user_agent', (ARRAY['Mozilla/5.0 (X11; Linux x86_64)','Mozilla/5.0 (iPhone; CPU iPhone OS 17_0)','curl/8.4.0'])[1 + g % 3],
                          'duration_ms', floor(random() * 2000)::int,
                          'session', md5(g::text))
FROM generate_series(1, 15000) g;

CREATE INDEX orders_customer_idx ON orders (customer_id);
CREATE INDEX orders_ordered_at_idx ON orders (ordered_at);
CREATE INDEX events_kind_at_idx ON events (kind, at);
CREATE INDEX customers_profile_idx ON customers USING gin (profile);

CREATE VIEW customer_revenue AS
SELECT c.id, c.name, c.country, count(DISTINCT o.id) AS orders, coalesce(sum(i.quantity * i.unit_price), 0) AS revenue
FROM customers c
LEFT JOIN orders o ON o.customer_id = c.id AND o.status <> 'cancelled'
LEFT JOIN order_items i ON i.order_id = o.id
GROUP BY c.id, c.name, c.country;

COMMENT ON TABLE orders IS 'Customer orders (sample data for the datasaver quick start)';

ANALYZE;
