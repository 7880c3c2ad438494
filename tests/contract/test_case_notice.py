"""``case/v1``: the notice of a case on the events topic (today: a supervision item raised), its
committed JSON Schema, and the aggregator speaking exactly the contract's model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import jsonschema_rs
import orjson
import pytest
from pydantic import ValidationError

from aggregator.cases.supervise import Kind, SupervisionItemOut, SupervisionNoticeV1
from contract import CaseNoticeV1, SupervisionItem, SupervisionKind
from contract.schema_export import SCHEMA_DIR

SCHEMA = orjson.loads((SCHEMA_DIR / "case-v1.json").read_bytes())
VALIDATOR = jsonschema_rs.Draft202012Validator(SCHEMA)
DUE = datetime(2026, 10, 1, 8, 30, tzinfo=UTC)


def notice(**kw: Any) -> CaseNoticeV1:
    item = SupervisionItem(
        item=f"0:accept:overdue:{int(DUE.timestamp())}",
        kind=SupervisionKind.OVERDUE,
        kind_zh="超期督办",
        clock="accept",
        level="department",
        due_at=DUE,
        raised_at=DUE + timedelta(minutes=1),
        case_version=3,
        audit_seq=17,
    )
    base: dict[str, Any] = {
        "event_id": 42,
        "state": "whistled",
        "version": 3,
        "grid_code": "33038300100100000005",
        "type": "smoke_fire",
        "departments": ["fire"],
        "supervision": item,
        "at": DUE + timedelta(minutes=1),
    }
    base.update(kw)
    return CaseNoticeV1.model_validate(base)


def errors(body: object) -> list[str]:
    return [e.message for e in VALIDATOR.iter_errors(body)]


def test_the_schema_names_the_wire_fields() -> None:
    assert SCHEMA["properties"]["schema"]["const"] == "case/v1"
    assert set(SCHEMA["required"]) >= {
        "event_id",
        "state",
        "version",
        "grid_code",
        "type",
        "departments",
        "supervision",
        "at",
    }
    kinds = SCHEMA["$defs"]["SupervisionKind"]["enum"]
    assert kinds == ["reminder", "overdue", "escalate_street", "escalate_county"]


def test_a_notice_round_trips_and_validates_against_the_committed_schema() -> None:
    raw = notice().to_json()
    assert raw.startswith(b'{"schema":"case/v1","change":"supervision"')
    assert errors(orjson.loads(raw)) == []
    again = CaseNoticeV1.model_validate_json(raw, strict=True)
    assert again == notice()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("schema",), "case/v2"),
        (("change",), "moved"),
        (("event_id",), "42"),
        (("supervision", "kind"), "nag"),
        (("supervision", "level"), "city"),
        (("supervision", "audit_seq"), 0),
        (("at",), 5),
    ],
)
def test_the_schema_and_the_model_refuse_the_same_wrong_field(
    path: tuple[str, ...], value: object
) -> None:
    body = orjson.loads(notice().to_json())
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert errors(body), f"the schema let {path}={value!r} through"
    with pytest.raises(ValidationError):
        CaseNoticeV1.model_validate_json(orjson.dumps(body), strict=True)


def test_times_carry_a_zone_and_are_utc_on_the_wire() -> None:
    east8 = timezone(timedelta(hours=8))
    n = notice(at=datetime(2026, 10, 1, 16, 31, tzinfo=east8))
    assert b'"at":"2026-10-01T08:31:00Z"' in n.to_json()
    with pytest.raises(ValidationError, match="timezone"):
        notice(at=datetime(2026, 10, 1, 8, 31))


def test_unknown_fields_are_kept_as_in_every_v1_message() -> None:
    body = orjson.loads(notice().to_json())
    body["escalated_to"] = "330383001"
    assert errors(body) == []
    parsed = CaseNoticeV1.model_validate_json(orjson.dumps(body), strict=True)
    assert parsed.model_extra == {"escalated_to": "330383001"}


def test_the_aggregator_publishes_the_contracts_model() -> None:
    """One source of truth: the timer's notice and kinds are the contract's; the API's item
    only narrows the clock to the lifecycle's clocks."""
    assert SupervisionNoticeV1 is CaseNoticeV1
    assert Kind is SupervisionKind
    assert issubclass(SupervisionItemOut, SupervisionItem)
    item = SupervisionItemOut.model_validate(notice().supervision.model_dump())
    body = orjson.loads(notice(supervision=item).to_json())
    assert errors(body) == []
    with pytest.raises(ValidationError):
        SupervisionItemOut.model_validate({**item.model_dump(), "clock": "coffee_break"})
