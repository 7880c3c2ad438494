"""Where operator accounts and bearer tokens are kept: the pool's database, on either backend.

``AccountStore`` is the small port that ``AuthStore`` (aggregator/access/auth.py) talks to; it
holds rows, never passwords or tokens (only their argon2 and SHA-256 hashes). Two adapters:

- ``SqliteAccountStore``: tables ``operators`` and ``operator_tokens`` in the SQLite pool file,
  made by this module (``CREATE TABLE IF NOT EXISTS``), one connection behind a lock.
- ``PgAccountStore``: the same tables in the PostgreSQL pool, made by the pool's numbered
  migrations (aggregator/pool/migrations/postgres/0002_operators.sql), through a small
  connection pool. Every replica of the aggregator reads and writes the same rows, so a token
  issued by one replica's API is accepted by every other, and disabling an account or changing
  its password ends its sessions on all of them at once.

On PostgreSQL the login limiter's counts are kept there too (``PgStrikeBook``, table
``login_strikes``), so a lockout earned through one replica holds on every replica. On SQLite
one API process serves the pool and the limiter counts in its memory.

``open_account_store(target)`` takes the pool target as every command finds it: a ``Path`` (or
path string) is an SQLite pool file, a ``postgresql://`` URL the PostgreSQL pool.
"""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import psycopg

from aggregator.config import redact_pool_url
from aggregator.pool.postgres import (
    PoolUnavailableError,
    connection_pool,
    is_pg_pool_fault,
    migrate,
)
from aggregator.pool.reader import is_pool_url, pg_sql
from aggregator.pool.sqlite import connect

__all__ = [
    "AccountRecord",
    "AccountStore",
    "PgAccountStore",
    "PgStrikeBook",
    "SqliteAccountStore",
    "StrikeBook",
    "StrikeKey",
    "Strikes",
    "describe_target",
    "open_account_store",
]

T = TypeVar("T")

