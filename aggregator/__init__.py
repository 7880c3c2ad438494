"""The central aggregator: ingest, validation, geo-tagging, dedup, event pool, API."""
