-- The same columns as on SQLite (0005_webhook_lifecycle.sql).
-- Webhook subscriptions that can be switched off (by an administrator, or by a receiver that
-- answered 410 Gone) and whose secret can be rotated with a grace period:
-- aggregator/pool/outbox.py. Times are UNIX seconds.

-- why the subscription is disabled ('disabled by admin', 'receiver answered 410 Gone') and
-- since when; both NULL while it is enabled
ALTER TABLE webhook_subscriptions ADD COLUMN disabled_reason TEXT;
ALTER TABLE webhook_subscriptions ADD COLUMN disabled_at DOUBLE PRECISION;
-- the secret before the last rotation: deliveries are signed with both keys until
-- previous_secret_until, so receivers can switch to the new one without losing any
ALTER TABLE webhook_subscriptions ADD COLUMN previous_secret TEXT;
ALTER TABLE webhook_subscriptions ADD COLUMN previous_secret_until DOUBLE PRECISION;
ALTER TABLE webhook_subscriptions ADD COLUMN secret_rotated_at DOUBLE PRECISION;
