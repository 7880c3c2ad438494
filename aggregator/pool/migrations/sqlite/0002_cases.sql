-- Cases (issue 15): the lifecycle of each event from registration to closing, and its audit
-- trail. aggregator/pool/cases.py writes both inside one transaction with the event's status;
-- aggregator/cases/ holds the rules. An event without a row here is a case in state
-- 'registered' at version 1: rows are made by the first step, so ingest never touches them.

CREATE TABLE IF NOT EXISTS cases (
    event_id        INTEGER PRIMARY KEY REFERENCES events(id),
    state           TEXT NOT NULL,
    version         INTEGER NOT NULL,             -- compare-and-set counter (rules.Case)
    body            TEXT NOT NULL,                -- rules.Case as JSON: clocks, departments …
    assignee        TEXT,                         -- the account the case is assigned to
    community       TEXT NOT NULL,                -- the grid code's community prefix
    lead_department TEXT,
    departments     TEXT NOT NULL DEFAULT '',     -- ',lead,co1,co2,': who the case was whistled to
    updated_at      REAL NOT NULL,
    next_due_at     REAL                          -- earliest running deadline (supervision)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cases_community ON cases(community, state);
CREATE INDEX IF NOT EXISTS cases_lead ON cases(lead_department, state);
CREATE INDEX IF NOT EXISTS cases_next_due ON cases(next_due_at) WHERE next_due_at IS NOT NULL;

-- Append-only: one chain over every case (aggregator/cases/audit.py says how the hash is made).
-- ``at`` keeps the exact text the hash covers (UTC, microseconds).
CREATE TABLE IF NOT EXISTS case_audit (
    seq          INTEGER PRIMARY KEY,
    event_id     INTEGER NOT NULL,
    case_version INTEGER NOT NULL,
    actor        TEXT NOT NULL,
    role         TEXT NOT NULL,
    action       TEXT NOT NULL,
    before       TEXT NOT NULL,
    after        TEXT NOT NULL,
    reason       TEXT,
    note         TEXT,
    evidence     TEXT NOT NULL DEFAULT '[]',      -- JSON list of sha256
    detail       TEXT NOT NULL DEFAULT '{}',      -- JSON object of strings
    at           TEXT NOT NULL,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS case_audit_event ON case_audit(event_id, seq);

-- The chain head: the newest row's seq and hash, updated with every append, so that a cut-off
-- tail is found too. Its single row is the append lock on PostgreSQL.
CREATE TABLE IF NOT EXISTS case_audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
INSERT OR IGNORE INTO case_audit_head(id, seq, hash)
    VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Rows are never updated or deleted. Whoever owns the file can drop these triggers: the hash
-- chain (gateway audit verify) is what finds that.
CREATE TRIGGER IF NOT EXISTS case_audit_no_update BEFORE UPDATE ON case_audit
BEGIN
    SELECT RAISE(ABORT, 'case_audit rows are never updated');
END;
CREATE TRIGGER IF NOT EXISTS case_audit_no_delete BEFORE DELETE ON case_audit
BEGIN
    SELECT RAISE(ABORT, 'case_audit rows are never deleted');
END;
