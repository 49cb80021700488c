-- The dataset label a directory watch attaches to its uploads (absent for commands and
-- older agents). It is also a segment of the object key.
ALTER TABLE sessions ADD COLUMN dataset TEXT;
