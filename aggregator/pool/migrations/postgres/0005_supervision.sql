-- Supervision (督办): the same tables as SQLite's 0004_supervision.sql. The timer claims the
-- cases with work in them with FOR UPDATE SKIP LOCKED, so replicas' timers share the work and
-- never raise one item twice (the primary key is the last word on that).

CREATE TABLE case_supervision (
    event_id     BIGINT NOT NULL,
    item         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    clock        TEXT NOT NULL,
    run          INTEGER NOT NULL,
    level        TEXT NOT NULL,
    case_version INTEGER NOT NULL,
    due_at       DOUBLE PRECISION NOT NULL,
    raise_at     DOUBLE PRECISION NOT NULL,
    raised_at    DOUBLE PRECISION NOT NULL,
    raised_by    TEXT NOT NULL,
    audit_seq    BIGINT NOT NULL,
    PRIMARY KEY (event_id, item)
);

CREATE TABLE case_supervision_next (
    event_id BIGINT PRIMARY KEY,
    version  INTEGER NOT NULL,
    next_at  DOUBLE PRECISION
);
