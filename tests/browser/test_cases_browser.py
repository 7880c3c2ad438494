"""One case through the dashboard in a real headless Chromium, against the real service, broker
and pool (an SQLite file and a PostgreSQL database in turn): a community operator and a
department account, each in its own browser context, take a smoke report from registration
through whistle, a late acceptance, handling with a photo, a send-back, handling again and
closing. Each page shows only the buttons the case's allowed_actions give its role, and both
read the same timeline from the audit trail."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, FilePayload, Page, Route, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from aggregator.clock import OffsetFileClock
from aggregator.config import SupervisionSettings
from aggregator.service import Service
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
    OPERATORS,
    PASSWORD,
    publish,
)
from tests.browser.test_dashboard import ARTIFACTS, browser  # noqa: F401  (the module's Chromium)

# The lifecycle actions of this case, in order (supervision rows may come between them).
STEPS = [
    "verify",
    "whistle",
    "accept_off_site",
    "handle",
    "send_back",
    "handle",
    "accept_feedback",
]


@pytest.fixture
def stack(
    broker: Any, tmp_path: Path, pool_backend: PoolBackend
) -> Iterator[tuple[Service, OffsetFileClock]]:
    """The whole service with operator accounts, its case clock moved by a file (as a
    simulation moves it): deadlines can pass without waiting for them."""
    clock_file = tmp_path / "case-clock"
    service = Service(
        aggregator_settings(
            broker,
            tmp_path / "agg",
            test_clock_file=clock_file,
            # the timer looks often, so the jump of the case clock is supervised at once
            supervision=SupervisionSettings(interval_s=0.3),
            **pool_backend.settings_overrides(),
        ),
        port=0,
        log_level="warning",
        password_hasher=FAST_HASHER,
    )
    for username, (level, scope, department) in OPERATORS.items():
        service.auth.create_account(
            username, level, scope_code=scope, department=department, password=PASSWORD
        )
    with service:
        assert service.aggregator.ingest.wait_connected(5), "aggregator did not connect"
        yield service, OffsetFileClock(clock_file)


@contextmanager
def guarded_page(browser: Browser) -> Iterator[Page]:  # noqa: F811
    """A page in a context of its own (its own session storage: its own login), failing the
    test on a script error, a Content-Security-Policy violation or a request off the service."""
    context: BrowserContext = browser.new_context(
        viewport={"width": 1440, "height": 900}, locale="zh-CN", timezone_id="Asia/Shanghai"
    )
    page = context.new_page()
    errors: list[str] = []
    violations: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None,
    )

    def only_local(route: Route) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    page.route("**/*", only_local)
    try:
        yield page
    finally:
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
    page.click("button.tab[data-tab=cases]")
    expect(page.locator("#cases-view")).to_be_visible()


def open_from_box(page: Page, box: str, event_id: int) -> None:
    """Open the case from one inbox (clicking the box reloads it at once)."""
    page.click(f"#boxes .box[data-box='{box}']")
    row = page.locator(f"#case-list .case[data-event-id='{event_id}']")
    expect(row).to_be_visible(timeout=5_000)
    row.click()
    expect(page.locator("#c-title")).to_contain_text(f"#{event_id}")


def expect_buttons(page: Page, *actions: str) -> None:
    """The case view comes to offer exactly these actions, in this order (within 5 s)."""
    script = (
        "(want) => JSON.stringify([...document.querySelectorAll('#c-body button.c-action')]"
        ".map(e => e.dataset.action)) === want"
    )
    try:
        page.wait_for_function(
            script, arg=json.dumps(list(actions), separators=(",", ":")), timeout=5_000
        )
    except PlaywrightTimeoutError:
        got = page.locator("#c-body button.c-action").evaluate_all(
            "els => els.map(e => e.dataset.action)"
        )
        raise AssertionError(f"buttons {got}, expected {list(actions)}") from None


def expect_state(page: Page, state: str) -> None:
    expect(page.locator(f"#c-body .case-state[data-state='{state}']")).to_be_visible()


def wait_for_supervision(page: Page, event_id: int, kind: str, clock: str) -> None:
    """Reopen the case (from the overdue box) until the timer's item shows, for 10 s at most."""
    item = page.locator(f"#c-body .supervision li[data-kind={kind}][data-clock={clock}]")
    deadline = time.monotonic() + 10
    while not item.count():
        assert time.monotonic() < deadline, f"no {kind} supervision item on {clock}"
        page.wait_for_timeout(300)
        open_from_box(page, "overdue", event_id)
    expect(item).to_contain_text("超期督办")


