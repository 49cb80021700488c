-- Live views (GET /v1/live): every insert or update of a session or a device takes the
-- next number of one sequence, so a console can ask "what changed after N" and be told
-- about progress and presence, which are not audit events. Numbers are taken when a row
-- changes, not when its transaction commits, so a reader can pass a number whose row is
-- still uncommitted: live views are best effort and the next change of that row shows it
-- (transitions are also in the gap-free event feed).
CREATE SEQUENCE live_seq;

ALTER TABLE sessions ADD COLUMN changed_seq BIGINT NOT NULL DEFAULT nextval('live_seq');
ALTER TABLE devices ADD COLUMN changed_seq BIGINT NOT NULL DEFAULT nextval('live_seq');
CREATE INDEX sessions_changed ON sessions (changed_seq);
CREATE INDEX devices_changed ON devices (changed_seq);

CREATE FUNCTION live_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.changed_seq := nextval('live_seq');
    RETURN NEW;
END
$$;
CREATE TRIGGER sessions_live BEFORE UPDATE ON sessions FOR EACH ROW EXECUTE FUNCTION live_changed();
CREATE TRIGGER devices_live BEFORE UPDATE ON devices FOR EACH ROW EXECUTE FUNCTION live_changed();

-- Free space on the gateway, from its signed presence status.
ALTER TABLE devices ADD COLUMN free_disk_bytes BIGINT;
