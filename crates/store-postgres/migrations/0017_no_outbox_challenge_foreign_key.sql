-- Each message inserted checked its challenge through this key: a lookup of the challenge's row
-- and a KEY SHARE lock on it, that is a write to the challenge's page and a WAL record, run by a
-- trigger after the statement (about a tenth of PostgreSQL's time per `send`). A message is only
-- written in the statement that writes its challenge, or by a resend in the transaction that
-- updates its pending challenge; and the sweeper deletes no challenge that a message still names
-- (its NOT EXISTS), so the check could not fail.
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_challenge_id_fkey;
