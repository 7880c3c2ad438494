"""What the broker-killed and fault-matrix tests share: a device that raises alerts at a steady
rate through the edge agent's own outbox and publisher, the aggregator and the edge agent as
real processes (so SIGKILL is a real crash), and the tally of the pool against what was raised.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from aggregator.pool.sqlite import connect as pool_connect
from contract import AlertV1, Location, Severity, new_alert_id, utcnow
from edge.config import Broker
from edge.outbox import Outbox
from edge.publisher import Publisher

if TYPE_CHECKING:
    from tests.conftest import BrokerHandle

ROOT = Path(__file__).resolve().parents[2]
# Inside Longxiang grid 10 of the Longgang sample: every alert becomes an alert row.
HERE = Location(lat=27.5618, lon=120.5378)


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def fast_dir(fallback: Path) -> Iterator[Path]:
    """A directory in memory (/dev/shm) when there is one.

    The edge outbox commits each alert with ``synchronous=FULL``; at 500 alerts/s that is more
    fsyncs than this machine's disk gives (~400/s measured). These tests are about the broker
    and the aggregator, not the device's flash, so the device's file lives in memory.
    """
    shm = Path("/dev/shm")
    if not shm.is_dir():
        fallback.mkdir(parents=True, exist_ok=True)
        yield fallback
        return
    path = Path(tempfile.mkdtemp(prefix="cwg-edge-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class AlertStream:
    """One device: alerts enqueued at ``rate``/s into a real outbox, drained by the real
    publisher (feedback-driven delivery, resends), as the edge agent's alert path does."""

    def __init__(
        self,
        broker: BrokerHandle,
        device_id: str,
        outbox_path: Path,
        *,
        feedback_timeout_s: float = 2.0,
    ) -> None:
        self.device_id = device_id
        self.outbox = Outbox(outbox_path, feedback_timeout_s=feedback_timeout_s)
        self.publisher = Publisher(
            device_id=device_id,
            kind="sensor",
            broker=Broker(host=broker.host, port=broker.port, topic_prefix=broker.prefix),
            username=device_id,
            password=broker.password(device_id),
            outbox=self.outbox,
        )
        self.ids: list[str] = []
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    def _build(self, seq: int) -> AlertV1:
        return AlertV1(
            alert_id=new_alert_id(self.device_id),
            device_id=self.device_id,
            seq=seq,
            type="noise_over_limit",
            severity=Severity.MEDIUM,
            confidence=0.9,
            observed_at=utcnow(),
            location=HERE,
        )

    def start(self) -> None:
        self.publisher.start()

    def produce(self, rate: float, seconds: float) -> None:
        """Raise ``rate`` alerts a second for ``seconds``, on a thread (see ``join``)."""

        def run() -> None:
            tick = 0.02
            per_tick = rate * tick
            owed = 0.0
            t0 = time.monotonic()
            n = 0
            while not self._done.is_set() and time.monotonic() - t0 < seconds:
                owed += per_tick
                while owed >= 1:
                    alert, result = self.outbox.enqueue(self._build)
                    assert result.stored
                    self.ids.append(alert.alert_id)
                    owed -= 1
                self.publisher.wake()
                n += 1
                # Paced against the start, so a slow round is made up, not lost.
                self._done.wait(max(0.0, t0 + n * tick - time.monotonic()))

        self._thread = threading.Thread(target=run, name="alert-producer", daemon=True)
        self._thread.start()

    def finish(self, timeout: float = 10.0) -> None:
        """Stop raising alerts (the publisher goes on draining the outbox)."""
        self._done.set()
        self.join(timeout)

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "the producer did not finish"

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(10)
        self.publisher.stop()
        self.outbox.close()


@dataclass(frozen=True)
class Tally:
    raised: int
    stored: int
    lost: int
    doubled: int
    unknown: int  # rows of this device that were never raised (must be 0)


def tally(pool: Path, device_id: str, raised: list[str] | int) -> Tally:
    """The pool against what the device raised: by alert_id, or by seq 0..n-1 when the
    device's ids are not known to the test (an edge agent in another process)."""
    with closing(pool_connect(pool, readonly=True)) as db:
        rows = db.execute(
            "SELECT alert_id, seq FROM alerts WHERE device_id = ?", (device_id,)
        ).fetchall()
    ids = [str(r[0]) for r in rows]
    seqs = [int(r[1]) for r in rows]
    if isinstance(raised, int):
        want_seqs = set(range(raised))
        return Tally(
            raised=raised,
            stored=len(rows),
            lost=len(want_seqs - set(seqs)),
            doubled=len(seqs) - len(set(seqs)),
            unknown=len(set(seqs) - want_seqs),
        )
    want = set(raised)
    return Tally(
        raised=len(raised),
        stored=len(rows),
        lost=len(want - set(ids)),
        doubled=len(ids) - len(set(ids)) + len(seqs) - len(set(seqs)),
        unknown=len(set(ids) - want),
    )


