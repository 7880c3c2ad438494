"""The whole agent, as a real process, against a real Mosquitto.

* Durability: alerts raised while the broker is down wait in the outbox; the agent is
  SIGKILLed and started again; the broker returns; a plain paho subscriber with a persistent
  session receives every alert exactly once, in seq order.
* Last Will: a killed agent's retained status turns offline (reason last_will).
* A camera agent on a real clip raises zone intrusions through the broker, a handful of
  them thanks to the cooldown, each a valid AlertV1 with a JPEG snapshot.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pytest
import yaml

from aggregator.config import Settings
from aggregator.pool.sqlite import connect as pool_connect
from aggregator.service import Aggregator, build_aggregator
from contract import AlertV1, DeviceState, Outcome, StatusV1, TelemetryV1
from edge.agent import build_agent
from edge.cli import main as cli_main
from edge.config import load_config

if TYPE_CHECKING:
    from tests.conftest import BrokerHandle, MqttTestClient

ROOT = Path(__file__).resolve().parents[2]
VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
# The walkway of vtest.avi, where the pedestrians are.
WALKWAY = [
    [0, 190],
    [420, 195],
    [600, 130],
    [768, 120],
    [768, 480],
    [560, 400],
    [330, 300],
    [0, 245],
]


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def write_smoke_replay(path: Path, episodes: int) -> None:
    # Each 1 → 0 pair is one alarm episode, hence one smoke_alarm alert (no cooldown).
    rows = ["timestamp,quantity,value"]
    for i in range(episodes):
        rows += [f"{i * 0.04:.2f},smoke_alarm,1", f"{i * 0.04 + 0.02:.2f},smoke_alarm,0"]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def sensor_config(
    broker: BrokerHandle, tmp_path: Path, replay: Path, *, loop: bool = False
) -> Path:
    data: dict[str, Any] = {
        "device": {"device_id": "sensor-001", "kind": "sensor"},
        "credentials": {"username": "sensor-001", "password_env": "CWG_TEST_PASSWORD"},
        "broker": {
            "host": broker.host,
            "port": broker.port,
            "topic_prefix": broker.prefix,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.5,
        },
        "geo": {"lat": 27.5579, "lon": 120.5347, "floor": 3},
        "sensors": [
            {
                "name": "smoke",
                "kind": "smoke",
                "unit": "",
                "source": {"type": "csv", "path": str(replay), "loop": loop},
            }
        ],
        "rules": [
            {
                "type": "smoke_alarm",
                "sensor": "smoke",
                "quantity": "smoke_alarm",
                "on_at": 1,
                "off_below": 0.5,
                "cooldown_s": 0,
            }
        ],
        "outbox": {"path": "outbox.db"},
        "heartbeat": {"interval_s": 1, "telemetry_interval_s": 1},
    }
    path = tmp_path / f"sensor-{replay.stem}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class AgentProcess:
    """``edge-agent run`` in a subprocess; killed by its own pid only."""

    def __init__(self, config: Path, state_dir: Path, password: str, *extra: str) -> None:
        env = {**os.environ, "CWG_TEST_PASSWORD": password}
        self.log = state_dir / f"agent-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edge.cli",
                    "run",
                    str(config),
                    "--state-dir",
                    str(state_dir),
                    *extra,
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"agent did not finish in {timeout} s:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.kill()


def outbox_next_seq(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()
    return int(row[0]) if row else 0


@pytest.mark.slow
def test_outbox_survives_sigkill_and_broker_outage(
    broker: BrokerHandle, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    sub = broker.client(
        "aggregator", client_id="agg-durable", clean_start=False, session_expiry_s=600
    )
    sub.subscribe(broker.topics.alert("sensor-001"))
    state = tmp_path / "state"
    state.mkdir()
    db = state / "outbox.db"
    password = broker.password("sensor-001")

    first_replay = tmp_path / "first.csv"
    write_smoke_replay(first_replay, 20)
    broker.stop()

    # Run 1: the broker is down; 20 alerts are committed to the outbox, then the agent dies.
    run1 = AgentProcess(sensor_config(broker, tmp_path, first_replay), state, password)
    agents.append(run1)
    wait_for(lambda: outbox_next_seq(db) == 20, 60, "20 alerts in the outbox")
    run1.kill()

    # Run 2, a new process on the same state: 2 more alerts; the broker comes back meanwhile.
    second_replay = tmp_path / "second.csv"
    write_smoke_replay(second_replay, 2)
    broker.start()
    run2 = AgentProcess(
        sensor_config(broker, tmp_path, second_replay), state, password, "--exit-when-done"
    )
    agents.append(run2)
    assert run2.wait(60) == 0, run2.output()

    msgs = sub.expect(22, timeout=30)
    alerts = [AlertV1.model_validate_json(m.payload) for m in msgs]
    assert [a.seq for a in alerts] == list(range(22))
    assert len({a.alert_id for a in alerts}) == 22
    assert {a.type for a in alerts} == {"smoke_alarm"}
    assert all(a.device_id == "sensor-001" and a.evidence.reading is not None for a in alerts)
    sub.expect_nothing(1.0)

    # The outbox knows they were delivered.
    assert (
        cli_main(
            [
                "outbox",
                str(sensor_config(broker, tmp_path, second_replay)),
                "--state-dir",
                str(state),
                "--json",
            ]
        )
        == 0
    )


@pytest.mark.slow
def test_killed_agent_leaves_a_last_will(
    broker: BrokerHandle, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    watcher = broker.client("integrator")
    watcher.subscribe(broker.topics.status("sensor-001"))
    readings = broker.client("aggregator")
    readings.subscribe(broker.topics.telemetry("sensor-001"), qos=0)
    replay = tmp_path / "slow.csv"
    replay.write_text(
        "timestamp,quantity,value\n0,smoke_alarm,0\n5,smoke_alarm,0\n", encoding="utf-8"
    )
    agent = AgentProcess(
        sensor_config(broker, tmp_path, replay, loop=True), tmp_path, broker.password("sensor-001")
    )
    agents.append(agent)
    online = StatusV1.model_validate_json(watcher.expect(1, timeout=30)[0].payload)
    assert online.state is DeviceState.ONLINE
    assert online.kind == "sensor"
    # Heartbeats (every second) carry health.
    beat = StatusV1.model_validate_json(watcher.expect(1, timeout=10)[0].payload)
    assert beat.health is not None
    assert beat.health.outbox_depth == 0
    assert beat.health.uptime_s is not None
    assert beat.health.version
    # Every reading also goes out as telemetry, in batches.
    batch = TelemetryV1.model_validate_json(readings.expect(1, timeout=10)[0].payload)
    assert batch.device_id == "sensor-001"
    assert batch.readings[0].quantity == "smoke_alarm"
    assert batch.location is not None
    assert batch.location.floor == 3
    agent.kill()
    last: StatusV1 | None = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        last = StatusV1.model_validate_json(watcher.expect(1, timeout=15)[0].payload)
        if last.state is DeviceState.OFFLINE:
            break
    assert last is not None
    assert last.state is DeviceState.OFFLINE
    assert last.reason == "last_will"
    # It is retained: a newcomer learns it at once.
    late = broker.client("integrator")
    late.subscribe(broker.topics.status("sensor-001"))
    retained = late.expect(1)[0]
    assert retained.retain
    assert StatusV1.model_validate_json(retained.payload).reason == "last_will"


def excerpt(src: Path, dst: Path, frames: int) -> Path:
    """The first ``frames`` frames of a clip, to keep the test short on a small machine."""
    cap = cv2.VideoCapture(str(src))
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    writer: cv2.VideoWriter | None = None
    try:
        for _ in range(frames):
            ok, frame = cap.read()
            if not ok:
                break
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(dst), cv2.VideoWriter.fourcc(*"MJPG"), fps, (w, h))
            writer.write(frame)
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    return dst


@pytest.mark.slow
def test_camera_agent_raises_intrusions_on_a_real_clip(
    broker: BrokerHandle, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    if not VTEST.exists():
        pytest.fail("vtest.avi is missing: apt-get install -y opencv-doc")
    clip = excerpt(VTEST, tmp_path / "walkway.avi", 400)  # 40 s of pedestrians
    sub = broker.client("aggregator")
    sub.subscribe(broker.topics.alert("cam-001"))
    answers = broker.client("aggregator")
    answers.subscribe(broker.topics.feedback("cam-001"))
    statuses = broker.client("integrator")
    statuses.subscribe(broker.topics.status("cam-001"))
    aggregator = build_aggregator(
        Settings.model_validate(
            {
                "data_dir": tmp_path / "agg",
                "mqtt": {
                    "host": broker.host,
                    "port": broker.port,
                    "password": broker.password("aggregator"),
                    "client_id": "agg-edge-e2e",
                    "topic_prefix": broker.prefix,
                },
                "batch": {"max_messages": 50, "linger_ms": 10},
            }
        )
    )
    aggregator.start()
    assert aggregator.ingest.wait_connected(5)
    config = {
        "device": {"device_id": "cam-001", "kind": "camera"},
        "credentials": {"username": "cam-001", "password_env": "CWG_TEST_PASSWORD"},
        "broker": {"host": broker.host, "port": broker.port, "topic_prefix": broker.prefix},
        "geo": {
            "lat": 27.5618,
            "lon": 120.5378,
            "homography": [[4.0e-7, 0, 120.5376], [0, -4.0e-7, 27.5620], [0, 0, 1]],
        },
        "camera": {
            "url": str(clip),
            "sample_fps": 2,
            "realtime": False,
            "detector": {"classes": ["person"], "score_threshold": 0.4},
            "snapshot_max_bytes": 60000,
        },
        "zones": {"walkway": WALKWAY},
        "rules": [
            {
                "type": "zone_intrusion",
                "zone": "walkway",
                "min_dwell_s": 1,
                "cooldown_s": 10,
                "cooldown_scope": "zone",
            }
        ],
        "outbox": {"path": "cam.db"},
        "heartbeat": {"interval_s": 1},
    }
    path = tmp_path / "cam-001.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    agent = AgentProcess(path, tmp_path, broker.password("cam-001"), "--exit-when-done")
    agents.append(agent)
    try:
        assert agent.wait(240) == 0, agent.output()
        alerts = check_alerts_at_subscriber(sub)
        check_event_pool(aggregator, alerts)
        # The aggregator answered the device about each alert (accepted, then merged).
        feedback = answers.expect_feedback(len(alerts))
        assert {f.alert_id for f in feedback} == {a.alert_id for a in alerts}
        assert {f.outcome for f in feedback} <= {Outcome.ACCEPTED, Outcome.MERGED}
        check_heartbeats(statuses)
    finally:
        aggregator.stop()


def check_alerts_at_subscriber(sub: MqttTestClient) -> list[AlertV1]:
    alerts: list[AlertV1] = []
    while True:
        try:
            alerts += [AlertV1.model_validate_json(m.payload) for m in sub.expect(1, timeout=2)]
        except AssertionError:
            break
    # 40 s of walkway with a 10 s cooldown: a handful, not one per frame.
    assert 2 <= len(alerts) <= 5, [a.description for a in alerts]
    assert [a.seq for a in alerts] == list(range(len(alerts)))
    for alert in alerts:
        assert alert.type == "zone_intrusion"
        assert alert.device_id == "cam-001"
        assert alert.evidence.zone == "walkway"
        assert alert.evidence.model == "nanodet-m-416"
        assert alert.evidence.model_version
        assert alert.evidence.objects
        assert all(o.cls == "person" for o in alert.evidence.objects)
        assert all(o.track_id is not None and o.box is not None for o in alert.evidence.objects)
        jpeg = alert.snapshot_bytes()
        assert jpeg is not None
        assert jpeg[:3] == b"\xff\xd8\xff"
        assert len(jpeg) <= 60000
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None
        assert image.shape[1] > 100
        # The homography put the intruder on the ground, not at the camera.
        assert (alert.location.lat, alert.location.lon) != (27.5618, 120.5378)
        assert 27.5617 < alert.location.lat < 27.5620
        assert 120.5376 < alert.location.lon < 120.5380
    return alerts


def check_heartbeats(statuses: MqttTestClient) -> None:
    """Heartbeats carried the camera's health; the last word was a clean goodbye."""
    seen: list[StatusV1] = []
    while not seen or seen[-1].state is DeviceState.ONLINE:
        seen += [StatusV1.model_validate_json(m.payload) for m in statuses.expect(1, timeout=5)]
    assert seen[-1].reason == "shutdown"
    healthy = [s.health for s in seen if s.health is not None and s.health.fps]
    assert healthy, seen
    assert all(h.inference_ms is not None and h.inference_ms > 0 for h in healthy)
    assert all(h.frames_dropped == 0 for h in healthy)  # a file read for analysis drops none
    assert healthy[-1].uptime_s is not None


