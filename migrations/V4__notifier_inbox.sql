-- The notifier's inbox (SPEC.md, "notifier"): one row per outbox event whose
-- email was sent. The notifier inserts the row in the transaction that decides
-- to send and commits it once the mail server took the email, so a redelivered
-- record finds the row and sends nothing.

CREATE TABLE notifier_inbox (
    event_id        bigint      PRIMARY KEY,   -- outbox.id (the record's event_id header)
    event_type      text        NOT NULL,
    message_id      text        NOT NULL,      -- the email's Message-ID
    topic           text        NOT NULL,      -- where the record was read
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    handled_at      timestamptz NOT NULL DEFAULT now()
);
