-- Signed bundles and the keys trusted to sign them.

CREATE TABLE bundles (
    hash         CHAR(64)     NOT NULL PRIMARY KEY,
    name         VARCHAR(128) NOT NULL,
    version      VARCHAR(128) NOT NULL,
    abi          INT          NOT NULL,
    size         BIGINT       NOT NULL,
    signer       CHAR(16)     NOT NULL,
    signature    TEXT         NOT NULL,
    content      LONGBLOB     NOT NULL,
    created_at   DATETIME(6)  NOT NULL,
    activated_at DATETIME(6)  NOT NULL,
    UNIQUE KEY bundles_name_version (name, version)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE trusted_keys (
    key_id     CHAR(16)     NOT NULL PRIMARY KEY,
    public_key VARCHAR(100) NOT NULL,
    added_at   DATETIME(6)  NOT NULL,
    revoked_at DATETIME(6)  NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
