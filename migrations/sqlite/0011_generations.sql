-- Shared configuration that servers hold in memory (engine::config_watch).
-- On SQLite one server runs; the host-side `troupe tokens create --admin`
-- bumps `tokens` as any change does.

-- One counter per kind of shared configuration, bumped in the commit of
-- every change to it (`Store::record`).
CREATE TABLE generations (
    kind       TEXT    NOT NULL PRIMARY KEY,  -- tokens, keys, bundles, nodes
    generation INTEGER NOT NULL
);

INSERT INTO generations (kind, generation)
VALUES ('tokens', 0), ('keys', 0), ('bundles', 0), ('nodes', 0);

-- The active version of each bundle name, named explicitly (written with
-- each push and activation).
CREATE TABLE active_bundles (
    name TEXT NOT NULL PRIMARY KEY,
    hash TEXT NOT NULL
);

INSERT INTO active_bundles (name, hash)
SELECT b.name, MIN(b.hash) FROM bundles b
 WHERE b.activated_at = (SELECT MAX(c.activated_at) FROM bundles c WHERE c.name = b.name)
 GROUP BY b.name;
