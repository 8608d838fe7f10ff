-- Shared configuration that servers hold in memory (engine::config_watch).
-- Expand only: a server of the previous version ignores both tables.

-- One counter per kind of shared configuration, bumped in the commit of
-- every change to it (`Store::record`); every server polls the four and
-- reloads a kind whose counter moved.
CREATE TABLE generations (
    kind       VARCHAR(32) NOT NULL PRIMARY KEY,  -- tokens, keys, bundles, nodes
    generation BIGINT      NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

INSERT INTO generations (kind, generation)
VALUES ('tokens', 0), ('keys', 0), ('bundles', 0), ('nodes', 0);

-- The active version of each bundle name, named explicitly (written with
-- each push and activation), rather than found by the newest
-- `bundles.activated_at`, which some server's clock wrote.
CREATE TABLE active_bundles (
    name VARCHAR(128) NOT NULL PRIMARY KEY,
    hash CHAR(64)  NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

INSERT INTO active_bundles (name, hash)
SELECT b.name, MIN(b.hash) FROM bundles b
 WHERE b.activated_at = (SELECT MAX(c.activated_at) FROM bundles c WHERE c.name = b.name)
 GROUP BY b.name;
