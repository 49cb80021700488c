-- Presence statuses are signed by the device and ordered: the API keeps the newest
-- (`ts_ms`, with `offline` after `online` of the same connection) and refuses older ones,
-- so a replayed or forged `status` cannot change a device's presence.
ALTER TABLE devices ADD COLUMN presence_ts_ms BIGINT;
