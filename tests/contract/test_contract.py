"""The wire contract: schema files match the models, topics round-trip, the catalogue is whole."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from contract import (
    AlertV1,
    DeviceChannel,
    EventNoticeV1,
    EventSummary,
    FeedbackBatchV1,
    FeedbackItem,
    FeedbackV1,
    Location,
    Outcome,
    RejectReason,
    StatusV1,
    TopicError,
    Topics,
    default_catalogue,
    event_notice_json,
    feedback_batch_json,
    feedback_item_json,
    feedback_json,
    load_catalogue,
    parse_feedback,
)
from contract.catalogue import CATALOGUE_PATH
from contract.messages import FEEDBACK_BATCH_MAX_ITEMS
from contract.schema_export import SCHEMA_DIR, render

REQUIRED_TYPES = {
    "fire_lane_occupied",
    "ebike_in_lift",
    "smoke_fire",
    "crowd_gathering",
    "zone_intrusion",
    "thrown_object",
    "street_vending",
    "exposed_garbage",
    "noise_over_limit",
    "smoke_alarm",
    "water_level",
    "gas_leak",
    "manhole_displaced",
    "sewage_discharge",
}


def test_committed_json_schema_matches_the_models() -> None:
    rendered = render()
    on_disk = {p.name for p in SCHEMA_DIR.glob("*.json")}
    assert on_disk == set(rendered), "run: python -m contract.schema_export"
    for name, text in rendered.items():
        assert (SCHEMA_DIR / name).read_text(encoding="utf-8") == text, (
            f"{name} drifted from the models; run: python -m contract.schema_export"
        )


def test_schema_drift_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from contract import schema_export

    for name, text in render().items():
        (tmp_path / name).write_text(text.replace('"seq"', '"sequence"'), encoding="utf-8")
    monkeypatch.setattr(schema_export, "SCHEMA_DIR", tmp_path)
    assert schema_export.main(["--check"]) == 1


def test_alert_schema_names_the_wire_fields() -> None:
    schema = json.loads((SCHEMA_DIR / "alert-v1.json").read_text(encoding="utf-8"))
    assert {"schema", "alert_id", "device_id", "seq", "type", "observed_at", "location"} <= set(
        schema["properties"]
    )
    assert set(schema["required"]) >= {"alert_id", "device_id", "seq", "type", "confidence"}


def _alert(**kw: object) -> AlertV1:
    base: dict[str, object] = {
        "alert_id": "a-1",
        "device_id": "cam-1",
        "seq": 1,
        "type": "smoke_fire",
        "confidence": 0.5,
        "observed_at": datetime(2026, 1, 1, tzinfo=UTC),
        "location": Location(lat=27.55, lon=120.55),
    }
    base.update(kw)
    return AlertV1.model_validate(base)


def test_alert_round_trips_on_the_wire_and_is_frozen() -> None:
    alert = _alert(snapshot=None)
    raw = alert.to_json()
    assert b'"schema":"alert/v1"' in raw
    again = AlertV1.model_validate_json(raw, strict=True)
    assert again == alert
    with pytest.raises(ValidationError):
        alert.seq = 2  # type: ignore[misc]


def test_observed_at_is_normalised_to_utc_and_must_carry_a_zone() -> None:
    east8 = timezone(timedelta(hours=8))
    alert = _alert(observed_at=datetime(2026, 1, 1, 8, tzinfo=east8))
    assert alert.observed_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert alert.observed_at.utcoffset() == timedelta(0)
    with pytest.raises(ValidationError, match="timezone"):
        _alert(observed_at=datetime(2026, 1, 1))


def test_strict_decoding_refuses_coercion() -> None:
    raw = _alert().to_json().replace(b'"seq":1', b'"seq":"1"')
    with pytest.raises(ValidationError, match="seq"):
        AlertV1.model_validate_json(raw, strict=True)


def test_unknown_fields_are_kept() -> None:
    raw = _alert().to_json()[:-1] + b',"vendor":{"x":1}}'
    alert = AlertV1.model_validate_json(raw, strict=True)
    assert alert.model_extra == {"vendor": {"x": 1}}
    assert b'"vendor":{"x":1}' in alert.to_json()


@pytest.mark.parametrize(
    ("lat", "lon"), [(90.1, 0), (-90.1, 0), (0, 180.5), (0, -180.5), (float("nan"), 0)]
)
def test_location_out_of_range_or_nan_is_refused(lat: float, lon: float) -> None:
    with pytest.raises(ValidationError):
        Location(lat=lat, lon=lon)


def test_snapshot_must_be_base64_jpeg() -> None:
    with pytest.raises(ValidationError, match="JPEG"):
        _alert(snapshot="iVBORw0KGgo=")  # PNG magic
    with pytest.raises(ValidationError, match="base64"):
        _alert(snapshot="not base64 at all!")
    assert _alert(snapshot="/9j/4AAQ").snapshot_bytes() == b"\xff\xd8\xff\xe0\x00\x10"


def test_topics_build_and_parse() -> None:
    t = Topics("city/longgang")
    assert t.alert("cam-1") == "city/longgang/v1/devices/cam-1/alert"
    assert t.events == "city/longgang/v1/events"
    parsed = t.parse("city/longgang/v1/devices/cam-1/status")
    assert (parsed.device_id, parsed.channel) == ("cam-1", DeviceChannel.STATUS)
    assert (
        t.device_filter(DeviceChannel.ALERT, "agg") == "$share/agg/city/longgang/v1/devices/+/alert"
    )
    for bad in (
        "city/longgang/v1/devices/cam-1",
        "city/longgang/v1/devices/cam-1/alert/x",
        "other/v1/devices/cam-1/alert",
        "city/longgang/v1/devices/cam-1/nope",
    ):
        with pytest.raises(TopicError):
            t.parse(bad)
    with pytest.raises(TopicError):
        t.alert("cam/1")
    with pytest.raises(TopicError):
        Topics("bad/#")


def test_feedback_and_status_models() -> None:
    fb = FeedbackV1(device_id="cam-1", outcome=Outcome.REJECTED, reason="invalid_json",
                    dead_letter_id=7, at=datetime.now(UTC))  # fmt: skip
    assert FeedbackV1.model_validate_json(fb.to_json(), strict=True) == fb
    will = StatusV1(device_id="cam-1", state="offline", reason="last_will")
    assert will.at is None  # a Last Will is composed before the device knows when it dies


FEEDBACK_CASES: list[dict[str, Any]] = [
    {"alert_id": "cam-1-7", "seq": 7, "outcome": Outcome.ACCEPTED, "event_id": 12},
    {"alert_id": "cam-1-8", "seq": 0, "outcome": Outcome.MERGED, "event_id": 1},
    {"alert_id": "Z9.a_b:c-d" + "x" * 118, "seq": 2**53, "outcome": Outcome.DUPLICATE,
     "event_id": 2**40},
    {"alert_id": "a", "seq": 3, "outcome": Outcome.OUT_OF_AREA, "detail": "(1.0, 2.0) 网格外"},
    {"outcome": Outcome.REJECTED, "reason": RejectReason.INVALID_JSON, "detail": "bad \"x\"",
     "dead_letter_id": 9},
    {"alert_id": "cam-1-9", "outcome": Outcome.REJECTED, "reason": RejectReason.UNKNOWN_TYPE,
     "detail": "type 'x'", "dead_letter_id": 10},
]  # fmt: skip


@pytest.mark.parametrize("fields", FEEDBACK_CASES)
@pytest.mark.parametrize(
    "at",
    [
        datetime(2026, 11, 23, 16, 26, 51, 562321, tzinfo=UTC),
        datetime(2026, 11, 23, 16, 26, 51, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    ],
)
def test_feedback_json_is_byte_for_byte_the_models_json(
    fields: dict[str, Any], at: datetime
) -> None:
    """The aggregator serializes feedback without the model; it must not drift from it."""
    fast = feedback_json(device_id="cam-1", at=at, **fields)
    assert fast == FeedbackV1(device_id="cam-1", at=at, **fields).to_json()
    assert FeedbackV1.model_validate_json(fast, strict=True).at == at


@pytest.mark.parametrize("n", [1, 2, len(FEEDBACK_CASES)])
def test_feedback_batch_json_is_byte_for_byte_the_models_json(n: int) -> None:
    at = datetime(2026, 11, 23, 16, 26, 51, 562321, tzinfo=UTC)
    cases = FEEDBACK_CASES[:n]
    fast = feedback_batch_json("cam-1", [feedback_item_json(**f) for f in cases], at)
    model = FeedbackBatchV1(device_id="cam-1", items=[FeedbackItem(**f) for f in cases], at=at)
    assert fast == model.to_json()
    assert FeedbackBatchV1.model_validate_json(fast, strict=True) == model


def test_parse_feedback_reads_one_outcome_or_a_batch_of_them() -> None:
    at = datetime(2026, 11, 23, 16, 26, 51, tzinfo=UTC)
    single = feedback_json(device_id="cam-1", at=at, **FEEDBACK_CASES[0])
    assert parse_feedback(single) == [FeedbackV1(device_id="cam-1", at=at, **FEEDBACK_CASES[0])]
    batch = feedback_batch_json("cam-1", [feedback_item_json(**f) for f in FEEDBACK_CASES], at)
    expanded = parse_feedback(batch)
    # As if each outcome had come alone, in order.
    assert [fb.to_json() for fb in expanded] == [
        feedback_json(device_id="cam-1", at=at, **f) for f in FEEDBACK_CASES
    ]
    for bad in (
        b'{"schema":"feedback/v2","device_id":"cam-1","outcome":"accepted","at":"2026-11-23T00:00:00Z"}',
        b'{"device_id":"cam-1","outcome":"accepted","at":"2026-11-23T00:00:00Z"}',
        b'{"schema":"feedback-batch/v1","device_id":"cam-1","items":[],"at":"2026-11-23T00:00:00Z"}',
        b'{"schema":"feedback-batch/v1","device_id":"cam-1","items":[{"outcome":"lost"}],'
        b'"at":"2026-11-23T00:00:00Z"}',
        b"[]",
    ):
        with pytest.raises(ValidationError):
            parse_feedback(bad)
    too_many = [FeedbackItem(outcome=Outcome.ACCEPTED)] * (FEEDBACK_BATCH_MAX_ITEMS + 1)
    with pytest.raises(ValidationError):
        FeedbackBatchV1(device_id="cam-1", items=too_many, at=at)


@pytest.mark.parametrize("recurrence_of", [None, 41])
def test_event_notice_json_is_byte_for_byte_the_models_json(recurrence_of: int | None) -> None:
    t = datetime(2026, 11, 23, 8, 30, 1, 250000, tzinfo=UTC)
    summary = EventSummary(
        event_id=42,
        type="fire_lane_blocked",
        type_zh="消防通道占用",
        type_en="Fire lane blocked",
        severity="high",
        status="registered",
        department="消防",
        grid_code="33038300100101000001",
        grid_path=[
            {"level": "county", "code": "330383", "name": "龙港市"},
            {"level": "grid", "code": "33038300100101000001", "name": "第01网格"},
        ],
        location=Location(lat=27.55, lon=120.55),
        description='车辆占用 "消防通道"',
        first_observed_at=t,
        last_observed_at=t + timedelta(seconds=30),
        registered_at=t,
        deadline_at=t + timedelta(hours=2),
        alert_count=3,
        device_ids=["cam-1", "cam-2"],
        recurrence_of=recurrence_of,
    )
    event = summary.model_dump(by_alias=True, exclude_none=True)
    at = datetime(2026, 11, 23, 8, 31, tzinfo=UTC)
    expected = EventNoticeV1(change="created", event=summary, at=at).to_json()
    assert event_notice_json("created", event, at) == expected


def test_catalogue_covers_every_required_type_with_every_field() -> None:
    cat = default_catalogue()
    assert set(cat.types) >= REQUIRED_TYPES
    for code, wt in cat.types.items():
        assert wt.code == code
        assert wt.zh
        assert wt.en
        assert wt.department in cat.departments
        assert wt.merge_radius_m > 0
        assert wt.merge_window_s > 0
        assert timedelta(0) < wt.handling_deadline <= timedelta(days=5)
    # Appendix A items named in the design
    assert cat.types["street_vending"].appendix_item == 8
    assert cat.types["exposed_garbage"].appendix_item == 9
    assert cat.types["noise_over_limit"].appendix_item == 13
    assert cat.types["manhole_displaced"].appendix_item == 11
    assert cat.types["sewage_discharge"].appendix_item == 15


def test_catalogue_validation_names_the_key_path(tmp_path: Path) -> None:
    data = yaml.safe_load(CATALOGUE_PATH.read_text(encoding="utf-8"))
    data["types"]["smoke_fire"]["merge_radius_m"] = -5
    bad = tmp_path / "cat.yaml"
    bad.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ValidationError, match=r"types\.smoke_fire\.merge_radius_m"):
        load_catalogue(bad)
    data["types"]["smoke_fire"]["merge_radius_m"] = 5
    data["types"]["smoke_fire"]["department"] = "nobody"
    bad.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ValidationError, match="unknown department 'nobody'"):
        load_catalogue(bad)
