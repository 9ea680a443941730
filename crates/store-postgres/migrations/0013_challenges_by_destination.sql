-- Every challenge leaves the pending state once (approved, out of attempts, canceled). With an
-- index of pending challenges only, `status` was an indexed column, so no change of it could be
-- a HOT update: each check wrote a new entry into every index of the table. No index names
-- `status`, `attempts` or `resolved_at` now, so a check rewrites the row in its page alone. The
-- index holds every challenge until the sweeper deletes it; the lookup of a destination's
-- pending code steps over that destination's few settled ones.
DROP INDEX IF EXISTS challenges_pending_by_destination;
CREATE INDEX challenges_by_destination ON challenges (tenant_id, destination, purpose, created_at);
