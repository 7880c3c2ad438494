"""The dashboard over HTTPS in a real headless Chromium (uvicorn's TLS, a certificate from the
development CA for 127.0.0.1)."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Route, expect, sync_playwright

from aggregator.access.auth import Level
from aggregator.config import HttpSettings
from aggregator.service import Service
from tests.aggregator.conftest import (
    aggregator_settings,
    grid_in_community,
    interior,
    make_alert,
)
from tests.aggregator.operator_support import FAST_HASHER, PASSWORD, publish
from tests.aggregator.test_https import dev_certificate

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: apt-get install -y chromium")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def test_dashboard_works_over_https(broker: Any, tmp_path: Path, browser: Browser) -> None:
    ca, cert, key = dev_certificate(tmp_path / "tls")
    settings = aggregator_settings(
        broker, tmp_path / "agg", http=HttpSettings(certfile=cert, keyfile=key)
    )
    service = Service(settings, port=0, log_level="warning", password_hasher=FAST_HASHER)
    service.auth.create_account("admin", Level.ADMIN, password=PASSWORD)
    service.start()
    try:
        assert service.aggregator.ingest.wait_connected(5), "aggregator did not connect"
        assert service.url.startswith("https://127.0.0.1:")
        # The certificate Chromium is shown verifies against the development CA (Chromium
        # itself is not given the CA, hence ignore_https_errors below).
        trust = ssl.create_default_context(cafile=str(ca))
        assert httpx.get(f"{service.url}/healthz", verify=trust).status_code == 200

        publish(
            broker, make_alert("cam-001", *interior(grid_in_community(0, 5)), type="smoke_fire")
        )
        context = browser.new_context(
            viewport={"width": 1440, "height": 900}, locale="en-US", ignore_https_errors=True
        )
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        plain: list[str] = []

        def only_https(route: Route) -> None:
            url = route.request.url
            if url.startswith((service.url, "data:", "blob:")):
                route.continue_()
            else:
                plain.append(url)
                route.abort()

        page.route("**/*", only_https)
        try:
            page.goto(service.url + "/")
            page.fill("#username", "admin")
            page.fill("#password", PASSWORD)
            page.click("#login-button")
            expect(page.locator("#events-view")).to_be_visible()
            expect(page.locator("#event-list .event")).to_have_count(1, timeout=10_000)
            # the live stream (wss://) is up and brings a new event without a reload
            expect(page.locator("#live.on")).to_be_visible(timeout=10_000)
            started = time.monotonic()
            publish(
                broker,
                make_alert("cam-002", *interior(grid_in_community(1, 7)), type="gas_leak", seq=2),
            )
            expect(page.locator("#event-list .event")).to_have_count(2, timeout=5_000)
            assert time.monotonic() - started < 5.0
            assert page.evaluate("() => location.protocol") == "https:"
            assert page.evaluate("() => window.isSecureContext") is True
        finally:
            context.close()
        assert not errors, f"JavaScript errors on the page: {errors}"
        assert not plain, f"the page asked for something not over the service's HTTPS: {plain}"
    finally:
        service.stop()
