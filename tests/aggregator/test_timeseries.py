"""Time series through the real pipeline into a real VictoriaMetrics (InfluxDB v2 write API)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from aggregator.broker.launcher import free_port
from aggregator.fanout.timeseries import TimeSeriesSettings, TimeSeriesSink
from aggregator.service import Aggregator, build_aggregator
from contract import Reading, TelemetryV1

from .conftest import GRIDS, aggregator_settings, count, grid_in_community, interior, make_alert

INSTALL_HINT = "victoria-metrics is missing: apt-get install -y victoria-metrics"


class VictoriaMetrics:
    """A victoria-metrics process on a loopback port; stop() and start() keep port and data."""

    def __init__(self, data: Path, port: int) -> None:
        self.data, self.port = data, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("victoria-metrics")
        if exe is None:
            pytest.fail(INSTALL_HINT)
        self.proc = subprocess.Popen(
            [
                exe,
                f"-storageDataPath={self.data}",
                f"-httpListenAddr=127.0.0.1:{self.port}",
                "-loggerLevel=ERROR",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("victoria-metrics did not answer /health within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # only the process this fixture started, by its pid
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def series(self, name_regex: str = "cwg_.*") -> list[dict[str, Any]]:
        httpx.get(f"{self.url}/internal/force_flush", timeout=5).raise_for_status()
        params = {
            "match[]": f'{{__name__=~"{name_regex}"}}',
            "start": "0",
            "end": str(time.time() + 60),
        }
        r = httpx.get(f"{self.url}/api/v1/export", params=params, timeout=5)
        r.raise_for_status()
        body = r.content
        return [orjson.loads(line) for line in body.splitlines() if line.strip()]


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    server = VictoriaMetrics(tmp_path / "vm", free_port())
    server.start()
    yield server
    server.stop()


def ts_settings(url: str, **kw: Any) -> TimeSeriesSettings:
    return TimeSeriesSettings(url=url, flush_interval_s=0.2, retry_max_s=0.5, timeout_s=2, **kw)


def wait_series(vm: VictoriaMetrics, check: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in vm.series() if check(s["metric"])]
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("series did not reach victoria-metrics in time")
        time.sleep(0.3)


@pytest.fixture
def pipeline(
    broker: Any, tmp_path: Path, vm: VictoriaMetrics
) -> Iterator[tuple[Aggregator, TimeSeriesSink]]:
    sink = TimeSeriesSink(ts_settings(vm.url))
    agg = build_aggregator(aggregator_settings(broker, tmp_path / "agg"), sinks=[sink], grids=GRIDS)
    sink.start()
    agg.start()
    assert agg.ingest.wait_connected(5)
    yield agg, sink
    agg.stop()
    sink.stop()


def send_alert(broker: Any, device: str, type_: str, community: int, seq: int) -> None:
    client = broker.client(device)
    alert = make_alert(device, *interior(grid_in_community(community, 3)), type=type_, seq=seq)
    assert not client.publish(broker.topics.alert(device), alert.to_json()).is_failure
    client.disconnect()


def test_alerts_telemetry_and_ingest_figures_reach_the_server(
    broker: Any, vm: VictoriaMetrics, pipeline: tuple[Aggregator, TimeSeriesSink]
) -> None:
    _agg, sink = pipeline
    send_alert(broker, "cam-001", "smoke_fire", 0, 1)
    send_alert(broker, "cam-002", "smoke_fire", 0, 1)  # same place: merged
    sensor = broker.client("sensor-001")
    now = datetime.now(UTC)
    telemetry = TelemetryV1(
        device_id="sensor-001",
        sent_at=now,
        readings=[
            Reading(quantity="noise_db", value=62.5, unit="dB", observed_at=now),
            Reading(quantity="water_level_m", value=0.42, unit="m", observed_at=now),
        ],
    )
    sensor.publish(broker.topics.telemetry("sensor-001"), telemetry.to_json())

    community = grid_in_community(0, 3).code[:12]
    alerts = wait_series(
        vm, lambda m: m["__name__"] == "cwg_alerts_count" and m.get("outcome") == "merged"
    )
    assert alerts[0]["metric"]["type"] == "smoke_fire"
    assert alerts[0]["metric"]["community"] == community
    assert alerts[0]["values"] == [1]
    accepted = wait_series(
        vm, lambda m: m["__name__"] == "cwg_alerts_count" and m.get("outcome") == "accepted"
    )
    assert accepted[0]["metric"]["grid"] == grid_in_community(0, 3).code
    noise = wait_series(
        vm, lambda m: m["__name__"] == "cwg_telemetry_value" and m.get("quantity") == "noise_db"
    )
    assert noise[0]["metric"]["device_id"] == "sensor-001"
    assert noise[0]["values"] == [62.5]
    ingest = wait_series(vm, lambda m: m["__name__"] == "cwg_ingest_messages")
    assert sum(ingest[0]["values"]) >= 3
    stats = sink.stats()
    assert stats.written > 0
    assert stats.dropped == 0
    assert stats.last_error is None


def test_server_down_ingest_goes_on_and_later_points_land(
    broker: Any, vm: VictoriaMetrics, pipeline: tuple[Aggregator, TimeSeriesSink]
) -> None:
    agg, sink = pipeline
    send_alert(broker, "cam-001", "smoke_fire", 0, 1)
    wait_series(vm, lambda m: m.get("type") == "smoke_fire")

    vm.stop()
    started = time.monotonic()
    for seq in range(2, 7):
        send_alert(broker, "cam-001", "gas_leak", seq % 4, seq)
    # Ingest does not wait for the time-series server: the alerts are pooled at once.
    deadline = time.monotonic() + 5
    while count(agg, "SELECT count(*) FROM alerts WHERE type='gas_leak'") < 5:
        assert time.monotonic() < deadline, "ingest stalled while the server was down"
        time.sleep(0.05)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while sink.stats().failed_writes == 0:
        assert time.monotonic() < deadline, "the sink never tried to write"
        time.sleep(0.05)
    assert sink.stats().buffered > 0

    vm.start()
    send_alert(broker, "cam-002", "water_level", 1, 9)
    later = wait_series(vm, lambda m: m.get("type") == "water_level")
    assert later[0]["metric"]["outcome"] == "accepted"
    # What was buffered during the outage lands too.
    held = wait_series(vm, lambda m: m.get("type") == "gas_leak")
    assert sum(sum(s["values"]) for s in held) == 5
    deadline = time.monotonic() + 5
    while sink.stats().buffered:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert sink.stats().dropped == 0


def test_full_buffer_drops_the_oldest_points_and_counts_them(tmp_path: Path) -> None:
    port = free_port()
    sink = TimeSeriesSink(ts_settings(f"http://127.0.0.1:{port}", buffer_points=10))
    now_ns = time.time_ns()
    sink.add([("cwg_buffer_test", {"run": "a"}, {"n": i}, now_ns + i) for i in range(25)])
    stats = sink.stats()
    assert stats.dropped == 15
    assert stats.buffered == 10
    server = VictoriaMetrics(tmp_path / "vm", port)
    server.start()
    try:
        sink.start()
        [series] = wait_series(server, lambda m: m["__name__"] == "cwg_buffer_test_n")
        assert sorted(series["values"]) == list(range(15, 25))  # the newest ten
    finally:
        sink.stop()
        server.stop()