_SQLITE_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS operators (
    username            TEXT PRIMARY KEY,
    level               TEXT NOT NULL CHECK (level IN
                          ('admin','county','street','community','department')),
    scope_code          TEXT NOT NULL DEFAULT '',   -- grid code prefix; '' = every grid
    department          TEXT,                       -- catalogue department code
    display_name        TEXT NOT NULL,
    password_hash       TEXT NOT NULL,              -- argon2id, PHC string
    disabled            INTEGER NOT NULL DEFAULT 0,
    created_at          REAL NOT NULL,
    password_changed_at REAL NOT NULL,
    last_login_at       REAL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS operator_tokens (
    token_hash   TEXT PRIMARY KEY,                  -- sha256 of the bearer token, hex
    username     TEXT NOT NULL REFERENCES operators(username),
    issued_at    REAL NOT NULL,
    expires_at   REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS operator_tokens_user ON operator_tokens(username);
"""

# The columns of an AccountRecord, in its field order; both adapters select exactly these.
_COLUMNS: Final = "username, level, scope_code, department, display_name, password_hash, disabled"
_SESSION_COLUMNS: Final = (
    "o.username, o.level, o.scope_code, o.department, o.display_name, o.password_hash,"
    " o.disabled, t.expires_at"
)


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """One ``operators`` row as the store hands it out (the level as stored, a string)."""

    username: str
    level: str
    scope_code: str
    department: str | None
    display_name: str
    password_hash: str
    disabled: bool


def _record(row: Sequence[Any]) -> AccountRecord:
    return AccountRecord(
        username=row[0],
        level=row[1],
        scope_code=row[2],
        department=row[3],
        display_name=row[4],
        password_hash=row[5],
        disabled=bool(row[6]),  # SQLite keeps 0/1, PostgreSQL a boolean
    )


class AccountStore(Protocol):
    """Accounts and token hashes. Every method is one transaction; thread-safe."""

    @property
    def target(self) -> str:
        """Where the rows are, safe to print (no password)."""
        ...

    def add(self, record: AccountRecord, at: float) -> bool:
        """Insert an account; False when the username is taken (nothing changed)."""
        ...

    def accounts(self) -> list[AccountRecord]:
        """Every account, by username."""
        ...

    def account(self, username: str) -> AccountRecord | None: ...

    def count(self) -> int: ...

    def set_disabled(self, username: str, disabled: bool) -> bool:
        """Disable (deleting the account's tokens) or enable; False when no such account."""
        ...

    def set_password_hash(self, username: str, password_hash: str, at: float) -> bool:
        """Store a new hash and delete the account's tokens; False when no such account."""
        ...

    def add_token(
        self,
        token_hash: str,
        username: str,
        issued_at: float,
        expires_at: float,
        rehashed: str | None = None,
    ) -> None:
        """Record a login: the token, the login time, and a password hash upgraded to the
        current parameters (``rehashed``); the account's expired tokens go."""
        ...

    def token_account(self, token_hash: str) -> tuple[AccountRecord, float] | None:
        """The account a token hash belongs to and the token's expiry (UNIX seconds)."""
        ...

    def delete_token(self, token_hash: str) -> None: ...

    def strike_book(self, forget_after_s: float) -> StrikeBook | None:
        """Where every replica counts failed logins (None: nowhere shared; each process
        counts in its own memory)."""
        ...

    def close(self) -> None: ...


# A key of the login limiter: ("user", casefolded name) or ("addr", client address).
StrikeKey = tuple[str, str]


@dataclass(slots=True)
class Strikes:
    """Failed logins of one limiter key, and the lockout they earned (the limiter's clock)."""

    failures: int = 0
    locked_until: float = 0.0
    last_failure: float = 0.0


class StrikeBook(Protocol):
    """Where the login limiter keeps its counts. ``change`` hands ``fn`` the entries of
    ``keys`` (in that order) and keeps what it changes, atomically: no other change of these
    keys, in this process or (when ``shared``) on another replica, runs in between. An
    exception from ``fn`` keeps nothing."""

    @property
    def shared(self) -> bool:
        """Whether other processes see these counts (each change is then a round trip)."""
        ...

    def change(
        self,
        keys: Sequence[StrikeKey],
        now: float,
        fn: Callable[[list[Strikes]], T],
        *,
        create: bool,
        write: bool = True,
    ) -> T:
        """``create``: missing keys get entries (else ``fn`` sees throwaway zero entries for
        them); ``write``: keep ``fn``'s changes (else a read)."""
        ...

    def __len__(self) -> int:
        """How many keys are held."""
        ...


def describe_target(target: Path | str) -> str:
    """A pool target fit for a log line or a terminal: a URL loses its password and options."""
    return redact_pool_url(str(target)) if is_pool_url(target) else str(target)


def open_account_store(target: Path | str) -> AccountStore:
    """The account store of a pool: ``PgAccountStore`` for a ``postgresql://`` URL, else
    ``SqliteAccountStore`` on the pool file."""
    if is_pool_url(target):
        return PgAccountStore(str(target))
    return SqliteAccountStore(Path(target))


# ---------------------------------------------------------------------------- both backends


class _Qmark(Protocol):
    """A connection inside the store's read or write scope, taking ``?`` placeholders."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any: ...


class _PgQmark:
    """A psycopg connection that takes ``?`` placeholders (``pg_sql``), so both adapters ask
    the same SQL."""

    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        return self._conn.execute(pg_sql(sql), list(parameters))


class _SqlAccountStore(ABC):
    """The account store's SQL, the same on both backends; an adapter supplies ``_read`` (a
    connection for one question) and ``_write`` (one write transaction)."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[_Qmark]: ...

    @abstractmethod
    def _write(self) -> AbstractContextManager[_Qmark]: ...

    def add(self, record: AccountRecord, at: float) -> bool:
        with self._write() as db:
            # ON CONFLICT rather than catching the key's violation: two replicas (or two
            # administrators) adding one name at once both get an answer, not an error
            rows = db.execute(
                "INSERT INTO operators(username, level, scope_code, department, display_name,"
                " password_hash, disabled, created_at, password_changed_at)"
                " VALUES (?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (username) DO NOTHING RETURNING username",
                (
                    record.username,
                    record.level,
                    record.scope_code,
                    record.department,
                    record.display_name,
                    record.password_hash,
                    record.disabled,  # SQLite keeps a bool as 0/1, PostgreSQL as a boolean
                    at,
                    at,
                ),
            ).fetchall()
        return bool(rows)

    def accounts(self) -> list[AccountRecord]:
        with self._read() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM operators ORDER BY username").fetchall()
        return [_record(r) for r in rows]

    def account(self, username: str) -> AccountRecord | None:
        with self._read() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM operators WHERE username=?", (username,)
            ).fetchone()
        return None if row is None else _record(row)

    def count(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT count(*) FROM operators").fetchone()[0])

    def set_disabled(self, username: str, disabled: bool) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE operators SET disabled=? WHERE username=?", (disabled, username)
            )
            found = int(cur.rowcount) > 0
            if found and disabled:
                db.execute("DELETE FROM operator_tokens WHERE username=?", (username,))
        return found

    def set_password_hash(self, username: str, password_hash: str, at: float) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE operators SET password_hash=?, password_changed_at=? WHERE username=?",
                (password_hash, at, username),
            )
            found = int(cur.rowcount) > 0
            db.execute("DELETE FROM operator_tokens WHERE username=?", (username,))
        return found

    def add_token(
        self,
        token_hash: str,
        username: str,
        issued_at: float,
        expires_at: float,
        rehashed: str | None = None,
    ) -> None:
        with self._write() as db:
            db.execute(
                "DELETE FROM operator_tokens WHERE username=? AND expires_at<?",
                (username, issued_at),
            )
            db.execute(
                "INSERT INTO operator_tokens(token_hash, username, issued_at, expires_at)"
                " VALUES (?,?,?,?)",
                (token_hash, username, issued_at, expires_at),
            )
            db.execute(
                "UPDATE operators SET last_login_at=?, password_hash=coalesce(?, password_hash)"
                " WHERE username=?",
                (issued_at, rehashed, username),
            )

    def token_account(self, token_hash: str) -> tuple[AccountRecord, float] | None:
        with self._read() as db:
            row = db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM operator_tokens t"
                " JOIN operators o ON o.username = t.username WHERE t.token_hash=?",
                (token_hash,),
            ).fetchone()
        return None if row is None else (_record(row), float(row[7]))

    def delete_token(self, token_hash: str) -> None:
        with self._read() as db:  # one statement: autocommit on both backends
            db.execute("DELETE FROM operator_tokens WHERE token_hash=?", (token_hash,))


