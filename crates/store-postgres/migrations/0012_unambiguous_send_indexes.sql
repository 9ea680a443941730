-- The send limits count a destination's, an address's and an account's recent sends, each
-- through its own index. The address and account indexes led with tenant_id, so they could
-- also serve the destination's count (tenant_id as the key, the destination as a filter): on
-- an empty or unanalyzed outbox the planner took one of them for the destination's count, a
-- prepared statement kept that plan, and every send then walked all of the tenant's recent
-- sends. Led by the address or account instead, they serve only their own counts.
DROP INDEX outbox_by_ip;
DROP INDEX outbox_by_user;
CREATE INDEX outbox_by_ip ON outbox (client_ip, tenant_id, created_at);
CREATE INDEX outbox_by_user ON outbox (user_id, tenant_id, created_at);
