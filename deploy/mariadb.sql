-- Creates troupe's database and user on MySQL or MariaDB. Run as an admin:
--   sed 's/CHANGE_ME/a-long-random-password/' deploy/mariadb.sql | sudo mariadb
-- then put the same password in TROUPE_DB. troupe creates its tables itself
-- (`troupe migrate`, or on every start).
--
-- Bundles (up to 64 MiB) are stored in the database, so the server must
-- accept packets that large: in the [mysqld] section of its configuration,
--   max_allowed_packet = 128M
CREATE DATABASE IF NOT EXISTS troupe CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
CREATE USER IF NOT EXISTS 'troupe'@'localhost' IDENTIFIED BY 'CHANGE_ME';
CREATE USER IF NOT EXISTS 'troupe'@'127.0.0.1' IDENTIFIED BY 'CHANGE_ME';
GRANT ALL PRIVILEGES ON troupe.* TO 'troupe'@'localhost';
GRANT ALL PRIVILEGES ON troupe.* TO 'troupe'@'127.0.0.1';