def lifecycle_rows(page: Page) -> list[str]:
    rows: list[str] = page.locator("#c-body .case-timeline li").evaluate_all(
        "els => els.map(e => e.dataset.action)"
    )
    return [r for r in rows if r in STEPS]


def test_a_case_from_registration_to_closing_by_two_roles(
    broker: Any,
    stack: tuple[Service, OffsetFileClock],
    browser: Browser,  # noqa: F811
) -> None:
    service, clock = stack
    publish(broker, make_alert("cam-001", *interior(grid_in_community(0, 5)), type="smoke_fire"))

    with guarded_page(browser) as comm, guarded_page(browser) as fire:
        login(comm, service, "comm_a")
        login(fire, service, "fire")

        # Registered: the community verifies; the department sees nothing yet.
        row = comm.locator("#case-list .case").first
        expect(row).to_be_visible(timeout=10_000)
        event_id = int(row.get_attribute("data-event-id") or 0)
        assert event_id > 0
        open_from_box(comm, "to_accept", event_id)
        expect_state(comm, "registered")
        expect_buttons(comm, "verify", "not_ours")
        expect(comm.locator("#c-body button.c-action[data-action=verify]")).to_have_text("核实")
        fire.click("#boxes .box[data-box='']")
        expect(fire.locator("#case-empty")).to_be_visible()
        expect(fire.locator("#case-list .case")).to_have_count(0)

        comm.click("#c-body button.c-action[data-action=verify]")
        expect_state(comm, "assessing")
        expect_buttons(comm, "self_handle", "whistle")

        # Whistle: the form asks for the lead department (the table's "departments").
        comm.click("#c-body button.c-action[data-action=whistle]")
        form = comm.locator("#c-body form.c-form[data-for=whistle]")
        expect(form.locator("select.c-lead")).to_be_visible()
        form.locator("button.c-submit").click()
        expect(comm.locator("#c-body .c-error")).to_contain_text("牵头部门")  # nothing sent
        form.locator("select.c-lead").select_option("fire")
        form.locator("input[name=co_departments][value=police]").check()
        form.locator("textarea.c-note").fill("楼道冒烟，请消防到场")
        form.locator("button.c-submit").click()
        expect_state(comm, "whistled")
        expect_buttons(comm)  # the community waits for the department
        expect(comm.locator("#c-body .facts")).to_contain_text("消防大队")

        # The department's inbox: to accept, with the acceptance clock counting down.
        open_from_box(fire, "to_accept", event_id)
        expect_state(fire, "whistled")
        expect_buttons(fire, "accept_off_site", "accept_on_site")
        accept = fire.locator("#c-body tr.deadline[data-clock=accept]")
        expect(accept.locator(".countdown")).to_contain_text("剩余")
        expect(accept).not_to_have_class("overdue")

        # 40 minutes pass on the case clock: the 30-minute acceptance is overdue, highlighted
        # on both pages and listed in the overdue box.
        clock.advance(40 * 60)
        open_from_box(fire, "overdue", event_id)
        expect(accept).to_have_class("deadline running overdue late")
        expect(accept.locator(".countdown")).to_contain_text("超时")
        expect(fire.locator("#c-body .case-state .badge.overdue")).to_be_visible()
        open_from_box(comm, "overdue", event_id)
        expect(comm.locator("#case-list .case.is-overdue")).to_have_count(1)
        # The supervision timer raised an overdue item on the acceptance: both pages show it.
        for page in (fire, comm):
            wait_for_supervision(page, event_id, "overdue", "accept")
        ARTIFACTS.mkdir(exist_ok=True)
        fire.screenshot(path=str(ARTIFACTS / "case-overdue-department.png"))

        fire.click("#c-body button.c-action[data-action=accept_off_site]")
        expect_state(fire, "dept_handling")
        expect_buttons(fire, "handle")
        # The community's open case follows the live stream, without a click.
        expect_state(comm, "dept_handling")
        expect_buttons(comm, "apply_extension")
        expect(fire.locator("#c-body tr.deadline[data-clock=accept] .late")).to_be_visible()

        # Handling with a photo: uploaded, named by its sha256 in the step, shown in the
        # timeline to both.
        fire.click("#c-body button.c-action[data-action=handle]")
        form = fire.locator("#c-body form.c-form[data-for=handle]")
        form.locator("textarea.c-summary").fill("已扑灭，现场清理")
        photo: FilePayload = {"name": "after.jpg", "mimeType": "image/jpeg", "buffer": jpeg(11, 96)}
        form.locator("input.c-photos").set_input_files(files=[photo])
        form.locator("button.c-submit").click()
        expect_state(fire, "reviewing")
        expect_buttons(fire)
        fire.wait_for_function(
            "() => { const i = document.querySelector('#c-body .case-timeline img[data-sha256]');"
            " return i && i.complete && i.naturalWidth === 96; }",
            timeout=5_000,
        )

        # The community reviews it and sends it back, with a reason.
        open_from_box(comm, "to_review", event_id)
        expect_state(comm, "reviewing")
        expect_buttons(comm, "accept_feedback", "send_back")
        comm.wait_for_function(
            "() => { const i = document.querySelector('#c-body .case-timeline img[data-sha256]');"
            " return i && i.complete && i.naturalWidth === 96; }",
            timeout=5_000,
        )
        expect(comm.locator("#c-body .case-timeline")).to_contain_text("已扑灭，现场清理")
        comm.click("#c-body button.c-action[data-action=send_back]")
        form = comm.locator("#c-body form.c-form[data-for=send_back]")
        form.locator("textarea.c-reason").fill("楼道仍有烟味")
        form.locator("button.c-submit").click()
        expect_state(comm, "rehandling")
        expect_buttons(comm, "apply_extension")

        # Handling again, text only this time.
        open_from_box(fire, "to_handle", event_id)
        expect_state(fire, "rehandling")
        expect_buttons(fire, "handle")
        expect(fire.locator("#c-body tr.deadline[data-clock=rehandle] .countdown")).to_be_visible()
        fire.click("#c-body button.c-action[data-action=handle]")
        form = fire.locator("#c-body form.c-form[data-for=handle]")
        form.locator("textarea.c-summary").fill("通风排查完毕，无烟味")
        form.locator("button.c-submit").click()
        expect_state(fire, "reviewing")

        # The community accepts the feedback: closed, nothing more to do for anyone.
        open_from_box(comm, "to_review", event_id)
        comm.click("#c-body button.c-action[data-action=accept_feedback]")
        expect_state(comm, "closed")
        expect_buttons(comm)
        expect(comm.locator("#c-title")).to_contain_text("已办结")
        expect(comm.locator("#c-body")).not_to_contain_text("null")

        # Both read the same timeline, every step in order.
        fire.click("#boxes .box[data-box='']")
        fire.locator(f"#case-list .case[data-event-id='{event_id}']").click()
        expect_state(fire, "closed")
        expect_buttons(fire)
        for page in (comm, fire):
            expect(
                page.locator("#c-body .case-timeline li[data-action=accept_feedback]")
            ).to_be_visible()
            assert lifecycle_rows(page) == STEPS
            timeline = page.locator("#c-body .case-timeline")
            expect(timeline).to_contain_text("楼道仍有烟味")
            expect(timeline).to_contain_text("comm_a")
            expect(timeline).to_contain_text("fire")

        # English, as the rest of the dashboard.
        fire.click("#lang")
        expect(fire.locator("button.tab[data-tab=cases]")).to_have_text("Cases")
        expect(fire.locator("#c-body .case-timeline li[data-action=send_back] b")).to_have_text(
            "Send back"
        )
        fire.screenshot(path=str(ARTIFACTS / "case-closed-department-en.png"))

        # The event's own detail panel shows the same case to the community.
        comm.click("button.tab[data-tab=events]")
        comm.locator(f"#event-list .event[data-event-id='{event_id}']").click()
        expect(comm.locator("#d-case .case-state[data-state=closed]")).to_be_visible()
        expect(comm.locator("#d-case .case-timeline li[data-action=send_back]")).to_be_visible()
        # the event's own log names the case steps as the case view does
        expect(comm.locator("#d-body ol.timeline:not(.case-timeline)")).to_contain_text("退回重办")
        comm.screenshot(path=str(ARTIFACTS / "case-closed-community.png"))

        # The handling tab's case figures, computed by hand for this one case: handled (a
        # single send-back is still effective handling) → 处置率 100%; sent back once →
        # 一次性处置率 0%; accepted 40 minutes after the whistle (30 allowed) → 按期处置率 0%;
        # the same for the community, the lead department and the person who handled it.
        comm.click("button.tab[data-tab=handling]")
        for by, key in (("community", COMMUNITY_A), ("department", "fire"), ("person", "fire")):
            comm.select_option("#cm-by", by)
            row = comm.locator(f"#cm-rows tr[data-key='{key}']")
            expect(row.locator("td.rate")).to_have_text("100%")
            expect(row.locator("td.first-time")).to_have_text("0%")
            expect(row.locator("td.on-time")).to_have_text("0%")
            expect(comm.locator("#cm-rows tr:not(.total)")).to_have_count(1)
        expect(comm.locator("#cm-rows tr.total td.rate")).to_have_text("100%")
        comm.select_option("#cm-days", "7")
        expect(comm.locator("#cm-rows tr.total td.first-time")).to_have_text("0%")
        expect(comm.locator("#cm-error")).to_be_empty()
        comm.screenshot(path=str(ARTIFACTS / "case-handling-figures.png"))


