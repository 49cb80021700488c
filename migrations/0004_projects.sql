-- Organisations: projects own devices and datasets; every session lands in a dataset.
-- Existing devices and sessions move to the project `default` and its dataset `default`
-- (or the dataset label they were created with).

CREATE TABLE projects (
    project_id     TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    -- NULL: no quota.
    quota_bytes    BIGINT CHECK (quota_bytes >= 0),
    -- Bytes of completed objects, and bytes reserved by sessions still open.
    used_bytes     BIGINT NOT NULL DEFAULT 0 CHECK (used_bytes >= 0),
    reserved_bytes BIGINT NOT NULL DEFAULT 0 CHECK (reserved_bytes >= 0),
    -- Storage policy (see domain::policy); datasets override it field by field.
    policy         JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO projects (project_id, name) VALUES ('default', 'Default project');

CREATE TABLE datasets (
    project_id  TEXT NOT NULL REFERENCES projects (project_id),
    name        TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'sealed')),
    policy      JSONB NOT NULL DEFAULT '{}'::jsonb,
    -- jsonl | csv | parquet; NULL: no validation.
    validator   TEXT,
    -- Written once, when the dataset is sealed: every object, its size and SHA-256.
    manifest    JSONB,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    sealed_at   TIMESTAMPTZ,
    PRIMARY KEY (project_id, name)
);
INSERT INTO datasets (project_id, name) VALUES ('default', 'default');
INSERT INTO datasets (project_id, name)
    SELECT DISTINCT 'default', dataset FROM sessions WHERE dataset IS NOT NULL
    ON CONFLICT DO NOTHING;

ALTER TABLE devices ADD COLUMN project_id TEXT NOT NULL DEFAULT 'default' REFERENCES projects (project_id);
ALTER TABLE devices ALTER COLUMN project_id DROP DEFAULT;

ALTER TABLE sessions ADD COLUMN project_id TEXT NOT NULL DEFAULT 'default';
ALTER TABLE sessions ALTER COLUMN project_id DROP DEFAULT;
UPDATE sessions SET dataset = 'default' WHERE dataset IS NULL;
ALTER TABLE sessions ALTER COLUMN dataset SET NOT NULL;
ALTER TABLE sessions ADD FOREIGN KEY (project_id, dataset) REFERENCES datasets (project_id, name);
-- Bytes this session holds in its project's reservation (0 once settled or deduplicated).
ALTER TABLE sessions ADD COLUMN reserved_bytes BIGINT NOT NULL DEFAULT 0;
-- A session whose content was already stored completes at once and points at that object.
ALTER TABLE sessions ADD COLUMN deduplicated_from UUID REFERENCES sessions (session_id);
-- Validation of the stored object: NULL (no validator), pending, accepted or rejected.
ALTER TABLE sessions ADD COLUMN validation TEXT
    CHECK (validation IN ('pending', 'accepted', 'rejected'));
ALTER TABLE sessions ADD COLUMN validation_error TEXT;
-- Dedupe looks up completed content by hash within a dataset.
CREATE INDEX sessions_content ON sessions (project_id, dataset, sha256) WHERE state = 'completed';
CREATE INDEX sessions_validation ON sessions (validation) WHERE validation = 'pending';
-- Two live sessions never write the same object.
CREATE UNIQUE INDEX sessions_object ON sessions (bucket, object_key)
    WHERE deduplicated_from IS NULL AND state NOT IN ('aborted', 'expired', 'failed');

-- Operator API keys: only a SHA-256 of the secret is stored; the token is shown once.
CREATE TABLE api_keys (
    key_id       TEXT PRIMARY KEY,
    secret_hash  TEXT NOT NULL,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    -- NULL: every project.
    project_id   TEXT REFERENCES projects (project_id),
    created_by   TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ
);

-- Audit events name the project they belong to (NULL: global, e.g. a new project).
ALTER TABLE audit_events ADD COLUMN project_id TEXT;
UPDATE audit_events SET project_id = 'default';
CREATE INDEX audit_events_project ON audit_events (project_id, id);

-- Recorded (and committed) before a multipart upload is created, so the cleanup worker can
-- abort an upload whose session was never written (a crash in between). Templates put
-- objects anywhere in a bucket, so the sweep looks only at keys named here.
CREATE TABLE upload_intents (
    bucket     TEXT NOT NULL,
    object_key TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (bucket, object_key)
);
