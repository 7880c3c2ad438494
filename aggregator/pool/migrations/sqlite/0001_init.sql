-- The community event pool on SQLite (WAL): version 1, the schema of the release that first
-- numbered its migrations. Every statement may meet a pool made before then (its tables already
-- there): see aggregator/pool/migrate.py, which brings such a pool to this version first.

CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;

-- One row per committed micro-batch; stamped just before COMMIT.
CREATE TABLE IF NOT EXISTS batches (
    id           INTEGER PRIMARY KEY,
    started_at   REAL NOT NULL,
    committed_at REAL,
    size         INTEGER
);

CREATE TABLE IF NOT EXISTS events (
    id                INTEGER PRIMARY KEY,
    source            TEXT NOT NULL DEFAULT 'smart_community_warning',
    type              TEXT NOT NULL,
    severity          TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN
                        ('registered','verified','dispatched','handling','closed')),
    department        TEXT NOT NULL,
    grid_code         TEXT NOT NULL,
    lat               REAL NOT NULL,   -- 事发位置: where the first alert placed it
    lon               REAL NOT NULL,
    grid_path         TEXT NOT NULL,   -- JSON [{level, code, name}], county › … › grid
    address           TEXT NOT NULL,   -- the grid path's names, county › … › grid
    description       TEXT NOT NULL,   -- 问题描述
    snapshot_sha256   TEXT,            -- 实时照片: the best snapshot so far
    snapshot_score    REAL,
    first_observed_at REAL NOT NULL,
    last_observed_at  REAL NOT NULL,
    registered_at     REAL NOT NULL,
    updated_at        REAL NOT NULL,
    deadline_at       REAL NOT NULL,
    closed_at         REAL,
    alert_count       INTEGER NOT NULL,
    device_count      INTEGER NOT NULL,
    recurrence_of     INTEGER REFERENCES events(id),
    version           INTEGER NOT NULL DEFAULT 1,
    -- the pool-wide change number (meta 'change_seq') of the commit that last changed the row:
    -- every writer reads the rows others changed since its own last commit
    change_seq        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_change ON events(change_seq);
CREATE INDEX IF NOT EXISTS events_open ON events(type, last_observed_at) WHERE status != 'closed';
CREATE INDEX IF NOT EXISTS events_closed ON events(type, closed_at) WHERE status = 'closed';
CREATE INDEX IF NOT EXISTS events_grid ON events(grid_code);
CREATE INDEX IF NOT EXISTS events_registered ON events(registered_at);

CREATE TABLE IF NOT EXISTS alerts (
    -- rowid order is arrival order: appends stay cheap; the idempotency key is the unique
    -- index on alert_id
    id              INTEGER PRIMARY KEY,
    alert_id        TEXT NOT NULL UNIQUE,
    event_id        INTEGER NOT NULL REFERENCES events(id),
    device_id       TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    type            TEXT NOT NULL,
    severity        TEXT NOT NULL,
    confidence      REAL NOT NULL,
    observed_at     REAL NOT NULL,
    received_at     REAL NOT NULL,
    batch_id        INTEGER NOT NULL REFERENCES batches(id),
    lat             REAL NOT NULL,
    lon             REAL NOT NULL,
    grid_code       TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    snapshot_sha256 TEXT,
    payload         BLOB NOT NULL      -- the message as received, its snapshot replaced by the hash
);
CREATE INDEX IF NOT EXISTS alerts_event ON alerts(event_id);
-- no index on (device_id, seq): nothing reads alerts by device, and at ~10k inserts a second
-- it cost a fifth of the alert insert's work in SQLite; pools made before lose it here
DROP INDEX IF EXISTS alerts_device;
CREATE INDEX IF NOT EXISTS alerts_snapshot ON alerts(snapshot_sha256)
    WHERE snapshot_sha256 IS NOT NULL;

CREATE TABLE IF NOT EXISTS event_devices (
    event_id       INTEGER NOT NULL REFERENCES events(id),
    device_id      TEXT NOT NULL,
    first_alert_at REAL NOT NULL,
    alert_count    INTEGER NOT NULL,
    PRIMARY KEY (event_id, device_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS event_log (
    id       INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    at       REAL NOT NULL,
    action   TEXT NOT NULL,
    actor    TEXT NOT NULL,
    detail   TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS event_log_event ON event_log(event_id, at);

CREATE TABLE IF NOT EXISTS out_of_area (
    alert_id    TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL,
    type        TEXT NOT NULL,
    observed_at REAL NOT NULL,
    received_at REAL NOT NULL,
    lat         REAL NOT NULL,
    lon         REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS devices (
    device_id        TEXT PRIMARY KEY,
    kind             TEXT,
    state            TEXT NOT NULL DEFAULT 'unknown',
    state_reason     TEXT,
    state_at         REAL,
    last_seen        REAL NOT NULL,
    health           TEXT,
    lat              REAL,
    lon              REAL,
    last_seq         INTEGER,
    alerts_total     INTEGER NOT NULL DEFAULT 0,
    rejected_total   INTEGER NOT NULL DEFAULT 0,
    out_of_area_total INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    topic       TEXT NOT NULL,
    device_id   TEXT,
    alert_id    TEXT,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    payload     BLOB NOT NULL,
    -- sha256 of topic, NUL, payload: a message is kept once, however often it comes again
    -- (a redelivery after a reconnect); NULL in rows older than the column
    message_sha256 TEXT,
    -- the payload's full size and sha256: ``payload`` keeps only its head when it was long
    -- (EventPool.dead_letter_keep_bytes); NULL in rows older than these columns
    payload_size INTEGER,
    payload_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS dead_letters_reason ON dead_letters(reason, received_at);
CREATE INDEX IF NOT EXISTS dead_letters_device ON dead_letters(device_id, received_at);
-- retention (EventPool.prune) deletes the oldest rows in bounded steps
CREATE INDEX IF NOT EXISTS dead_letters_received ON dead_letters(received_at);
CREATE INDEX IF NOT EXISTS out_of_area_received ON out_of_area(received_at);
-- a message is kept once (a redelivery after a reconnect adds nothing)
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_message ON dead_letters(message_sha256)
    WHERE message_sha256 IS NOT NULL;

-- the pool-wide change number (events.change_seq)
INSERT OR IGNORE INTO meta(key, value) VALUES ('change_seq', '0');
