"""The aggregator on a real Mosquitto and a real pool (an SQLite file, and a PostgreSQL database):
alerts in, events and feedback out."""

from __future__ import annotations

import base64
import hashlib
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson
import pytest

from aggregator.config import MqttSettings, NoticeSettings, Settings
from aggregator.service import Aggregator, build_aggregator
from contract import (
    DeviceChannel,
    EventNoticeV1,
    EventStatus,
    FeedbackV1,
    Outcome,
    RejectReason,
    StatusV1,
    parse_feedback,
)

from .conftest import (
    GRIDS,
    OUTSIDE,
    PoolBackend,
    aggregator_settings,
    alert_dict,
    count,
    grid_in_community,
    interior,
    make_alert,
    offset,
    pool,
    wait_until,
)


def feedback_of(client: Any, n: int = 1, timeout: float = 10) -> list[FeedbackV1]:
    feedback: list[FeedbackV1] = client.expect_feedback(n, timeout)
    return feedback


def device(broker: Any, device_id: str) -> Any:
    if device_id not in broker.accounts:
        broker.add_device(device_id)
    client = broker.client(device_id)
    client.subscribe(broker.topics.feedback(device_id))
    return client


def settings_with(
    broker: Any,
    data_dir: Any,
    backend: PoolBackend,
    *,
    mqtt: dict[str, Any] | None = None,
    **kw: Any,
) -> Settings:
    """The test aggregator's settings on ``backend`` with some changed (``mqtt`` fields merged
    in)."""
    settings = aggregator_settings(broker, data_dir, **backend.settings_overrides(), **kw)
    if mqtt:
        merged = MqttSettings.model_validate({**settings.mqtt.model_dump(), **mqtt})
        settings = settings.model_copy(update={"mqtt": merged})
    return settings


def started(settings: Settings) -> Aggregator:
    agg = build_aggregator(settings, grids=GRIDS)
    agg.start()
    assert agg.ingest.wait_connected(5), "aggregator did not connect to the test broker"
    return agg


@pytest.fixture
def aggregator(broker: Any, tmp_path: Path, pool_backend: PoolBackend) -> Iterator[Aggregator]:
    """The aggregator on each pool backend in turn."""
    agg = started(settings_with(broker, tmp_path / "agg", pool_backend))
    yield agg
    agg.stop()


def test_alert_becomes_one_event_with_grid_path_department_and_feedback(
    broker: Any, aggregator: Aggregator
) -> None:
    integrator = broker.client("integrator")
    integrator.subscribe(broker.topics.events)
    cam = device(broker, "cam-001")
    grid = grid_in_community(2, 9)
    alert = make_alert("cam-001", *interior(grid), type="ebike_in_lift")
    assert not cam.publish(broker.topics.alert("cam-001"), alert.to_json()).is_failure

    [fb] = feedback_of(cam)
    assert (fb.outcome, fb.alert_id, fb.seq) == (Outcome.ACCEPTED, alert.alert_id, alert.seq)
    assert fb.event_id is not None
    with pool(aggregator) as db:
        row = db.execute("SELECT * FROM events WHERE id=?", (fb.event_id,)).fetchone()
    assert row["grid_code"] == grid.code
    assert row["department"] == "fire"  # e-bike in a lift: Appendix A item 30, 消防大队
    assert row["source"] == "smart_community_warning"
    assert [g["code"] for g in orjson.loads(row["grid_path"])] == [g.code for g in grid.path]

    [notice_msg] = integrator.expect(1)
    notice = EventNoticeV1.model_validate_json(notice_msg.payload)
    assert notice.change == "created"
    assert notice.event.event_id == fb.event_id
    assert notice.event.grid_path[-1].code == grid.code
    assert notice.event.grid_path[2].level == "community"
    assert notice.event.device_ids == ["cam-001"]


def test_same_alert_id_twice_gives_one_alert_row(broker: Any, aggregator: Aggregator) -> None:
    cam = device(broker, "cam-001")
    alert = make_alert("cam-001", *interior(grid_in_community(0)))
    cam.publish(broker.topics.alert("cam-001"), alert.to_json())
    cam.publish(broker.topics.alert("cam-001"), alert.to_json())
    first, second = feedback_of(cam, 2)
    assert (first.outcome, second.outcome) == (Outcome.ACCEPTED, Outcome.DUPLICATE)
    assert first.event_id == second.event_id
    assert count(aggregator, "SELECT count(*) FROM alerts WHERE alert_id=?", alert.alert_id) == 1
    assert count(aggregator, "SELECT alert_count FROM events") == 1


