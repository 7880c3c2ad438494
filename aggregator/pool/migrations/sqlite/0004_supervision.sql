-- Supervision (督办, Longgang 9.1): the reminders, overdue items and escalations the timer
-- raised (aggregator/pool/supervision.py; the decisions are aggregator/cases/supervise.py).
-- The primary key is what makes each item exactly once: the timer inserts an item and appends
-- its audit row, webhook deliveries and notice only when the insert added the row.

CREATE TABLE IF NOT EXISTS case_supervision (
    event_id     INTEGER NOT NULL,
    item         TEXT NOT NULL,                 -- '<run>:<clock>:<kind>:<deadline>', stable
    kind         TEXT NOT NULL,                 -- reminder, overdue, escalate_street, escalate_county
    clock        TEXT NOT NULL,                 -- the stage clock chased
    run          INTEGER NOT NULL,              -- its index in the case's clock runs
    level        TEXT NOT NULL,                 -- who is chased: community, department, street, county
    case_version INTEGER NOT NULL,              -- the case's version when raised
    due_at       REAL NOT NULL,                 -- the stage deadline (UNIX seconds)
    raise_at     REAL NOT NULL,                 -- when the item fell due
    raised_at    REAL NOT NULL,                 -- when the timer raised it
    raised_by    TEXT NOT NULL,                 -- the timer (replica) that raised it
    audit_seq    INTEGER NOT NULL,              -- its row in case_audit
    PRIMARY KEY (event_id, item)
) WITHOUT ROWID;

-- Per case: the version the timer last looked at and the next time something falls due at
-- that version (NULL: nothing more until the case moves). Keeps each tick to the cases with
-- work in them instead of every overdue case.
CREATE TABLE IF NOT EXISTS case_supervision_next (
    event_id INTEGER PRIMARY KEY,
    version  INTEGER NOT NULL,
    next_at  REAL
) WITHOUT ROWID;
