"""Correct dedup under concurrency: several writers on one pool file — aggregator replicas on a
shared subscription — agree on every event, because each reads what the others committed
before it decides (under SQLite's write lock)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

from aggregator.config import MqttSettings
from aggregator.service import build_aggregator
from contract import Outcome

from .conftest import (
    GRIDS,
    PoolBackend,
    aggregator_settings,
    count,
    grid_in_community,
    interior,
    make_alert,
    offset,
    past,
    wait_until,
)
from .test_pool import Harness


def test_two_writers_on_one_pool_merge_into_each_others_events(
    pool_backend: PoolBackend,
) -> None:
    a, b = Harness(pool_backend), Harness(pool_backend)  # two writers, one pool
    lat, lon = interior(grid_in_community(0))
    assert a.send(make_alert("cam-1", lat, lon, observed_at=past(30))) == [Outcome.ACCEPTED]
    assert b.send(make_alert("cam-2", *offset(lat, lon, 40), observed_at=past(20))) == [
        Outcome.MERGED
    ]
    assert a.send(make_alert("cam-3", *offset(lat, lon, -40), observed_at=past(10))) == [
        Outcome.MERGED
    ]
    assert a.rows("SELECT alert_count, device_count FROM events") == [(3, 3)]  # one event


def test_a_status_change_made_by_one_writer_reaches_the_other(pool_backend: PoolBackend) -> None:
    a, b = Harness(pool_backend), Harness(pool_backend)
    lat, lon = interior(grid_in_community(2))
    a.send(make_alert("cam-1", lat, lon, type="exposed_garbage"))
    [(event_id,)] = a.rows("SELECT id FROM events")
    from contract import EventStatus

    a.pool.set_status(int(str(event_id)), EventStatus.CLOSED, "op", "cleaned")
    assert b.send(make_alert("cam-2", lat, lon, type="exposed_garbage")) == [Outcome.ACCEPTED]
    assert b.rows("SELECT recurrence_of FROM events ORDER BY id") == [(None,), (event_id,)]


def test_replicas_on_a_shared_subscription_make_one_event_per_incident(
    broker: Any, tmp_path: Path
) -> None:
    """Two aggregators share the alert stream ($share) and one pool file; three cameras see one
    fire, each sending bursts that the broker splits between the replicas."""
    data = tmp_path / "shared"
    replicas = []
    for n in range(2):
        settings = aggregator_settings(broker, data)
        mqtt = settings.mqtt.model_dump()
        mqtt.update(client_id=f"agg-replica-{n}-{uuid.uuid4().hex[:6]}", share_group="cwg")
        settings = settings.model_copy(update={"mqtt": MqttSettings.model_validate(mqtt)})
        agg = build_aggregator(settings, grids=GRIDS)
        agg.start()
        assert agg.ingest.wait_connected(5)
        replicas.append(agg)
    try:
        lat, lon = interior(grid_in_community(1, 4))
        cams = ["cam-001", "cam-002", "cam-003"]
        clients = {c: broker.client(c) if c in broker.accounts else None for c in cams}
        for c in cams:
            if clients[c] is None:
                broker.add_device(c)
                clients[c] = broker.client(c)
        per_camera = 60

        def burst(i: int, cam: str) -> None:
            for k in range(per_camera):
                alert = make_alert(
                    cam, *offset(lat, lon, 30 * i, 10 * (k % 5)), seq=k, type="smoke_fire"
                )
                clients[cam].paho.publish(broker.topics.alert(cam), alert.to_json(), qos=1)

        threads = [threading.Thread(target=burst, args=(i, c)) for i, c in enumerate(cams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = per_camera * len(cams)
        wait_until(
            lambda: count(replicas[0], "SELECT count(*) FROM alerts") == total,
            timeout=30,
            what=f"{total} alerts pooled",
        )
        # both replicas did part of the work…
        assert all(r.ingest.stats().messages > 0 for r in replicas)
        # …and they agree: one fire, one event, every camera and alert on it
        assert count(replicas[0], "SELECT count(*) FROM events") == 1
        assert count(replicas[0], "SELECT alert_count FROM events") == total
        assert count(replicas[0], "SELECT device_count FROM events") == 3
        outcomes = count(replicas[0], "SELECT count(*) FROM alerts WHERE outcome='accepted'")
        assert outcomes == 1
    finally:
        for agg in replicas:
            agg.stop()
