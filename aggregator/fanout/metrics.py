"""Prometheus metrics of one aggregator, on a registry of its own (tests run several).

The ingest process serves them on a loopback port (``CWG_METRICS_PORT``); the operator API,
which runs in a process of its own, shows them on its token-guarded ``/metrics`` by reading that
port when it is asked (``ScrapedMetrics``)."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class Metrics:
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


class _Scrape(Collector):
    """The families another process serves as Prometheus text, read at each collection."""

    def __init__(self, url: str | None, timeout: float = 2.0) -> None:
        self.url = url
        self.timeout = timeout

    def describe(self) -> Iterable[Metric]:
        return []  # names unknown until scraped; registering must not scrape

    def collect(self) -> Iterable[Metric]:
        if not self.url:
            return []
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as response:  # noqa: S310 - our own loopback URL
                text = response.read().decode()
        except OSError:
            log.warning("ingest metrics at %s could not be read", self.url)
            return []
        return list(text_string_to_metric_families(text))


class ScrapedMetrics(Metrics):
    """The ingest process's metrics as seen from the operator API's process: only
    ``registry`` (and ``dedup_ratio``) are there; the counters themselves live in ingest."""

    def __init__(self, url: str | None) -> None:  # no super().__init__: nothing is counted here
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Scrape(url))
