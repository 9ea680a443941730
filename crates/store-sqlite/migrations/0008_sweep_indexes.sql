-- Every statement the sweeper runs finds its rows through an index, so a sweep costs the rows it
-- deletes, not the size of the table (a million dead challenges must not slow a check down).
-- Deleting a challenge looks for tickets that still name it (the foreign key and the sweep's
-- own NOT EXISTS): without this index each deleted challenge scanned every ticket.
CREATE INDEX login_tickets_by_challenge ON login_tickets (challenge_id);
-- Settled messages by age: only rows that left the queue are in it.
CREATE INDEX outbox_settled_by_created ON outbox (created_at) WHERE status <> 'queued';
-- Revoked JWT ids by expiry.
CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at);
