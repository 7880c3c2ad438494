-- Operator accounts and their bearer tokens in the pool that every replica shares, so a token
-- issued by one replica's API is accepted by every other, and disabling an account or changing
-- its password ends its sessions everywhere. The same tables and columns as on SQLite
-- (aggregator/access/store.py); times as UNIX seconds.

CREATE TABLE operators (
    username            TEXT PRIMARY KEY,
    level               TEXT NOT NULL CHECK (level IN
                          ('admin','county','street','community','department')),
    scope_code          TEXT NOT NULL DEFAULT '',   -- grid code prefix; '' = every grid
    department          TEXT,                       -- catalogue department code
    display_name        TEXT NOT NULL,
    password_hash       TEXT NOT NULL,              -- argon2id, PHC string
    disabled            BOOLEAN NOT NULL DEFAULT false,
    created_at          DOUBLE PRECISION NOT NULL,
    password_changed_at DOUBLE PRECISION NOT NULL,
    last_login_at       DOUBLE PRECISION
);

-- Only the SHA-256 of a token is kept: a copy of this table logs nobody in.
CREATE TABLE operator_tokens (
    token_hash   TEXT PRIMARY KEY,                  -- sha256 of the bearer token, hex
    username     TEXT NOT NULL REFERENCES operators(username),
    issued_at    DOUBLE PRECISION NOT NULL,
    expires_at   DOUBLE PRECISION NOT NULL
);
-- disabling an account or changing its password deletes its tokens; a login its expired ones
CREATE INDEX operator_tokens_user ON operator_tokens(username, expires_at);

-- The login limiter's failed attempts, one row per user name ('user:<casefolded name>') or
-- client address ('addr:<address>'), shared by every replica so that a lockout holds on all of
-- them (aggregator/access/store.py PgStrikeBook). Times are UNIX seconds; rows quiet for the
-- limiter's forget period are deleted.
CREATE TABLE login_strikes (
    key          TEXT PRIMARY KEY,
    failures     INTEGER NOT NULL DEFAULT 0,
    locked_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_failure DOUBLE PRECISION NOT NULL DEFAULT 0
);
