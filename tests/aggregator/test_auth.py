"""Operator accounts, passwords and tokens in a real pool (GB/T 34300 graded access): an SQLite
file and a PostgreSQL database, and two stores on one database as two replicas see it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from aggregator.access.auth import (
    AccountError,
    AuthError,
    AuthStore,
    Level,
    Operator,
    create_account,
    main_accounts,
)
from aggregator.access.store import PgAccountStore
from aggregator.pool.postgres import PoolUnavailableError
from aggregator.pool.sqlite import EventPool
from contract import default_catalogue
from tests.pgsupport import PgServer

from .conftest import PoolBackend

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
GOOD = "a long enough secret"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuthStore]:
    s = AuthStore(tmp_path / "pool.db", hasher=FAST)
    yield s
    s.close()


@pytest.fixture
def backend_store(pool_backend: PoolBackend) -> Iterator[AuthStore]:
    """An account store on the SQLite pool file, then on a fresh PostgreSQL pool."""
    s = AuthStore(pool_backend.target, hasher=FAST)
    yield s
    s.close()


@pytest.mark.parametrize(
    ("level", "scope", "department", "problem"),
    [
        (Level.COMMUNITY, "330383001", None, "12-digit"),
        (Level.STREET, "330383001001", None, "9-digit"),
        (Level.COUNTY, "", None, "6-digit"),
        (Level.COUNTY, "33038３", None, "ASCII digits"),  # a full-width digit
        (Level.ADMIN, "330383", None, "neither scope"),
        (Level.DEPARTMENT, "", None, "--department"),
        (Level.DEPARTMENT, "3303830", "police", "county, street or community"),
        (Level.COMMUNITY, "330383001001", "police", "no department"),
    ],
)
def test_scope_must_fit_the_level(
    store: AuthStore, level: Level, scope: str, department: str | None, problem: str
) -> None:
    with pytest.raises(AccountError, match=problem):
        store.create_account("op1", level, scope_code=scope, department=department, password=GOOD)


@pytest.mark.parametrize("name", ["op1\n", "op\x001", "o", "op 1", "-op1"])
def test_a_name_must_be_a_whole_account_name(store: AuthStore, name: str) -> None:
    """Matched whole: a trailing newline (which ``$`` lets through) is refused too."""
    with pytest.raises(AccountError, match="2-64 letters"):
        store.create_account(name, Level.ADMIN, password=GOOD)


def test_passwords_are_argon2_tokens_hashed_and_weak_passwords_refused(
    backend_store: AuthStore, pool_backend: PoolBackend
) -> None:
    store = backend_store
    with pytest.raises(AccountError, match="at least"):
        store.create_account("op1", Level.ADMIN, password="short")
    with pytest.raises(AccountError, match="not the"):
        store.create_account("operator01", Level.ADMIN, password="OPERATOR01")
    op, generated = store.create_account("op1", Level.ADMIN)
    assert len(generated) >= 16
    with pytest.raises(AccountError, match="already exists"):
        store.create_account("op1", Level.ADMIN, password=GOOD)
    issued = store.login("op1", generated)
    assert store.resolve(issued.token) == op
    [(stored_hash,)] = pool_backend.rows("SELECT password_hash FROM operators")
    assert stored_hash.startswith("$argon2id$")
    assert generated not in stored_hash
    token_hashes = [r[0] for r in pool_backend.rows("SELECT token_hash FROM operator_tokens")]
    assert token_hashes
    assert issued.token not in token_hashes
    # The library default cost is what production uses.
    default = AuthStore(pool_backend.target)
    default.create_account("op2", Level.ADMIN, password=GOOD)
    default.close()
    [(op2_hash,)] = pool_backend.rows("SELECT password_hash FROM operators WHERE username='op2'")
    assert "m=65536,t=3" in op2_hash
    # A hash of older, cheaper parameters is upgraded at the next login.
    cheap = AuthStore(pool_backend.target, hasher=PasswordHasher(time_cost=1, memory_cost=512))
    cheap.create_account("op3", Level.ADMIN, password=GOOD)
    cheap.close()
    default = AuthStore(pool_backend.target)
    default.login("op3", GOOD)
    default.close()
    [(op3_hash,)] = pool_backend.rows("SELECT password_hash FROM operators WHERE username='op3'")
    assert "m=65536,t=3" in op3_hash


def test_login_resolve_expiry_disable_and_password_change(pool_backend: PoolBackend) -> None:
    store = AuthStore(pool_backend.target, hasher=FAST, token_ttl=timedelta(seconds=1))
    store.create_account("comm", Level.COMMUNITY, scope_code="330383001001", password=GOOD)
    with pytest.raises(AuthError, match="wrong username or password"):
        store.login("comm", "not the password")
    with pytest.raises(AuthError, match="wrong username or password"):
        store.login("ghost", GOOD)
    with pytest.raises(AuthError):
        store.resolve("")
    token = store.login("comm", GOOD).token
    assert store.resolve(token).scope_code == "330383001001"
    time.sleep(1.1)
    with pytest.raises(AuthError, match="expired"):
        store.resolve(token)
    store.token_ttl = timedelta(hours=1)
    token = store.login("comm", GOOD).token
    store.set_disabled("comm", True)
    with pytest.raises(AuthError):
        store.resolve(token)  # disabling ends every session
    with pytest.raises(AuthError, match="disabled"):
        store.login("comm", GOOD)
    store.set_disabled("comm", False)
    token = store.login("comm", GOOD).token
    new = store.set_password("comm")
    with pytest.raises(AuthError):
        store.resolve(token)  # a new password ends the old sessions
    store.login("comm", new)
    token = store.login("comm", new).token
    store.revoke(token)
    with pytest.raises(AuthError, match="invalid token"):
        store.resolve(token)
    with pytest.raises(AccountError, match="no account"):
        store.set_disabled("nobody", True)
    with pytest.raises(AccountError, match="no account"):
        store.set_password("nobody", GOOD)
    # a login clears the account's expired tokens, so the table does not grow with them
    assert len(pool_backend.rows("SELECT token_hash FROM operator_tokens")) == 1
    store.token_ttl = timedelta(seconds=-1)
    store.login("comm", new)
    store.token_ttl = timedelta(hours=1)
    store.login("comm", new)
    assert len(pool_backend.rows("SELECT token_hash FROM operator_tokens")) == 2
    store.close()


def test_event_filter_selects_exactly_the_scope(tmp_path: Path) -> None:
    pool = EventPool(tmp_path / "pool.db", default_catalogue())
    db = pool.reader
    rows = [
        ("33038300100101000001", "police"),
        ("33038300100201000001", "fire"),
        ("33038300200101000001", "police"),
        ("44030500100101000001", "police"),
    ]
    for i, (code, dept) in enumerate(rows, 1):
        db.execute(
            "INSERT INTO events(id, type, severity, status, department, grid_code, lat, lon,"
            " grid_path, address, description, first_observed_at, last_observed_at,"
            " registered_at, updated_at, deadline_at, alert_count, device_count)"
            " VALUES (?, 'smoke_fire', 'high', 'registered', ?, ?, 0, 0, '[]', '', '',"
            " 0, 0, 0, 0, 0, 1, 1)",
            (i, dept, code),
        )

    def visible(op: Operator) -> set[int]:
        cond, params = op.event_filter("e")
        return {r[0] for r in db.execute(f"SELECT id FROM events e WHERE {cond}", params)}

    def op(level: Level, scope: str = "", dept: str | None = None) -> Operator:
        return Operator("x", level, scope, dept, "x")

    assert visible(op(Level.ADMIN)) == {1, 2, 3, 4}
    assert visible(op(Level.COUNTY, "330383")) == {1, 2, 3}
    assert visible(op(Level.STREET, "330383001")) == {1, 2}
    assert visible(op(Level.COMMUNITY, "330383001002")) == {2}
    assert visible(op(Level.DEPARTMENT, "", "police")) == {1, 3, 4}
    assert visible(op(Level.DEPARTMENT, "330383", "police")) == {1, 3}
    assert op(Level.COMMUNITY, "330383001002").sees_event("33038300100201000009", "fire")
    assert not op(Level.DEPARTMENT, "", "police").sees_event("33038300100201000009", "fire")
    pool.close()


def test_default_admin_only_in_development_mode(pool_backend: PoolBackend) -> None:
    store = AuthStore(pool_backend.target, hasher=FAST)
    assert store.ensure_dev_admin(dev=False) is None
    assert store.accounts() == []
    with pytest.raises(AuthError):
        store.login("admin", "admin")
    message = store.ensure_dev_admin(dev=True)
    assert message is not None
    assert "admin/admin" in message
    assert store.login("admin", "admin").operator.is_admin
    assert store.ensure_dev_admin(dev=True) is None  # once only
    store.close()


def test_cli_add_list_disable_enable_passwd(
    pool_backend: PoolBackend,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if pool_backend.is_postgres:
        # the URL comes from the environment, as in production; trust authentication ignores
        # the password, which must then appear nowhere in what the command prints
        user, _, rest = pool_backend.target.partition("@")
        monkeypatch.setenv("CWG_POOL_URL", f"{user}:hunter2-secret@{rest}")
        pool_args: list[str] = []
    else:
        monkeypatch.delenv("CWG_POOL_URL", raising=False)
        pool_args = ["--pool", pool_backend.target]

    def accounts(*argv: str) -> int:
        return main_accounts([*pool_args, *argv])

    args = ["add", "comm-a", "--level", "community", "--scope"]
    assert accounts(*args, "330383001001", "--name", "Longxiang duty") == 0
    captured = capsys.readouterr()
    password = captured.out.split("(shown once): ")[1].strip()
    expected = pool_backend.target.split("?")[0] if pool_backend.is_postgres else pool_args[1]
    assert f"pool: {expected}" in captured.err
    assert accounts("add", "police-1", "--level", "department", "--department", "police") == 0
    assert accounts("add", "bad", "--level", "street") == 2
    assert "9-digit" in capsys.readouterr().err
    assert accounts("list") == 0
    listing = capsys.readouterr().out
    assert "comm-a" in listing
    assert "330383001001" in listing
    assert "police-1" in listing
    assert accounts("disable", "comm-a") == 0
    assert "disabled" in capsys.readouterr().out
    store = AuthStore(pool_backend.target, hasher=FAST)
    with pytest.raises(AuthError, match="disabled"):
        store.login("comm-a", password)
    assert accounts("enable", "comm-a") == 0
    assert store.login("comm-a", password).operator.display_name == "Longxiang duty"
    assert accounts("passwd", "comm-a") == 0
    new = capsys.readouterr().out.split("(shown once): ")[-1].strip()
    assert store.login("comm-a", new)
    assert accounts("disable", "nobody") == 2
    assert "hunter2" not in "".join(capsys.readouterr())
    store.close()


def test_gateway_accounts_finds_the_pool_as_gateway_run_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gateway accounts`` writes to the pool of the data directory the gateway runs with
    (--data-dir, else CWG_DATA_DIR), never to a ./var of wherever it was typed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CWG_DATA_DIR", raising=False)
    monkeypatch.delenv("CWG_POOL_PATH", raising=False)
    data = tmp_path / "data"
    assert main_accounts(["--data-dir", str(data), "add", "ops-1", "--level", "admin"]) == 0
    assert f"pool: {data / 'pool.db'}" in capsys.readouterr().err
    monkeypatch.setenv("CWG_DATA_DIR", str(tmp_path / "env"))
    assert main_accounts(["add", "ops-2", "--level", "admin"]) == 0
    assert not (tmp_path / "var").exists()
    for folder, name in ((data, "ops-1"), (tmp_path / "env", "ops-2")):
        store = AuthStore(folder / "pool.db", hasher=FAST)
        assert [op.username for op in store.accounts()] == [name]
        store.close()


def test_create_account_function(pool_backend: PoolBackend) -> None:
    op, password = create_account(
        pool_backend.target, "street-ops", "street", scope_code="330383002"
    )
    assert op.level is Level.STREET
    assert op.sees_grid("33038300200101000007")
    assert not op.sees_grid("33038300100101000007")
    assert password


def test_a_token_from_one_replica_works_on_another_and_ends_on_both(
    pool_backend: PoolBackend,
) -> None:
    """Two stores on one pool, as two replicas' APIs hold them: a token issued by one is
    accepted by the other, and disabling, a new password or a logout made on either ends it
    on both."""
    a = AuthStore(pool_backend.target, hasher=FAST)
    b = AuthStore(pool_backend.target, hasher=FAST)
    try:
        op, _ = a.create_account("duty-1", Level.COUNTY, scope_code="330383", password=GOOD)
        with pytest.raises(AccountError, match="already exists"):
            b.create_account("duty-1", Level.ADMIN, password=GOOD)
        token = a.login("duty-1", GOOD).token
        assert b.resolve(token) == op
        assert [o.username for o in b.accounts()] == ["duty-1"]

        b.set_disabled("duty-1", True)
        for store in (a, b):
            with pytest.raises(AuthError):
                store.resolve(token)
        with pytest.raises(AuthError, match="disabled"):
            a.login("duty-1", GOOD)
        a.set_disabled("duty-1", False)

        token = b.login("duty-1", GOOD).token
        assert a.resolve(token).scope_code == "330383"
        new = a.set_password("duty-1")
        for store in (a, b):
            with pytest.raises(AuthError, match="invalid token"):
                store.resolve(token)
        with pytest.raises(AuthError, match="wrong username or password"):
            b.login("duty-1", GOOD)

        token = b.login("duty-1", new).token
        assert a.resolve(token).username == "duty-1"
        a.revoke(token)
        with pytest.raises(AuthError, match="invalid token"):
            b.resolve(token)
    finally:
        a.close()
        b.close()


def test_replicas_adding_one_name_at_once_make_one_account(pool_backend: PoolBackend) -> None:
    stores = [AuthStore(pool_backend.target, hasher=FAST) for _ in range(2)]
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def add(store: AuthStore, i: int) -> None:
        start.wait(timeout=10)
        try:
            store.create_account("same-name", Level.ADMIN, display_name=f"try {i}", password=GOOD)
            outcomes.append("created")
        except AccountError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=add, args=(stores[i % 2], i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    try:
        assert sorted(outcomes) == ["account 'same-name' already exists"] * 7 + ["created"]
        assert len(pool_backend.rows("SELECT username FROM operators")) == 1
    finally:
        for store in stores:
            store.close()


def test_an_unreachable_postgresql_pool_is_not_a_bad_token(
    pg_server: PgServer, pg_url: str
) -> None:
    """While PostgreSQL is down, a token check fails as the pool's fault (the API answers
    503, the operator stays logged in) rather than as a refused token; it works again after."""
    # a short checkout timeout: a request waits this long for the server before failing
    store = AuthStore(PgAccountStore(pg_url, connect_timeout_s=2.0), hasher=FAST)
    try:
        store.create_account("duty-2", Level.ADMIN, password=GOOD)
        token = store.login("duty-2", GOOD).token
        pg_server.stop()
        try:
            with pytest.raises(PoolUnavailableError) as caught:
                store.resolve(token)
            assert not isinstance(caught.value, AuthError)
        finally:
            pg_server.start()
        assert store.resolve(token).username == "duty-2"
    finally:
        store.close()
