"""Operator access hardened: login lockout, security headers, cursors that are a 400 and never a
500, /metrics behind a token, private pool files, and secrets kept out of logs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from aggregator.access.auth import (
    AuthError,
    AuthStore,
    Level,
    LimiterPolicy,
    LoginLimiter,
    LoginThrottledError,
    PasswordChecker,
    verify_login,
)
from aggregator.access.store import PgAccountStore
from aggregator.api.app import SECURITY_HEADERS, RedactSecrets, redact
from aggregator.config import AccessSettings, HttpSettings
from aggregator.pool.postgres import PoolUnavailableError
from aggregator.pool.snapshots import SnapshotStore
from aggregator.pool.sqlite import EventPool
from aggregator.service import Service
from contract import load_catalogue

from .conftest import (
    PoolBackend,
    aggregator_settings,
    grid_in_community,
    interior,
    jpeg,
    make_alert,
)
from .operator_support import (
    FAST_HASHER,
    OPERATORS,
    PASSWORD,
    Api,
    publish,
    running_service,
    wait_for_events,
)

METRICS_TOKEN = "metrics-scraper-secret-0123456789"
POOL_PASSWORD = "pool-password-0123456789"


@pytest.fixture
def service(broker: Any, tmp_path: Path, pool_backend: PoolBackend) -> Iterator[Service]:
    """The whole service on each pool backend (crafted cursors reach each one's SQL)."""
    with running_service(broker, tmp_path, backend=pool_backend) as s:
        yield s


@pytest.fixture
def api(service: Service) -> Iterator[Api]:
    a = Api(service.url)
    yield a
    a.close()


# -- login throttling -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def attempt(limiter: LoginLimiter, user: str = "alice", addr: str = "10.0.0.1") -> float:
    """0 when the attempt is admitted (and then failed), else the Retry-After it got."""
    try:
        limiter.admit(user, addr)
    except LoginThrottledError as exc:
        return exc.retry_after
    return 0.0


LIMITER_BOOKS = ("memory", "postgres")


@pytest.fixture(params=LIMITER_BOOKS)
def make_limiter(request: pytest.FixtureRequest) -> Iterator[Callable[..., LoginLimiter]]:
    """Limiters whose counts are in this process's memory, or in a PostgreSQL pool (each call
    then a replica of its own on the same database)."""
    stores: list[PgAccountStore] = []
    url = str(request.getfixturevalue("pg_url")) if request.param == "postgres" else None

    def make(policy: LimiterPolicy | None = None, clock: Any = None) -> LoginLimiter:
        policy = policy or LimiterPolicy()
        kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
        if url is None:
            return LoginLimiter(policy, **kwargs)
        store = PgAccountStore(url)
        stores.append(store)
        limiter = LoginLimiter(policy, book=store.strike_book(policy.forget_after_s), **kwargs)
        assert limiter.shared
        return limiter

    yield make
    for store in stores:
        store.close()


def test_lockout_starts_after_the_free_failures_and_doubles_up_to_the_cap(
    make_limiter: Callable[..., LoginLimiter],
) -> None:
    clock = Clock()
    limiter = make_limiter(LimiterPolicy(max_lockout_s=8.0), clock=clock)
    assert [attempt(limiter) for _ in range(5)] == [0.0] * 5  # five free failures
    assert attempt(limiter) == 0.0  # the sixth is checked, and locks for 1 s
    waits = []
    for _ in range(6):
        wait = attempt(limiter)
        assert wait > 0  # refused without a password check, and not counted
        assert attempt(limiter) == wait  # a retry during the lockout does not lengthen it
        assert limiter.retry_after("alice", "10.0.0.1") == wait
        waits.append(wait)
        clock.now += wait
        assert attempt(limiter) == 0.0  # admitted once the lockout has passed
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # doubling, capped
    # Another user name from another address is not affected; the right password clears it.
    assert attempt(limiter, "bob", "10.0.0.2") == 0.0
    limiter.succeeded("bob", "10.0.0.2")
    # Quiet for the forget period: alice starts from zero again.
    clock.now += 8.0 + LimiterPolicy().forget_after_s + 1
    assert [attempt(limiter) for _ in range(6)] == [0.0] * 6


def test_lockout_per_address_covers_a_spray_of_user_names(
    make_limiter: Callable[..., LoginLimiter],
) -> None:
    clock = Clock()
    limiter = make_limiter(LimiterPolicy(free_failures_addr=20), clock=clock)
    assert all(attempt(limiter, f"user{i}") == 0.0 for i in range(21))
    assert attempt(limiter, "user-new") == 1.0  # the address is locked, whatever the name
    assert attempt(limiter, "user-new", "10.9.9.9") == 0.0  # another address is not


def test_a_success_clears_the_user_and_gives_the_address_its_attempt_back(
    make_limiter: Callable[..., LoginLimiter],
) -> None:
    limiter = make_limiter(LimiterPolicy(free_failures_user=2, free_failures_addr=3))
    for _ in range(2):
        attempt(limiter)
    attempt(limiter)  # admitted: the right password this time
    limiter.succeeded("alice", "10.0.0.1")
    assert limiter.retry_after("alice", "10.0.0.1") == 0.0
    assert attempt(limiter) == 0.0
    limiter.withdraw("nobody", "10.0.0.9")  # nothing to take back: no entry appears
    assert limiter.retry_after("nobody", "10.0.0.9") == 0.0


def test_entries_are_bounded(make_limiter: Callable[..., LoginLimiter]) -> None:
    clock = Clock()
    policy = LimiterPolicy(max_entries=50, forget_after_s=10.0)
    limiter = make_limiter(policy, clock=clock)
    n = 500 if not limiter.shared else 60  # a round trip each on PostgreSQL
    for i in range(n):
        attempt(limiter, f"u{i}", f"10.0.{i // 250}.{i % 250}")
    if not limiter.shared:
        assert len(limiter.strikes) <= 50
        return
    # In the pool, keys quiet for the forget period are deleted (a minute apart at most).
    assert len(limiter.strikes) == 2 * n
    clock.now += 120.0
    attempt(limiter, "late", "10.1.0.1")
    assert len(limiter.strikes) == 2


def test_a_lockout_earned_on_one_replica_holds_on_the_others(pg_url: str) -> None:
    """Two replicas' limiters on one PostgreSQL pool: failures counted by either one lock the
    user out on both, at the same count as one replica would; concurrent guesses through both
    are admitted exactly up to that count."""
    clock = Clock()
    policy = LimiterPolicy(free_failures_user=5)
    stores = [PgAccountStore(pg_url) for _ in range(2)]
    try:
        a, b = (
            LoginLimiter(policy, clock=clock, book=s.strike_book(policy.forget_after_s))
            for s in stores
        )
        assert a.shared
        assert [attempt((a, b)[i % 2]) for i in range(6)] == [0.0] * 6  # 5 free + 1 checked
        assert attempt(a) == 1.0
        assert attempt(b) == 1.0
        clock.now += 1.0
        assert attempt(b) == 0.0
        assert attempt(a) == 2.0  # the lockout doubles whichever replica counted
        b.succeeded("alice", "10.0.0.1")
        # A remembers its refusal for a second; after it, A sees that B cleared the lockout
        # (which would otherwise hold for another half second)
        assert attempt(a) == 2.0
        clock.now += 1.5
        assert attempt(a) == 0.0

        # 24 guesses at once from 24 addresses, half through each replica: exactly 6 admitted
        admitted: list[float] = []
        start = threading.Barrier(24)

        def guess(i: int) -> None:
            start.wait(timeout=10)
            admitted.append(attempt((a, b)[i % 2], "carol", f"10.2.0.{i}"))

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(admitted) == 24
        assert admitted.count(0.0) == 6
    finally:
        for store in stores:
            store.close()


def test_a_flood_at_a_locked_user_is_refused_without_asking_the_pool(pg_url: str) -> None:
    """Refusals are remembered for a second: guesses at a locked user cost no round trip.
    Shown by closing the replica's store: its refusals go on, its first admission fails."""
    clock = Clock()
    policy = LimiterPolicy(free_failures_user=1, base_lockout_s=30.0)
    store = PgAccountStore(pg_url)
    limiter = LoginLimiter(policy, clock=clock, book=store.strike_book(policy.forget_after_s))
    assert [attempt(limiter) for _ in range(3)] == [0.0, 0.0, 30.0]
    store.close()
    for _ in range(100):
        assert attempt(limiter) == 30.0
    clock.now += 0.5
    assert attempt(limiter, addr="10.0.0.7") == 29.5  # the user is locked, whatever the address
    clock.now += 0.6
    with pytest.raises(PoolUnavailableError):
        attempt(limiter)


def test_login_through_either_replica_meets_one_lockout(pool_backend: PoolBackend) -> None:
    """``verify_login`` with each replica's own store and limiter, as each API process makes
    them (``AuthStore.login_limiter``): on PostgreSQL wrong passwords given to replica A lock
    the user out on replica B too; on SQLite (one API process per pool) the limiter is this
    process's."""
    replicas = [AuthStore(pool_backend.target, hasher=FAST_HASHER) for _ in range(2)]
    policy = LimiterPolicy(free_failures_user=3, base_lockout_s=30.0)
    limiters = [r.login_limiter(policy) for r in replicas]
    checker = PasswordChecker()
    try:
        replicas[0].create_account("duty-3", Level.ADMIN, password=PASSWORD)
        assert all(lim.shared == pool_backend.is_postgres for lim in limiters)

        async def login(i: int, password: str) -> str:
            try:
                await verify_login(
                    replicas[i], limiters[i], checker, "duty-3", password, "10.3.0.1"
                )
            except LoginThrottledError:
                return "throttled"
            except AuthError:
                return "refused"
            return "ok"

        async def scenario() -> list[str]:
            out = [await login(0, "wrong password!") for _ in range(4)]
            out.append(await login(1, PASSWORD))
            out.append(await login(0, PASSWORD))
            return out

        outcomes = asyncio.run(scenario())
        assert outcomes[:4] == ["refused"] * 4  # 3 free, the 4th checked and locking
        expected = "throttled" if pool_backend.is_postgres else "ok"
        assert outcomes[4] == expected  # replica B
        assert outcomes[5] == "throttled"  # replica A
    finally:
        checker.close()
        for r in replicas:
            r.close()


@contextmanager
def service_with(
    broker: Any, root: Path, access: AccessSettings, backend: PoolBackend | None = None
) -> Iterator[Service]:
    """The whole service with these access settings and the usual operator accounts (on
    ``backend``'s pool when given)."""
    overrides = backend.settings_overrides() if backend is not None else {}
    service = Service(
        aggregator_settings(broker, root / "agg", access=access, **overrides),
        port=0,
        log_level="warning",
        password_hasher=FAST_HASHER,
    )
    for username, (level, scope, department) in OPERATORS.items():
        service.auth.create_account(
            username, level, scope_code=scope, department=department, password=PASSWORD
        )
    with service:
        yield service


@pytest.mark.parametrize("trusted", [[], ["127.0.0.0/8"]], ids=["no-proxy", "loopback-proxy"])
def test_only_a_trusted_proxy_names_the_client_the_login_limiter_counts(
    broker: Any, tmp_path: Path, trusted: list[str]
) -> None:
    """A client that writes X-Forwarded-For itself must not spread its guesses over addresses
    it makes up: without a trusted proxy the header is ignored and the connection's address is
    locked out; behind a trusted one each forwarded address counts on its own."""
    access = AccessSettings(
        login_free_failures_addr=3, login_free_failures_user=100, login_refusal_delay_s=0.1
    )
    service = Service(
        aggregator_settings(
            broker, tmp_path / "agg", access=access, http=HttpSettings(trusted_proxies=trusted)
        ),
        port=0,
        log_level="warning",
        password_hasher=FAST_HASHER,
    )
    with service, httpx.Client(base_url=service.url, timeout=10) as http:
        statuses = [
            http.post(
                "/api/v1/auth/token",
                json={"username": f"nobody-{i}", "password": "wrong"},
                headers={"X-Forwarded-For": f"203.0.113.{i + 1}"},
            ).status_code
            for i in range(6)
        ]
    if trusted:
        assert statuses == [401] * 6  # six clients, one failure each
    else:
        # one client: three free failures, the fourth locks it out
        assert statuses == [401] * 4 + [429] * 2


def test_trusted_proxies_are_addresses_or_networks() -> None:
    assert HttpSettings(trusted_proxies=[" 10.0.0.0/8", "::1"]).trusted_proxies == [
        "10.0.0.0/8",
        "::1",
    ]
    for bad in ("*", "proxy.example", "10.0.0.0/33"):
        with pytest.raises(ValueError, match="not an address or a network"):
            HttpSettings(trusted_proxies=[bad])


def test_twenty_wrong_logins_lock_out_even_the_right_password(
    broker: Any, tmp_path: Path, pool_backend: PoolBackend
) -> None:
    # Refusals held 0.2 s (2 s by default), so that the test runs through several lockouts.
    access = AccessSettings(login_refusal_delay_s=0.2)
    with service_with(broker, tmp_path, access, pool_backend) as service:
        api = Api(service.url)
        try:
            lockout_flow(api)
        finally:
            api.close()


def lockout_flow(api: Api) -> None:
    statuses: list[int] = []
    refused_s: list[float] = []
    for i in range(20):
        t0 = time.perf_counter()
        r = api.http.post(
            "/api/v1/auth/token", json={"username": "comm_a", "password": f"wrong guess {i}"}
        )
        statuses.append(r.status_code)
        if r.status_code == 429:
            refused_s.append(time.perf_counter() - t0)
            assert int(r.headers["retry-after"]) >= 1
    assert statuses[:6] == [401] * 6, statuses
    assert statuses.count(429) >= 10, statuses
    assert set(statuses) <= {401, 429}
    # A refusal is held back for what is left of the lockout, at most the setting: most wait
    # the full 0.2 s, the last of a lockout less.
    assert sorted(refused_s)[len(refused_s) // 2] >= 0.15, refused_s
    assert max(refused_s) < 1.0, refused_s
    r = api.http.post("/api/v1/auth/token", json={"username": "comm_a", "password": PASSWORD})
    assert r.status_code == 429, r.text
    assert "access_token" not in r.text
    wait = int(r.headers["retry-after"])
    assert wait >= 1
    # The address is not locked by one user's lockout: another operator still logs in.
    r = api.http.post("/api/v1/auth/token", json={"username": "comm_b", "password": PASSWORD})
    assert r.status_code == 200
    # Once the lockout has passed, the right password works again.
    time.sleep(wait + 0.3)
    r = api.http.post("/api/v1/auth/token", json={"username": "comm_a", "password": PASSWORD})
    assert r.status_code == 200, r.text


def test_two_replicas_apis_share_tokens_logouts_and_lockouts(
    broker: Any, tmp_path: Path, pg_url: str
) -> None:
    """Two gateways on one PostgreSQL pool, each with its own data directory and API process:
    a token from replica A's API works on replica B's, a logout or a disabled account on one
    ends it on the other, and wrong passwords given to A lock the user out on B."""
    access = AccessSettings(login_refusal_delay_s=0.1, login_lockout_base_s=30.0)
    services = [
        Service(
            aggregator_settings(broker, tmp_path / name, access=access, pool_url=pg_url),
            port=0,
            log_level="warning",
            password_hasher=FAST_HASHER,
        )
        for name in ("a", "b")
    ]
    for username in ("duty-a", "duty-b"):
        services[0].auth.create_account(username, Level.ADMIN, password=PASSWORD)
    with services[0], services[1]:
        a, b = Api(services[0].url), Api(services[1].url)
        try:
            # a token from A, used on B
            bearer = {"Authorization": f"Bearer {a.token('duty-a')}"}
            r = b.http.get("/api/v1/auth/me", headers=bearer)
            assert r.status_code == 200, r.text
            assert r.json()["username"] == "duty-a"
            # a logout on B ends it on A
            assert b.http.post("/api/v1/auth/logout", headers=bearer).status_code == 204
            assert a.http.get("/api/v1/auth/me", headers=bearer).status_code == 401
            # an account disabled (here, through B's store) is logged out on both
            bearer = {"Authorization": f"Bearer {b.token('duty-b')}"}
            assert a.http.get("/api/v1/auth/me", headers=bearer).status_code == 200
            services[1].auth.set_disabled("duty-b", True)
            for api in (a, b):
                assert api.http.get("/api/v1/auth/me", headers=bearer).status_code == 401
            # the free failures are shared: 5 wrong passwords on A, the 6th on B locks the user
            statuses = [
                api.http.post(
                    "/api/v1/auth/token", json={"username": "duty-a", "password": f"wrong {i}"}
                ).status_code
                for i, api in enumerate([a] * 5 + [b])
            ]
            assert statuses == [401] * 6
            for api in (a, b):
                r = api.http.post(
                    "/api/v1/auth/token", json={"username": "duty-a", "password": PASSWORD}
                )
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) > 20
        finally:
            a.close()
            b.close()


# -- headers ----------------------------------------------------------------------------------


def test_a_username_no_account_can_have_is_401_like_any_unknown_one(
    service: Service, api: Api
) -> None:
    """A name with NUL (which PostgreSQL text cannot hold) or other characters no account may
    have is refused like an unknown user, before the pool (and the shared limiter) sees it."""
    for name in ("comm_a\x00", "comm\x00_a", "\x00", "comm a", "комм"):
        r = api.http.post("/api/v1/auth/token", json={"username": name, "password": PASSWORD})
        assert r.status_code == 401, (name, r.status_code, r.text)
        assert r.json()["detail"] == "wrong username or password"
    r = api.http.post("/api/v1/auth/token", json={"username": "comm_a", "password": PASSWORD})
    assert r.status_code == 200, r.text


def test_security_headers_on_every_response(service: Service, api: Api) -> None:
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp
    responses = [
        api.get("/"),
        api.get("/app.js"),
        api.get("/app.css"),
        api.get("/healthz"),
        api.get("/no-such-page"),
        api.get("/api/v1/events"),  # 401
        api.get("/api/v1/events", "admin"),
        api.get("/api/v1/events", "admin", cursor="!!"),  # 400
        api.http.post("/api/v1/auth/token", json={"username": "x"}),  # 422
        api.http.post("/api/v1/auth/token", json={"username": "admin", "password": PASSWORD}),
    ]
    for r in responses:
        for name, value in SECURITY_HEADERS.items():
            assert r.headers.get(name) == value, (r.request.url, r.status_code, name)
    # The dashboard's page has no inline script or style for the policy to refuse.
    page = responses[0].text
    assert "<script>" not in page
    assert "<style" not in page
    assert " style=" not in page
    assert '<script src="app.js"></script>' in page


# -- cursors ----------------------------------------------------------------------------------


def b64(payload: Any) -> str:
    # json, not orjson: a crafted cursor may hold integers beyond 64 bits.
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


HUGE = 2**63


def test_crafted_cursors_are_400(service: Service, api: Api, broker: Any) -> None:
    for i in range(3):
        publish(broker, make_alert(f"cam-{i}", *interior(grid_in_community(i, 1)), seq=i))
    wait_for_events(api, 3)
    first = api.get("/api/v1/events", "admin", limit=1).json()
    assert first["next_cursor"]
    assert (
        api.get("/api/v1/events", "admin", limit=1, cursor=first["next_cursor"]).status_code == 200
    )
    bad = [
        b64({"s": "-registered_at", "v": HUGE, "i": 1}),
        b64({"s": "-registered_at", "v": 1.0, "i": HUGE}),
        b64({"s": "-registered_at", "v": 1.0, "i": -HUGE - 1}),
        b64({"s": "-registered_at", "v": 2**64 - 1, "i": 2**64 - 1}),
        b64({"s": "-registered_at", "v": 1.0, "i": 1, "x": [HUGE]}),
        # JSON's true is no number (PostgreSQL refuses to compare an id with a boolean)
        b64({"s": "-registered_at", "v": True, "i": True}),
        b64(b'{"s": "-registered_at", "v": 1e400, "i": 1}'),
        b64(b'{"s": "-registered_at", "v": NaN, "i": 1}'),
        b64([1, 2]),
        "not base64 at all ✓",
        "",
    ]
    for cursor in bad:
        r = api.get("/api/v1/events", "admin", cursor=cursor)
        assert r.status_code in (400, 200), (cursor, r.status_code, r.text)
        if cursor:
            assert r.status_code == 400, (cursor, r.text)
        r = api.get("/api/v1/dead-letters", "admin", cursor=cursor)
        assert r.status_code == (400 if cursor else 200), (cursor, r.text)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=10,
)
_cursor_dicts = st.fixed_dictionaries(
    {},
    optional={
        "s": st.sampled_from(["-registered_at", "registered_at", "-severity", "x"]) | st.text(),
        "v": _json_values,
        "i": _json_values,
    },
)
# Well-formed cursors of the default sort whose numbers reach past 64 bits: the shape that
# gave a 500 (SQLite's OverflowError) before cursors were checked.
_edge_ints = (
    st.integers(2**63, 2**66)
    | st.integers(-(2**66), -(2**63) - 1)
    | st.integers(-(2**63), 2**63 - 1)
    | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1])
)
_near_miss = st.fixed_dictionaries(
    {
        "s": st.just("-registered_at"),
        "v": _edge_ints | st.floats(allow_nan=False, allow_infinity=False),
        "i": _edge_ints,
    }
)
_cursors = (
    _near_miss.map(b64)
    | _cursor_dicts.map(b64)
    | _json_values.map(b64)
    | st.binary(max_size=200).map(b64)
    | st.text(max_size=300)
    | st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=300
    )
)


