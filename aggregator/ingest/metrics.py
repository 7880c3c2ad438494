"""Ingest's own Prometheus metrics (messages, alerts by outcome, rejections, batches, notices,
queue depth, broker connection), on a registry of its own (tests run several aggregators in one
process).

They live beside the worker that counts them; ``aggregator/fanout/metrics.py`` serves them to
the operator API's process (``ScrapedMetrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    """The ingest metrics. Names are the public contract (dashboards, alerts): keep them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "cwg_ingest_messages", "MQTT messages received", ["channel"], registry=r
        )
        self.alerts = Counter(
            "cwg_alerts",
            "alerts by outcome (accepted, merged, duplicate, out_of_area)",
            ["outcome"],
            registry=r,
        )
        self.rejections = Counter(
            "cwg_rejections", "messages rejected, by reason", ["reason"], registry=r
        )
        self.events_created = Counter("cwg_events_created", "events opened", registry=r)
        self.notices = Counter(
            "cwg_event_notices",
            "event notices published by ingest, by change (created, updated)",
            ["change"],
            registry=r,
        )
        self.notices_coalesced = Counter(
            "cwg_event_notices_coalesced",
            "updates of an event folded into its next notice (notices.update_interval_ms)",
            registry=r,
        )
        self.batch_seconds = Histogram(
            "cwg_batch_seconds",
            "time to process and commit one micro-batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.batch_size = Histogram(
            "cwg_batch_messages",
            "messages per micro-batch",
            buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.queue_depth = Gauge(
            "cwg_ingest_queue_depth", "messages received, not yet committed", registry=r
        )
        self.connected = Gauge(
            "cwg_broker_connected", "1 while connected to the broker", registry=r
        )

    def dedup_ratio(self) -> float:
        """Share of pooled alerts that joined an existing event."""
        # Read through the registry, so that a scraped copy (ScrapedMetrics) answers the same.
        merged = self.registry.get_sample_value("cwg_alerts_total", {"outcome": "merged"}) or 0.0
        accepted = (
            self.registry.get_sample_value("cwg_alerts_total", {"outcome": "accepted"}) or 0.0
        )
        total = merged + accepted
        return merged / total if total else 0.0
