"""Poison messages: each kind that once stopped ingest for every device, on a real broker and pool.

Each test sends the poison, checks that it becomes a dead letter with a reason (or, for a fault of
the pool itself, waits unacknowledged until the pool is fixed), that the device is told, that the
MQTT I/O process was never restarted, and that a valid alert sent afterwards lands.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.config import DeadLetterSettings
from aggregator.grids import Grid, GridIndex, default_grid_file
from aggregator.ingest.decode import DecodeLimits, Rejection, decode_alert
from aggregator.ingest.worker import is_pool_fault
from aggregator.service import Aggregator, build_aggregator
from contract import AlertV1, FeedbackV1, Outcome, RejectReason, default_catalogue

from .conftest import (
    GRIDS,
    OUTSIDE,
    aggregator_settings,
    alert_dict,
    count,
    grid_in_community,
    interior,
    jpeg,
    make_alert,
    pool,
    wait_until,
)

CAM = "cam-001"


def device(broker: Any, device_id: str = CAM) -> Any:
    client = broker.client(device_id)
    client.subscribe(broker.topics.feedback(device_id))
    return client


def io_restarts(agg: Aggregator) -> int:
    """How often the MQTT I/O loop was started again after it ended (0: never)."""
    incarnation: int = agg.ingest._transport._incarnation  # type: ignore[attr-defined]
    return incarnation - 1


def feedback(client: Any, n: int = 1, timeout: float = 10) -> list[FeedbackV1]:
    got: list[FeedbackV1] = client.expect_feedback(n, timeout)
    return got


def then_a_valid_alert_lands(broker: Any, agg: Aggregator, client: Any) -> None:
    good = make_alert(CAM, *interior(grid_in_community(0)), seq=7)
    client.publish(broker.topics.alert(CAM), good.to_json())
    [fb] = feedback(client)
    assert (fb.alert_id, fb.outcome) == (good.alert_id, Outcome.ACCEPTED)
    assert io_restarts(agg) == 0


def with_raw(d: dict[str, Any], **raw: bytes) -> bytes:
    """``d`` as JSON with fields whose value is the given raw JSON text (NaN, 1e400 …)."""
    body = orjson.dumps(d)[:-1]
    for key, text in raw.items():
        body += b',"%s":%s' % (key.encode(), text)
    return body + b"}"


def in_evidence(d: dict[str, Any], text: bytes) -> bytes:
    """``d`` with ``evidence.dwell_s`` … replaced by raw JSON text."""
    d = {**d, "evidence": {"detector": "test", "extra_number": 1}}
    return orjson.dumps(d).replace(b'"extra_number":1', b'"extra_number":' + text)


TIMES = ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"]


@pytest.mark.parametrize("observed_at", TIMES)
def test_time_whose_utc_form_overflows_is_rejected_and_io_survives(
    observed_at: str, broker: Any, aggregator: Aggregator
) -> None:
    cam = device(broker)
    d = alert_dict(CAM, seq=41)
    d["observed_at"] = observed_at
    cam.publish(broker.topics.alert(CAM), orjson.dumps(d))
    [fb] = feedback(cam)
    assert fb.outcome is Outcome.REJECTED
    assert fb.reason is RejectReason.SCHEMA_VIOLATION, fb.detail
    assert fb.detail is not None
    assert "UTC" in fb.detail
    assert (fb.alert_id, fb.seq) == (d["alert_id"], 41)
    then_a_valid_alert_lands(broker, aggregator, cam)


def test_seq_beyond_64_bits_is_rejected(broker: Any, aggregator: Aggregator) -> None:
    cam = device(broker)
    d = alert_dict(CAM)
    d["seq"] = 2**63
    cam.publish(broker.topics.alert(CAM), orjson.dumps(d))
    [fb] = feedback(cam)
    assert fb.outcome is Outcome.REJECTED
    assert fb.reason is RejectReason.SCHEMA_VIOLATION, fb.detail
    assert fb.alert_id == d["alert_id"]
    assert fb.seq is None  # not a seq the contract allows: not echoed
    then_a_valid_alert_lands(broker, aggregator, cam)


NUMBERS = {
    "NaN": (b"NaN", RejectReason.INVALID_JSON),
    "Infinity": (b"Infinity", RejectReason.INVALID_JSON),
    "-Infinity": (b"-Infinity", RejectReason.INVALID_JSON),
    "1e400": (b"1e400", RejectReason.SCHEMA_VIOLATION),
    "-1E+400": (b"-1E+400", RejectReason.SCHEMA_VIOLATION),
    "400 digits": (b"9" * 400, RejectReason.SCHEMA_VIOLATION),
    "2^64": (str(2**64).encode(), RejectReason.SCHEMA_VIOLATION),
    "-2^63-1": (str(-(2**63) - 1).encode(), RejectReason.SCHEMA_VIOLATION),
}


@pytest.mark.parametrize("where", ["unknown field", "evidence", "with a snapshot"])
def test_unrepresentable_numbers_anywhere_are_rejected(
    where: str, broker: Any, aggregator: Aggregator
) -> None:
    cam = device(broker)
    sent: list[tuple[str, RejectReason]] = []
    for n, (text, reason) in enumerate(NUMBERS.values()):
        if where == "evidence":
            d = alert_dict(CAM, seq=n)
            payload = in_evidence(d, text)
        else:
            snap = jpeg(n) if where == "with a snapshot" else None
            d = alert_dict(CAM, seq=n, snapshot=snap)
            payload = with_raw(d, vendor_value=b'[1, {"x": %s}]' % text)
        cam.publish(broker.topics.alert(CAM), payload)
        sent.append((d["alert_id"], reason))
    got = feedback(cam, len(sent))
    assert [(f.alert_id, f.outcome, f.reason) for f in got] == [
        (alert_id, Outcome.REJECTED, reason) for alert_id, reason in sent
    ], [f.detail for f in got]
    assert [f.seq for f in got] == list(range(len(sent)))
    assert count(aggregator, "SELECT COUNT(*) FROM alerts") == 0
    then_a_valid_alert_lands(broker, aggregator, cam)


def test_nan_latitude_leaves_the_alert_id_and_seq_readable(
    broker: Any, aggregator: Aggregator
) -> None:
    cam = device(broker)
    d = alert_dict(CAM, seq=5)
    payload = orjson.dumps(d).replace(
        b'"lat":' + orjson.dumps(d["location"]["lat"]), b'"lat":NaN', 1
    )
    cam.publish(broker.topics.alert(CAM), payload)
    [fb] = feedback(cam)
    assert fb.outcome is Outcome.REJECTED
    assert (fb.alert_id, fb.seq) == (d["alert_id"], 5)


def test_truncated_alert_still_names_its_id(broker: Any, aggregator: Aggregator) -> None:
    cam = device(broker)
    d = alert_dict(CAM, seq=9)
    payload = orjson.dumps(d)
    cam.publish(broker.topics.alert(CAM), payload[: payload.index(b'"location"') + 5])
    [fb] = feedback(cam)
    assert (fb.outcome, fb.reason) == (Outcome.REJECTED, RejectReason.INVALID_JSON)
    assert (fb.alert_id, fb.seq) == (d["alert_id"], 9)


def test_status_and_telemetry_with_poison_are_dead_lettered(
    broker: Any, aggregator: Aggregator
) -> None:
    cam = device(broker)
    status = b'{"schema":"status/v1","device_id":"%s","state":"online","at":"%s"}'
    telemetry = (
        b'{"schema":"telemetry/v1","device_id":"%s","sent_at":"2026-01-01T00:00:00Z",'
        b'"readings":[{"quantity":"noise_db","value":1e400,"unit":"dB"}]}'
    )
    cam.publish(broker.topics.status(CAM), status % (CAM.encode(), TIMES[0].encode()))
    cam.publish(broker.topics.telemetry(CAM), telemetry % CAM.encode())
    got = feedback(cam, 2)
    assert [(f.outcome, f.reason) for f in got] == [
        (Outcome.REJECTED, RejectReason.SCHEMA_VIOLATION),
        (Outcome.REJECTED, RejectReason.SCHEMA_VIOLATION),
    ]
    then_a_valid_alert_lands(broker, aggregator, cam)


def test_feedback_items_come_in_arrival_order_with_seq(broker: Any, aggregator: Aggregator) -> None:
    cam = device(broker)
    lat, lon = interior(grid_in_community(0))
    ids: list[str] = []
    payloads: list[bytes] = []
    for seq in range(30):
        kind = seq % 3
        if kind == 0:
            a = make_alert(CAM, lat, lon, seq=seq)
            payloads.append(a.to_json())
        elif kind == 1:
            d = alert_dict(CAM, seq=seq)
            d["confidence"] = 7.5  # out of range: rejected
            a_id = d["alert_id"]
            payloads.append(orjson.dumps(d))
            ids.append(a_id)
            continue
        else:
            a = make_alert(CAM, *OUTSIDE, seq=seq)
            payloads.append(a.to_json())
        ids.append(a.alert_id)
    cam.publish_many(broker.topics.alert(CAM), payloads)
    got = feedback(cam, 30)
    assert [f.alert_id for f in got] == ids
    assert [f.seq for f in got] == list(range(30))
    expected = [Outcome.ACCEPTED, Outcome.REJECTED, Outcome.OUT_OF_AREA]
    assert all(f.outcome in (expected[i % 3], Outcome.MERGED) for i, f in enumerate(got))


class FailingGrids(GridIndex):
    """Grids whose lookup fails whenever a batch holds one chosen position: a fault of ours
    that only one message triggers, as the bisect must find it."""

    poison: tuple[float, float] = (0.0, 0.0)

    def locate_many(
        self,
        lats: Sequence[float] | np.ndarray[Any, Any],
        lons: Sequence[float] | np.ndarray[Any, Any],
    ) -> list[Grid | None]:
        if any((lat, lon) == self.poison for lat, lon in zip(lats, lons, strict=True)):
            raise RuntimeError("grid lookup failed")
        return super().locate_many(lats, lons)


def test_exception_in_assembly_dead_letters_only_its_message(broker: Any, tmp_path: Path) -> None:
    grids = FailingGrids.from_geojson(default_grid_file())
    assert isinstance(grids, FailingGrids)
    lat, lon = interior(grid_in_community(0))
    grids.poison = (lat + 0.0001, lon)
    agg = build_aggregator(aggregator_settings(broker, tmp_path / "agg"), grids=grids)
    agg.start()
    try:
        assert agg.ingest.wait_connected(5)
        cam = device(broker)
        alerts = [make_alert(CAM, lat, lon, seq=i) for i in range(40)]
        poisoned = make_alert(CAM, *grids.poison, seq=40)
        alerts.insert(23, poisoned)
        cam.publish_many(broker.topics.alert(CAM), [a.to_json() for a in alerts])
        got = feedback(cam, len(alerts))
        assert [f.alert_id for f in got] == [a.alert_id for a in alerts]
        bad = [f for f in got if f.outcome is Outcome.REJECTED]
        assert [(f.alert_id, f.reason, f.seq) for f in bad] == [
            (poisoned.alert_id, RejectReason.INTERNAL_ERROR, 40)
        ]
        assert bad[0].detail is not None
        assert bad[0].detail.startswith("RuntimeError")
        assert count(agg, "SELECT COUNT(*) FROM alerts") == 40
        with pool(agg) as db:
            row = db.execute("SELECT reason, payload FROM dead_letters").fetchone()
        assert (row[0], bytes(row[1])) == ("internal_error", poisoned.to_json())
        assert io_restarts(agg) == 0
    finally:
        agg.stop()


def test_full_pool_is_retried_unacknowledged_and_nothing_is_lost(
    broker: Any, aggregator: Aggregator, caplog: pytest.LogCaptureFixture
) -> None:
    cam = device(broker)
    lat, lon = interior(grid_in_community(0))
    writer = aggregator.pool.reader  # the writer's own connection
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    # SQLite's own "database or disk is full" (SQLITE_FULL) from here on
    writer.execute(f"PRAGMA max_page_count={pages}")
    alerts = [make_alert(CAM, lat, lon, seq=i, vendor_padding="d" * 900) for i in range(300)]
    cam.publish_many(broker.topics.alert(CAM), [a.to_json() for a in alerts])
    time.sleep(3)  # several retries
    committed = count(aggregator, "SELECT COUNT(*) FROM alerts")
    assert committed < len(alerts)
    assert count(aggregator, "SELECT COUNT(*) FROM dead_letters") == 0
    assert "the pool could not commit" in caplog.text
    writer.execute("PRAGMA max_page_count=1073741823")  # the disk has room again
    wait_until(
        lambda: count(aggregator, "SELECT COUNT(*) FROM alerts") == len(alerts),
        20,
        "every alert pooled after the pool was fixed",
    )
    assert count(aggregator, "SELECT COUNT(DISTINCT alert_id) FROM alerts") == len(alerts)
    assert count(aggregator, "SELECT COUNT(*) FROM dead_letters") == 0
    assert io_restarts(aggregator) == 0


def test_oversized_dead_letters_are_capped(broker: Any, aggregator: Aggregator) -> None:
    """500 distinct 2 MB rejected payloads grow the pool by less than 50 MB."""
    cam = device(broker)
    keep = aggregator.settings.dead_letters.keep_bytes

    def size() -> int:
        with pool(aggregator) as db:
            return int(db.execute("PRAGMA page_count").fetchone()[0]) * int(
                db.execute("PRAGMA page_size").fetchone()[0]
            )

    before = size()
    topic = broker.topics.alert(CAM)
    n = 500
    for i in range(n):
        cam.publish(topic, b"%08d" % i + b"x" * (2 * 1024 * 1024 - 8))
    wait_until(
        lambda: count(aggregator, "SELECT COUNT(*) FROM dead_letters") == n,
        120,
        "every oversized payload dead-lettered",
    )
    grown = size() - before
    assert grown < 50 * 1024 * 1024, grown
    with pool(aggregator) as db:
        row = db.execute(
            "SELECT reason, length(payload), payload_size, payload_sha256 FROM dead_letters"
            " ORDER BY id LIMIT 1"
        ).fetchone()
    first = b"%08d" % 0 + b"x" * (2 * 1024 * 1024 - 8)
    assert tuple(row) == (
        "payload_too_large",
        keep,
        len(first),
        hashlib.sha256(first).hexdigest(),
    )
    # a redelivery of the same full payload is recognised by its full hash: no new row
    cam.publish(topic, first)
    [*_, fb] = feedback(cam, n + 1, timeout=60)
    assert fb.outcome is Outcome.REJECTED
    assert count(aggregator, "SELECT COUNT(*) FROM dead_letters") == n


def test_dead_letters_and_out_of_area_rows_expire(broker: Any, tmp_path: Path) -> None:
    settings = aggregator_settings(
        broker,
        tmp_path / "agg",
        dead_letters=DeadLetterSettings(retention_days=2 / 86400, prune_every_s=1),
    )
    agg = build_aggregator(settings, grids=GRIDS)
    agg.start()
    try:
        assert agg.ingest.wait_connected(5)
        cam = device(broker)
        cam.publish(broker.topics.alert(CAM), b"not json")
        cam.publish(broker.topics.alert(CAM), make_alert(CAM, *OUTSIDE).to_json())
        feedback(cam, 2)
        assert count(agg, "SELECT COUNT(*) FROM dead_letters") == 1
        assert count(agg, "SELECT COUNT(*) FROM out_of_area") == 1
        wait_until(
            lambda: (
                count(agg, "SELECT COUNT(*) FROM dead_letters") == 0
                and count(agg, "SELECT COUNT(*) FROM out_of_area") == 0
            ),
            10,
            "expired rows deleted",
        )
    finally:
        agg.stop()


_NUMBER_TEXT = st.one_of(
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e308", b"1e309", b"-1e400", b"1e-400"]),
    st.integers(-(2**70), 2**70).map(lambda n: str(n).encode()),
    st.builds(
        lambda m, e: b"%de%d" % (m, e), st.integers(-(10**20), 10**20), st.integers(-400, 400)
    ),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
)


def _reference_verdict(text: bytes) -> bool:
    """Whether the number rules hold, by the standard library's parser and its hooks."""

    def bad(_: str) -> Any:
        raise ValueError

    def checked_int(s: str) -> int:
        n = int(s)
        if not -(2**63) <= n <= 2**63 - 1:
            raise ValueError
        return n

    def checked_float(s: str) -> float:
        f = float(s)
        if not math.isfinite(f):
            raise ValueError
        return f

    try:
        json.loads(text, parse_constant=bad, parse_int=checked_int, parse_float=checked_float)
    except ValueError:
        return False
    return True


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(
    numbers=st.lists(_NUMBER_TEXT, min_size=1, max_size=4),
    where=st.sampled_from(["top", "evidence", "object", "location"]),
)
def test_number_rules_agree_with_a_reference_parser(numbers: list[bytes], where: str) -> None:
    """decode accepts an otherwise valid alert exactly when every number in its unknown fields
    is a JSON number within a double and, if an integer, within signed 64 bits."""
    d = alert_dict(CAM)
    marker = "__numbers__"
    if where == "top":
        d["vendor"] = marker
    elif where == "evidence":
        d["evidence"] = {"vendor": marker}
    elif where == "object":
        d["evidence"] = {"objects": [{"cls": "car", "score": 0.5, "vendor": marker}]}
    else:
        d["location"] = {**d["location"], "vendor": marker}
    payload = orjson.dumps(d).replace(b'"%s"' % marker.encode(), b"[" + b",".join(numbers) + b"]")
    expected_ok = _reference_verdict(payload)
    got = decode_alert(payload, CAM, default_catalogue(), datetime.now(UTC), DecodeLimits())
    assert isinstance(got, AlertV1) is expected_ok, (payload[-200:], got)
    if not expected_ok:
        assert isinstance(got, Rejection)
        assert got.reason in (RejectReason.INVALID_JSON, RejectReason.SCHEMA_VIOLATION)
        assert (got.alert_id, got.seq) == (d["alert_id"], d["seq"])


