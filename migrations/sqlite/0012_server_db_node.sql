-- The database node each server writes through (MySQL/MariaDB only; NULL
-- here). Expand only.
ALTER TABLE servers ADD COLUMN db_node TEXT NULL;
