-- Room on each page for a new version of every row on it. Codes are checked, and login tickets
-- spent, in about the order they were created, so one batch (one statement, one transaction)
-- changes most rows of a page at once, and a row version that transaction replaces cannot be
-- pruned before it ends. With 20% of a page free only the first few new versions fit on their
-- page: the rest became non-HOT updates, each a new entry in every index of the table (four on
-- challenges), and 41% of `v1-check`'s updates stayed HOT. A consumed challenge is a few bytes
-- longer than a pending one (its resolved_at), hence 45 there. The tables are about twice as
-- large; the sweeper keeps them to the rows still alive.
ALTER TABLE login_tickets SET (fillfactor = 50);
ALTER TABLE challenges SET (fillfactor = 45);
