"""Prometheus metrics of one aggregator as the operator side sees them.

Ingest counts its metrics itself (``aggregator/ingest/metrics.py``, re-exported here). The
ingest process serves them on a loopback port (``CWG_METRICS_PORT``); the operator API,
which runs in a process of its own, shows them on its token-guarded ``/metrics`` by reading that
port when it is asked (``ScrapedMetrics``)."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from aggregator.ingest.metrics import Metrics

__all__ = ["Metrics", "ScrapedMetrics"]

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
