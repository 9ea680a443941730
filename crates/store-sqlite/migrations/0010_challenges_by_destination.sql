-- Every challenge leaves the pending state once (approved, out of attempts, canceled): with an
-- index of pending challenges only, each of those was one more write at a random place of that
-- index, on every code checked. The index now holds every challenge until the sweeper deletes it,
-- and the lookup of a destination's pending code steps over that destination's few settled ones.
DROP INDEX IF EXISTS challenges_pending_by_destination;
CREATE INDEX challenges_by_destination ON challenges (tenant_id, destination, purpose, created_at);
