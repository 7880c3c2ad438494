"""The read model on both pool backends: the seam (``pool/reader.py``) and every question of
``pool/queries.py`` answering the same on an SQLite file and on PostgreSQL."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from aggregator.ingest.assemble import Inbound, Pipeline
from aggregator.ingest.decode import DecodeLimits
from aggregator.pool import queries
from aggregator.pool.handling import GroupBy, Handling
from aggregator.pool.model import Batch, StatusIn
from aggregator.pool.port import PoolWriter
from aggregator.pool.postgres import PgEventPool
from aggregator.pool.reader import (
    PgReader,
    Reader,
    Row,
    is_pg,
    is_pool_url,
    open_reader,
    pg_sql,
    read_errors,
)
from aggregator.pool.snapshots import SnapshotStore
from aggregator.pool.sqlite import EventPool
from contract import AlertV1, EventStatus, Topics, default_catalogue

from .conftest import (
    GRIDS,
    OUTSIDE,
    PoolBackend,
    grid_in_community,
    interior,
    jpeg,
    make_alert,
    offset,
    past,
)


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
    assert is_pool_url("POSTGRESQL://u@h/db")  # the scheme is case-insensitive, as in Settings
    assert is_pool_url("Postgres://h/db")
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


# ---------------------------------------------------------------------- one pool, two backends

TOPICS = Topics("cwg")
CATALOGUE = default_catalogue()
# Columns whose values are the clock at commit (registration, a step, a batch's commit): they
# differ between two pools filled one after the other. Compared by type only.
VOLATILE = frozenset(
    {"registered_at", "updated_at", "deadline_at", "closed_at", "committed_at", "started_at",
     "at", "sort_value"}
)  # fmt: skip
FIRE = "fire"  # smoke_fire's department


def _batches(tmp: Path) -> list[Batch]:
    """Four micro-batches made once (the same objects go to both pools): merges, a duplicate,
    out-of-area, dead letters, a device status, several types, departments and communities."""
    pipeline = Pipeline(TOPICS, CATALOGUE, GRIDS, SnapshotStore(tmp / "snaps"), DecodeLimits())

    def batch(*alerts: AlertV1, raw: tuple[tuple[str, bytes], ...] = ()) -> Batch:
        now = time.time()
        msgs = [Inbound(TOPICS.alert(a.device_id), a.to_json(), now) for a in alerts]
        msgs += [Inbound(topic, payload, now) for topic, payload in raw]
        return pipeline.assemble(msgs).batch

    g0, g1, g2 = (interior(grid_in_community(n, 3)) for n in (0, 1, 2))
    a = make_alert("cam-1", *g0, observed_at=past(900), snapshot=jpeg(1), confidence=0.6,
                   alert_id="cam-1-a")  # fmt: skip
    b = make_alert("cam-2", *offset(*g0, north_m=60), observed_at=past(600), confidence=0.9,
                   snapshot=jpeg(2), severity="critical", alert_id="cam-2-b")  # fmt: skip
    batches = [
        batch(
            a,
            a,
            make_alert("cam-3", *OUTSIDE, alert_id="cam-3-out"),
            raw=((TOPICS.alert("cam-7"), b'{"schema": "alert/v1"'),),
        ),
        batch(
            b,
            make_alert("cam-4", *g1, type="crowd_gathering", alert_id="cam-4-c"),
            make_alert(
                "cam-5", *g2, type="fire_lane_occupied", observed_at=past(300), alert_id="cam-5-d"
            ),
        ),
        batch(
            make_alert("cam-6", *g1, type="street_vending", alert_id="cam-6-e", seq=3),
            make_alert("cam-1", *g0, observed_at=past(1700), seq=2, alert_id="cam-1-f"),
            raw=((TOPICS.alert("cam-8"), b"not json"), (TOPICS.alert("cam-7"), b"[1, 2]")),
        ),
    ]
    batches[0].statuses.append(StatusIn("cam-1", "online", None, time.time(), "camera", "{}"))
    return batches


def _fill(pool: PoolWriter, batches: list[Batch]) -> None:
    for batch in batches[:3]:
        pool.commit_batch(batch)
    pool.set_status(2, EventStatus.VERIFIED, "op", "seen")
    pool.set_status(3, EventStatus.CLOSED, "op", "cleared")


def _later(tmp: Path) -> Batch:
    """After the steps: the fire lane blocked again opens a recurrence of the closed event."""
    pipeline = Pipeline(TOPICS, CATALOGUE, GRIDS, SnapshotStore(tmp / "snaps"), DecodeLimits())
    g2 = interior(grid_in_community(2, 3))
    again = make_alert("cam-5", *g2, type="fire_lane_occupied", seq=2, alert_id="cam-5-g")
    return pipeline.assemble([Inbound(TOPICS.alert("cam-5"), again.to_json(), time.time())]).batch


def _v(key: str, value: Any) -> Any:
    """A value as compared across backends: its type always, the value unless the clock set it."""
    return (type(value).__name__, "*" if key in VOLATILE else value)


def _row(row: Row) -> dict[str, Any]:
    names = row.keys()  # (iterating a row gives its values, as sqlite3.Row)
    return {k: _v(k, row[k]) for k in names}


def _rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [_row(r) for r in rows]


def _handling(h: Handling) -> tuple[Any, ...]:
    return (h.key, h.registered, h.closed, h.closed_on_time, h.overdue, len(h.close_seconds))


def _answers(db: Reader) -> dict[str, Any]:
    """Every question of the read model, asked of one pool, as comparable values."""
    now = time.time()
    everything = queries.EVERYTHING
    fire: queries.Scope = ("e.department = ?", [FIRE])
    community = GRIDS.communities()[0].code
    area: queries.Scope = (f"substr(e.grid_code, 1, {len(community)}) = ?", [community])
    ids = queries.event_ids(db)
    out: dict[str, Any] = {"ids": ids}
    out["summaries"] = [
        {k: _v(k, v) for k, v in s.model_dump().items()}
        for s in queries.event_summaries(db, ids, CATALOGUE)
    ]
    out["summary_dicts"] = [
        {k: _v(k, v) for k, v in s.items()} for s in queries.event_summary_dicts(db, ids, CATALOGUE)
    ]
    filters = {
        "all": queries.EventFilter(),
        "open": queries.EventFilter(open_only=True),
        "status": queries.EventFilter(statuses=["registered", "verified"]),
        "types": queries.EventFilter(types=["smoke_fire", "street_vending"]),
        "severity": queries.EventFilter(severities=["critical", "low"]),
        "grid": queries.EventFilter(grid_prefix=community),
        "department": queries.EventFilter(department="police"),
        "device": queries.EventFilter(device_id="cam-2"),
        "window": queries.EventFilter(since=now - 1000, until=now + 60),
        "empty": queries.EventFilter(since=now + 3600),
    }
    for name, f in filters.items():
        for scope_name, scope in (("all", everything), ("fire", fire), ("area", area)):
            rows = queries.list_events(db, scope, f)
            out[f"list/{name}/{scope_name}"] = _rows(rows)
    for sort in sorted(queries.SORT_KEYS):
        for descending in (True, False):
            pages: list[list[int]] = []
            after: tuple[float, int] | None = None
            for _ in range(10):  # bounded: five events, two a page
                f = queries.EventFilter(sort=sort, descending=descending, after=after, limit=2)
                page = queries.list_events(db, everything, f)
                if not page:
                    break
                pages.append([r["id"] for r in page])
                after = (page[-1]["sort_value"], page[-1]["id"])
            out[f"pages/{sort}/{descending}"] = pages
    out["devices_of"] = queries.devices_of(db, ids)
    for eid in ids:
        for scope_name, scope in (("all", everything), ("fire", fire), ("area", area)):
            row = queries.scoped_event(db, scope, eid)
            out[f"event/{eid}/{scope_name}"] = None if row is None else _row(row)
        out[f"alerts/{eid}"] = _rows(queries.event_alerts(db, eid, 10))
        out[f"event_devices/{eid}"] = _rows(queries.event_devices(db, eid))
        out[f"snapshots/{eid}"] = sorted(queries.event_snapshots(db, eid))
        out[f"log/{eid}"] = _rows(queries.event_log(db, eid))
    shas = sorted({s for eid in ids for s in queries.event_snapshots(db, eid)})
    for scope_name, scope in (("all", everything), ("fire", fire), ("area", area)):
        out[f"scoped_devices/{scope_name}"] = sorted(queries.scoped_device_ids(db, scope))
        out[f"scoped_snapshot/{scope_name}"] = [
            queries.scoped_snapshot(db, scope, s) for s in [*shas, "0" * 64]
        ]
        out[f"grid_counts/{scope_name}"] = queries.grid_counts(db, scope)
        for window in ((None, None), (now - 3600, now + 60), (now + 60, None)):
            stats = queries.EventStats(db, scope, None, *window)
            key = f"stats/{scope_name}/{window[0] is None}/{window[1] is None}"
            out[key + "/totals"] = _v("", stats.totals(now + 7200))  # all past their deadline
            out[key + "/totals_now"] = stats.totals(now)
            out[key + "/by"] = [
                stats.by_type(),
                stats.by_status(),
                stats.by_severity(),
                stats.by_grid(),
                stats.by_area(len(community)),
                stats.by_hour(),
            ]
            for by in GroupBy:
                total, groups = stats.handling(by, now + 7200)
                out[f"{key}/handling/{by}"] = [_handling(total), *map(_handling, groups)]
        grid_stats = queries.EventStats(db, scope, community)
        out[f"stats/{scope_name}/grid"] = [grid_stats.totals(now), grid_stats.by_type()]
    out["devices"] = _rows(queries.devices(db))
    out["device_state"] = [queries.device_state(db, d) for d in ("cam-1", "cam-2", "nobody")]
    out["dead_letters"] = [
        _rows(queries.dead_letters(db)),
        _rows(queries.dead_letters(db, oldest_first=True, limit=2)),
        _rows(queries.dead_letters(db, device_id="cam-7")),
        _rows(queries.dead_letters(db, reason="invalid_json")),
        _rows(queries.dead_letters(db, before_id=3)),
    ]
    first = queries.dead_letter(db, 1)
    out["dead_letter"] = [None if first is None else _row(first), queries.dead_letter(db, 99)]
    queries.ping(db)
    out["latest"] = [
        _rows(queries.latest_events(db)),
        _rows(queries.latest_events(db, type_="smoke_fire", by_update=True)),
        _rows(queries.latest_events(db, grid_prefix=community, status="registered", limit=1)),
    ]
    out["pool_counts"] = queries.pool_counts(db)
    out["event_ids"] = [
        queries.event_ids(db, type_="smoke_fire"),
        queries.event_ids(db, grid_prefix=community),
        queries.event_ids(db, device_id="cam-5"),
    ]
    out["alert_count"] = [
        queries.alert_count(db),
        queries.alert_count(db, "cam-1-%"),
        queries.alert_count(db, "cam-%"),
        queries.alert_count(db, "%-b"),
        queries.alert_count(db, "cam-2-b"),
        queries.alert_count(db, "cam-9%"),
    ]
    out["out_of_area"] = [_rows(queries.out_of_area(db)), _rows(queries.out_of_area(db, "x"))]
    out["latencies"] = sorted(type(x).__name__ for x in queries.latencies(db))
    out["latencies_like"] = len(queries.latencies(db, "cam-1-%"))
    span = queries.commit_span(db)
    out["commit_span"] = None if span is None else [type(x).__name__ for x in span]
    out["commit_span_none"] = queries.commit_span(db, "nothing%")
    with queries.snapshot(db):
        out["marks"] = queries.feed_marks(db)
        out["last_alert"] = queries.last_alert_rowid(db)
        out["changed"] = queries.changed_events(db, 0, 100)
        out["changed_after"] = queries.changed_events(db, out["marks"][0] - 1, 100)
        out["alerts_after"] = _rows(queries.alerts_after(db, 0, 100))
        out["alerts_after_2"] = _rows(queries.alerts_after(db, 2, 2))
        out["out_of_area_after"] = [
            len(queries.out_of_area_after(db, 0.0, 100)),
            queries.out_of_area_after(db, now + 60, 100),
        ]
    return out


def test_every_question_answers_the_same_on_sqlite_and_postgresql(
    pg_url: str, tmp_path: Path
) -> None:
    """The same batches and steps go to an SQLite pool and a PostgreSQL pool; every question
    of the read model gets the same answer from both, value and Python type (times set by the
    clock at commit by type only)."""
    batches = _batches(tmp_path)
    lite = EventPool(tmp_path / "pool.db", CATALOGUE)
    pg = PgEventPool(pg_url, CATALOGUE)
    try:
        for pool in (lite, pg):
            _fill(pool, batches)
        later = _later(tmp_path)
        lite.commit_batch(later)
        pg.commit_batch(later)
        with closing(open_reader(tmp_path / "pool.db")) as a, closing(open_reader(pg_url)) as b:
            assert not is_pg(a)
            assert is_pg(b)
            on_sqlite, on_pg = _answers(a), _answers(b)
    finally:
        lite.close()
        pg.close()
    assert on_sqlite.keys() == on_pg.keys()
    differ = [k for k in on_sqlite if on_sqlite[k] != on_pg[k]]
    assert not differ, {k: (on_sqlite[k], on_pg[k]) for k in differ[:3]}
    # and the answers say something: the pool holds what the batches made
    assert on_sqlite["ids"] == [1, 2, 3, 4, 5]
    assert on_sqlite["pool_counts"] == queries.PoolCounts(
        events=5, alerts=7, merged=2, out_of_area=1, dead_letters=3, devices_online=1
    )
    assert on_sqlite["pages/registered_at/True"] == [[5, 4], [3, 2], [1]]
    assert on_sqlite["pages/severity/False"] == [[4, 2], [3, 5], [1]]
    assert on_sqlite["stats/all/True/True/handling/department"][:2] == [
        ("all", 5, 1, 1, 4, 1),
        ("police", 3, 1, 1, 2, 1),
    ]
    assert on_sqlite["alert_count"] == [7, 2, 7, 1, 1, 0]
    assert on_sqlite["changed_after"] == [(5, 6)]
    assert on_sqlite["latest"][0][0]["devices"] == ("str", "cam-5")


def test_a_pg_reader_whose_session_the_server_ended_answers_again(pg_url: str) -> None:
    """A question asked on its own after the server ended the session is asked again on a new
    one; inside a snapshot the broken link raises one of ``read_errors()`` (a consistent read
    cannot be continued on another session), and the next question gets a new session."""
    import psycopg

    def end_session() -> int:
        pid = int(reader.execute("SELECT pg_backend_pid()").fetchall()[0][0])
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return pid

    reader = PgReader(pg_url)
    try:
        assert reader.execute("SELECT count(*) FROM events").fetchall()[0][0] == 0
        pid = end_session()
        row = reader.execute("SELECT pg_backend_pid() AS pid").fetchall()[0]
        assert row["pid"] != pid
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        pid = end_session()  # inside the transaction: not asked again elsewhere
        with pytest.raises(read_errors()):
            queries.feed_marks(reader)
        assert reader.execute("SELECT pg_backend_pid()").fetchall()[0][0] != pid
        with queries.snapshot(reader):
            assert queries.feed_marks(reader) == (0, 0)
    finally:
        reader.close()
