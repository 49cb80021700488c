-- The SHA-256 of each completed object, read back from storage by the API
-- (control-api/src/digest.rs). A device's claimed digest is never trusted on its own: only
-- an object whose digest the API computed from the stored bytes may be a dedupe source.

-- NULL: nothing to check (not completed, or completed before this column existed and not
-- yet claimed); 'pending': to be read; 'verified': the stored bytes hash to the claimed
-- digest; 'mismatch': they do not (the device lied or storage holds other bytes).
ALTER TABLE sessions ADD COLUMN digest_check TEXT CHECK (digest_check IN ('pending', 'verified', 'mismatch'));
-- The SHA-256 the API computed from the stored object.
ALTER TABLE sessions ADD COLUMN stored_sha256 TEXT;
-- Claim, lease and backoff, as for validation (0007).
ALTER TABLE sessions ADD COLUMN digest_after TIMESTAMPTZ;
ALTER TABLE sessions ADD COLUMN digest_attempts INT NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN digest_claim UUID;
-- Completed sessions of earlier versions are checked too, so they can become dedupe sources.
UPDATE sessions SET digest_check = 'pending' WHERE state = 'completed' AND deduplicated_from IS NULL;
CREATE INDEX sessions_digest_pending ON sessions (completed_at) WHERE digest_check = 'pending';

-- The storage policy in force when the session was created (control-api/src/guarantees.rs):
-- completion checks that storage applied it. NULL for sessions of earlier versions.
ALTER TABLE sessions ADD COLUMN policy JSONB;
