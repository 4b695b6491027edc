-- Idempotency keys of POST /orders (order-api, issue 4).
--
-- A request with an Idempotency-Key inserts its key here first, in the same
-- transaction as the order and its outbox row, so concurrent retries of one
-- key queue on the primary key and only the first creates an order. The
-- first response is stored (as text: the body is replayed byte for byte);
-- a retry with the same request gets it back, a different request is refused.
-- status_code and response_body are NULL only inside the creating
-- transaction, which fills them before it commits.
CREATE TABLE idempotency_keys (
    key           text        PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 255),
    request_hash  bytea       NOT NULL,
    status_code   smallint,
    response_body text,
    location      text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);

-- Expired keys are deleted in batches by expiry time.
CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
