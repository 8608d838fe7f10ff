-- troupe schema v1 (MySQL / MariaDB). Times are UTC DATETIME(6).

CREATE TABLE actions (
    id               BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    kind             VARCHAR(255) NOT NULL,
    target           VARCHAR(255) NOT NULL,
    params           LONGTEXT     NOT NULL,
    status           VARCHAR(16)  NOT NULL,
    bundle           CHAR(64)     NOT NULL,
    current_step     VARCHAR(255) NULL,
    error            TEXT         NULL,
    idempotency_key  VARCHAR(255) NULL,
    request_hash     CHAR(64)     NOT NULL,
    owner            VARCHAR(255) NULL,
    lease_expires_at DATETIME(6)  NULL,
    revision         BIGINT       NOT NULL DEFAULT 0,
    created_at       DATETIME(6)  NOT NULL,
    started_at       DATETIME(6)  NULL,
    finished_at      DATETIME(6)  NULL,
    UNIQUE KEY actions_idempotency_key (idempotency_key),
    KEY actions_by_target (target, id),
    KEY actions_by_status (status, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE action_steps (
    action_id   BIGINT       NOT NULL,
    seq         INT          NOT NULL,
    name        VARCHAR(255) NOT NULL,
    step        VARCHAR(255) NOT NULL,
    status      VARCHAR(16)  NOT NULL,
    attempt     INT          NOT NULL DEFAULT 0,
    started_at  DATETIME(6)  NULL,
    finished_at DATETIME(6)  NULL,
    output      LONGTEXT     NULL,
    error       TEXT         NULL,
    PRIMARY KEY (action_id, seq),
    CONSTRAINT action_steps_action FOREIGN KEY (action_id) REFERENCES actions (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE action_step_attempts (
    action_id   BIGINT      NOT NULL,
    seq         INT         NOT NULL,
    attempt     INT         NOT NULL,
    started_at  DATETIME(6) NULL,
    finished_at DATETIME(6) NOT NULL,
    error       TEXT        NOT NULL,
    PRIMARY KEY (action_id, seq, attempt)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
