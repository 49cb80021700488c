-- The audit log becomes the outbox: every row gets a gap-free sequence number (`seq`) after
-- its transaction commits, from one relay at a time (src/events.rs), so numbers are handed
-- out in commit order and a consumer that reads `seq > N` in order never misses an event.
-- (An id from BIGSERIAL would not do: ids are taken at insert, and a transaction that
-- commits late makes a row with a smaller id appear after a reader has passed it.)

ALTER TABLE audit_events ADD COLUMN seq BIGINT;
UPDATE audit_events a SET seq = n.rn
  FROM (SELECT id, row_number() OVER (ORDER BY id) AS rn FROM audit_events) n
 WHERE a.id = n.id;
CREATE UNIQUE INDEX audit_events_seq ON audit_events (seq);
CREATE INDEX audit_events_unsequenced ON audit_events (id) WHERE seq IS NULL;
CREATE INDEX audit_events_project_seq ON audit_events (project_id, seq);

-- Append-only: no row is deleted and the only change ever made is giving it its seq.
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'audit_events is append-only: rows are never deleted';
    END IF;
    IF OLD.seq IS NOT NULL
       OR ROW(NEW.id, NEW.at, NEW.actor, NEW.action, NEW.subject, NEW.request_id,
              NEW.project_id, NEW.detail)
          IS DISTINCT FROM
          ROW(OLD.id, OLD.at, OLD.actor, OLD.action, OLD.subject, OLD.request_id,
              OLD.project_id, OLD.detail) THEN
        RAISE EXCEPTION 'audit_events is append-only: only an unset seq may be set';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();

-- Wakes the relay when new rows commit (notifications are delivered at commit).
CREATE FUNCTION audit_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('uplink_audit', '');
    RETURN NULL;
END $$;
CREATE TRIGGER audit_events_notify AFTER INSERT ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_notify();

-- Webhooks: each receives the events of its project (all projects when NULL), optionally
-- only some actions, one POST per event in seq order, signed with HMAC-SHA256.
CREATE TABLE webhooks (
    webhook_id        UUID PRIMARY KEY,
    project_id        TEXT REFERENCES projects (project_id),
    url               TEXT NOT NULL,
    -- The HMAC key. Kept as is: signing needs it. Shown once, at creation.
    secret            TEXT NOT NULL,
    actions           TEXT[],
    -- The seq of the last event delivered (or, at creation, the starting point).
    cursor            BIGINT NOT NULL,
    failures          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error        TEXT,
    last_delivered_at TIMESTAMPTZ,
    -- One API instance delivers to a webhook at a time.
    lease_owner       UUID,
    lease_until       TIMESTAMPTZ,
    created_by        TEXT NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