# ---------------------------------------------------------------------------- SQLite


class SqliteAccountStore(_SqlAccountStore):
    """The tables in the SQLite pool file: one connection behind a lock (account reads are
    single-row lookups; the pool's WAL keeps them from waiting on ingest)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = connect(path)
        self._db.executescript(_SQLITE_SCHEMA)

    @property
    def target(self) -> str:
        return str(self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock (the connection is in autocommit mode)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def strike_book(self, forget_after_s: float) -> StrikeBook | None:
        # One API process per SQLite pool: its memory is the whole count, and a write per
        # login attempt would queue a login flood behind the ingest writer's lock.
        return None


# ---------------------------------------------------------------------------- PostgreSQL


class PgAccountStore(_SqlAccountStore):
    """The tables in the PostgreSQL pool, shared by every replica. Opening migrates the pool
    (as the event pool's adapter does), so ``gateway accounts add`` works on a fresh database
    before any aggregator has started. Server and connection faults raise
    ``PoolUnavailableError``, never ``AuthError``: an unreachable pool is not a bad token."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout_s: float = 10.0,
        checkout_timeout_s: float = 3.0,
        migrate_on_open: bool = True,
    ) -> None:
        self._target = describe_target(url)
        with self._faults():
            if migrate_on_open:
                migrate(url)
            self._pool = connection_pool(
                url,
                name="cwg-access",
                min_size=min_size,
                max_size=max_size,
                connect_timeout_s=connect_timeout_s,
                checkout_timeout_s=checkout_timeout_s,
            )

    @property
    def target(self) -> str:
        return self._target

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _faults(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if is_pg_pool_fault(exc):
                # the URL stays out of the message: it may hold a password
                raise PoolUnavailableError(
                    f"PostgreSQL pool {self._target}: {type(exc).__name__}"
                ) from exc
            raise

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        with self._faults(), self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[_PgQmark]:
        with self._conn() as conn:
            yield _PgQmark(conn)

    @contextmanager
    def _write(self) -> Iterator[_PgQmark]:
        with self._conn() as conn, conn.transaction():
            yield _PgQmark(conn)

    def strike_book(self, forget_after_s: float) -> StrikeBook | None:
        return PgStrikeBook(self, forget_after_s)

    def connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A connection of the store's pool (autocommit); faults raise
        ``PoolUnavailableError``."""
        return self._conn()


def _strike_name(key: StrikeKey) -> str:
    return f"{key[0]}:{key[1]}"


class PgStrikeBook:
    """The login limiter's counts in the PostgreSQL pool (``login_strikes``), one row per key:
    every replica counts into the same rows, so a lockout earned through one replica's API
    holds on all of them, and N replicas do not give a guesser N times the free failures.

    A change is one transaction: the rows of its keys are created if needed and locked
    (``FOR UPDATE``, in sorted order, so two replicas never deadlock), handed to the limiter's
    rule, and written back. Rows quiet for ``forget_after_s`` are deleted now and then, which
    bounds the table under a spray of made-up names as the in-memory limit does."""

    PRUNE_EVERY_S: Final = 60.0

    def __init__(self, store: PgAccountStore, forget_after_s: float) -> None:
        self._store = store
        self._forget_after_s = forget_after_s
        self._pruned_at = float("-inf")
        self._prune_lock = threading.Lock()

    @property
    def shared(self) -> bool:
        return True

    def change(
        self,
        keys: Sequence[StrikeKey],
        now: float,
        fn: Callable[[list[Strikes]], T],
        *,
        create: bool,
        write: bool = True,
    ) -> T:
        names = [_strike_name(k) for k in keys]
        ordered = sorted(set(names))
        lock = " ORDER BY key FOR UPDATE" if write else ""
        with self._store.connection() as conn, conn.transaction():
            if create:
                conn.execute(
                    "INSERT INTO login_strikes(key) SELECT unnest(%s::text[]) ORDER BY 1"
                    " ON CONFLICT (key) DO NOTHING",
                    (ordered,),
                )
            rows = conn.execute(
                "SELECT key, failures, locked_until, last_failure FROM login_strikes"
                " WHERE key = ANY(%s)" + lock,
                (ordered,),
            ).fetchall()
            found = {r[0]: Strikes(int(r[1]), float(r[2]), float(r[3])) for r in rows}
            entries = [found.get(name) or Strikes() for name in names]
            result = fn(entries)
            kept = [(n, e) for n, e in zip(names, entries, strict=True) if n in found]
            if write and kept:
                conn.execute(
                    "UPDATE login_strikes s SET failures = x.f, locked_until = x.l,"
                    " last_failure = x.t FROM unnest(%s::text[], %s::int[], %s::float8[],"
                    " %s::float8[]) AS x(k, f, l, t) WHERE s.key = x.k",
                    (
                        [n for n, _ in kept],
                        [e.failures for _, e in kept],
                        [e.locked_until for _, e in kept],
                        [e.last_failure for _, e in kept],
                    ),
                )
        if create:
            self._prune(now)
        return result

    def _prune(self, now: float) -> None:
        with self._prune_lock:
            if now - self._pruned_at < self.PRUNE_EVERY_S:
                return
            self._pruned_at = now
        with self._store.connection() as conn:
            conn.execute(
                "DELETE FROM login_strikes WHERE greatest(locked_until, last_failure) < %s",
                (now - self._forget_after_s,),
            )

    def __len__(self) -> int:
        with self._store.connection() as conn:
            row = conn.execute("SELECT count(*) FROM login_strikes").fetchone()
        return 0 if row is None else int(row[0])
