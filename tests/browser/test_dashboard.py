"""The dashboard in a real headless Chromium against the real service, broker and pool (an
SQLite file and a PostgreSQL database in turn)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from aggregator.service import Service
from contract import DeviceState, Health, StatusV1
from tests.aggregator.conftest import (
    PoolBackend,
    aggregator_settings,
    grid_in_community,
    interior,
    jpeg,
    make_alert,
)
from tests.aggregator.operator_support import (
    COMMUNITY_A,
    FAST_HASHER,
    PASSWORD,
    publish,
    running_service,
)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
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


@pytest.fixture
def service(broker: Any, tmp_path: Path, pool_backend: PoolBackend) -> Iterator[Service]:
    with running_service(broker, tmp_path, backend=pool_backend) as s:
        yield s


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1440, "height": 900}, locale="zh-CN")
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    # The service sends a strict Content-Security-Policy; Chromium reports each thing it
    # refuses (an inline script or style, a foreign origin) on the console.
    violations: list[str] = []
    pg.on(
        "console",
        lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    # Everything the page needs comes from the service itself: refuse anything else.
    outside: list[str] = []

    def only_local(route: Route) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    pg.route("**/*", only_local)
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not violations, f"Content-Security-Policy violations: {violations}"
    assert not outside, f"the page tried to reach outside the service: {outside}"


def login(page: Page, service: Service, username: str) -> None:
    page.goto(service.url + "/")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("#login-button")
    expect(page.locator("#events-view")).to_be_visible()


def test_login_map_list_live_event_and_detail_with_snapshot(
    broker: Any, service: Service, page: Page
) -> None:
    publish(broker, make_alert("cam-001", *interior(grid_in_community(0, 5)), type="ebike_in_lift"))
    login(page, service, "admin")
    expect(page.locator("#map path.gridcell")).to_have_count(144)
    expect(page.locator("#event-list .event")).to_have_count(1, timeout=10_000)
    expect(page.locator("#live.on")).to_be_visible()

    # A new alert through the broker appears on the page, without reload, within 3 s.
    snapshot = jpeg(7, size=320)
    started = time.monotonic()
    publish(
        broker,
        make_alert(
            "cam-002",
            *interior(grid_in_community(0, 9)),
            type="smoke_fire",
            seq=2,
            confidence=0.93,
            snapshot=snapshot,
        ),
    )
    expect(page.locator("#event-list .event")).to_have_count(2, timeout=3_000)
    assert time.monotonic() - started < 3.0
    newest = page.locator("#event-list .event").first
    expect(newest).to_contain_text("烟火")
    expect(page.locator("#map circle.marker")).to_have_count(2)

    newest.click()
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#d-title")).to_contain_text("烟火")
    page.wait_for_function(
        "() => { const i = document.getElementById('d-snapshot');"
        " return i && i.complete && i.naturalWidth === 320; }",
        timeout=5_000,
    )
    expect(page.locator("#d-body")).to_contain_text("cam-002")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-zh.png"))

    # The detail panel shows the event's case; an administrator takes no case actions (the
    # case's allowed_actions are empty for it), so it offers no buttons.
    expect(page.locator("#d-case .case-state[data-state=registered]")).to_be_visible()
    expect(page.locator("#d-case button.c-action")).to_have_count(0)

    # English labels.
    page.click("#lang")
    expect(page.locator("[data-tab=events]")).to_have_text("Events")
    expect(page.locator("#d-title")).to_contain_text("Smoke or fire")
    page.screenshot(path=str(ARTIFACTS / "dashboard-en.png"))

    # The device board, with a status and health report arriving over MQTT.
    cam = broker.client("cam-002")
    status = StatusV1(
        device_id="cam-002",
        state=DeviceState.ONLINE,
        at=datetime.now(UTC),
        kind="camera",
        health=Health(fps=9.8, inference_ms=38.5, outbox_depth=0, version="1.4.2"),
    )
    assert not cam.publish(broker.topics.status("cam-002"), status.to_json()).is_failure
    page.click("[data-tab=devices]")
    expect(page.locator("#device-rows tr")).to_have_count(2)
    row = page.locator('#device-rows tr[data-device-id="cam-002"]')
    expect(row).to_contain_text("9.8 fps", timeout=12_000)
    expect(row.locator(".state.online")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "devices-en.png"))


def test_a_batch_of_new_events_shows_at_once(broker: Any, service: Service, page: Page) -> None:
    """Alerts committed together reach the page as one batch frame, every event in it shown."""
    frames: list[str] = []
    page.on(
        "websocket",
        lambda ws: ws.on(
            "framereceived",
            lambda payload: frames.append(payload) if isinstance(payload, str) else None,
        ),
    )
    login(page, service, "comm_a")
    expect(page.locator("#live.on")).to_be_visible()
    cam = broker.client("cam-001")
    alerts = [
        make_alert("cam-001", *interior(grid_in_community(0, i)), type="gas_leak", seq=i)
        for i in range(8)
    ]
    started = time.monotonic()
    codes = cam.publish_many(broker.topics.alert("cam-001"), [a.to_json() for a in alerts])
    assert not any(c.is_failure for c in codes)
    expect(page.locator("#event-list .event")).to_have_count(8, timeout=3_000)
    assert time.monotonic() - started < 3.0
    expect(page.locator("#map circle.marker")).to_have_count(8)
    batches = [f for f in frames if f.startswith('{"kind":"batch"')]
    assert batches, frames
    # The totals follow, a second later at most.
    expect(page.locator("#summary .stat b").first).to_have_text("8", timeout=3_000)


def test_community_operator_sees_only_its_community(
    broker: Any, service: Service, page: Page
) -> None:
    publish(broker, make_alert("cam-001", *interior(grid_in_community(0, 2)), type="smoke_fire"))
    publish(broker, make_alert("cam-002", *interior(grid_in_community(1, 2)), type="smoke_fire"))
    login(page, service, "comm_a")
    expect(page.locator("#map path.gridcell")).to_have_count(40)
    expect(page.locator("#event-list .event")).to_have_count(1, timeout=10_000)
    codes = page.locator("#map path.gridcell").evaluate_all("els => els.map(e => e.dataset.code)")
    assert all(code.startswith(COMMUNITY_A) for code in codes)
    # Live: another community's alert never reaches this page; its own does.
    publish(broker, make_alert("cam-002", *interior(grid_in_community(1, 7)), type="gas_leak"))
    publish(broker, make_alert("cam-001", *interior(grid_in_community(0, 7)), type="gas_leak"))
    expect(page.locator("#event-list .event")).to_have_count(2, timeout=3_000)
    page.wait_for_timeout(500)
    expect(page.locator("#event-list .event")).to_have_count(2)


def test_handling_tab_shows_rates_per_department_and_community(
    broker: Any, service: Service, page: Page
) -> None:
    publish(broker, make_alert("cam-001", *interior(grid_in_community(0, 2)), type="smoke_fire"))
    publish(
        broker, make_alert("cam-002", *interior(grid_in_community(0, 6)), type="exposed_garbage")
    )
    login(page, service, "admin")
    expect(page.locator("#event-list .event")).to_have_count(2, timeout=10_000)
    fire = page.locator("#event-list .event").evaluate_all(
        "els => els.map(e => [e.dataset.eventId, e.textContent])"
    )
    [fire_id] = [i for i, text in fire if "烟火" in text]
    # the community closes it through the case route: verify, handle it itself, close
    login_as = page.request.post(
        f"{service.url}/api/v1/auth/token", data={"username": "comm_a", "password": PASSWORD}
    )
    assert login_as.ok, login_as.text()
    auth = {"Authorization": "Bearer " + login_as.json()["access_token"]}
    for version, action, payload in (
        (1, "verify", {}),
        (2, "self_handle", {}),
        (3, "handle", {"summary": "extinguished"}),
    ):
        step = page.request.post(
            f"{service.url}/api/v1/cases/{fire_id}/steps",
            headers=auth,
            data={"action": action, "expected_version": version, "payload": payload},
        )
        assert step.ok, step.text()
    page.click("button.tab[data-tab=handling]")
    expect(page.locator("#handling-view")).to_be_visible()
    fire_row = page.locator("#handling-rows tr[data-key=fire]")
    expect(fire_row).to_contain_text("消防大队")
    expect(fire_row.locator("td.rate")).to_have_text("100%")
    expect(fire_row.locator("td.on-time")).to_have_text("100%")
    expect(page.locator("#handling-rows tr.total td.rate")).to_have_text("50%")
    page.select_option("#h-by", "community")
    expect(page.locator(f"#handling-rows tr[data-key='{COMMUNITY_A}']")).to_contain_text("2")
    expect(page.locator("#handling-rows tr:not(.total)")).to_have_count(1)
    page.click("#lang")
    expect(page.locator("button.tab[data-tab=handling]")).to_have_text("Handling")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-handling.png"))


def test_no_token_in_any_log_line_after_a_browser_session(
    broker: Any, tmp_path: Path, page: Page, capfd: pytest.CaptureFixture[str]
) -> None:
    """With every request logged (info), a whole session — login, live stream, an event with
    its snapshot, a case step, logout — leaves no token in any line the service's processes
    wrote."""
    service = Service(
        aggregator_settings(broker, tmp_path / "agg"),
        port=0,
        log_level="info",
        password_hasher=FAST_HASHER,
    )
    service.auth.create_account("comm_a", "community", scope_code=COMMUNITY_A, password=PASSWORD)
    with service:
        assert service.aggregator.ingest.wait_connected(5)
        login(page, service, "comm_a")
        token = page.evaluate("sessionStorage.getItem('cwg.token')")
        assert token
        expect(page.locator("#live.on")).to_be_visible()
        publish(
            broker,
            make_alert(
                "cam-001", *interior(grid_in_community(0, 3)), type="smoke_fire", snapshot=jpeg(3)
            ),
        )
        expect(page.locator("#event-list .event")).to_have_count(1, timeout=5_000)
        page.locator("#event-list .event").first.click()
        page.wait_for_function(
            "() => { const i = document.getElementById('d-snapshot');"
            " return i && i.complete && i.naturalWidth > 0; }",
            timeout=5_000,
        )
        page.click("#d-case button.c-action[data-action=verify]")
        expect(page.locator("#d-body")).to_contain_text("已核实")
        expect(page.locator("#d-case .case-state[data-state=assessing]")).to_be_visible()
        # The session cookie the login set is HttpOnly: page scripts cannot read it.
        assert "cwg_stream" not in page.evaluate("document.cookie")
        page.click("#logout")
        expect(page.locator("#login-view")).to_be_visible()
        page.wait_for_timeout(300)
    out, err = capfd.readouterr()
    logged = out + err
    assert '"POST /api/v1/auth/token HTTP/1.1" 200' in logged, "the access log was not captured"
    assert "WebSocket /api/v1/stream" in logged
    assert token not in logged
    assert PASSWORD not in logged


def test_the_api_documentation_runs_from_the_service_under_its_csp(
    broker: Any, tmp_path: Path, page: Page
) -> None:
    """Swagger UI at /docs: every file from the service itself, no CSP violation (the page
    fixture fails on either), the operations of the OpenAPI document listed, and a call tried
    from the page with a token given to "Authorize"."""
    with running_service(broker, tmp_path) as service:
        page.goto(service.url + "/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("operator API")
        expect(page.locator(".opblock-summary-path[data-path='/api/v1/events']")).to_have_count(1)
        token = page.request.post(
            service.url + "/api/v1/auth/token", data={"username": "admin", "password": PASSWORD}
        ).json()["access_token"]
        page.click("button.authorize")
        page.fill(".auth-container input", token)
        page.click(".auth-btn-wrapper button.authorize")
        page.click("button.btn-done")
        events = page.locator(".opblock-get", has=page.locator("[data-path='/api/v1/events']"))
        events.locator(".opblock-summary").click()
        events.locator("button.try-out__btn").click()
        events.locator("button.execute").click()
        answered = events.locator(".live-responses-table td.response-col_status:not(.col_header)")
        expect(answered).to_have_text("200")  # the token from "Authorize" was sent
        # the document is only the API's, and a page of the service (no ReDoc, no CDN copy)
        assert page.request.get(service.url + "/redoc").status != 200
        assert page.request.get(service.url + "/docs/assets/redoc.standalone.js").status == 404
