"""At-least-once in, exactly-once out: SIGKILL the aggregator mid-stream, restart, count; on an
SQLite pool and on a PostgreSQL one."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from aggregator.pool.reader import open_reader

from .conftest import PoolBackend, grid_in_community, interior, make_alert, offset, wait_until

N = 1000


class AggregatorProcess:
    """`gateway run` as a real process, so that SIGKILL is a real crash."""

    def __init__(self, broker: Any, data_dir: Path, backend: PoolBackend) -> None:
        self.broker = broker
        self.data_dir = data_dir
        self.backend = backend
        self.password_file = data_dir / "aggregator.password"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.password_file.write_text(broker.password("aggregator"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "aggregator.log"

    def start(self) -> None:
        env = {
            **os.environ,
            # small batches, so that a kill lands between commits
            "CWG_BATCH__MAX_MESSAGES": "10",
            "CWG_BATCH__LINGER_MS": "0",
            "CWG_MQTT__RECEIVE_MAXIMUM": "200",
            "CWG_MQTT__TOPIC_PREFIX": self.broker.prefix,
        }
        env.pop("CWG_POOL_URL", None)
        if self.backend.is_postgres:  # from the environment, as a deployment passes it
            env["CWG_POOL_URL"] = self.backend.target
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "aggregator.cli",
                    "run",
                    "--data-dir",
                    str(self.data_dir),
                    "--broker",
                    f"{self.broker.host}:{self.broker.port}",
                    "--password-file",
                    str(self.password_file),
                    "--client-id",
                    "agg-crash-test",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    @property
    def pool_target(self) -> Path | str:
        return self.backend.target if self.backend.is_postgres else self.data_dir / "pool.db"

    def alerts(self) -> int:
        if isinstance(self.pool_target, Path) and not self.pool_target.exists():
            return 0
        with closing(open_reader(self.pool_target)) as db:
            try:
                return int(db.execute("SELECT count(*) FROM alerts").fetchone()[0])
            except sqlite3.OperationalError:  # the schema is not created yet
                return 0

    def connected(self) -> bool:
        return self.log.exists() and b"connected session_present" in self.log.read_bytes()


@pytest.fixture
def agg_process(
    broker: Any, tmp_path: Path, pool_backend: PoolBackend
) -> Iterator[AggregatorProcess]:
    proc = AggregatorProcess(broker, tmp_path / "agg", pool_backend)
    yield proc
    proc.stop()


def test_sigkill_with_1000_alerts_in_flight_loses_none_and_counts_none_twice(
    broker: Any, agg_process: AggregatorProcess
) -> None:
    agg_process.start()
    wait_until(agg_process.connected, timeout=20, what="aggregator connected")
    cam = broker.client("cam-001")
    lat, lon = interior(grid_in_community(0))
    types = ("crowd_gathering", "zone_intrusion", "street_vending")
    alerts = [
        make_alert("cam-001", *offset(lat, lon, north_m=(i % 2) * 100), seq=i, type=types[i % 3])
        for i in range(N)
    ]
    for alert in alerts:  # published without waiting: all 1000 are in flight at once
        cam.paho.publish(broker.topics.alert("cam-001"), alert.to_json(), qos=1)

    at_kill = wait_until(agg_process.alerts, timeout=20, what="first commits")
    agg_process.kill()
    assert at_kill < N, "the aggregator finished before the kill; nothing was in flight"

    agg_process.start()
    wait_until(lambda: agg_process.alerts() >= N, timeout=60, what=f"{N} alerts pooled")
    time.sleep(1.0)  # anything more would be a double count: give it the chance to show
    with closing(open_reader(agg_process.pool_target)) as db:
        stored = {r[0] for r in db.execute("SELECT alert_id FROM alerts")}
        assert len(stored) == db.execute("SELECT count(*) FROM alerts").fetchone()[0] == N
        assert stored == {a.alert_id for a in alerts}
        # every alert counted once in the events it joined
        assert db.execute("SELECT sum(alert_count) FROM events").fetchone()[0] == N
        assert db.execute("SELECT sum(alert_count) FROM event_devices").fetchone()[0] == N


def test_io_process_killed_mid_stream_is_replaced_and_nothing_is_lost(
    broker: Any, tmp_path: Path, pool_backend: PoolBackend
) -> None:
    """The MQTT I/O child dies with alerts in flight: a new one takes over the session, the
    broker redelivers what was never acknowledged, and every alert is pooled exactly once."""
    cam = broker.client("cam-002")
    lat, lon = interior(grid_in_community(2))
    alerts = [make_alert("cam-002", lat, lon, seq=i, type="crowd_gathering") for i in range(N)]
    agg = _started_aggregator(broker, tmp_path, pool_backend)
    try:
        first_child = agg.ingest._transport._process  # type: ignore[attr-defined]
        for alert in alerts[:600]:
            cam.paho.publish(broker.topics.alert("cam-002"), alert.to_json(), qos=1)
        at_kill = wait_until(lambda: _pooled(agg), timeout=20, what="first commits")
        os.kill(first_child.pid, signal.SIGKILL)
        assert at_kill < 600, "everything was pooled before the kill; nothing was in flight"
        for alert in alerts[600:]:
            cam.paho.publish(broker.topics.alert("cam-002"), alert.to_json(), qos=1)
        wait_until(lambda: _pooled(agg) >= N, timeout=60, what=f"{N} alerts pooled")
        time.sleep(1.0)
        assert agg.ingest._transport._process is not first_child  # type: ignore[attr-defined]
        assert agg.ingest.stats().connected
        with closing(open_reader(agg.settings.pool_target)) as db:
            stored = {r[0] for r in db.execute("SELECT alert_id FROM alerts")}
            assert stored == {a.alert_id for a in alerts}
            assert db.execute("SELECT sum(alert_count) FROM events").fetchone()[0] == N
    finally:
        agg.stop()


def _started_aggregator(broker: Any, data_dir: Path, backend: PoolBackend) -> Any:
    from aggregator.service import build_aggregator

    from .conftest import GRIDS, aggregator_settings

    settings = aggregator_settings(broker, data_dir / "agg", **backend.settings_overrides())
    agg = build_aggregator(settings, grids=GRIDS)
    agg.start()
    assert agg.ingest.wait_connected(10)
    return agg


def _pooled(agg: Any) -> int:
    with closing(open_reader(agg.settings.pool_target)) as db:
        return int(db.execute("SELECT count(*) FROM alerts").fetchone()[0])
