-- Outbound webhooks (Standard Webhooks) and their durable outbox: aggregator/pool/outbox.py.
-- A case step inserts its deliveries in its own transaction, so a committed step is delivered
-- at least once and a rolled-back one never; the delivery worker (aggregator/fanout/webhooks.py)
-- claims due rows, posts them and marks them. Times are UNIX seconds.

CREATE TABLE IF NOT EXISTS webhook_subscriptions (
    id          TEXT PRIMARY KEY,                -- 'wh_<random>'
    url         TEXT NOT NULL,                   -- where deliveries are POSTed (http/https)
    -- 'whsec_<base64 key>': the HMAC key, shown to the creator once; the API never returns it
    -- again and nothing logs it (the key must be kept whole to sign every retry)
    secret      TEXT NOT NULL,
    event_types TEXT NOT NULL DEFAULT '[]',      -- JSON list of warning type codes; [] = all
    grid_prefix TEXT NOT NULL DEFAULT '',        -- grid code prefix; '' = every grid
    department  TEXT,                            -- a lead or co-department; NULL = any
    actions     TEXT NOT NULL DEFAULT '[]',      -- JSON list of case actions; [] = all
    description TEXT NOT NULL DEFAULT '',
    enabled     INTEGER NOT NULL DEFAULT 1,
    created_by  TEXT NOT NULL,
    created_at  REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id              INTEGER PRIMARY KEY,          -- enqueue order: the order within one case
    webhook_id      TEXT NOT NULL UNIQUE,         -- 'msg_…', stable per (subscription, message)
    subscription_id TEXT NOT NULL,
    case_id         TEXT NOT NULL,                -- the case (its event's id)
    message_type    TEXT NOT NULL,                -- e.g. 'case.step'
    payload         TEXT NOT NULL,                -- the JSON body, sent byte for byte each try
    created_at      REAL NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending','delivered','dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until     REAL,                         -- a worker holds it until then (or finishes)
    lease_token     TEXT,                         -- which claim holds it
    last_error      TEXT,                         -- 'HTTP 503', 'ConnectTimeout', … (no secrets)
    last_status     INTEGER,                      -- the receiver's last HTTP status
    finished_at     REAL                          -- delivered or given up
);
-- what the worker asks: due pending rows, and whether a case has an earlier one still pending
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries(next_attempt_at, id)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_case
    ON webhook_deliveries(subscription_id, case_id, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_list
    ON webhook_deliveries(subscription_id, status, id);
-- what retention deletes: finished deliveries by age
CREATE INDEX IF NOT EXISTS webhook_deliveries_finished ON webhook_deliveries(finished_at)
    WHERE status != 'pending';