class _Child:
    """A child process the matrix kills or stops: SIGTERM, then SIGKILL after ``stop_wait_s``."""

    proc: subprocess.Popen[bytes] | None
    stop_wait_s = 15.0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_wait_s)
            except subprocess.TimeoutExpired:
                self.kill()


class AggregatorProcess(_Child):
    """``gateway run`` as a real process, so that SIGKILL is a real crash."""

    def __init__(
        self,
        broker: BrokerHandle,
        data_dir: Path,
        *,
        client_id: str = "agg-fault-matrix",
        args: Sequence[str] = (),
        **env: str,
    ) -> None:
        self.broker = broker
        self.data_dir = data_dir
        self.client_id = client_id  # replicas each need their own: it names the session
        self.args = list(args)  # more `gateway run` options (--share-group, --http-port, …)
        self.pool = data_dir / "pool.db"
        self.password_file = data_dir / "aggregator.password"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.password_file.write_text(broker.password("aggregator"))
        self.password_file.chmod(0o600)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"{data_dir.name}.log"

    def start(self) -> None:
        env = {
            **os.environ,
            "CWG_BATCH__MAX_MESSAGES": "200",
            "CWG_BATCH__LINGER_MS": "10",
            "CWG_MQTT__TOPIC_PREFIX": self.broker.prefix,
            **self.env,
        }
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "aggregator.cli", "run",
                    "--data-dir", str(self.data_dir),
                    "--broker", f"{self.broker.host}:{self.broker.port}",
                    "--password-file", str(self.password_file),
                    "--client-id", self.client_id,
                    *self.args,
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


class EdgeAgentProcess(_Child):
    """``edge-agent run`` for a sensor replaying smoke-alarm episodes; SIGKILL is a crash."""

    stop_wait_s = 20.0  # on SIGTERM the agent stops its sources and says goodbye first

    def __init__(
        self, broker: BrokerHandle, device_id: str, state_dir: Path, rate: float, episodes: int
    ) -> None:
        self.broker = broker
        self.device_id = device_id
        self.state_dir = state_dir
        self.outbox = state_dir / "outbox.db"
        state_dir.mkdir(parents=True, exist_ok=True)
        # Each 1 → 0 pair is one smoke_alarm alert (no cooldown): ``episodes`` alerts a run.
        step = 1.0 / rate / 2
        rows = ["timestamp,quantity,value"]
        for i in range(episodes):
            rows += [f"{2 * i * step:.4f},smoke_alarm,1", f"{(2 * i + 1) * step:.4f},smoke_alarm,0"]
        replay = state_dir / "smoke.csv"
        replay.write_text("\n".join(rows) + "\n", encoding="utf-8")
        config: dict[str, Any] = {
            "device": {"device_id": device_id, "kind": "sensor"},
            "credentials": {"username": device_id, "password_env": "CWG_TEST_PASSWORD"},
            "broker": {"host": broker.host, "port": broker.port, "topic_prefix": broker.prefix},
            "geo": {"lat": HERE.lat, "lon": HERE.lon},
            "sensors": [
                {
                    "name": "smoke",
                    "kind": "smoke",
                    "unit": "",
                    "source": {"type": "csv", "path": str(replay), "loop": False},
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
            "outbox": {"path": str(self.outbox), "feedback_timeout_s": 2},
            "heartbeat": {"interval_s": 5, "telemetry_interval_s": 5},
        }
        self.config = state_dir / "agent.yaml"
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir / "agent.log"

    def start(self, *, exit_when_done: bool = False) -> None:
        env = {**os.environ, "CWG_TEST_PASSWORD": self.broker.password(self.device_id)}
        extra = ["--exit-when-done"] if exit_when_done else []
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge.cli", "run", str(self.config),
                 "--state-dir", str(self.state_dir), *extra],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def raised(self) -> int:
        """Alerts committed to the outbox so far (its next seq)."""
        if not self.outbox.exists():
            return 0
        with closing(sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True, timeout=5)) as db:
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            except sqlite3.OperationalError:
                return 0
        return int(row[0]) if row else 0

    def undelivered(self) -> int:
        with closing(sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True, timeout=5)) as db:
            row = db.execute("SELECT count(*) FROM alerts WHERE delivered_at IS NULL").fetchone()
        return int(row[0])

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def caught_up(pool: Path, device_id: str, n: int) -> bool:
    """Whether the pool holds the device's alerts of seq 0..n-1 (all that was raised by then)."""
    if n == 0:
        return True
    try:
        with closing(pool_connect(pool, readonly=True)) as db:
            row = db.execute(
                "SELECT count(DISTINCT seq) FROM alerts WHERE device_id = ? AND seq < ?",
                (device_id, n),
            ).fetchone()
    except sqlite3.Error:
        return False  # not created yet, or being recovered
    return int(row[0]) >= n
