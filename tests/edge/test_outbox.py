"""The outbox on a real SQLite file: seq, delivery marks, restarts, overflow policy, counters."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from contract import AlertV1, Location, Severity, new_alert_id, utcnow
from edge.outbox import Outbox, OutboxError

HERE = Location(lat=27.55, lon=120.55)


def builder(type_code: str = "noise_over_limit", severity: Severity = Severity.MEDIUM):  # type: ignore[no-untyped-def]
    def build(seq: int) -> AlertV1:
        return AlertV1(
            alert_id=new_alert_id("dev-1"),
            device_id="dev-1",
            seq=seq,
            type=type_code,
            severity=severity,
            confidence=0.9,
            observed_at=utcnow(),
            location=HERE,
        )

    return build


def test_seq_is_monotonic_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    seqs = [box.enqueue(builder())[0].seq for _ in range(3)]
    assert seqs == [0, 1, 2]
    box.mark_delivered([0, 1, 2])
    box.close()

    box = Outbox(path, keep_delivered=0)
    alert, result = box.enqueue(builder())
    assert alert.seq == result.seq == 3
    assert [p.seq for p in box.pending()] == [3]
    box.mark_delivered([3])
    # Every delivered row is pruned (keep_delivered=0), yet the seq keeps counting.
    assert box.stats().delivered == 0
    assert box.enqueue(builder())[0].seq == 4
    box.close()


def test_pending_in_seq_order_until_delivered(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    alerts = [box.enqueue(builder())[0] for _ in range(5)]
    pending = box.pending()
    assert [p.seq for p in pending] == [0, 1, 2, 3, 4]
    assert AlertV1.model_validate_json(pending[2].payload) == alerts[2]
    assert [p.seq for p in box.pending(after_seq=2, limit=1)] == [3]
    box.mark_delivered([1, 3])
    box.mark_delivered([1])  # a duplicate PUBACK changes nothing
    assert [p.seq for p in box.pending()] == [0, 2, 4]
    stats = box.stats()
    assert (stats.depth, stats.delivered, stats.next_seq) == (3, 2, 5)
    box.close()


def test_builder_must_use_the_allocated_seq(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    with pytest.raises(OutboxError):
        box.enqueue(lambda seq: builder()(seq + 7))
    # The failed transaction allocated nothing.
    assert box.enqueue(builder())[0].seq == 0
    box.close()


LOW, MED, HIGH, CRIT = Severity.LOW, Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL


@pytest.mark.parametrize(
    ("queued", "new", "remaining", "new_stored"),
    [
        # the lowest severity goes first, the oldest within it
        ([HIGH, LOW, MED, LOW], MED, [HIGH, MED, LOW, MED], True),
        # a new alert less severe than everything queued is itself the one dropped
        ([HIGH, HIGH, CRIT, MED], LOW, [HIGH, HIGH, CRIT, MED], False),
        # same severity: the oldest makes room for the newest
        ([MED, MED, MED, MED], MED, [MED, MED, MED, MED], True),
        # critical alerts are never dropped to make room for a lesser alert...
        ([CRIT, CRIT, CRIT, CRIT], HIGH, [CRIT, CRIT, CRIT, CRIT], False),
        # ...the lesser ones go first when a critical arrives...
        ([CRIT, HIGH, CRIT, LOW], CRIT, [CRIT, HIGH, CRIT, CRIT], True),
        # ...and when only criticals remain the outbox grows rather than lose one
        ([CRIT, CRIT, CRIT, CRIT], CRIT, [CRIT, CRIT, CRIT, CRIT, CRIT], True),
    ],
)
def test_overflow_policy(
    tmp_path: Path,
    queued: list[Severity],
    new: Severity,
    remaining: list[Severity],
    new_stored: bool,
) -> None:
    box = Outbox(tmp_path / "o.db", max_rows=4)
    for sev in queued:
        box.enqueue(builder(severity=sev))
    _, result = box.enqueue(builder(severity=new))
    assert result.stored is new_stored
    left = [AlertV1.model_validate_json(p.payload).severity for p in box.pending()]
    assert left == remaining
    stats = box.stats()
    assert stats.dropped_total == len(queued) + 1 - len(remaining)
    assert stats.overflow_grown == (1 if len(remaining) > 4 else 0)
    box.close()


def test_drop_counters_per_type_and_severity_persist(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, max_rows=2)
    box.enqueue(builder("noise_over_limit", LOW))
    box.enqueue(builder("noise_over_limit", LOW))
    box.enqueue(builder("gas_leak", CRIT))  # evicts the oldest low noise alert
    box.enqueue(builder("water_level", HIGH))  # evicts the other low one
    box.enqueue(builder("noise_over_limit", LOW))  # less severe than all: dropped itself
    box.close()

    box = Outbox(path, max_rows=2)
    stats = box.stats()
    assert stats.dropped == {("noise_over_limit", "low"): 3}
    assert stats.dropped_total == box.dropped_total() == 3
    assert [AlertV1.model_validate_json(p.payload).type for p in box.pending()] == [
        "gas_leak",
        "water_level",
    ]
    box.close()


def test_delivered_rows_do_not_count_against_the_limit(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_rows=2)
    for _ in range(2):
        box.enqueue(builder())
    box.mark_delivered([0, 1])
    for _ in range(2):
        assert box.enqueue(builder())[1].stored
    assert box.stats().dropped_total == 0
    box.close()


def test_byte_limit(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_rows=1000, max_bytes=1024)
    size = len(builder()(0).to_json())
    n = 1024 // size
    for _ in range(n + 3):
        box.enqueue(builder())
    stats = box.stats()
    assert stats.depth == n
    assert stats.depth_bytes <= 1024
    assert stats.dropped_total == 3
    # the survivors are the newest ones
    assert [p.seq for p in box.pending()] == list(range(3, n + 3))
    box.close()


def test_a_puback_only_moves_an_alert_to_awaiting_feedback(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", feedback_timeout_s=30)
    alerts = [box.enqueue(builder())[0] for _ in range(4)]
    box.mark_acked([0, 1, 2])
    # Acknowledged by the broker: no longer sent on a new connection, but still undelivered.
    assert [p.seq for p in box.pending()] == [3]
    stats = box.stats()
    assert (stats.depth, stats.awaiting_feedback, box.unsent()) == (4, 3, 1)
    # Feedback (any outcome) names the alert_id; an unknown id changes nothing.
    assert box.mark_confirmed([alerts[1].alert_id, "dev-1-unknown"]) == 1
    assert box.mark_confirmed([alerts[1].alert_id]) == 0  # the same answer twice
    # Feedback may come before the PUBACK is handled: the late PUBACK does not revive it.
    assert box.mark_confirmed([alerts[3].alert_id]) == 1
    box.mark_acked([3])
    stats = box.stats()
    assert (stats.depth, stats.awaiting_feedback, stats.delivered) == (2, 2, 2)
    # Nothing is overdue before the timeout.
    assert box.due() == []
    box.close()


def test_overdue_alerts_are_resent_with_a_growing_wait(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, feedback_timeout_s=10)
    alerts = [box.enqueue(builder())[0] for _ in range(3)]
    box.mark_acked([0, 1, 2])
    t0 = time.time()
    assert box.due(now=t0 + 5) == []
    due = box.due(now=t0 + 11)
    assert [(p.seq, p.alert_id) for p in due] == [(a.seq, a.alert_id) for a in alerts]
    box.mark_resending([0, 1])
    # Being resent: unsent again (a reconnect before its PUBACK replays it), counted.
    assert [p.seq for p in box.pending()] == [0, 1]
    assert [p.seq for p in box.due(now=t0 + 11)] == [2]
    assert box.stats().resent == box.resent_total() == 2
    box.mark_acked([0, 1])
    t1 = time.time()
    # The second wait is twice the first.
    assert [p.seq for p in box.due(now=t1 + 15)] == [2]  # 0 and 1 now wait 20 s
    assert [p.seq for p in box.due(now=t1 + 21)] == [0, 1, 2]
    box.close()
    # The counter and the states survive a restart.
    box = Outbox(path, feedback_timeout_s=10)
    assert box.resent_total() == 2
    assert box.pending() == []
    assert box.stats().awaiting_feedback == 3
    box.close()


def test_an_outbox_made_before_feedback_tracking_gains_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE alerts (seq INTEGER PRIMARY KEY, alert_id TEXT NOT NULL UNIQUE,"
        " type TEXT NOT NULL, severity TEXT NOT NULL, sev_rank INTEGER NOT NULL,"
        " payload BLOB NOT NULL, size INTEGER NOT NULL, created_at REAL NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0, delivered_at REAL);"
        "INSERT INTO alerts (seq, alert_id, type, severity, sev_rank, payload, size, created_at)"
        " VALUES (0, 'dev-1-a', 'noise_over_limit', 'medium', 1, x'7b7d', 2, 0);"
    )
    db.commit()
    db.close()
    box = Outbox(path)
    assert [p.alert_id for p in box.pending()] == ["dev-1-a"]  # replayed as unsent
    box.mark_acked([0])
    assert box.stats().awaiting_feedback == 1
    box.close()
