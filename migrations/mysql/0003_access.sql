-- Who may do what: API tokens (stored hashed), who submitted each action,
-- and the audit log of administrative changes.

ALTER TABLE actions ADD COLUMN submitted_by VARCHAR(255) NULL;

CREATE TABLE api_tokens (
    id          CHAR(16)     NOT NULL PRIMARY KEY,
    name        VARCHAR(255) NOT NULL,
    scopes      VARCHAR(255) NOT NULL,
    kinds       TEXT         NULL,
    secret_hash CHAR(64)     NOT NULL,
    created_by  VARCHAR(255) NOT NULL,
    created_at  DATETIME(6)  NOT NULL,
    expires_at  DATETIME(6)  NULL,
    revoked_at  DATETIME(6)  NULL,
    UNIQUE KEY api_tokens_name (name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE audit_log (
    id      BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    at      DATETIME(6)  NOT NULL,
    actor   VARCHAR(255) NOT NULL,
    event   VARCHAR(64)  NOT NULL,
    subject VARCHAR(255) NOT NULL,
    detail  TEXT         NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE secrets (
    name       VARCHAR(128)     NOT NULL PRIMARY KEY,
    nonce      VARBINARY(24)    NOT NULL,
    ciphertext MEDIUMBLOB       NOT NULL,
    updated_at DATETIME(6)      NOT NULL,
    updated_by VARCHAR(255)     NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
