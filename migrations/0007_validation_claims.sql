-- Validation of completed objects (control-api/src/validation.rs).

-- The validator an object is checked with: the dataset's when the session completed
-- (a later change of the dataset's validator does not move the goal posts).
ALTER TABLE sessions ADD COLUMN validator TEXT CHECK (validator IN ('jsonl', 'csv', 'parquet'));
-- A worker claims a pending object by setting validation_after to the end of its lease and
-- renews it while it reads; an object whose lease ran out (its worker died) is claimed
-- again. After a read error (storage down) it is the time of the next attempt.
-- NULL: claimable now.
ALTER TABLE sessions ADD COLUMN validation_after TIMESTAMPTZ;
-- Attempts started so far (the backoff after a read error grows with them).
ALTER TABLE sessions ADD COLUMN validation_attempts INT NOT NULL DEFAULT 0;
-- The current claim (a random token per attempt); only its holder writes the verdict.
ALTER TABLE sessions ADD COLUMN validation_claim UUID;
