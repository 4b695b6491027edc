-- The relay streams this publication through a pgoutput slot: outbox inserts only.
CREATE PUBLICATION outbox_pub FOR TABLE outbox WITH (publish = 'insert');
