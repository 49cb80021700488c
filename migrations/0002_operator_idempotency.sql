-- Answers to state-changing operator calls made with an Idempotency-Key header.
CREATE TABLE operator_requests (
    idempotency_key TEXT PRIMARY KEY,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    body_sha256     TEXT NOT NULL,
    status          INTEGER NOT NULL,
    content_type    TEXT,
    response        BYTEA NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
