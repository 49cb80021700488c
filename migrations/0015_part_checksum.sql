-- Parts presigned with a SHA-256 (`x-amz-checksum-sha256`) instead of an MD5
-- (`Content-MD5`): the session says which; each part row holds that digest (base64).
ALTER TABLE sessions ADD COLUMN part_checksum TEXT NOT NULL DEFAULT 'md5'
    CHECK (part_checksum IN ('md5', 'sha256'));
ALTER TABLE session_parts RENAME COLUMN md5 TO digest;
