"""The read model's one seam to a pool backend: a ``Reader`` runs a question (SQL with ``?``
placeholders) and hands back rows that answer ``row[0]``, ``row["col"]`` and ``row.keys()``.

A ``sqlite3.Connection`` is a Reader as it is. ``PgReader`` makes a psycopg 3 connection one:
it rewrites the placeholders to psycopg's ``%s`` and builds rows that behave like
``sqlite3.Row``, so ``aggregator/pool/queries.py`` asks its questions once for both backends and
its callers handle one kind of row. The SQL that differs between the dialects is chosen inside
queries.py (``is_pg``), nowhere else.

psycopg is imported only when a PostgreSQL pool is opened: a SQLite-only install (the tools,
the simulators) does not need the driver.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, overload

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import RowMaker

URL_SCHEMES = ("postgresql://", "postgres://")


class Row(Protocol):
    """One result row: by position, by column name, and its column names."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


class Cursor(Protocol):
    """The result of one question: rows (``Row``) one at a time, all at once, or iterated."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Reader(Protocol):
    """A connection the read model asks its questions on (``?`` placeholders)."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...

    def close(self) -> None: ...


def is_pool_url(target: Path | str) -> bool:
    """Whether a pool target names a PostgreSQL database (a URL) rather than a SQLite file."""
    # case-insensitive like Settings.pool_url (which hands the URL on with its scheme lowered)
    return isinstance(target, str) and target[:16].lower().startswith(URL_SCHEMES)


def is_pg(conn: Reader) -> bool:
    """Whether a reader asks PostgreSQL (for the few questions whose SQL differs)."""
    return isinstance(conn, PgReader)


def open_reader(target: Path | str) -> Reader:
    """A read-only connection of its own: on the database a ``postgresql://`` URL names, or on
    a SQLite pool file (WAL lets it read while the aggregator writes)."""
    if is_pool_url(target):
        return PgReader(str(target))
    from aggregator.pool.sqlite import connect  # not at import: sqlite.py imports the model

    return connect(target, readonly=True)


def read_errors() -> tuple[type[Exception], ...]:
    """The exceptions a reader raises when its pool cannot answer (either backend)."""
    try:
        import psycopg
    except ImportError:  # a SQLite-only install
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)


# ---------------------------------------------------------------------------- PostgreSQL


class PgRow:
    """A row like ``sqlite3.Row``: indexed by position or (case-insensitive) column name,
    iterated as its values, ``keys()`` its column names, equal to a row of the same values."""

    __slots__ = ("_index", "_names", "_values")

    def __init__(self, names: list[str], index: dict[str, int], values: Sequence[Any]) -> None:
        self._names = names
        self._index = index
        self._values = tuple(values)

    @overload
    def __getitem__(self, key: int | str, /) -> Any: ...

    @overload
    def __getitem__(self, key: slice, /) -> tuple[Any, ...]: ...

    def __getitem__(self, key: int | str | slice, /) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._index[key.lower()]]
            except KeyError:
                raise IndexError("No item with that key") from None  # as sqlite3.Row says
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PgRow):
            return self._names == other._names and self._values == other._values
        return NotImplemented

    def __hash__(self) -> int:
        return hash((tuple(self._names), self._values))

    def __repr__(self) -> str:
        return f"PgRow({dict(zip(self._names, self._values, strict=True))!r})"


def pg_row_factory(cursor: psycopg.Cursor[Any]) -> RowMaker[PgRow]:
    """psycopg row factory: the cursor's column names are read once per result, every row of it
    shares them."""
    description = cursor.description
    if description is None:  # a statement without a result (BEGIN, COMMIT)

        def none(values: Sequence[Any]) -> PgRow:
            return PgRow([], {}, values)

        return none
    names = [column.name for column in description]
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name.lower(), i)  # the first of equal names, as sqlite3.Row

    def make(values: Sequence[Any]) -> PgRow:
        return PgRow(names, index, values)

    return make


@lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """The read model's SQL for psycopg: ``?`` outside quotes becomes ``%s``, and every literal
    ``%`` (a LIKE pattern written in the SQL, a modulo) is doubled, as psycopg reads ``%``
    everywhere in a query that has parameters."""
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if ch == "%":
            out.append("%%")
            continue
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append(ch)
    return "".join(out)


class PgReader:
    """A Reader on a PostgreSQL pool: a connection of its own in autocommit mode whose
    sessions are read-only (``default_transaction_read_only``: a stray write fails rather than
    changing the pool behind the writer's back). A connection the server broke (a restart) is
    replaced: a question asked outside a transaction is asked again on a new session, one inside
    a transaction raises."""

    def __init__(self, url: str, *, connect_timeout_s: float = 10.0) -> None:
        self._url = url
        self._timeout = max(1, round(connect_timeout_s))
        self._conn: psycopg.Connection[PgRow] = self._connect()

    def _connect(self) -> psycopg.Connection[PgRow]:
        import psycopg

        return psycopg.connect(
            self._url,
            autocommit=True,
            row_factory=pg_row_factory,
            connect_timeout=self._timeout,
            options="-c default_transaction_read_only=on",
        )

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[PgRow]:
        import psycopg

        if self._conn.broken:  # the server went away: a new session for this question
            self._conn = self._connect()
        idle = self._conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        try:
            return self._conn.execute(pg_sql(sql), list(parameters))
        except psycopg.OperationalError:
            # A session the server ended (a restart) is only found out by using it. A question
            # asked outside a transaction is read-only and asked once more on a new session;
            # inside one (``queries.snapshot``) the break is the caller's to see.
            if not (idle and self._conn.broken):
                raise
            self._conn = self._connect()
            return self._conn.execute(pg_sql(sql), list(parameters))

    def close(self) -> None:
        self._conn.close()