def test_fuzzed_cursors_are_400_or_200_never_500(service: Service, api: Api) -> None:
    token = api.token("admin")
    headers = {"Authorization": f"Bearer {token}"}
    seen: dict[int, int] = {}

    @given(cursor=_cursors, path=st.sampled_from(["/api/v1/events", "/api/v1/dead-letters"]))
    @settings(
        max_examples=int(os.environ.get("CWG_CURSOR_EXAMPLES", "300")),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(cursor: str, path: str) -> None:
        r = api.http.get(path, params={"cursor": cursor}, headers=headers)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        # 422: longer than the parameter's documented 512 characters.
        assert r.status_code in (200, 400, 422), (cursor, r.status_code, r.text)
        if len(cursor) > 512:
            assert r.status_code == 422

    run()
    assert seen.get(400, 0) > 0, seen


# -- /metrics ---------------------------------------------------------------------------------


def test_metrics_need_the_metrics_token_or_an_admin(broker: Any, tmp_path: Path) -> None:
    access = AccessSettings(metrics_token=SecretStr(METRICS_TOKEN))
    with service_with(broker, tmp_path, access) as service:
        api = Api(service.url)
        try:
            assert api.get("/metrics").status_code == 401
            assert api.get("/metrics", "comm_a").status_code == 401
            r = api.http.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
            assert r.status_code == 401
            r = api.http.get("/metrics", params={"token": METRICS_TOKEN})
            assert r.status_code == 401  # never from the URL
            assert api.get("/metrics", "admin").status_code == 200
            r = api.http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
            assert r.status_code == 200
            assert "cwg_stream_clients" in r.text
        finally:
            api.close()


# -- files ------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_pool_wal_and_snapshots_are_private_and_fixed_on_open(tmp_path: Path) -> None:
    # SQLite only: a PostgreSQL pool has no files of ours (its server guards its data folder)
    data = tmp_path / "data"
    catalogue = load_catalogue()
    pool = EventPool(data / "pool.db", catalogue)
    pool.close()
    pool = EventPool(data / "pool.db", catalogue)  # WAL and SHM exist while it is open
    files = [data / "pool.db", data / "pool.db-wal", data / "pool.db-shm"]
    try:
        assert mode(data) == 0o700
        for f in files:
            assert f.exists(), f
            assert mode(f) == 0o600, (f, oct(mode(f)))
    finally:
        pool.close()
    # A pool made or copied with loose modes is tightened when it is opened.
    data.chmod(0o755)
    for f in files:
        if f.exists():
            f.chmod(0o644)
    pool = EventPool(data / "pool.db", catalogue)
    try:
        assert mode(data) == 0o700
        for f in files:
            if f.exists():
                assert mode(f) == 0o600, (f, oct(mode(f)))
    finally:
        pool.close()
    store = SnapshotStore(data / "snapshots")
    sha = store.put(jpeg(1))
    assert mode(data / "snapshots") == 0o700
    assert mode(store.path_of(sha)) == 0o600
    assert mode(store.path_of(sha).parent) == 0o700


def test_a_shared_directory_is_left_alone(tmp_path: Path) -> None:
    # SQLite only: the pool file's folder
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: sticky, everyone's
    pool = EventPool(shared / "pool.db", load_catalogue())
    pool.close()
    assert mode(shared) == 0o1777
    assert mode(shared / "pool.db") == 0o600


# -- logs -------------------------------------------------------------------------------------


def test_redaction_hides_secrets_and_keeps_the_access_log_shape() -> None:
    secret = "s3cr3t-Token_value.~+/="
    assert secret not in redact(f"GET /api/v1/stream?grid=33&token={secret}&type=x")
    assert "grid=33" in redact(f"GET /api/v1/stream?grid=33&token={secret}&type=x")
    assert "type=x" in redact(f"/x?access_token={secret}&type=x")
    assert secret not in redact(f"/x?password={secret}")
    assert secret not in redact(f"Authorization: Bearer {secret}")
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", f"/api/v1/stream/sse?token={secret}", "1.1", 401),
        None,
    )
    assert RedactSecrets().filter(record)
    assert isinstance(record.args, tuple)
    assert len(record.args) == 5
    assert record.args[4] == 401
    assert secret not in record.getMessage()
    assert "/api/v1/stream/sse?token=" in record.getMessage()


