-- The W3C trace context of the request that wrote each outbox row (README,
-- "Following one order"): order-api writes the request's `traceparent` (its own
-- span as the parent) and `tracestate`; the relay copies both columns into the
-- record's headers (--header-columns), the notifier continues the trace.
-- Nullable: rows written before, or by a writer that knows no trace, have none.
-- Adding a nullable column without a default rewrites nothing.

ALTER TABLE outbox
    ADD COLUMN traceparent text,
    ADD COLUMN tracestate  text;
