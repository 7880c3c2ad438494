"""Load generator: valid alerts at a target rate through the real broker, measured end to end.

Always bounded (a count, a duration, or both). Three publishing paths:

* ``mosquitto_pub`` (default, the C client): each publisher is a ``mosquitto_pub -l`` process
  with its own device credentials, QoS 1, reading one alert per line from its stdin. Feeder
  processes render the lines lazily at the paced rate, so ``observed_at`` is stamped just
  before the line is handed over.
* ``paho``: two worker processes, each serving its share of the publishers (paho clients with
  the lean QoS 1 paths of ``aggregator.ingest.mqtt``) on one select loop, each client with at most
  1,000 unacknowledged messages (paho stalls past ~65k). Per alert it takes about half the CPU
  of the ``mosquitto_pub`` path with its feeders.
* ``raw``: the same two workers, but paho only connects each publisher (CONNECT with its
  credentials, CONNACK with the broker's Receive Maximum); then ``RawConnection`` frames QoS 1
  PUBLISH packets in runs, writes them straight to the socket and parses the PUBACKs in bulk.
  About half the CPU of ``paho`` again (~16 against ~32 µs per alert at 10.5k/s,
  ``bench/bench_ingest.py``, whose default it is).

Payloads are pre-rendered AlertV1 JSON templates (one per device × type × position) in which
only ``alert_id``, ``seq`` and ``observed_at`` are filled in per message. Alert ids are the edge
agent's (``contract.new_alert_id``: the device id and a UUIDv7, in time order per device);
``alert_ids="uuid4"`` sends random ones instead, as a device of another make might, to measure
what they cost the pool's unique index. Results come from the pool: every alert of the run
counted (zero-loss check) and, per alert, ``observed_at`` → commit of its batch
(``alerts.batch_id = batches.id``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import queue
import random
import selectors
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any, Final, Literal

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from aggregator.broker.launcher import (
    BrokerEndpoint,
    DeviceCredentials,
    DeviceTopics,
    raise_fd_limit,
)
from aggregator.broker.registry import DeviceKind, DeviceRegistry
from aggregator.grids import GridIndex, default_grid_file
from aggregator.ingest.mqtt import LeanClient, own_loop_client, publish_packet
from contract import Catalogue, Reading, TelemetryV1, Topics, default_catalogue
from contract.ids import Uuid7
from simulators.errors import LoadError
from simulators.messages import make_alert
from simulators.poolview import PoolView
from simulators.stack import DeviceSpec, GatewayStack, Provisioner

__all__ = [
    "LoadConfig",
    "LoadReport",
    "PreProvisioned",
    "Template",
    "count_subscriber",
    "machine_description",
    "preprovision_fleet",
    "render",
    "run_load",
]

log = logging.getLogger(__name__)

_AID = "QQAIDQQ"
_SEQ = 987654321
_TS = datetime(2001, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)
_TS_JSON = b'"2001-02-03T04:05:06.789012Z"'
_TICK_S = 0.005
MAX_SMALL_FLEET: Final = 64
MAX_CONNECTIONS: Final = 20_000
_PROGRESS_S = 2.0
_PAHO_INFLIGHT = 1000
_KEEPALIVE_S = 30
_DRAIN_S = 60.0
_RECV_CHUNK = 1 << 16
# "Try again later" on a non-blocking socket, plain or TLS (a TLS write may need a read first
# and the other way round; either way the same bytes are offered again on the next turn).
_TLS_RECORD: Final = 16384  # the largest TLS record's payload
_WOULD_BLOCK: Final = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class LoadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(
        default=2000, gt=0, le=200_000, description="target alerts per second, in total"
    )
    count: int | None = Field(default=None, ge=1, le=5_000_000, description="alerts to send")
    duration_s: float | None = Field(default=None, gt=0, le=3600, description="seconds to send for")
    mode: Literal["mosquitto_pub", "paho", "raw"] = "mosquitto_pub"
    publishers: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CONNECTIONS,
        description="publishing clients, each a device with its own account and connection "
        f"(default: enough for the rate); more than {MAX_SMALL_FLEET} only in the raw mode",
    )
    workers: int | None = Field(
        default=None, ge=1, le=16, description="generator processes (default 2)"
    )
    connect_rate: float = Field(
        default=500, gt=0, le=10_000, description="new device connections per second, in total"
    )
    telemetry_interval_s: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="raw mode: each device also sends one telemetry/v1 (QoS 0) this often",
    )
    progress: bool = Field(default=False, description="progress lines on stderr")
    snapshot: bool = Field(default=False, description="attach a small JPEG to every alert")
    alert_ids: Literal["uuid7", "uuid4"] = Field(
        default="uuid7",
        description="uuid7: the edge agent's ids, <device_id>-<UUIDv7 hex>, in time order per "
        "device; uuid4: <device_id>-<random hex>, as a device of another make might send",
    )
    templates_per_device: int = Field(default=64, ge=1, le=4096)
    drain_timeout_s: float | None = Field(
        default=None, gt=0, description="how long to wait for the pool to hold everything sent"
    )
    seed: int = 7

    @model_validator(mode="after")
    def _bounded(self) -> LoadConfig:
        if self.count is None and self.duration_s is None:
            raise ValueError("give count or duration_s (or both): a load run is always bounded")
        # Past a few dozen clients only the raw path scales: one mosquitto_pub process per
        # device, or paho's per-client loop work, would take the cores the broker needs.
        if (self.publishers or 0) > MAX_SMALL_FLEET and self.mode != "raw":
            raise ValueError(f"more than {MAX_SMALL_FLEET} publishers need mode 'raw'")
        if self.telemetry_interval_s is not None and self.mode != "raw":
            raise ValueError("telemetry is sent by the raw mode only")
        return self

    @property
    def n_workers(self) -> int:
        # Two by default, one per core of the 2-core reference machine.
        return self.workers or 2

    @property
    def total(self) -> int:
        by_time = math.inf if self.duration_s is None else self.rate * self.duration_s
        return int(min(self.count or math.inf, by_time))

    @property
    def n_publishers(self) -> int:
        if self.publishers is not None:
            return self.publishers
        per = 6000
        return max(2, min(32, math.ceil(self.rate / per)))


@dataclass(frozen=True, slots=True)
class Template:
    """An AlertV1 JSON cut around its three per-message fields."""

    head: bytes  # ... "alert_id":"
    mid1: bytes  # ...,"seq":
    mid2: bytes  # ...,"observed_at":
    tail: bytes


def make_template(payload: bytes) -> Template:
    a = payload.index(f'"{_AID}"'.encode())
    s = payload.index(f'"seq":{_SEQ}'.encode())
    t = payload.index(_TS_JSON)
    if not a < s < t:
        raise LoadError("unexpected field order in AlertV1 JSON")
    return Template(
        payload[: a + 1],
        payload[a + 1 + len(_AID) : s + 6],
        payload[s + 6 + len(str(_SEQ)) : t + 1],
        payload[t + len(_TS_JSON) - 1 :],
    )


def render(tpl: Template, alert_id: str, seq: int, stamp: bytes) -> bytes:
    return b"".join(
        (tpl.head, alert_id.encode(), tpl.mid1, str(seq).encode(), tpl.mid2, stamp, tpl.tail)
    )


def id_maker(alert_ids: str) -> Callable[[], str]:
    """What follows ``<device_id>-`` in each alert id (``LoadConfig.alert_ids``)."""
    if alert_ids == "uuid4":
        return lambda: os.urandom(16).hex()
    return Uuid7()


def stamp_now() -> bytes:
    now = time.time()
    whole = int(now)
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((now - whole) * 1e6):06d}Z"
    ).encode()


def build_templates(
    device_id: str,
    n: int,
    rng: random.Random,
    grids: GridIndex,
    catalogue: Catalogue,
    *,
    snapshot: bool,
) -> list[Template]:
    """``n`` templates for one device: types and grid positions drawn at random, so that the
    pool sees a realistic mix of new events and merges."""
    all_grids = sorted(grids.grids, key=lambda g: g.code)
    types = list(catalogue.types.values())
    out = []
    for i in range(n):
        grid = rng.choice(all_grids)
        lat, lon = grid.centroid
        alert = make_alert(
            alert_id=_AID,
            device_id=device_id,
            seq=_SEQ,
            wt=rng.choice(types),
            observed_at=_TS,
            lat=lat,
            lon=lon,
            snapshot=snapshot,
            variant=i,
        )
        out.append(make_template(alert.to_json()))
    return out


# ------------------------------------------------------------------------------- workers


@dataclass(frozen=True, slots=True)
class Publisher:
    device_id: str
    username: str
    password: str
    host: str
    port: int
    topic: str
    templates: list[Template]
    ca_file: str | None = None  # verified TLS with this CA; None: plain MQTT
    telemetry_topic: str = ""


@dataclass(frozen=True, slots=True)
class WorkerJob:
    mode: str
    alert_ids: str  # LoadConfig.alert_ids
    publishers: list[Publisher]
    rate: float  # this worker's share
    count: int  # this worker's share
    index: int = 0  # this worker's slots in _Sync.counters
    connect_rate: float = 500.0  # this worker's share
    telemetry_interval_s: float | None = None


@dataclass(slots=True)
class _Sync:
    """Workers report ready (publishers connected), then all start at one wall-clock time."""

    ready: Any  # multiprocessing Queue
    start_at: Any  # multiprocessing Value('d'); 0 until the parent sets it
    stop: MpEvent
    # Per worker: connections up, alerts handed to the sockets (for progress lines), as
    # multiprocessing Array('q') slots 2*index and 2*index+1; None: not counted.
    counters: Any = None

    def count(self, index: int, connected: int | None = None, sent: int | None = None) -> None:
        if self.counters is None:
            return
        if connected is not None:
            self.counters[2 * index] = connected
        if sent is not None:
            self.counters[2 * index + 1] = sent

    def wait_start(self) -> None:
        self.ready.put(os.getpid())
        while (at := self.start_at.value) == 0 or time.time() < at:
            if self.stop.is_set():
                return
            time.sleep(0.001)


def _worker(job: WorkerJob, results: Any, sync: _Sync) -> None:
    window: list[float] = []
    stats: dict[str, float] = {}
    try:
        # A spawned child starts with the parent's limits; raised here too in case the parent
        # could not (it never lowers the limit).
        raise_fd_limit(len(job.publishers) + 256)
        if job.mode == "mosquitto_pub":
            sent, errors = _feed_mosquitto_pub(job, sync, window)
        elif job.mode == "raw":
            sent, errors = _publish_raw(job, sync, window, stats)
        else:
            sent, errors = _publish_paho(job, sync, window)
        results.put({"sent": sent, "errors": errors, "window": window, "stats": stats})
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put(
            {
                "sent": 0,
                "errors": [f"{type(exc).__name__}: {exc}"],
                "window": window,
                "stats": stats,
            }
        )


def _pace(
    job: WorkerJob,
    sync: _Sync,
    emit: Any,
    window: list[float],
    every_tick: Any = None,
) -> int:
    """Call ``emit(n)`` so that ``job.count`` messages go out at ``job.rate``, and
    ``every_tick()`` (if given) once a tick; returns sent and records the wall-clock window it
    took in ``window``."""
    sync.wait_start()
    stop = sync.stop
    window.append(time.time())
    t0 = time.monotonic()
    sent = 0
    while sent < job.count and not stop.is_set():
        due = min(job.count, int((time.monotonic() - t0) * job.rate) + 1)
        if due > sent:
            sent += emit(due - sent)
            sync.count(job.index, sent=sent)
        if every_tick is not None:
            every_tick()
        time.sleep(_TICK_S)
    window.append(time.time())
    return sent


def _feed_mosquitto_pub(job: WorkerJob, sync: _Sync, window: list[float]) -> tuple[int, list[str]]:
    exe = shutil.which("mosquitto_pub")
    if exe is None:
        raise LoadError("mosquitto_pub not found; apt-get install -y mosquitto-clients")
    procs = []
    # Credentials go in each publisher's own options file (mosquitto_pub reads
    # $XDG_CONFIG_HOME/mosquitto_pub), not on its command line where `ps` would show them.
    conf_root = Path(tempfile.mkdtemp(prefix="cwg-load-"))
    for p in job.publishers:
        home = conf_root / p.device_id
        home.mkdir(mode=0o700)
        opts = home / "mosquitto_pub"
        opts.touch(mode=0o600)
        opts.write_text(f"-u {p.username}\n-P {p.password}\n", encoding="utf-8")
        tls = ["--cafile", p.ca_file] if p.ca_file is not None else []  # verifies the host too
        procs.append(
            subprocess.Popen(
                [
                    exe,
                    "-h",
                    p.host,
                    "-p",
                    str(p.port),
                    "-V",
                    "mqttv5",
                    "-i",
                    p.device_id,  # the broker binds a device to its id
                    "-t",
                    p.topic,
                    "-q",
                    "1",
                    "-M",
                    str(_PAHO_INFLIGHT),
                    "-l",
                    "--quiet",
                    *tls,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**os.environ, "XDG_CONFIG_HOME": str(home)},
            )
        )
    seqs = [0] * len(procs)
    turn = 0
    new_id = id_maker(job.alert_ids)

    def emit(n: int) -> int:
        nonlocal turn
        stamp = stamp_now()  # fresh for this slice of lines
        per = [n // len(procs) + (1 if i < n % len(procs) else 0) for i in range(len(procs))]
        for k in range(len(procs)):
            i = (turn + k) % len(procs)
            if per[k] == 0:
                continue
            pub = job.publishers[i]
            lines = []
            for _ in range(per[k]):
                seqs[i] += 1
                s = seqs[i]
                tpl = pub.templates[s % len(pub.templates)]
                lines.append(render(tpl, f"{pub.device_id}-{new_id()}", s, stamp))
            stdin = procs[i].stdin
            assert stdin is not None
            stdin.write(b"\n".join(lines) + b"\n")
            stdin.flush()
        turn += 1
        return n

    errors: list[str] = []
    try:
        sent = _pace(job, sync, emit, window)
    finally:
        for proc in procs:
            if proc.stdin:
                proc.stdin.close()  # EOF: mosquitto_pub finishes its in-flight QoS 1 and exits
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            err = proc.stderr.read() if proc.stderr else b""
            if proc.returncode != 0:
                errors.append(
                    f"mosquitto_pub exited {proc.returncode}: {err.decode(errors='replace')[:300]}"
                )
        shutil.rmtree(conf_root, ignore_errors=True)
    return sent, errors


class _Clients:
    """A worker's publishers as paho clients on one selector loop of its own (epoll: no
    limit at fd 1,024), connected (MQTT 5, with their device credentials) by ``connect`` at
    the job's connect rate."""

    def __init__(self, job: WorkerJob, on_connected: Callable[[int], None] | None = None) -> None:
        self.job = job
        n = len(job.publishers)
        self.clients: list[LeanClient] = []
        self.inflight = [0] * n  # paho mode: QoS 1 messages not yet acknowledged
        self.room = [0] * n  # 0 until CONNACK, then how many may be unacknowledged
        self.errors: list[str] = []
        self.connected = 0
        self.connect_seconds = 0.0
        self.sel = selectors.DefaultSelector()
        self._on_connected = on_connected
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._last_misc = time.monotonic()

    def _open(self, i: int) -> None:
        p = self.job.publishers[i]
        c = own_loop_client(p.device_id)  # the broker binds a device to its id
        c.username_pw_set(p.username, p.password)
        if p.ca_file is not None:
            # One verifying context per CA for all of this worker's clients: loading the CA
            # once, not thousands of times.
            context = self._contexts.get(p.ca_file)
            if context is None:
                context = ssl.create_default_context(cafile=p.ca_file)
                self._contexts[p.ca_file] = context
            c.tls_set_context(context)
        c.on_connect = partial(self._on_connect, i)
        c.on_publish = partial(self._on_publish, i)
        self.clients.append(c)
        try:
            c.connect(p.host, p.port, keepalive=_KEEPALIVE_S)
        except OSError as exc:
            self.errors.append(f"{p.device_id}: cannot connect to the broker: {exc}")
            return
        sock = c.socket()
        if sock is not None:
            self.sel.register(sock, selectors.EVENT_READ, c)

    def _on_connect(self, i: int, _c: Any, _u: Any, _f: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.errors.append(
                f"{self.job.publishers[i].device_id}: broker refused connection: {rc}"
            )
            return
        server_max = getattr(props, "ReceiveMaximum", 65535) if props else 65535
        self.room[i] = min(_PAHO_INFLIGHT, int(server_max))
        self.connected += 1

    def _on_publish(self, i: int, _c: Any, _u: Any, _mid: int, rc: Any, _p: Any) -> None:
        self.inflight[i] -= 1
        if rc.is_failure and len(self.errors) < 20:
            self.errors.append(f"{self.job.publishers[i].device_id}: PUBACK {rc}")

    def connect(self, timeout: float | None = None) -> bool:
        """Open the connections at the job's connect rate and wait for every CONNACK; False
        (with ``errors`` saying why) if one did not come. The default timeout is the time the
        rate needs plus 30 s."""
        n = len(self.job.publishers)
        rate = self.job.connect_rate
        limit = n / rate + 30.0 if timeout is None else timeout
        t0 = time.monotonic()
        deadline = t0 + limit
        while self.connected < n and not self.errors and time.monotonic() < deadline:
            due = min(n, int((time.monotonic() - t0) * rate) + 1)
            while len(self.clients) < due and not self.errors:
                self._open(len(self.clients))
            self.serve(0.01)
            if self._on_connected is not None:
                self._on_connected(self.connected)
        self.connect_seconds = time.monotonic() - t0
        if self.errors or self.connected < n:
            if not self.errors:
                self.errors.append(
                    f"{n - self.connected} of {n} publishers got no CONNACK within {limit:.0f} s"
                )
            self.disconnect()
            return False
        return True

    def serve(self, timeout: float) -> None:
        """One round of network I/O for every client: writes, reads, and (once a second)
        keepalive."""
        for c in self.clients:
            if c.want_write():
                c.loop_write()
        for key, _ in self.sel.select(timeout):
            key.data.loop_read()
        now = time.monotonic()
        misc = now - self._last_misc >= 1.0
        if misc:
            self._last_misc = now
        for i, c in enumerate(self.clients):
            if c.buffered():
                c.loop_read()
            if misc:
                if c.socket() is None:
                    raise LoadError(
                        f"{self.job.publishers[i].device_id}: connection to the broker lost"
                    )
                c.loop_misc()

    def disconnect(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_write()
        self.sel.close()


def _publish_paho(job: WorkerJob, sync: _Sync, window: list[float]) -> tuple[int, list[str]]:
    """All of this worker's publishers on one select loop: paho clients with the lean QoS 1
    publish and read paths of the aggregator's own session (``aggregator.ingest.mqtt``), each with
    at most ``_PAHO_INFLIGHT`` unacknowledged messages (or the broker's Receive Maximum)."""
    net = _Clients(job)
    if not net.connect():
        return 0, net.errors
    n = len(job.publishers)
    clients, inflight, room = net.clients, net.inflight, net.room
    pending: list[deque[bytes]] = [deque() for _ in range(n)]

    def pump() -> None:
        for i, c in enumerate(clients):
            q = pending[i]
            topic = job.publishers[i].topic
            while q and inflight[i] < room[i]:
                info = c.publish(topic, q.popleft(), qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise LoadError(f"{job.publishers[i].device_id}: publish failed: {info.rc}")
                inflight[i] += 1
            if c.want_write():
                c.loop_write()

    alerts = _Alerts(job)

    def emit(count: int) -> int:
        for i, payload in alerts.take(count):
            pending[i].append(payload)
        return count

    def every_tick() -> None:
        # One round per tick: each round's messages and PUBACKs go in a few system calls, not
        # one wakeup per PUBACK.
        pump()
        net.serve(0.0)

    sent = _pace(job, sync, emit, window, every_tick)
    deadline = time.monotonic() + _DRAIN_S
    while (any(pending) or any(inflight)) and time.monotonic() < deadline and not net.errors:
        pump()
        net.serve(0.05)
    errors = list(net.errors)
    if any(pending) or any(inflight):
        errors.append(f"not every PUBACK arrived within {_DRAIN_S:.0f} s")
    net.disconnect()
    return sent, errors


class _Alerts:
    """A worker's alerts in sending order: round-robin over its publishers, each with its own
    ``seq`` and its templates in turn."""

    def __init__(self, job: WorkerJob) -> None:
        self.job = job
        self.seqs = [0] * len(job.publishers)
        self.turn = 0
        self.new_id = id_maker(job.alert_ids)

    def take(self, count: int) -> Iterator[tuple[int, bytes]]:
        """The next ``count``: (publisher index, AlertV1 JSON), all stamped now."""
        stamp = stamp_now()  # fresh for this slice
        job, seqs, new_id = self.job, self.seqs, self.new_id
        n = len(job.publishers)
        for _ in range(count):
            i = self.turn % n
            self.turn += 1
            pub = job.publishers[i]
            seqs[i] += 1
            s = seqs[i]
            tpl = pub.templates[s % len(pub.templates)]
            yield i, render(tpl, f"{pub.device_id}-{new_id()}", s, stamp)


_PINGREQ: Final = b"\xc0\x00"
_DISCONNECT: Final = b"\xe0\x00"  # normal disconnection (MQTT 5: no reason code means 0)


class RawConnection:
    """One publisher's broker connection after its paho handshake (CONNECT with the device's
    credentials, CONNACK, the broker's Receive Maximum): QoS 1 PUBLISH packets are framed in
    runs and written straight to the socket, and PUBACKs parsed in bulk. Per message that is
    about half the CPU of the paho clients' lean path (``bench/bench_ingest.py --mode paho``
    compares), which on a 2-core machine leaves more to the broker and the aggregator.

    Every packet identifier in flight is distinct (a PUBACK frees it), at most ``room`` are
    unacknowledged, and a PUBACK with a failure reason code is reported in ``errors``."""

    __slots__ = (
        "_mid",
        "errors",
        "inbuf",
        "last_write",
        "name",
        "out",
        "pending",
        "room",
        "sock",
        "tls",
        "topic",
        "unacked",
    )

    def __init__(self, name: str, sock: Any, topic: str, room: int, errors: list[str]) -> None:
        self.name = name
        self.sock = sock
        self.topic = topic.encode()
        self.room = room
        self.errors = errors
        self.pending: deque[bytes] = deque()  # payloads waiting for room
        self.out = bytearray()  # framed, not yet written
        self.inbuf = bytearray()
        self.unacked: set[int] = set()
        self.last_write = time.monotonic()
        self._mid = 0
        self.tls = isinstance(sock, ssl.SSLSocket)

    def busy(self) -> bool:
        """Messages still to send or to be acknowledged."""
        return bool(self.pending or self.unacked or self.out)

    def pump(self) -> None:
        """Frame what there is room for, write what the socket takes, read what came back."""
        self._frame()
        self.ping_if_idle(time.monotonic())
        self.flush()
        self._read()

    def ping_if_idle(self, now: float) -> bool:
        """Queue a PINGREQ if nothing was written for a third of the keepalive (a quiet
        device, or draining): the broker would otherwise drop the session."""
        if not self.out and now - self.last_write > _KEEPALIVE_S / 3:
            self.out += _PINGREQ
            return True
        return False

    def read(self) -> None:
        """Read what the broker sent (PUBACKs free room)."""
        self._read()

    def flush(self) -> None:
        """Frame what there is room for and write what the socket takes."""
        self._frame()
        if self.out:
            # TLS: at most one record per call, so a write that must be retried is retried
            # with exactly the same bytes, as OpenSSL requires.
            chunk = bytes(self.out[:_TLS_RECORD]) if self.tls else self.out
            try:
                n = self.sock.send(chunk)
            except _WOULD_BLOCK:
                n = 0
            except OSError as exc:
                raise LoadError(f"{self.name}: connection to the broker lost: {exc}") from exc
            if n:
                del self.out[:n]
                self.last_write = time.monotonic()

    def _frame(self) -> None:
        pending, unacked = self.pending, self.unacked
        if not pending or len(unacked) >= self.room:
            return
        mid, topic = self._mid, self.topic
        parts = []
        while pending and len(unacked) < self.room:
            mid = mid % 65535 + 1
            while mid in unacked:  # never a packet identifier still in use
                mid = mid % 65535 + 1
            unacked.add(mid)
            parts.append(publish_packet(topic, mid, pending.popleft()))
        self._mid = mid
        self.out += b"".join(parts)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(_RECV_CHUNK)
            except _WOULD_BLOCK:
                break
            except OSError as exc:
                raise LoadError(f"{self.name}: connection to the broker lost: {exc}") from exc
            if not data:
                raise LoadError(f"{self.name}: the broker closed the connection")
            self.inbuf += data
            # A short plain read emptied the socket. TLS returns one record per call, and the
            # broker sends a record per PUBACK: reading on until it would block, not one
            # record per turn, which held a TLS connection to ~200 PUBACKs a second.
            if len(data) < _RECV_CHUNK and not self.tls:
                break
        self._parse()

    def _parse(self) -> None:
        buf, unacked = self.inbuf, self.unacked
        n, pos = len(buf), 0
        while pos < n:
            length, shift, i = 0, 0, pos + 1
            while i < n:  # the remaining length: a variable byte integer
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise LoadError(f"{self.name}: malformed packet from the broker")
            else:
                break  # the length itself is not all here yet
            end = i + length
            if end > n:
                break
            kind = buf[pos] & 0xF0
            if kind == 0x40 and length >= 2:  # PUBACK: packet id, [reason code, properties]
                mid = (buf[i] << 8) | buf[i + 1]
                unacked.discard(mid)
                code = buf[i + 2] if length > 2 else 0
                if code >= 0x80 and len(self.errors) < 20:
                    self.errors.append(f"{self.name}: PUBACK reason code 0x{code:02x}")
            elif kind == 0xE0:  # DISCONNECT from the broker
                code = buf[i] if length else 0
                raise LoadError(f"{self.name}: the broker disconnected, reason code 0x{code:02x}")
            elif kind != 0xD0:  # anything but PINGRESP
                raise LoadError(f"{self.name}: unexpected MQTT packet type 0x{kind:02x}")
            pos = end
        del buf[:pos]

    def close(self) -> None:
        """DISCONNECT (normal), then close the socket."""
        with contextlib.suppress(OSError):
            self.sock.send(bytes(self.out) + _DISCONNECT)
        self.sock.close()


def publish_qos0_packet(topic: bytes, payload: bytes) -> bytes:
    """An MQTT 5 PUBLISH, QoS 0, no properties (telemetry: no packet id, no PUBACK)."""
    remaining = 2 + len(topic) + 1 + len(payload)
    header = bytearray(b"\x30")
    while True:
        byte, remaining = remaining & 0x7F, remaining >> 7
        header.append(byte | 0x80 if remaining else byte)
        if not remaining:
            break
    return b"".join((header, len(topic).to_bytes(2, "big"), topic, b"\x00", payload))


class _Telemetry:
    """Each device's telemetry/v1 every ``interval`` seconds, the devices spread evenly over
    the interval (device k first sends at k/n of it), as QoS 0 PUBLISH frames."""

    def __init__(self, publishers: list[Publisher], interval: float) -> None:
        self.interval = interval
        self.topics = [p.telemetry_topic.encode() for p in publishers]
        stamp = _TS_JSON[1:-1]
        self.parts = [
            TelemetryV1(
                device_id=p.device_id,
                sent_at=_TS,
                readings=[Reading(quantity="temperature", value=21.5, unit="Cel", observed_at=_TS)],
            )
            .to_json()
            .split(stamp)
            for p in publishers
        ]
        self.sent = 0
        self.t0: float | None = None

    def due(self) -> Iterator[tuple[int, bytes]]:
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        n = len(self.topics)
        due = int((now - self.t0) * n / self.interval) + 1
        if due <= self.sent:
            return
        stamp = stamp_now()
        for k in range(self.sent, due):
            i = k % n
            yield i, publish_qos0_packet(self.topics[i], stamp.join(self.parts[i]))
        self.sent = due


def _publish_raw(
    job: WorkerJob, sync: _Sync, window: list[float], stats: dict[str, float] | None = None
) -> tuple[int, list[str]]:
    """paho connects this worker's publishers, then ``RawConnection`` carries their messages.

    One epoll selector serves every connection; a tick writes only to the connections that
    have something to send and reads only the ones the selector reports, so a tick costs what
    its messages cost, not what the fleet's size does."""
    net = _Clients(job, on_connected=lambda n: sync.count(job.index, connected=n))
    if not net.connect():
        return 0, net.errors
    if stats is not None:
        stats["connect_s"] = net.connect_seconds
    conns = []
    for i, c in enumerate(net.clients):
        sock = c.socket()
        if sock is None or c.buffered():
            net.disconnect()
            return 0, [f"{job.publishers[i].device_id}: unexpected data after CONNACK"]
        p = job.publishers[i]
        conns.append(RawConnection(p.device_id, sock, p.topic, net.room[i], net.errors))
    net.sel.close()  # paho is done with these sockets; the raw loop has a selector of its own
    sel = selectors.DefaultSelector()
    for conn in conns:
        sel.register(conn.sock, selectors.EVENT_READ, conn)

    alerts = _Alerts(job)
    telemetry = (
        _Telemetry(job.publishers, job.telemetry_interval_s)
        if job.telemetry_interval_s is not None
        else None
    )
    dirty: set[RawConnection] = set()
    state = {"sending": True, "checked": time.monotonic()}

    def emit(count: int) -> int:
        for i, payload in alerts.take(count):
            conn = conns[i]
            conn.pending.append(payload)
            dirty.add(conn)
        return count

    def every_tick(timeout: float = 0.0) -> None:
        nonlocal dirty
        for key, _ in sel.select(timeout):
            key.data.read()
        if telemetry is not None and state["sending"]:
            for i, frame in telemetry.due():
                conns[i].out += frame
                dirty.add(conns[i])
        now = time.monotonic()
        if now - state["checked"] >= 1.0:
            state["checked"] = now
            for conn in conns:
                if conn.ping_if_idle(now):
                    dirty.add(conn)
        if dirty:
            left = set()
            for conn in dirty:
                conn.flush()
                if conn.pending or conn.out:  # no room yet, or the socket took part of it
                    left.add(conn)
            dirty = left

    errors = net.errors
    try:
        cpu0 = time.process_time()
        sent = _pace(job, sync, emit, window, every_tick)
        if stats is not None:
            stats["send_cpu_s"] = time.process_time() - cpu0
        state["sending"] = False
        deadline = time.monotonic() + _DRAIN_S
        while any(c.busy() for c in conns) and time.monotonic() < deadline:
            every_tick(0.05)
        if any(c.busy() for c in conns):
            errors.append(f"not every PUBACK arrived within {_DRAIN_S:.0f} s")
    except LoadError as exc:
        return 0, [*errors, str(exc)]
    finally:
        sel.close()
        for conn in conns:
            conn.close()
    if stats is not None and telemetry is not None:
        stats["telemetry"] = telemetry.sent
    return sent, errors


# ------------------------------------------------------------------------------- the run


@dataclass(slots=True)
class LoadReport:
    mode: str
    target_rate: float
    publishers: int
    sent: int
    pooled: int
    lost: int
    zero_loss: bool
    send_seconds: float
    send_rate: float
    ingest_seconds: float
    ingest_rate: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    run_tag: str = ""
    connect_seconds: float = 0.0  # the slowest worker's, from its first connect to its last CONNACK
    telemetry_sent: int = 0
    started_at: float = 0.0  # wall clock of the first send
    # raw mode: the generator's CPU while sending (connects and drain not counted), per alert
    generator_cpu_us: float = 0.0

    @property
    def per_connection_rate(self) -> float:
        return self.send_rate / self.publishers if self.publishers else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        lat = self.latency_ms
        return "\n".join(
            [
                f"load run {self.run_tag} ({self.mode}, {self.publishers:,} publishers, "
                f"target {self.target_rate:,.0f}/s)",
                f"  connect  {self.publishers:>9,} connections, each its own account, in "
                f"{self.connect_seconds:6.2f} s",
                f"  sent     {self.sent:>9,} in {self.send_seconds:6.2f} s = "
                f"{self.send_rate:>9,.0f}/s ({self.per_connection_rate:,.2f}/s per connection"
                + (f"; telemetry {self.telemetry_sent:,}" if self.telemetry_sent else "")
                + ")",
                f"  pooled   {self.pooled:>9,} in {self.ingest_seconds:6.2f} s = "
                f"{self.ingest_rate:>9,.0f}/s (first send → last commit)",
                f"  loss     {self.lost:>9,}  {'ZERO LOSS' if self.zero_loss else 'LOSS!'}",
                "  latency  observed_at → committed: "
                + "  ".join(f"{k} {v:,.1f} ms" for k, v in lat.items()),
            ]
            + [f"  error: {e}" for e in self.errors]
        )


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def pct(p: float) -> float:
        return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))] * 1000

    return {
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": v[-1] * 1000,
        "mean": sum(v) / len(v) * 1000,
    }