def test_no_token_in_the_service_logs(
    broker: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str], pool_backend: PoolBackend
) -> None:
    """Every request line is logged (info), with tokens sent where they do not belong too: not
    one log line of the service's processes holds a token, nor the pool's password."""
    overrides = pool_backend.settings_overrides()
    if pool_backend.is_postgres:
        # the test cluster trusts 127.0.0.1 and never asks for it: only the logs could show it
        user, at, rest = pool_backend.target.partition("@")
        overrides["pool_url"] = SecretStr(f"{user}:{POOL_PASSWORD}{at}{rest}")
    service = Service(
        aggregator_settings(broker, tmp_path / "agg", **overrides),
        port=0,
        log_level="info",
        password_hasher=FAST_HASHER,
    )
    service.auth.create_account("admin", "admin", password=PASSWORD)
    tokens: list[str] = []
    with service, httpx.Client(base_url=service.url, timeout=10) as http:
        for _ in range(2):
            r = http.post("/api/v1/auth/token", json={"username": "admin", "password": PASSWORD})
            tokens.append(r.json()["access_token"])
        http.cookies.clear()  # the login's stream cookie would open the SSE stream below
        auth = {"Authorization": f"Bearer {tokens[0]}"}
        http.get("/api/v1/events", headers=auth)
        http.get("/api/v1/events", params={"token": tokens[0], "access_token": tokens[1]})
        http.get("/api/v1/stream/sse", params={"token": tokens[1], "password": PASSWORD})
        http.get("/metrics", params={"token": tokens[0]}, headers=auth)
        http.post("/api/v1/auth/logout", headers={"Authorization": f"Bearer {tokens[1]}"})
    out, err = capfd.readouterr()
    logged = out + err
    assert "GET /api/v1/events" in logged, "the access log was not captured"
    for token in tokens:
        assert token not in logged
    assert PASSWORD not in logged
    assert POOL_PASSWORD not in logged
