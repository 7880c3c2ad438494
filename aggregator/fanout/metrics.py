"""Prometheus metrics of one aggregator as the operator side sees them.

Ingest counts its metrics itself (``aggregator/ingest/metrics.py``, re-exported here). The
ingest process serves them on a loopback port (``CWG_METRICS_PORT``); the operator API,
which runs in a process of its own, shows them on its token-guarded ``/metrics`` by reading that
port when it is asked (``ScrapedMetrics``)."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from aggregator.ingest.metrics import Metrics

__all__ = ["Metrics", "ScrapedMetrics", "WebhookMetrics"]

log = logging.getLogger(__name__)


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


class WebhookMetrics:
    """Webhook delivery's metrics, on the registry of the service that runs the worker (the
    ingest registry, which the operator API's ``/metrics`` shows). Names are public: keep them.

    ``outcome``: ``delivered`` (2xx), ``failed`` (an attempt that will be retried: another
    status, no answer, a refused destination), ``dead`` (the last retry failed), ``gone`` (the
    receiver answered 410 and the subscription was disabled)."""

    OUTCOMES: Final = ("delivered", "failed", "dead", "gone")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.deliveries = Counter(
            "cwg_webhook_deliveries",
            "webhook delivery attempts by outcome (delivered, failed, dead, gone)",
            ["outcome"],
            registry=r,
        )
        for outcome in self.OUTCOMES:  # present at 0 from the start, so rates have a base
            self.deliveries.labels(outcome)
        self.attempt_seconds = Histogram(
            "cwg_webhook_attempt_seconds",
            "time of one webhook POST, until the answer or the failure",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.pending = Gauge(
            "cwg_webhook_pending",
            "webhook deliveries pending (due or waiting for a retry or an enabled subscription)",
            registry=r,
        )
