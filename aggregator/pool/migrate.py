"""Numbered migrations for both storage adapters.

Each backend has a folder of SQL files, ``migrations/<backend>/NNNN_name.sql``, applied in
order; a table ``schema_migrations`` records each applied version. All pending files are
applied in one transaction under the backend's write lock (SQLite's ``BEGIN IMMEDIATE``,
PostgreSQL's advisory lock in ``postgres.migrate``), so replicas opening one pool together
apply them once. A small runner rather than a migration library: the pool has two backends with
their own dialects and a dozen tables, the files are plain SQL that a reviewer reads as such,
and a library would add a dependency and its own state table for what is forty lines here.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Final, NamedTuple

from aggregator.errors import PoolError

log = logging.getLogger(__name__)

FOLDER: Final = Path(__file__).parent / "migrations"


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


def numbered(folder: Path) -> list[Migration]:
    """The numbered SQL files (``NNNN_name.sql``) of a folder, in order."""
    out = [
        Migration(int(path.name[:4]), path.stem[5:], path.read_text("utf-8"))
        for path in sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    ]
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise PoolError(f"{folder}: two migrations share a number: {versions}")
    return out


def pending(applied: set[int], wanted: list[Migration]) -> list[Migration]:
    """The migrations not applied yet; refuses a pool that a newer release has migrated."""
    newer = max(applied, default=0)
    if newer > max((m.version for m in wanted), default=0):
        raise PoolError(
            f"pool schema version {newer} is newer than this aggregator knows; upgrade it"
        )
    return [m for m in wanted if m.version not in applied]


# ---------------------------------------------------------------------------- SQLite


def migrate_sqlite(db: sqlite3.Connection, folder: Path = FOLDER / "sqlite") -> list[int]:
    """Bring a SQLite pool (a connection in autocommit mode) to the newest version; returns the
    versions applied."""
    wanted = numbered(folder)
    db.execute("BEGIN IMMEDIATE")  # the write lock: a replica opening the file too waits here
    try:
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        applied = {r[0] for r in db.execute("SELECT version FROM schema_migrations")}
        if not applied:
            _baseline(db)
        done = []
        for m in pending(applied, wanted):
            log.info("pool migration %04d_%s", m.version, m.name)
            for statement in _statements(m.sql):
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)",
                (m.version, m.name, time.time()),
            )
            done.append(m.version)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return done


def _baseline(db: sqlite3.Connection) -> None:
    """A pool made before migrations were numbered holds version 1's tables (its
    ``meta.schema_version`` says 1), perhaps without the dead-letter columns that those releases
    added at every start. Add them, so that 0001's ``IF NOT EXISTS`` statements complete the
    pool and record it; a new file has none of these tables and skips all of this."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "meta" in tables:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None and int(row[0]) != 1:
            raise PoolError(f"pool schema version {row[0]} is unknown to this aggregator")
        db.execute("DELETE FROM meta WHERE key = 'schema_version'")  # schema_migrations rules
    if "dead_letters" in tables:
        columns = {r[1] for r in db.execute("PRAGMA table_info(dead_letters)")}
        for column, kind in (
            ("message_sha256", "TEXT"),
            ("payload_size", "INTEGER"),
            ("payload_sha256", "TEXT"),
        ):
            if column not in columns:
                db.execute(f"ALTER TABLE dead_letters ADD COLUMN {column} {kind}")
    if tables - {"schema_migrations"}:
        log.info("pool made before numbered migrations: bringing it to version 1")


def _statements(sql: str) -> list[str]:
    """One SQL file as its statements: ``executescript`` would commit the transaction first.
    ``sqlite3.complete_statement`` knows where one ends (semicolons in comments, strings and
    trigger bodies included)."""
    out: list[str] = []
    current = ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip() and not all(
        s.strip().startswith("--") or not s.strip() for s in current.splitlines()
    ):
        raise PoolError(f"an unfinished SQL statement at the end of a migration: {current!r}")
    return out
