"""The event pool: the batch model and dedup (no database), the storage adapters (SQLite,
PostgreSQL) with their numbered migrations, and the read model every reader uses."""