def _raised(action: Any) -> BaseException:
    try:
        action()
    except (sqlite3.Error, OverflowError, UnicodeError) as exc:
        return exc
    raise AssertionError("nothing was raised")


def test_pool_faults_are_told_from_message_faults_by_sqlite_error_codes(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    db.execute("INSERT INTO t VALUES (1, x'00')")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages}")
    full = _raised(lambda: db.execute("INSERT INTO t VALUES (2, ?)", (b"x" * 100_000,)))
    db.execute("PRAGMA max_page_count=1073741823")
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    readonly = _raised(lambda: ro.execute("INSERT INTO t VALUES (3, x'00')"))
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    db.execute("BEGIN IMMEDIATE")
    busy = _raised(lambda: other.execute("BEGIN IMMEDIATE"))
    db.execute("ROLLBACK")
    duplicate = _raised(lambda: db.execute("INSERT INTO t VALUES (1, x'00')"))
    overflow = _raised(lambda: db.execute("INSERT INTO t VALUES (?, x'00')", (2**63,)))
    surrogate = _raised(lambda: db.execute("INSERT INTO t VALUES (4, ?)", ("\ud800",)))
    disk = OSError(errno.ENOSPC, "No space left on device")
    for exc in (full, readonly, busy, disk):
        assert is_pool_fault(exc), exc
    for exc in (duplicate, overflow, surrogate, RuntimeError("bug"), ValueError("x")):
        assert not is_pool_fault(exc), exc
    for conn in (db, ro, other):
        conn.close()