def test_three_devices_one_incident_make_one_event_with_three_devices(
    broker: Any, aggregator: Aggregator
) -> None:
    lat, lon = interior(grid_in_community(1, 3))
    cams = {d: device(broker, d) for d in ("cam-001", "cam-002", "cam-003")}
    offsets = {"cam-001": (0, 0), "cam-002": (60, 20), "cam-003": (-40, -70)}  # metres
    now = datetime.now(UTC)
    outcomes = []
    for i, (device_id, cam) in enumerate(cams.items()):
        north, east = offsets[device_id]
        alert = make_alert(
            device_id,
            *offset(lat, lon, north, east),
            observed_at=now - timedelta(seconds=30 * i),
            type="smoke_fire",
        )
        cam.publish(broker.topics.alert(device_id), alert.to_json())
        outcomes.append(feedback_of(cam)[0])
    assert [f.outcome for f in outcomes] == [Outcome.ACCEPTED, Outcome.MERGED, Outcome.MERGED]
    assert len({f.event_id for f in outcomes}) == 1
    assert count(aggregator, "SELECT count(*) FROM events") == 1
    assert count(aggregator, "SELECT device_count FROM events") == 3
    assert count(aggregator, "SELECT count(*) FROM event_devices") == 3


def test_alert_outside_every_grid_gives_no_event_and_out_of_area_feedback(
    broker: Any, aggregator: Aggregator
) -> None:
    cam = device(broker, "cam-002")
    alert = make_alert("cam-002", *OUTSIDE)
    cam.publish(broker.topics.alert("cam-002"), alert.to_json())
    [fb] = feedback_of(cam)
    assert fb.outcome is Outcome.OUT_OF_AREA
    assert fb.alert_id == alert.alert_id
    assert fb.detail
    assert "outside every grid" in fb.detail
    assert count(aggregator, "SELECT count(*) FROM events") == 0
    assert count(aggregator, "SELECT out_of_area_total FROM devices WHERE device_id='cam-002'") == 1


def _png() -> str:
    ok, buf = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    assert ok
    return base64.b64encode(buf.tobytes()).decode()


def _json(d: dict[str, Any]) -> bytes:
    return orjson.dumps(d)


def _nan_lat() -> bytes:
    raw = _json(alert_dict("cam-001"))
    lat = orjson.loads(raw)["location"]["lat"]
    return raw.replace(orjson.dumps(lat), b"NaN", 1)


def _without(field: str) -> bytes:
    d = alert_dict("cam-001")
    del d[field]
    return _json(d)


def _with(**changes: Any) -> bytes:
    d = alert_dict("cam-001")
    d.update(changes)
    return _json(d)


def _location(lat: float, lon: float) -> bytes:
    d = alert_dict("cam-001")
    d["location"] = {"lat": lat, "lon": lon}
    return _json(d)


