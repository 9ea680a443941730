-- Rows that are updated in place on every login (a ticket spent, a challenge's attempts, a
-- user's failure count) get room in their own page: with full pages (the default fillfactor of
-- 100) every such update writes a new row version elsewhere and a new entry into each of the
-- table's indexes; with room, an update that changes no indexed column stays on its page and
-- touches no index (a HOT update). Applies to pages written from now on.
ALTER TABLE login_tickets SET (fillfactor = 80);
ALTER TABLE challenges SET (fillfactor = 80);
ALTER TABLE users SET (fillfactor = 80);
ALTER TABLE sessions SET (fillfactor = 90);
