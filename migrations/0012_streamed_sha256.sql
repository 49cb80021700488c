-- Devices that hash while their parts upload create the session without the file's SHA-256
-- and send it in the session.complete manifest: claimed_sha256 stays NULL until completion
-- (and a session completed without it is impossible: completion requires the manifest).
ALTER TABLE sessions ALTER COLUMN claimed_sha256 DROP NOT NULL;
