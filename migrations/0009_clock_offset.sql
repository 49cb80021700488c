-- How far each device's clock is from the API's (seconds, device minus API), as the device
-- last reported it in its signed presence status (`clock_offset_secs`). NULL until a
-- device that measures it reports one. Shown in the operator's device view.
ALTER TABLE devices ADD COLUMN clock_offset_secs BIGINT;