class _Progress:
    """Progress lines on stderr, at most one every ``_PROGRESS_S``: connections up, alerts
    handed to the sockets, alerts pooled."""

    def __init__(self, on: bool, counters: Any, workers: int, connections: int, total: int):
        self.on = on
        self.counters = counters
        self.workers = workers
        self.connections = connections
        self.total = total
        self.last = 0.0
        self.t0 = time.monotonic()

    def _say(self, text: str) -> None:
        now = time.monotonic()
        if self.on and now - self.last >= _PROGRESS_S:
            self.last = now
            print(f"[{now - self.t0:6.1f} s] {text}", file=sys.stderr, flush=True)

    def connecting(self) -> None:
        up = sum(self.counters[2 * w] for w in range(self.workers))
        self._say(f"connected {up:,} / {self.connections:,}")

    def sending(self) -> None:
        sent = sum(self.counters[2 * w + 1] for w in range(self.workers))
        self._say(f"sent {sent:,} / {self.total:,}")

    def draining(self, pooled: int, sent: int) -> None:
        self._say(f"pooled {pooled:,} / {sent:,}")


def fleet_ids(tag: str, n: int) -> list[str]:
    """The device ids of a run's publishers."""
    return [f"{tag}-p{i:02d}" for i in range(n)]


class PreProvisioned:
    """Devices registered before the broker started (``preprovision_fleet``): the broker
    loaded their accounts from the registry at start, so a fleet of thousands costs no live
    account changes (the dynamic-security plugin saves its whole file after each one, which
    grows with the square of the fleet)."""

    def __init__(self, stack: GatewayStack, passwords: dict[str, str]) -> None:
        self.stack = stack
        self.passwords = passwords

    @property
    def topics(self) -> Topics:
        return self.stack.topics

    def provision(self, specs: Sequence[DeviceSpec]) -> dict[str, DeviceCredentials]:
        endpoint: BrokerEndpoint = self.stack.device_endpoint
        out: dict[str, DeviceCredentials] = {}
        for spec in specs:
            if spec.device_id not in self.passwords:
                # Anything else goes through the running broker as usual.
                out |= self.stack.provision([spec])
                continue
            out[spec.device_id] = DeviceCredentials(
                device_id=spec.device_id,
                kind=spec.kind,
                username=spec.device_id,
                password=SecretStr(self.passwords[spec.device_id]),
                broker=endpoint,
                topic_prefix=self.topics.prefix,
                topics=DeviceTopics.for_device(self.topics, spec.device_id),
            )
        return out