def test_an_extension_applied_for_and_approved_moves_the_deadline(
    broker: Any,
    stack: tuple[Service, OffsetFileClock],
    browser: Browser,  # noqa: F811
) -> None:
    """The community handles a case itself and applies for more time with a reason and a new
    deadline (entered in Shanghai time); the county account, whose review box holds pending
    extensions, approves it; the stage deadline shown moves to it, marked extended."""
    service, _clock = stack
    publish(
        broker, make_alert("cam-001", *interior(grid_in_community(0, 5)), type="exposed_garbage")
    )
    with guarded_page(browser) as comm, guarded_page(browser) as county:
        login(comm, service, "comm_a")
        row = comm.locator("#case-list .case").first
        expect(row).to_be_visible(timeout=10_000)
        event_id = int(row.get_attribute("data-event-id") or 0)
        open_from_box(comm, "to_accept", event_id)
        comm.click("#c-body button.c-action[data-action=verify]")
        expect_buttons(comm, "self_handle", "whistle")
        comm.click("#c-body button.c-action[data-action=self_handle]")
        expect_state(comm, "community_handling")
        expect_buttons(comm, "whistle", "handle", "apply_extension")
        expect(comm.locator("#c-body tr.deadline[data-clock=community_handle]")).to_be_visible()

        # Assignment: refused for an account of no department the case went to, then to a
        # person of the community; recorded in the timeline.
        comm.click("#c-body button.c-assign-open")
        form = comm.locator("#c-body form.c-form[data-for=assign]")
        form.locator("input.c-assignee").fill("fire")
        form.locator("button.c-submit").click()
        expect(comm.locator("#c-body .c-error")).to_contain_text("neither of the case's community")
        form.locator("input.c-assignee").fill("comm_a")
        form.locator("button.c-submit").click()
        expect(comm.locator("#c-body .facts")).to_contain_text("指派给comm_a")
        expect(comm.locator("#c-body .case-timeline li[data-action=assign]")).to_be_visible()

        comm.click("#c-body button.c-action[data-action=apply_extension]")
        form = comm.locator("#c-body form.c-form[data-for=apply_extension]")
        expect(form.locator("input.c-until")).to_be_visible()  # the table's optional "until"
        form.locator("textarea.c-reason").fill("需要环卫车辆，明日清运")
        form.locator("input.c-until").fill("2031-03-04T18:30")
        form.locator("button.c-submit").click()
        expect(comm.locator("#c-body .facts")).to_contain_text("需要环卫车辆，明日清运")
        # Pending: the community may not apply twice (the table's guard), the county decides.
        expect_buttons(comm, "whistle", "handle")

        login(county, service, "county")
        open_from_box(county, "to_review", event_id)
        # (a county account may also whistle a case the community handles: the table says so)
        expect_buttons(county, "whistle", "approve_extension", "refuse_extension")
        county.click("#c-body button.c-action[data-action=approve_extension]")
        form = county.locator("#c-body form.c-form[data-for=approve_extension]")
        expect(form.locator("textarea.c-reason")).to_be_visible()
        form.locator("button.c-submit").click()  # approved as asked
        deadline = county.locator("#c-body tr.deadline[data-clock=community_handle]")
        # 2031-03-04 18:30 in Shanghai, shown in the page's time zone (Shanghai)
        expect(deadline).to_contain_text("2031/3/4 18:30:00")
        expect(deadline).to_contain_text("已延期")
        expect_buttons(county, "whistle")
        expect(
            county.locator("#c-body .case-timeline li[data-action=approve_extension]")
        ).to_be_visible()
