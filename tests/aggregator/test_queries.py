"""The read model on both pool backends: the seam (``pool/reader.py``) and every question of
``pool/queries.py`` answering the same on an SQLite file and on PostgreSQL."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from aggregator.pool.reader import PgReader, is_pg, is_pool_url, open_reader, pg_sql, read_errors

from .conftest import PoolBackend


def test_placeholders_become_psycopg_ones_outside_quotes_and_percent_is_doubled() -> None:
    assert pg_sql("SELECT a FROM t WHERE b = ? AND c IN (?, ?)") == (
        "SELECT a FROM t WHERE b = %s AND c IN (%s, %s)"
    )
    assert pg_sql("SELECT '?', \"x?\" WHERE d LIKE 'a%' AND e = ?") == (
        "SELECT '?', \"x?\" WHERE d LIKE 'a%%' AND e = %s"
    )
    assert pg_sql("SELECT 'it''s ?', ?") == "SELECT 'it''s ?', %s"


def test_a_url_names_postgresql_and_anything_else_a_sqlite_file(tmp_path: Path) -> None:
    assert is_pool_url("postgresql://u@h/db")
    assert is_pool_url("postgres://h/db")
    assert not is_pool_url(tmp_path / "pool.db")
    assert not is_pool_url(str(tmp_path / "p.db"))
    assert sqlite3.Error in read_errors()


def test_rows_read_the_same_on_both_backends(pool_backend: PoolBackend) -> None:
    """Rows answer by position, by column name (any case) and with their column names, as
    ``sqlite3.Row`` does; a missing name raises IndexError on both."""
    pool_backend.writer()  # makes (migrates) the pool
    with closing(open_reader(pool_backend.target)) as db:
        assert is_pg(db) is pool_backend.is_postgres
        sql = "SELECT ? AS a, ? AS b, 'x%' LIKE ? AS c"
        row = db.execute(sql, (7, "seven", "x%")).fetchone()
        assert row[0] == 7
        assert row["b"] == "seven"
        assert row["A"] == 7
        assert row.keys() == ["a", "b", "c"]
        assert list(row)[:2] == [7, "seven"]
        assert len(row) == 3
        assert dict(zip(row.keys(), row, strict=True))["b"] == "seven"
        with pytest.raises(IndexError):
            row["nope"]
        rows = db.execute("SELECT count(*) AS n FROM events WHERE id > ?", (0,)).fetchall()
        assert [r["n"] for r in rows] == [0]
        assert [tuple(r) for r in db.execute("SELECT 1 UNION ALL SELECT 2 ORDER BY 1")] == [
            (1,),
            (2,),
        ]


def test_a_pg_reader_is_read_only_and_the_writer_has_one(pool_backend: PoolBackend) -> None:
    pool = pool_backend.writer()
    reader = pool.reader  # type: ignore[attr-defined]  # both adapters have one
    assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    if pool_backend.is_postgres:
        assert isinstance(reader, PgReader)
        import psycopg

        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            reader.execute("DELETE FROM events")
        # the reader answers again after a refused statement (autocommit: nothing pending)
        assert reader.execute("SELECT 1").fetchall()[0][0] == 1
