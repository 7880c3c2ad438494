"""Ingest's Prometheus metrics on a running service's loopback endpoint: the broker connection
gauge follows the MQTT session by itself (nothing needs to ask the ingest for its stats)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aggregator.service import Service

from .conftest import aggregator_settings, wait_until
from .operator_support import FAST_HASHER

_GAUGE = re.compile(r"^cwg_broker_connected (\S+)$", re.MULTILINE)


@pytest.fixture
def service(broker: Any, tmp_path: Path) -> Iterator[Service]:
    settings = aggregator_settings(broker, tmp_path / "agg")
    service = Service(settings, port=0, log_level="warning", password_hasher=FAST_HASHER)
    service.start()  # no wait_connected(): the gauge must not depend on anyone asking
    try:
        yield service
    finally:
        service.stop()


def connected_gauge(service: Service) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).text
    found = _GAUGE.search(text)
    return float(found.group(1)) if found else None


def test_broker_connected_gauge_follows_the_session(broker: Any, service: Service) -> None:
    wait_until(lambda: connected_gauge(service) == 1.0, what="cwg_broker_connected 1")
    broker.stop()
    wait_until(lambda: connected_gauge(service) == 0.0, what="cwg_broker_connected 0")
    broker.start()
    wait_until(lambda: connected_gauge(service) == 1.0, 30, "cwg_broker_connected 1 again")