BAD_INPUTS: dict[str, tuple[bytes | Any, RejectReason]] = {
    "invalid JSON": (b'{"alert_id": "x", ', RejectReason.INVALID_JSON),
    "invalid UTF-8": (b'{"description": "\xff\xfe bad"}', RejectReason.INVALID_UTF8),
    "missing required field": (_without("observed_at"), RejectReason.SCHEMA_VIOLATION),
    "wrongly typed field": (_with(seq="seven"), RejectReason.SCHEMA_VIOLATION),
    "unknown warning type": (_with(type="alien_landing"), RejectReason.UNKNOWN_TYPE),
    "latitude out of range": (_location(91.5, 120.55), RejectReason.INVALID_LOCATION),
    "longitude out of range": (_location(27.55, -181.0), RejectReason.INVALID_LOCATION),
    "NaN latitude": (_nan_lat(), RejectReason.INVALID_LOCATION),
    "observed in the future": (
        _with(observed_at=(datetime.now(UTC) + timedelta(hours=2)).isoformat()),
        RejectReason.OBSERVED_IN_FUTURE,
    ),
    "device id differs from topic": (
        _json(alert_dict("cam-002")),
        RejectReason.DEVICE_MISMATCH,
    ),
    "payload over the size limit": (
        _with(description="x" * 1000, padding="y" * (1024 * 1024)),
        RejectReason.PAYLOAD_TOO_LARGE,
    ),
    "snapshot is not a JPEG": (_with(snapshot=_png()), RejectReason.SNAPSHOT_NOT_JPEG),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_dead_lettered_reported_and_ingestion_goes_on(
    case: str, broker: Any, aggregator: Aggregator
) -> None:
    payload, reason = BAD_INPUTS[case]
    cam = device(broker, "cam-001")
    cam.publish(broker.topics.alert("cam-001"), payload)
    [fb] = feedback_of(cam)
    assert fb.outcome is Outcome.REJECTED
    assert fb.reason is reason, fb.detail
    assert fb.detail
    assert fb.dead_letter_id is not None
    with pool(aggregator) as db:
        dl = db.execute("SELECT * FROM dead_letters WHERE id=?", (fb.dead_letter_id,)).fetchone()
    assert dl["reason"] == reason.value
    # kept byte for byte, up to dead_letters.keep_bytes; its full size and hash always
    keep = aggregator.settings.dead_letters.keep_bytes
    assert bytes(dl["payload"]) == payload[:keep]
    assert dl["payload_size"] == len(payload)
    assert dl["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert dl["device_id"] == "cam-001"
    assert dl["topic"] == broker.topics.alert("cam-001")
    # and the next good alert is pooled as usual
    good = make_alert("cam-001", *interior(grid_in_community(0)))
    cam.publish(broker.topics.alert("cam-001"), good.to_json())
    [after] = feedback_of(cam)
    assert after.outcome is Outcome.ACCEPTED
    assert count(aggregator, "SELECT rejected_total FROM devices WHERE device_id='cam-001'") == 1


def test_a_rejected_message_that_comes_again_is_kept_once(
    broker: Any, aggregator: Aggregator
) -> None:
    """A redelivery (a commit whose acknowledgement never reached the broker) brings the same
    bytes on the same topic again: it changes nothing in the pool, and the device hears the
    first dead letter's id again. Another payload is another dead letter."""
    cam = device(broker, "cam-001")
    topic = broker.topics.alert("cam-001")
    cam.publish(topic, b"{not json")
    [first] = feedback_of(cam)
    cam.publish(topic, b"{not json")
    [again] = feedback_of(cam)
    assert first.outcome is again.outcome is Outcome.REJECTED
    assert first.dead_letter_id is not None
    assert again.dead_letter_id == first.dead_letter_id
    cam.publish(topic, b"{not json either")
    [other] = feedback_of(cam)
    assert other.dead_letter_id not in (None, first.dead_letter_id)
    assert count(aggregator, "SELECT count(*) FROM dead_letters") == 2
    assert count(aggregator, "SELECT rejected_total FROM devices WHERE device_id='cam-001'") == 2


def test_rejection_names_the_alert_when_it_can(broker: Any, aggregator: Aggregator) -> None:
    cam = device(broker, "cam-001")
    cam.publish(broker.topics.alert("cam-001"), _with(alert_id="a-42", seq=42, confidence="high"))
    [fb] = feedback_of(cam)
    assert (fb.reason, fb.alert_id) == (RejectReason.SCHEMA_VIOLATION, "a-42")
    assert fb.detail is not None
    assert "confidence" in fb.detail


def test_unknown_fields_are_kept_not_fatal(broker: Any, aggregator: Aggregator) -> None:
    cam = device(broker, "cam-001")
    payload = _with(firmware="2.4.1", vendor_extension={"ir": True})
    cam.publish(broker.topics.alert("cam-001"), payload)
    [fb] = feedback_of(cam)
    assert fb.outcome is Outcome.ACCEPTED
    with pool(aggregator) as db:
        stored = orjson.loads(db.execute("SELECT payload FROM alerts").fetchone()[0])
    assert stored["vendor_extension"] == {"ir": True}


def test_status_and_last_will_mark_devices_online_and_offline(
    broker: Any, aggregator: Aggregator
) -> None:
    topic = broker.topics.status("sensor-001")
    will = StatusV1(device_id="sensor-001", state="offline", reason="last_will")
    sensor = broker.new_client("sensor-001")
    sensor.paho.will_set(topic, will.to_json(), qos=1, retain=True)
    assert not sensor.connect().is_failure
    online = StatusV1(device_id="sensor-001", state="online", at=datetime.now(UTC), kind="sensor")
    sensor.publish(topic, online.to_json(), retain=True)

    def state() -> str | None:
        with pool(aggregator) as db:
            row = db.execute("SELECT state FROM devices WHERE device_id='sensor-001'").fetchone()
        return row[0] if row else None

    wait_until(lambda: state() == "online", what="device online")
    # an abrupt loss of the connection: the broker publishes the Last Will
    sensor.paho.socket().close()
    wait_until(lambda: state() == "offline", timeout=60, what="Last Will marks it offline")


def test_channel_counters_and_dedup_ratio(broker: Any, aggregator: Aggregator) -> None:
    cam = device(broker, "cam-001")
    lat, lon = interior(grid_in_community(0))
    for i in range(4):
        cam.publish(
            broker.topics.alert("cam-001"), make_alert("cam-001", lat, lon, seq=i).to_json()
        )
    feedback_of(cam, 4)
    assert math.isclose(aggregator.metrics.dedup_ratio(), 3 / 4)
    sample = aggregator.metrics.messages.labels(DeviceChannel.ALERT.value)._value.get()
    assert sample == 4


def test_in_process_transport_pools_acknowledges_and_answers(
    broker: Any, tmp_path: Any, pool_backend: PoolBackend
) -> None:
    """``mqtt.io_process = false``: paho on a thread of the aggregator process."""
    agg = started(
        settings_with(broker, tmp_path / "inproc", pool_backend, mqtt={"io_process": False})
    )
    try:
        cam = device(broker, "cam-001")
        lat, lon = interior(grid_in_community(3))
        alerts = [make_alert("cam-001", lat, lon, seq=i) for i in range(50)]
        for alert in alerts:
            cam.paho.publish(broker.topics.alert("cam-001"), alert.to_json(), qos=1)
        outcomes = [fb.outcome for fb in feedback_of(cam, 50)]
        assert outcomes.count(Outcome.ACCEPTED) == 1
        assert outcomes.count(Outcome.MERGED) == 49
        assert count(agg, "SELECT count(*) FROM alerts") == 50
        assert agg.ingest.stats().connected
    finally:
        agg.stop()


@pytest.mark.parametrize("batching", [True, False])
def test_outcomes_of_one_commit_reach_the_device_as_one_feedback_batch(
    broker: Any, tmp_path: Any, batching: bool, pool_backend: PoolBackend
) -> None:
    """Alerts queued while the aggregator was away arrive together and commit together: the
    device hears of all of them in feedback-batch/v1 messages, in the order they were handled,
    or in one feedback/v1 each with ``mqtt.feedback_batching`` off."""
    settings = settings_with(
        broker, tmp_path / "agg", pool_backend, mqtt={"feedback_batching": batching}
    )
    started(settings).stop()  # the persistent session stays: the broker queues for it

    cam = device(broker, "cam-001")
    lat, lon = interior(grid_in_community(1))
    alerts = [make_alert("cam-001", lat, lon, seq=i) for i in range(30)]
    payloads = [a.to_json() for a in alerts]
    payloads.append(orjson.dumps(alert_dict("cam-001", seq=30, type="no_such_type")))
    payloads.append(make_alert("cam-001", *OUTSIDE, seq=31).to_json())
    assert not any(
        rc.is_failure for rc in cam.publish_many(broker.topics.alert("cam-001"), payloads)
    )

    agg = started(settings)
    try:
        messages = []
        outcomes: list[FeedbackV1] = []
        while len(outcomes) < len(payloads):
            [message] = cam.expect(1)
            messages.append(message)
            outcomes += parse_feedback(message.payload)
        cam.expect_nothing(0.3)
    finally:
        agg.stop()
    schemas = [orjson.loads(m.payload)["schema"] for m in messages]
    if batching:
        assert "feedback-batch/v1" in schemas
        assert len(messages) < len(payloads)
    else:
        assert schemas == ["feedback/v1"] * len(payloads)
    assert len(outcomes) == len(payloads)
    by_id = {fb.alert_id: fb for fb in outcomes}
    assert set(by_id) == {a.alert_id for a in alerts} | {
        orjson.loads(payloads[30])["alert_id"],
        orjson.loads(payloads[31])["alert_id"],
    }
    assert [by_id[a.alert_id].outcome for a in alerts].count(Outcome.ACCEPTED) == 1
    assert by_id[orjson.loads(payloads[30])["alert_id"]].reason is RejectReason.UNKNOWN_TYPE
    assert by_id[orjson.loads(payloads[30])["alert_id"]].dead_letter_id is not None
    assert by_id[orjson.loads(payloads[31])["alert_id"]].outcome is Outcome.OUT_OF_AREA
    accepted_or_merged = [fb.seq or 0 for fb in outcomes if fb.event_id is not None]
    assert accepted_or_merged == sorted(accepted_or_merged)  # in the order they were handled


def notices_of(client: Any, n: int, timeout: float = 10) -> list[EventNoticeV1]:
    return [EventNoticeV1.model_validate_json(m.payload) for m in client.expect(n, timeout)]


@pytest.mark.parametrize("interval_ms", [600, 0])
def test_updates_of_an_event_are_coalesced_into_one_notice_per_interval(
    broker: Any, tmp_path: Any, interval_ms: int, pool_backend: PoolBackend
) -> None:
    """``created`` goes at once; the updates of the next interval come as one ``updated``
    notice with the state after the last of them (with 0: one per batch)."""
    notices = NoticeSettings(update_interval_ms=interval_ms)
    agg = started(settings_with(broker, tmp_path / "agg", pool_backend, notices=notices))
    try:
        integrator = broker.client("integrator")
        integrator.subscribe(broker.topics.events)
        cam = device(broker, "cam-001")
        lat, lon = interior(grid_in_community(2, 3))
        topic = broker.topics.alert("cam-001")
        cam.publish(topic, make_alert("cam-001", lat, lon, seq=0).to_json())
        feedback_of(cam)
        [created] = notices_of(integrator, 1)
        assert created.change == "created"
        merges_from = time.monotonic()
        for seq in range(1, 5):  # four merges, each its own batch (each waits for feedback)
            cam.publish(
                topic, make_alert("cam-001", *offset(lat, lon, east_m=seq), seq=seq).to_json()
            )
            feedback_of(cam)
        if interval_ms:
            [updated] = notices_of(integrator, 1)
            assert time.monotonic() - merges_from >= 0.3  # held, not sent with the first merge
            integrator.expect_nothing(1.0)
            assert agg.metrics.notices_coalesced._value.get() >= 1
        else:
            *_, updated = notices_of(integrator, 4)
        assert updated.change == "updated"
        assert updated.event.event_id == created.event.event_id
        assert updated.event.alert_count == 5  # the state after the last merge
        assert agg.metrics.notices.labels("created")._value.get() == 1
    finally:
        agg.stop()


def test_held_updates_go_out_when_the_aggregator_stops(
    broker: Any, tmp_path: Any, pool_backend: PoolBackend
) -> None:
    notices = NoticeSettings(update_interval_ms=60_000)
    agg = started(settings_with(broker, tmp_path / "agg", pool_backend, notices=notices))
    integrator = broker.client("integrator")
    integrator.subscribe(broker.topics.events)
    cam = device(broker, "cam-001")
    lat, lon = interior(grid_in_community(0, 5))
    topic = broker.topics.alert("cam-001")
    for seq in range(3):
        cam.publish(topic, make_alert("cam-001", *offset(lat, lon, north_m=seq), seq=seq).to_json())
        feedback_of(cam)
    [created] = notices_of(integrator, 1)
    integrator.expect_nothing(0.5)  # the two merges wait for their minute
    agg.stop()
    [updated] = notices_of(integrator, 1)
    assert (updated.change, updated.event.alert_count) == ("updated", 3)
    assert updated.event.event_id == created.event.event_id


def test_a_held_update_of_an_event_closed_meanwhile_is_dropped(
    broker: Any, tmp_path: Any, pool_backend: PoolBackend
) -> None:
    settings = settings_with(
        broker, tmp_path / "agg", pool_backend, notices=NoticeSettings(update_interval_ms=800)
    )
    agg = started(settings)
    try:
        integrator = broker.client("integrator")
        integrator.subscribe(broker.topics.events)
        cam = device(broker, "cam-001")
        lat, lon = interior(grid_in_community(1, 7))
        topic = broker.topics.alert("cam-001")
        for seq in range(2):
            cam.publish(topic, make_alert("cam-001", lat, lon, seq=seq).to_json())
            feedback_of(cam)
        [created] = notices_of(integrator, 1)
        # an operator closes it (through the API that sends its own `closed` notice)
        pool_backend.lifecycle().set_status(created.event.event_id, EventStatus.CLOSED, "test")
        integrator.expect_nothing(1.5)
    finally:
        agg.stop()
    integrator.expect_nothing(0.3)
