-- Uploads from workstations (uplinkctl put): sessions owned by an operator's API key (or the
-- operator token) instead of a device (control-api/src/http/uploads.rs).

ALTER TABLE sessions ALTER COLUMN device_id DROP NOT NULL;
-- The actor that owns a client session (`key:<key_id>` or `operator`); NULL for a device's.
ALTER TABLE sessions ADD COLUMN owner TEXT;
ALTER TABLE sessions ADD CONSTRAINT sessions_one_owner CHECK ((device_id IS NULL) <> (owner IS NULL));
-- One session per client job, as per device job (sessions_device_job).
CREATE UNIQUE INDEX sessions_owner_job ON sessions (owner, job_id) WHERE owner IS NOT NULL;
