-- Uplink control API: initial schema.

CREATE TABLE devices (
    device_id     TEXT PRIMARY KEY,
    public_key    TEXT NOT NULL,
    enabled       BOOLEAN NOT NULL DEFAULT TRUE,
    online        BOOLEAN NOT NULL DEFAULT FALSE,
    agent_version TEXT,
    queue_depth   INTEGER,
    last_seen_at  TIMESTAMPTZ,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE sessions (
    session_id     UUID PRIMARY KEY,
    device_id      TEXT NOT NULL REFERENCES devices (device_id),
    job_id         UUID NOT NULL,
    command_id     UUID,
    file_name      TEXT NOT NULL,
    bucket         TEXT NOT NULL,
    object_key     TEXT NOT NULL,
    size           BIGINT NOT NULL CHECK (size >= 0),
    part_size      BIGINT NOT NULL,
    part_count     INTEGER NOT NULL,
    claimed_sha256 TEXT NOT NULL,
    -- NULL for a 0-byte object, uploaded with one PutObject.
    upload_id      TEXT,
    state          TEXT NOT NULL,
    version        INTEGER NOT NULL DEFAULT 0,
    bytes_done     BIGINT NOT NULL DEFAULT 0,
    rate_bps       BIGINT NOT NULL DEFAULT 0,
    sha256         TEXT,
    etag           TEXT,
    error          TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at   TIMESTAMPTZ
);
-- One session per agent job.
CREATE UNIQUE INDEX sessions_device_job ON sessions (device_id, job_id);
CREATE INDEX sessions_state ON sessions (state, updated_at);

-- The MD5 each part was presigned with: completion checks storage against these.
CREATE TABLE session_parts (
    session_id UUID NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    number     INTEGER NOT NULL,
    md5        TEXT NOT NULL,
    size       BIGINT NOT NULL,
    PRIMARY KEY (session_id, number)
);

CREATE TABLE commands (
    command_id    UUID PRIMARY KEY,
    device_id     TEXT NOT NULL REFERENCES devices (device_id),
    action        JSONB NOT NULL,
    envelope      JSONB NOT NULL,
    state         TEXT NOT NULL,
    reason        TEXT,
    session_id    UUID,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at    TIMESTAMPTZ NOT NULL,
    published_at  TIMESTAMPTZ,
    publish_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX commands_due ON commands (device_id, state);

-- Answers to device requests, keyed by (device, request_id): duplicates get the same answer.
CREATE TABLE device_requests (
    device_id   TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    op          TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    status      INTEGER NOT NULL,
    response    JSONB NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, request_id)
);

CREATE TABLE audit_events (
    id         BIGSERIAL PRIMARY KEY,
    at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    request_id TEXT,
    detail     JSONB NOT NULL DEFAULT '{}'::jsonb
);
