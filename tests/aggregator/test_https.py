"""HTTPS for the operator API (uvicorn's own TLS, a certificate from the development CA), and
the API in a process of its own with ingest's metrics on a loopback port."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.sync.client import connect

from aggregator.access.auth import Level
from aggregator.broker import devca
from aggregator.config import HttpSettings
from aggregator.service import Service

from .conftest import aggregator_settings, grid_in_community, interior, make_alert, wait_until
from .operator_support import FAST_HASHER, PASSWORD, publish


def dev_certificate(root: Path) -> tuple[Path, Path, Path]:
    """CA, server certificate for 127.0.0.1 and localhost, and its key."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca, cert, key = root / "ca.crt", root / "server.crt", root / "server.key"
    devca.ensure(ca, root / "ca.key", cert, key, ["127.0.0.1", "localhost"])
    return ca, cert, key


@pytest.fixture
def https_service(broker: Any, tmp_path: Path) -> Iterator[tuple[Service, Path]]:
    ca, cert, key = dev_certificate(tmp_path / "tls")
    settings = aggregator_settings(
        broker, tmp_path / "agg", http=HttpSettings(certfile=cert, keyfile=key)
    )
    service = Service(settings, port=0, log_level="warning", password_hasher=FAST_HASHER)
    service.auth.create_account("admin", Level.ADMIN, password=PASSWORD)
    service.start()
    try:
        assert service.aggregator.ingest.wait_connected(5), "aggregator did not connect"
        yield service, ca
    finally:
        service.stop()


def test_api_serves_https_that_verifies_against_the_dev_ca(
    broker: Any, https_service: tuple[Service, Path]
) -> None:
    service, ca = https_service
    assert service.url.startswith("https://127.0.0.1:")
    trust = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(base_url=service.url, verify=trust, timeout=10) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        r = http.post("/api/v1/auth/token", json={"username": "admin", "password": PASSWORD})
        assert r.status_code == 200, r.text
        token = r.json()["access_token"]
        # the stream's cookie is Secure over HTTPS
        assert "secure" in r.headers["set-cookie"].lower()
        page = http.get("/")
        assert page.status_code == 200
        assert "<html" in page.text.lower()
        publish(broker, make_alert("cam-001", *interior(grid_in_community(0, 3))))
        wait_until(
            lambda: http.get("/api/v1/events", headers={"Authorization": f"Bearer {token}"}).json()[
                "items"
            ],
            what="the event over HTTPS",
        )
    # Nothing trusted but the system's CAs: the development certificate is refused.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{service.url}/healthz", timeout=10)
    # Plain HTTP is not served on the HTTPS port.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{service.port}/healthz", timeout=5)


def test_live_stream_over_wss(broker: Any, https_service: tuple[Service, Path]) -> None:
    service, ca = https_service
    trust = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(base_url=service.url, verify=trust, timeout=10) as http:
        token = http.post(
            "/api/v1/auth/token", json={"username": "admin", "password": PASSWORD}
        ).json()["access_token"]
    # the API process runs at nice 10: on a busy box its handshake may take longer than the
    # client's default 10 s, and a timed-out TLS handshake can leave the client's reader waiting
    url = f"wss://127.0.0.1:{service.port}/api/v1/stream"
    with connect(url, ssl=trust, open_timeout=60) as ws:
        ws.send(orjson.dumps({"token": token}).decode())
        wait_until(lambda: service.hub.client_count == 1, what="the stream client")
        publish(broker, make_alert("cam-001", *interior(grid_in_community(1, 2)), type="gas_leak"))
        while True:
            message = orjson.loads(ws.recv(timeout=10))
            if message.get("kind") == "event":
                break
    assert message["change"] == "created"
    assert message["event"]["type"] == "gas_leak"


def test_api_runs_in_its_own_process_and_ingest_metrics_stay_on_loopback(
    broker: Any, https_service: tuple[Service, Path]
) -> None:
    service, ca = https_service
    assert service.api_pid is not None
    assert service.api_pid != os.getpid()
    publish(broker, make_alert("cam-001", *interior(grid_in_community(2, 1))))
    own = f"http://127.0.0.1:{service.metrics_port}/metrics"
    text = wait_until(
        lambda: (lambda t: t if "cwg_batch_seconds_count" in t else None)(httpx.get(own).text),
        what="ingest metrics",
    )
    assert 'cwg_alerts_total{outcome="accepted"} 1.0' in text
    # The API's /metrics (a token needed) shows ingest's with the stream's gauges.
    trust = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(base_url=service.url, verify=trust, timeout=10) as http:
        assert http.get("/metrics").status_code == 401
        token = http.post(
            "/api/v1/auth/token", json={"username": "admin", "password": PASSWORD}
        ).json()["access_token"]
        shown = http.get("/metrics", headers={"Authorization": f"Bearer {token}"}).text
    assert 'cwg_alerts_total{outcome="accepted"} 1.0' in shown
    assert "cwg_dedup_ratio 0.000000" in shown
    assert "cwg_stream_clients 0" in shown
