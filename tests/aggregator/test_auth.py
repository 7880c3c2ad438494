"""Operator accounts, passwords and tokens in a real pool file (GB/T 34300 graded access)."""

from __future__ import annotations

import sqlite3
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
from aggregator.pool.sqlite import EventPool
from contract import default_catalogue

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
GOOD = "a long enough secret"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuthStore]:
    s = AuthStore(tmp_path / "pool.db", hasher=FAST)
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


def test_passwords_are_argon2_tokens_hashed_and_weak_passwords_refused(
    store: AuthStore, tmp_path: Path
) -> None:
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
    db = sqlite3.connect(tmp_path / "pool.db")
    stored_hash = db.execute("SELECT password_hash FROM operators").fetchone()[0]
    assert stored_hash.startswith("$argon2id$")
    assert generated not in stored_hash
    token_hashes = [r[0] for r in db.execute("SELECT token_hash FROM operator_tokens")]
    assert token_hashes
    assert issued.token not in token_hashes
    db.close()
    # The library default cost is what production uses.
    default = AuthStore(tmp_path / "pool.db")
    default.create_account("op2", Level.ADMIN, password=GOOD)
    default.close()
    db = sqlite3.connect(tmp_path / "pool.db")
    assert (
        "m=65536,t=3"
        in db.execute("SELECT password_hash FROM operators WHERE username='op2'").fetchone()[0]
    )
    db.close()


def test_login_resolve_expiry_disable_and_password_change(tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "pool.db", hasher=FAST, token_ttl=timedelta(seconds=1))
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
    store.revoke(store.login("comm", new).token)
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


def test_default_admin_only_in_development_mode(tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "pool.db", hasher=FAST)
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
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = tmp_path / "pool.db"
    args = ["--pool", str(pool), "add", "comm-a", "--level", "community", "--scope"]
    assert main_accounts([*args, "330383001001", "--name", "Longxiang duty"]) == 0
    out = capsys.readouterr().out
    password = out.split("(shown once): ")[1].strip()
    assert main_accounts(["--pool", str(pool), "add", "police-1", "--level", "department",
                          "--department", "police"]) == 0  # fmt: skip
    assert main_accounts(["--pool", str(pool), "add", "bad", "--level", "street"]) == 2
    assert "9-digit" in capsys.readouterr().err
    assert main_accounts(["--pool", str(pool), "list"]) == 0
    listing = capsys.readouterr().out
    assert "comm-a" in listing
    assert "330383001001" in listing
    assert "police-1" in listing
    assert main_accounts(["--pool", str(pool), "disable", "comm-a"]) == 0
    assert "disabled" in capsys.readouterr().out
    store = AuthStore(pool, hasher=FAST)
    with pytest.raises(AuthError, match="disabled"):
        store.login("comm-a", password)
    assert main_accounts(["--pool", str(pool), "enable", "comm-a"]) == 0
    assert store.login("comm-a", password).operator.display_name == "Longxiang duty"
    assert main_accounts(["--pool", str(pool), "passwd", "comm-a"]) == 0
    new = capsys.readouterr().out.split("(shown once): ")[-1].strip()
    assert store.login("comm-a", new)
    assert main_accounts(["--pool", str(pool), "disable", "nobody"]) == 2
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


def test_create_account_function(tmp_path: Path) -> None:
    op, password = create_account(
        tmp_path / "pool.db", "street-ops", "street", scope_code="330383002"
    )
    assert op.level is Level.STREET
    assert op.sees_grid("33038300200101000007")
    assert not op.sees_grid("33038300100101000007")
    assert password
