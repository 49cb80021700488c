-- An accepted command whose final ack has not come is re-published every
-- `command_recheck_secs` (control-api/src/command_feed.rs): its device answers with its
-- latest ack, which repairs a final ack lost on the way. The claim's second scan.
CREATE INDEX commands_accepted ON commands (updated_at) WHERE state = 'accepted';
