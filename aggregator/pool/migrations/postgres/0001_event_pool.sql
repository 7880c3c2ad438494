-- The community event pool on PostgreSQL: the same tables and columns as the SQLite pool
-- (aggregator/pool/sqlite.py), times as UNIX seconds so that window arithmetic reads the same on both.
-- Applied by aggregator.pgpool.migrate inside one transaction under an advisory lock.

-- One row per committed micro-batch; stamped just before COMMIT.
CREATE TABLE batches (
    id           BIGSERIAL PRIMARY KEY,
    started_at   DOUBLE PRECISION NOT NULL,
    committed_at DOUBLE PRECISION,
    size         INTEGER
);

-- The change number of a commit (a batch or a lifecycle step): it orders changes, and a
-- listener that missed notifications reads the rows above the last number it saw. Sequence
-- values are taken before commit, so two replicas may commit them out of order: catching up
-- re-reads a small overlap rather than trusting the numbers to be gap-free.
CREATE SEQUENCE pool_change_seq;

CREATE TABLE events (
    id                BIGSERIAL PRIMARY KEY,
    source            TEXT NOT NULL DEFAULT 'smart_community_warning',
    type              TEXT NOT NULL,
    severity          TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN
                        ('registered','verified','dispatched','handling','closed')),
    department        TEXT NOT NULL,
    grid_code         TEXT NOT NULL,
    lat               DOUBLE PRECISION NOT NULL,
    lon               DOUBLE PRECISION NOT NULL,
    grid_path         TEXT NOT NULL,
    address           TEXT NOT NULL,
    description       TEXT NOT NULL,
    snapshot_sha256   TEXT,
    snapshot_score    DOUBLE PRECISION,
    first_observed_at DOUBLE PRECISION NOT NULL,
    last_observed_at  DOUBLE PRECISION NOT NULL,
    registered_at     DOUBLE PRECISION NOT NULL,
    updated_at        DOUBLE PRECISION NOT NULL,
    deadline_at       DOUBLE PRECISION NOT NULL,
    closed_at         DOUBLE PRECISION,
    alert_count       INTEGER NOT NULL,
    device_count      INTEGER NOT NULL,
    recurrence_of     BIGINT REFERENCES events(id),
    version           INTEGER NOT NULL DEFAULT 1,
    change_seq        BIGINT NOT NULL DEFAULT 0
);
-- semantic dedup reads the candidates near each alert inside the batch's transaction
-- (type, then a latitude band; longitude and time are filtered on the band's rows)
CREATE INDEX events_open_near ON events(type, lat) WHERE status <> 'closed';
CREATE INDEX events_closed_near ON events(type, lat) WHERE status = 'closed';
CREATE INDEX events_change ON events(change_seq);
CREATE INDEX events_grid ON events(grid_code);
CREATE INDEX events_registered ON events(registered_at);

-- alert_id is unique across the whole pool. The alerts table is partitioned by month, and a
-- partitioned table's unique index must hold the partition key, so the idempotency key has a
-- table of its own: a batch claims its ids here (INSERT … ON CONFLICT DO NOTHING RETURNING)
-- before it pools them. Retention deletes a month's ids with its partition
-- (PgEventPool.drop_alerts_before).
CREATE TABLE alert_ids (
    alert_id    TEXT PRIMARY KEY,
    received_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX alert_ids_received ON alert_ids(received_at);

-- Months of alerts: RANGE partitions by month of received_at (UNIX seconds), made ahead of
-- need by the writer (PgEventPool._ensure_partitions); an old month is dropped whole.
CREATE TABLE alerts (
    id              BIGSERIAL,
    alert_id        TEXT NOT NULL,
    event_id        BIGINT NOT NULL REFERENCES events(id),
    device_id       TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    type            TEXT NOT NULL,
    severity        TEXT NOT NULL,
    confidence      DOUBLE PRECISION NOT NULL,
    observed_at     DOUBLE PRECISION NOT NULL,
    received_at     DOUBLE PRECISION NOT NULL,
    batch_id        BIGINT NOT NULL REFERENCES batches(id),
    lat             DOUBLE PRECISION NOT NULL,
    lon             DOUBLE PRECISION NOT NULL,
    grid_code       TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    snapshot_sha256 TEXT,
    payload         BYTEA NOT NULL,
    PRIMARY KEY (id, received_at)
) PARTITION BY RANGE (received_at);
CREATE INDEX alerts_alert_id ON alerts(alert_id);
CREATE INDEX alerts_event ON alerts(event_id);
CREATE INDEX alerts_snapshot ON alerts(snapshot_sha256) WHERE snapshot_sha256 IS NOT NULL;

CREATE TABLE event_devices (
    event_id       BIGINT NOT NULL REFERENCES events(id),
    device_id      TEXT NOT NULL,
    first_alert_at DOUBLE PRECISION NOT NULL,
    alert_count    INTEGER NOT NULL,
    PRIMARY KEY (event_id, device_id)
);

CREATE TABLE event_log (
    id       BIGSERIAL PRIMARY KEY,
    event_id BIGINT NOT NULL REFERENCES events(id),
    at       DOUBLE PRECISION NOT NULL,
    action   TEXT NOT NULL,
    actor    TEXT NOT NULL,
    detail   TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX event_log_event ON event_log(event_id, at);

CREATE TABLE out_of_area (
    alert_id    TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL,
    type        TEXT NOT NULL,
    observed_at DOUBLE PRECISION NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    lat         DOUBLE PRECISION NOT NULL,
    lon         DOUBLE PRECISION NOT NULL
);
CREATE INDEX out_of_area_received ON out_of_area(received_at);

CREATE TABLE devices (
    device_id         TEXT PRIMARY KEY,
    kind              TEXT,
    state             TEXT NOT NULL DEFAULT 'unknown',
    state_reason      TEXT,
    state_at          DOUBLE PRECISION,
    last_seen         DOUBLE PRECISION NOT NULL,
    health            TEXT,
    lat               DOUBLE PRECISION,
    lon               DOUBLE PRECISION,
    last_seq          BIGINT,
    alerts_total      BIGINT NOT NULL DEFAULT 0,
    rejected_total    BIGINT NOT NULL DEFAULT 0,
    out_of_area_total BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE dead_letters (
    id             BIGSERIAL PRIMARY KEY,
    received_at    DOUBLE PRECISION NOT NULL,
    topic          TEXT NOT NULL,
    device_id      TEXT,
    alert_id       TEXT,
    reason         TEXT NOT NULL,
    detail         TEXT NOT NULL,
    payload        BYTEA NOT NULL,
    -- sha256 of topic, NUL, payload: a message is kept once, however often it comes again
    message_sha256 TEXT NOT NULL UNIQUE,
    -- the payload's full size and sha256: ``payload`` keeps only its head when it was long
    payload_size   INTEGER NOT NULL,
    payload_sha256 TEXT NOT NULL
);
CREATE INDEX dead_letters_reason ON dead_letters(reason, received_at);
CREATE INDEX dead_letters_device ON dead_letters(device_id, received_at);
CREATE INDEX dead_letters_received ON dead_letters(received_at);

-- Snapshots where every replica reads them: content-addressed JPEG bytes.
CREATE TABLE snapshots (
    sha256    TEXT PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    jpeg      BYTEA NOT NULL,
    stored_at DOUBLE PRECISION NOT NULL
);
