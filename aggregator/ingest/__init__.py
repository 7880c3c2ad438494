"""Ingest: the MQTT session and client, transport, decode, prevalidation, assembly of a batch,
the batch worker, feedback and notices."""
