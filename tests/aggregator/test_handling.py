"""Longgang 8.6 handling metrics over a real pool file: handling rate, on-time rate, overdue."""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path

import pytest

from aggregator.cli import main
from aggregator.pool.handling import GroupBy, Handling, handling_stats
from aggregator.pool.sqlite import LifecycleWriter, connect
from contract import EventStatus, Outcome

from .conftest import grid_in_community, interior, make_alert
from .test_pool import Harness, sqlite_backend


def test_counting_rules() -> None:
    h = Handling("fire")
    now = 1000.0
    h.add(closed_at=150.0, registered_at=100.0, deadline_at=200.0, now=now)  # on time
    h.add(closed_at=400.0, registered_at=100.0, deadline_at=200.0, now=now)  # late
    h.add(closed_at=None, registered_at=100.0, deadline_at=200.0, now=now)  # overdue
    h.add(closed_at=None, registered_at=900.0, deadline_at=2000.0, now=now)  # not due yet
    assert (h.registered, h.closed, h.closed_on_time, h.open, h.overdue) == (4, 2, 1, 2, 1)
    assert h.handling_rate == pytest.approx(2 / 4)
    assert h.due == 3  # the event whose deadline is ahead is not late yet
    assert h.on_time_rate == pytest.approx(1 / 3)
    assert h.median_close_s == pytest.approx(175.0)
    empty = Handling("none")
    assert (empty.handling_rate, empty.on_time_rate, empty.median_close_s) == (None, None, None)


def _stats(
    path: Path, by: GroupBy, now: float, where: tuple[str, ...] = (), params: tuple[str, ...] = ()
) -> tuple[Handling, dict[str, Handling]]:
    with closing(connect(path, readonly=True)) as db:
        total, groups = handling_stats(db, by, now, where=where, params=params)
    return total, {g.key: g for g in groups}


def test_rates_and_overdue_by_department_type_and_community(tmp_path: Path) -> None:
    h = Harness(sqlite_backend(tmp_path))  # the file-level lifecycle writer and CLI
    sent = [
        ("smoke_fire", 0, 1),  # fire, deadline 15 min
        ("smoke_fire", 0, 9),
        ("exposed_garbage", 0, 2),  # enforcement, deadline 24 h
        ("exposed_garbage", 1, 3),
        ("fire_lane_occupied", 2, 4),  # police, deadline 1 h
    ]
    for seq, (type_, community, grid) in enumerate(sent):
        alert = make_alert(
            f"cam-{seq}", *interior(grid_in_community(community, grid)), type=type_, seq=seq
        )
        assert h.send(alert) == [Outcome.ACCEPTED]
    events = h.rows("SELECT id, type FROM events ORDER BY id")
    assert len(events) == 5
    fire_ids = [i for i, t in events if t == "smoke_fire"]
    garbage_ids = [i for i, t in events if t == "exposed_garbage"]
    writer = LifecycleWriter(h.pool.path)
    try:
        writer.set_status(fire_ids[0], EventStatus.CLOSED, "fire", "extinguished")
        writer.set_status(garbage_ids[0], EventStatus.HANDLING, "enforcement")
    finally:
        writer.close()

    # Now: nothing is late; only the closed event is due.
    total, by_dept = _stats(h.pool.path, GroupBy.DEPARTMENT, time.time())
    assert (total.registered, total.closed, total.closed_on_time, total.overdue) == (5, 1, 1, 0)
    assert total.handling_rate == pytest.approx(1 / 5)
    assert total.on_time_rate == pytest.approx(1.0)
    assert set(by_dept) == {"fire", "enforcement", "police"}
    assert (by_dept["fire"].registered, by_dept["fire"].closed) == (2, 1)
    assert by_dept["police"].on_time_rate is None  # nothing due yet
    assert by_dept["fire"].median_close_s is not None

    # Two hours on: the open fire and fire-lane events are past their deadlines, the garbage
    # (24 h) is not, though one is being handled.
    later = time.time() + 2 * 3600
    total, by_type = _stats(h.pool.path, GroupBy.TYPE, later)
    assert total.overdue == 2
    assert (by_type["smoke_fire"].overdue, by_type["smoke_fire"].due) == (1, 2)
    assert by_type["smoke_fire"].on_time_rate == pytest.approx(1 / 2)
    assert by_type["fire_lane_occupied"].overdue == 1
    assert by_type["exposed_garbage"].overdue == 0
    assert by_type["exposed_garbage"].open == 2

    # Grouped by community, and narrowed to one community as an operator's scope narrows it.
    community_a = grid_in_community(0, 1).code[:12]
    _, by_community = _stats(h.pool.path, GroupBy.COMMUNITY, later)
    assert by_community[community_a].registered == 3
    total_a, _ = _stats(
        h.pool.path,
        GroupBy.GRID,
        later,
        ("substr(e.grid_code, 1, 12) = ?",),
        (community_a,),
    )
    assert (total_a.registered, total_a.closed, total_a.overdue) == (3, 1, 1)


def test_an_empty_pool_has_no_rates(tmp_path: Path) -> None:
    h = Harness(sqlite_backend(tmp_path))  # the file-level lifecycle writer and CLI
    total, groups = _stats(h.pool.path, GroupBy.DEPARTMENT, time.time())
    assert (total.registered, total.handling_rate, total.on_time_rate) == (0, None, None)
    assert groups == {}


def test_cli_prints_the_table_per_type_and_refuses_a_missing_pool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    h = Harness(sqlite_backend(tmp_path))  # the file-level lifecycle writer and CLI
    for seq, grid in enumerate((1, 9)):
        alert = make_alert(f"cam-{seq}", *interior(grid_in_community(0, grid)), seq=seq)
        assert h.send(alert) == [Outcome.ACCEPTED]
    writer = LifecycleWriter(h.pool.path)
    try:
        writer.set_status(1, EventStatus.CLOSED, "fire", "extinguished")
    finally:
        writer.close()
    assert main(["handling", "--data-dir", str(tmp_path), "--by", "type", "--days", "1"]) == 0
    out = capsys.readouterr().out
    [smoke] = [line for line in out.splitlines() if "smoke_fire" in line]
    assert "烟火" in smoke
    assert [c.strip() for c in smoke.split("│")[3:8]] == ["2", "1", "50%", "1", "100%"]
    [total] = [line for line in out.splitlines() if " all " in line]
    assert "50%" in total
    with pytest.raises(SystemExit, match="no event pool"):
        main(["handling", "--data-dir", str(tmp_path / "elsewhere")])
