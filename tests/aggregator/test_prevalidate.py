"""Alerts validated in the MQTT I/O loop (``Prevalidator``) assemble exactly like alerts the
pipeline decodes itself: the same pooled rows, the same dead letters with the same reasons."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aggregator.ingest.assemble import Inbound, Pipeline, Prevalidator
from aggregator.ingest.decode import DecodeLimits
from aggregator.pool.snapshots import SnapshotStore
from contract import default_catalogue

from .conftest import GRIDS, OUTSIDE, grid_in_community, interior, jpeg, make_alert
from .test_ingest import BAD_INPUTS
from .test_pool import TOPICS


def messages() -> list[Inbound]:
    lat, lon = interior(grid_in_community(2))
    good = [
        make_alert("cam-001", lat, lon, seq=1),
        make_alert("cam-001", lat, lon, seq=2, snapshot=jpeg(3), severity="critical"),
        make_alert("cam-001", *OUTSIDE, seq=3),
    ]
    now = time.time()
    out = [Inbound(TOPICS.alert("cam-001"), a.to_json(), now) for a in good]
    out += [Inbound(TOPICS.alert("cam-001"), p, now) for p, _ in BAD_INPUTS.values()]
    out.append(Inbound(TOPICS.status("cam-001"), b'{"state": "online"}', now))
    out.append(Inbound("not/a/device/topic", b"{}", now))
    return out


def snapshot(assembled: Any) -> tuple[Any, ...]:
    batch = assembled.batch
    return (
        [vars_of(a) for a in batch.alerts],
        [vars_of(o) for o in batch.out_of_area],
        [
            (d.topic, d.device_id, d.alert_id, d.reason, d.detail, d.payload)
            for d in batch.dead_letters
        ],
        {k: vars_of(v) for k, v in assembled.alerts.items()},
    )


def vars_of(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


def test_prevalidated_messages_assemble_exactly_like_locally_decoded_ones(tmp_path: Path) -> None:
    catalogue = default_catalogue()
    limits = DecodeLimits()
    local = Pipeline(TOPICS, catalogue, GRIDS, SnapshotStore(tmp_path / "a"), limits)
    remote = Pipeline(TOPICS, catalogue, GRIDS, SnapshotStore(tmp_path / "b"), limits)
    check = Prevalidator(TOPICS, catalogue, limits)
    now = datetime.now(UTC)
    raw = messages()
    pre = [
        Inbound(m.topic, m.payload, m.received_at, pre=check.check(m.topic, m.payload, now))
        for m in raw
    ]
    assert sum(m.pre is not None for m in pre) == 3 + len(BAD_INPUTS)  # alerts only
    assert snapshot(local.assemble(raw)) == snapshot(remote.assemble(pre))
    # and what was compared is what matters: pooled, out of area, every bad input kept
    assembled = remote.assemble(pre)
    assert len(assembled.batch.alerts) == 2
    assert assembled.batch.alerts[1].snapshot_sha256 is not None
    assert len(assembled.batch.out_of_area) == 1
    reasons = [d.reason for d in assembled.batch.dead_letters]
    assert reasons[: len(BAD_INPUTS)] == [reason for _, reason in BAD_INPUTS.values()]
