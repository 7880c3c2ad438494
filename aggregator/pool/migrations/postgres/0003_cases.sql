-- Cases (issue 15): the same tables as SQLite's 0002_cases.sql (aggregator/pool/cases.py
-- writes them inside one transaction with the event's status). An event without a row here is
-- a case in state 'registered' at version 1.

CREATE TABLE cases (
    event_id        BIGINT PRIMARY KEY REFERENCES events(id),
    state           TEXT NOT NULL,
    version         INTEGER NOT NULL,
    body            TEXT NOT NULL,
    assignee        TEXT,
    community       TEXT NOT NULL,
    lead_department TEXT,
    departments     TEXT NOT NULL DEFAULT '',
    updated_at      DOUBLE PRECISION NOT NULL,
    next_due_at     DOUBLE PRECISION
);
CREATE INDEX cases_community ON cases(community, state);
CREATE INDEX cases_lead ON cases(lead_department, state);
CREATE INDEX cases_next_due ON cases(next_due_at) WHERE next_due_at IS NOT NULL;

CREATE TABLE case_audit (
    seq          BIGINT PRIMARY KEY,
    event_id     BIGINT NOT NULL,
    case_version INTEGER NOT NULL,
    actor        TEXT NOT NULL,
    role         TEXT NOT NULL,
    action       TEXT NOT NULL,
    before       TEXT NOT NULL,
    after        TEXT NOT NULL,
    reason       TEXT,
    note         TEXT,
    evidence     TEXT NOT NULL DEFAULT '[]',
    detail       TEXT NOT NULL DEFAULT '{}',
    at           TEXT NOT NULL,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL
);
CREATE INDEX case_audit_event ON case_audit(event_id, seq);

-- The chain head; appends lock its row (SELECT … FOR UPDATE), so replicas never chain onto
-- the same previous row.
CREATE TABLE case_audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO case_audit_head(id, seq, hash)
    VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Rows are never updated or deleted. The pool's own user owns the table and could disable
-- this trigger (REVOKE does not bind an owner): the hash chain is what finds that.
CREATE FUNCTION case_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'case_audit rows are never updated or deleted';
END;
$$;
CREATE TRIGGER case_audit_append_only BEFORE UPDATE OR DELETE ON case_audit
    FOR EACH ROW EXECUTE FUNCTION case_audit_append_only();
