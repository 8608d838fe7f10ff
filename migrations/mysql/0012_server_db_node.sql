-- The database node each server writes through (`host:port`, when --db
-- lists a cluster's nodes), as of its last renewal. Expand only.
ALTER TABLE servers ADD COLUMN db_node VARCHAR(255) NULL;