def check_event_pool(aggregator: Aggregator, alerts: list[AlertV1]) -> None:
    """The aggregator registered every alert in the event pool, in the right grid."""

    def stored() -> int:
        with closing(pool_connect(aggregator.settings.pool, readonly=True)) as db:
            return int(
                db.execute("SELECT count(*) FROM alerts WHERE device_id = 'cam-001'").fetchone()[0]
            )

    wait_for(lambda: stored() == len(alerts), 15, f"{len(alerts)} alerts in the event pool")
    with closing(pool_connect(aggregator.settings.pool, readonly=True)) as db:
        events = db.execute(
            "SELECT type, grid_code FROM events WHERE id IN"
            " (SELECT event_id FROM alerts WHERE device_id = 'cam-001')"
        ).fetchall()
    assert events
    assert {t for t, _ in events} == {"zone_intrusion"}
    # The intruder's ground position lies in Longxiang grid 10.
    assert {g for _, g in events} == {"33038300100101000010"}


@pytest.mark.slow
def test_sigterm_stops_the_agent_cleanly(
    broker: BrokerHandle, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    watcher = broker.client("integrator")
    watcher.subscribe(broker.topics.status("sensor-001"))
    replay = tmp_path / "idle.csv"
    replay.write_text("timestamp,quantity,value\n0,smoke_alarm,0\n5,smoke_alarm,0\n", "utf-8")
    agent = AgentProcess(
        sensor_config(broker, tmp_path, replay, loop=True), tmp_path, broker.password("sensor-001")
    )
    agents.append(agent)
    first = StatusV1.model_validate_json(watcher.expect(1, timeout=30)[0].payload)
    assert first.state is DeviceState.ONLINE
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait(15) == 0, agent.output()
    states = [StatusV1.model_validate_json(m.payload) for m in watcher.expect(1, timeout=5)]
    while states[-1].state is DeviceState.ONLINE:
        states += [StatusV1.model_validate_json(m.payload) for m in watcher.expect(1, timeout=5)]
    assert states[-1].reason == "shutdown"  # said goodbye: no Last Will
    assert "signal SIGTERM: stopping" in agent.output()
    assert "agent stopped device=sensor-001" in agent.output()


@pytest.mark.slow
def test_fire_lane_sample_raises_one_alert_per_parked_vehicle(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """The shipped fire-lane sample on the whole clip: the van and the car, once each."""
    if not VTEST.exists():
        pytest.fail("vtest.avi is missing: apt-get install -y opencv-doc")
    creds = broker.add_device("cam-fire-lane-01", "camera")
    sample = load_config(ROOT / "firmware-configs" / "cam-fire-lane-01.yaml")
    assert sample.camera is not None
    config = sample.model_copy(
        update={
            "broker": sample.broker.model_copy(
                update={"host": broker.host, "port": broker.port, "topic_prefix": broker.prefix}
            ),
            # Read the file as fast as detection goes (the sample plays it like a camera).
            "camera": sample.camera.model_copy(update={"realtime": False}),
        }
    )
    sub = broker.client("aggregator")
    sub.subscribe(broker.topics.alert("cam-fire-lane-01"))
    agent = build_agent(config, state_dir=tmp_path, password=creds.password.get_secret_value())
    assert agent.run(exit_when_done=True) == 0
    alerts = [AlertV1.model_validate_json(m.payload) for m in sub.expect(2, timeout=10)]
    sub.expect_nothing(1.0)
    assert {a.type for a in alerts} == {"fire_lane_occupied"}
    objects = [a.evidence.objects[0] for a in alerts]
    assert {o.cls for o in objects} <= {"car", "truck", "bus"}
    assert len({o.track_id for o in objects}) == 2  # two vehicles, one alert each
    assert all(a.evidence.dwell_s is not None and a.evidence.dwell_s >= 60 for a in alerts)
