-- No statement looks sessions up by user (users are never deleted, and sessions are found by
-- their token's hash): the index only cost every login a write at a random key.
DROP INDEX IF EXISTS sessions_by_user;
