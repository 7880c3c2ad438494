"""The live stream serializes summaries read from the pool without models: byte for byte the
notice the models make, for events with and without snapshots, merged and in several grids."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aggregator.pool import queries
from aggregator.pool.model import summary_dict_from_row, summary_from_row
from aggregator.service import Aggregator
from contract import EventNoticeV1, EventSummary, event_notice_json

from .conftest import grid_in_community, interior, jpeg, make_alert, offset, pool, wait_until
from .operator_support import publish


def test_row_dicts_serialize_as_the_models_do(broker: Any, aggregator: Aggregator) -> None:
    lat, lon = interior(grid_in_community(0, 1))
    alerts = [
        make_alert("cam-001", lat, lon, seq=1, snapshot=jpeg(1)),
        make_alert("cam-002", *offset(lat, lon, east_m=15), seq=1),  # merges into the first
        make_alert("cam-003", *interior(grid_in_community(1, 2)), type="gas_leak", seq=1),
        make_alert("cam-004", *interior(grid_in_community(2, 3)), type="smoke_fire", seq=1),
    ]
    for a in alerts:
        publish(broker, a)

    def pooled() -> bool:
        with pool(aggregator) as db:
            return queries.alert_count(db) >= len(alerts)

    wait_until(pooled, what="the alerts pooled")
    catalogue = aggregator.catalogue
    at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    with pool(aggregator) as db:
        ids = [r[0] for r in db.execute("SELECT id FROM events")]
        assert len(ids) == 3
        dicts = queries.event_summary_dicts(db, ids, catalogue)
        devices = queries.devices_of(db, ids)
        rows = {r["id"]: r for r in db.execute("SELECT * FROM events")}
    assert [d["event_id"] for d in dicts] == sorted(ids)
    assert any("snapshot_sha256" in d for d in dicts)
    assert any(len(d["device_ids"]) == 2 for d in dicts)
    for d in dicts:
        row = rows[d["event_id"]]
        model = summary_from_row(row, devices.get(row["id"], []), catalogue)
        assert EventSummary.model_validate(d) == model
        assert summary_dict_from_row(row, devices.get(row["id"], []), catalogue) == d
        for change in ("created", "updated", "closed"):
            by_model = EventNoticeV1(change=change, event=model, at=at).to_json()
            assert event_notice_json(change, d, at) == by_model
