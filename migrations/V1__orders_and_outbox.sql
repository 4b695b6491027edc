-- Orders and the transactional outbox (SPEC.md, "Database").
-- Every order change writes its orders row and its outbox row in one transaction.

CREATE TABLE orders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     bigint      NOT NULL CHECK (user_id > 0),
    email       text        NOT NULL CHECK (length(email) BETWEEN 3 AND 254 AND email LIKE '%_@_%'),
    status      text        NOT NULL DEFAULT 'CREATED'
                            CHECK (status IN ('CREATED', 'PAID', 'SHIPPED', 'DELIVERED', 'CANCELLED')),
    items       jsonb       NOT NULL CHECK (jsonb_typeof(items) = 'array'),
    total_cents bigint      NOT NULL CHECK (total_cents >= 0),
    currency    text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (updated_at >= created_at)
);

-- Listing a user's orders: GET /orders?user_id=..&after=ID pages by (user_id, id).
CREATE INDEX orders_user_id_id_idx ON orders (user_id, id);

CREATE TABLE outbox (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    aggregate_type text        NOT NULL CHECK (aggregate_type <> ''),
    aggregate_id   text        NOT NULL CHECK (aggregate_id <> ''),
    user_id        bigint      NOT NULL,
    event_type     text        NOT NULL CHECK (event_type <> ''),
    payload        jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
