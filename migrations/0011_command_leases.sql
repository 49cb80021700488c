-- Commands pushed to the bridges (control-api/src/command_feed.rs).

-- A bridge claims due commands before it publishes them: `claimed_by` is its name (its
-- broker client id), `lease_until` the end of its claim. While the lease runs no other
-- bridge gets the command; publishing it clears the lease. A bridge that dies between
-- claim and publish loses the command only until its lease runs out.
ALTER TABLE commands ADD COLUMN claimed_by TEXT;
ALTER TABLE commands ADD COLUMN lease_until TIMESTAMPTZ;

-- The commands a bridge may still have to publish (the claim query's scan).
CREATE INDEX commands_open ON commands (created_at) WHERE state IN ('pending', 'published');

-- A command that becomes due at once (stored, or its device came online: published_at is
-- set to NULL) wakes the API instances' long-polls; notifications go out at commit, and
-- PostgreSQL sends one per transaction however many rows fired.
CREATE FUNCTION commands_due_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('uplink_commands', '');
    RETURN NULL;
END $$;
CREATE TRIGGER commands_due_notify AFTER INSERT OR UPDATE OF published_at ON commands
    FOR EACH ROW WHEN (NEW.published_at IS NULL AND NEW.state IN ('pending', 'published'))
    EXECUTE FUNCTION commands_due_notify();