def preprovision_fleet(stack: GatewayStack, tag: str, n: int) -> PreProvisioned:
    """Register ``n`` camera accounts for the run ``tag`` in the stack's registry before its
    broker starts (call it before ``stack.start()``); pass the result to ``run_load`` as the
    provisioner, with the same ``run_tag``."""
    if stack.broker is not None:
        raise LoadError("pre-provision before the stack starts; a running broker needs live ones")
    registry: DeviceRegistry = stack.registry
    passwords = {}
    for device_id in fleet_ids(tag, n):
        _, passwords[device_id] = registry.add_device(device_id, DeviceKind.CAMERA)
    registry.save()
    return PreProvisioned(stack, passwords)


def run_load(
    config: LoadConfig,
    provisioner: Provisioner,
    pool_path: Path | str | None,
    *,
    grids: GridIndex | None = None,
    catalogue: Catalogue | None = None,
    run_tag: str | None = None,
    on_sent: Any = None,
) -> LoadReport:
    """Provision publishers, send ``config.total`` alerts at ``config.rate``, wait until the
    pool holds them (or the drain timeout passes), and measure. Without a ``pool_path`` (a
    broker with no aggregator, for a baseline subscriber) it only sends."""
    tag = run_tag or f"ld{uuid.uuid4().hex[:6]}"
    grids = grids or GridIndex.from_geojson(default_grid_file())
    catalogue = catalogue or default_catalogue()
    total = config.total
    n_pub = min(config.n_publishers, total)
    specs = [DeviceSpec(device_id, DeviceKind.CAMERA) for device_id in fleet_ids(tag, n_pub)]
    started = time.monotonic()
    creds = provisioner.provision(specs)
    provision_s = time.monotonic() - started
    if provision_s > 1:
        log.info("%s devices provisioned in %.1f s", n_pub, provision_s)
    rng = random.Random(config.seed)
    # A fleet of thousands gets fewer templates per device: their rendering is the parent's
    # start-up time, and 4 per device across thousands of devices are variety enough.
    per_device = min(config.templates_per_device, max(4, 16_384 // n_pub))
    pubs = [
        Publisher(
            c.device_id,
            c.username,
            c.password.get_secret_value(),
            c.broker.host,
            c.broker.port,
            c.topics.alert,
            build_templates(
                c.device_id,
                per_device,
                rng,
                grids,
                catalogue,
                snapshot=config.snapshot,
            ),
            str(c.broker.ca_file) if c.broker.ca_file is not None else None,
            c.topics.telemetry,
        )
        for c in (creds[s.device_id] for s in specs)
    ]
    # Two worker processes by default, one per core of the 2-core reference machine: a
    # mosquitto_pub feeder only writes lines, and a paho worker serves all its clients on one
    # selector loop.
    n_workers = min(n_pub, config.n_workers)
    # One descriptor per connection in each worker (spawned children inherit the limit).
    need = math.ceil(n_pub / n_workers) + 256
    if (have := raise_fd_limit(need)) < need:
        raise LoadError(
            f"{need} open files needed per generator process, the limit is {have}: raise the "
            "hard limit (ulimit -Hn) or use more workers"
        )
    # spawn, not fork: the caller may run the aggregator's threads in this very process.
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    stop = ctx.Event()
    counters = ctx.Array("q", 2 * n_workers, lock=False)
    sync = _Sync(ctx.Queue(), ctx.Value("d", 0.0), stop, counters)
    jobs = []
    for w in range(n_workers):
        mine = pubs[w::n_workers]
        share = len(mine) / n_pub
        count = total * len(mine) // n_pub + (1 if w < total * len(mine) % n_pub else 0)
        jobs.append(
            WorkerJob(
                config.mode,
                config.alert_ids,
                mine,
                config.rate * share,
                count,
                index=w,
                connect_rate=config.connect_rate * share,
                telemetry_interval_s=config.telemetry_interval_s,
            )
        )
    fixed = total - sum(j.count for j in jobs)
    if fixed:
        jobs[0] = dataclasses.replace(jobs[0], count=jobs[0].count + fixed)
    progress = _Progress(config.progress, counters, n_workers, n_pub, total)
    procs = [ctx.Process(target=_worker, args=(j, results, sync), daemon=True) for j in jobs]
    for p in procs:
        p.start()
    # Connecting takes n / connect_rate; a worker that is not ready by then and a minute
    # more has failed.
    ready_deadline = time.monotonic() + n_pub / config.connect_rate + 60
    ready = 0
    while ready < len(procs):
        try:
            sync.ready.get(timeout=_PROGRESS_S)
            ready += 1
        except queue.Empty:
            progress.connecting()
            if time.monotonic() > ready_deadline or any(p.exitcode not in (None, 0) for p in procs):
                stop.set()
                break
    progress.connecting()
    sync.start_at.value = time.time() + 0.2
    errors: list[str] = []
    windows: list[float] = []
    sent = 0
    send_deadline = time.monotonic() + (config.duration_s or total / config.rate) * 3 + 60
    got = 0
    stats: list[dict[str, float]] = []
    try:
        while got < len(procs):
            try:
                r = results.get(timeout=0.5)
            except queue.Empty:
                progress.sending()
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    errors.append(
                        f"{len(dead)} publisher process(es) died: exit {dead[0].exitcode}"
                    )
                    break
                if time.monotonic() > send_deadline:
                    errors.append("publishers did not finish in time")
                    break
                continue
            got += 1
            sent += r["sent"]
            errors += r["errors"]
            windows += r["window"]
            stats.append(r["stats"])
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    send_seconds = (max(windows) - min(windows)) if windows else 0.0
    connect_seconds = max((st.get("connect_s", 0.0) for st in stats), default=0.0)
    telemetry_sent = int(sum(st.get("telemetry", 0) for st in stats))
    send_cpu = sum(st.get("send_cpu_s", 0.0) for st in stats)
    generator_cpu_us = send_cpu / sent * 1e6 if sent else 0.0
    started_at = min(windows) if windows else 0.0
    if on_sent is not None:
        on_sent(sent)
    if pool_path is None:
        return LoadReport(
            mode=config.mode,
            target_rate=config.rate,
            publishers=n_pub,
            sent=sent,
            pooled=0,
            lost=0,
            zero_loss=False,
            send_seconds=send_seconds,
            send_rate=sent / send_seconds if send_seconds > 0 else 0.0,
            ingest_seconds=0.0,
            ingest_rate=0.0,
            latency_ms={},
            errors=errors,
            run_tag=tag,
            connect_seconds=connect_seconds,
            telemetry_sent=telemetry_sent,
            started_at=started_at,
            generator_cpu_us=generator_cpu_us,
        )
    view = PoolView(pool_path, catalogue)
    like = f"{tag}-%"
    # Enough for an aggregator ingesting 1,000 alerts/s to catch up; a real stall still ends.
    drain = config.drain_timeout_s or 60 + total / 1000
    deadline = time.monotonic() + drain
    pooled = view.alert_count(like=like)
    while pooled < sent and time.monotonic() < deadline:
        time.sleep(0.25)
        pooled = view.alert_count(like=like)
        progress.draining(pooled, sent)
    lat = view.latencies(like=like)
    span = view.commit_span(like=like)
    ingest_seconds = (span[1] - min(windows)) if span and windows else 0.0
    return LoadReport(
        mode=config.mode,
        target_rate=config.rate,
        publishers=n_pub,
        sent=sent,
        pooled=pooled,
        lost=sent - pooled,
        zero_loss=pooled == sent == total,
        send_seconds=send_seconds,
        send_rate=sent / send_seconds if send_seconds > 0 else 0.0,
        ingest_seconds=ingest_seconds,
        ingest_rate=pooled / ingest_seconds if ingest_seconds > 0 else 0.0,
        latency_ms=percentiles(lat),
        errors=errors,
        run_tag=tag,
        connect_seconds=connect_seconds,
        telemetry_sent=telemetry_sent,
        started_at=started_at,
        generator_cpu_us=generator_cpu_us,
    )


# ------------------------------------------------------------------------------- baseline


def count_subscriber(
    host: str,
    port: int,
    username: str,
    password: str,
    topic_filter: str,
    expected: int,
    ready: MpEvent,
    results: Any,
    idle_timeout_s: float = 10.0,
    limit_s: float = 600.0,
) -> None:
    """A bare paho subscriber (QoS 1, automatic acks) that only counts: the ceiling a Python
    consumer reaches on this machine. Runs in its own process; puts count and rate."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    state = {"n": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        now = time.time()
        if state["n"] == 0:
            state["first"] = now
        state["n"] += 1
        state["last"] = now
        if state["n"] >= expected:
            done.set()

    def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        c.subscribe(topic_filter, qos=1)

    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bare-counter-{os.getpid()}",
        protocol=mqtt.MQTTv5,
    )
    c.username_pw_set(username, password)
    c.on_message = on_message
    c.on_connect = on_connect
    c.on_subscribe = lambda *_a: ready.set()
    c.connect(host, port, keepalive=30)
    c.loop_start()
    started = time.monotonic()
    while not done.wait(0.5):
        idle = state["n"] and time.time() - state["last"] > idle_timeout_s
        if idle or time.monotonic() - started > limit_s:
            break
    c.disconnect()
    c.loop_stop()
    span = state["last"] - state["first"]
    results.put(
        {"count": state["n"], "seconds": span, "rate": state["n"] / span if span > 0 else 0.0}
    )


def machine_description() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def loop_seconds(n: int = 5_000_000) -> float:
    """Seconds a fixed Python loop (``n`` additions) takes now: how fast this machine is at the
    moment. Virtual machines here swing by 2× and more from one minute to the next, so a
    benchmark prints this beside its figures to tell a slow spell from a slow change."""
    started = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - started
