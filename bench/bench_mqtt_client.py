"""MQTT client CPU per message: ``aggregator.ingest.mqtt.LeanClient`` driven the way ``IoLoop``
drives it, against stock paho-mqtt, both on a real Mosquitto in the same run.

Two measurements, each a table of variants:

* drain (the receive path): N QoS 1 messages are queued by ``mosquitto_pub`` into a persistent
  subscriber session (subscription ``bench/#``, session expiry 3600 s, receive maximum 4000)
  while it is disconnected; the subscriber then reconnects and takes them all;
* publish (the feedback path): N QoS 1 publishes to a topic nobody subscribes to (Mosquitto
  answers each with PUBACK reason 0x10, "no matching subscribers", as it does for device
  feedback topics while no device listens).

Each variant runs in a subprocess of its own, so the CPU time (``time.process_time``) is that
client's alone. Variants alternate within each of ``--repeat`` rounds, so load from elsewhere on
a shared machine falls on all of them alike; the tables show medians, and the ratio of CPU per
message to the first (stock paho) variant measured in the same run.

    python bench/bench_mqtt_client.py [--messages 50000] [--repeat 3] [--payload-bytes 420]
        [--feedback-bytes 250] [--window 1000] [--timeout 120] [--only drain|publish]

Needs ``mosquitto`` and ``mosquitto_pub`` (apt-get install -y mosquitto mosquitto-clients).
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from aggregator.ingest.mqtt import LeanClient, own_loop_client
from simulators.loadgen import machine_description

HOST = "127.0.0.1"
DRAIN_FILTER = "bench/#"
DRAIN_TOPIC = "bench/device-0001/alert"
# not under DRAIN_FILTER, nor anything else: the broker has no subscriber for it
FEEDBACK_TOPIC = "nobody-listens/device-0001/feedback"
SESSION_EXPIRY_S = 3600
RECEIVE_MAXIMUM = 4000
IDLE_LIMIT_S = 15.0  # a drain that receives nothing for this long has lost messages
DISTINCT_PAYLOADS = 256  # publishers cycle through these, built before the clock starts

DRAIN_VARIANTS = {
    "paho-auto": "paho loop_forever, auto-ack",
    "paho-manual": "paho loop_forever, manual ack",
    "lean": "LeanClient, own select loop, manual ack",
}
PUBLISH_VARIANTS = {
    "paho-burst": "paho loop_start, max_inflight W, publish all at once",
    "lean-paced": "LeanClient, own loop, paced window W",
}


# -- payloads -------------------------------------------------------------------------------


def json_payload(i: int, size: int) -> bytes:
    """JSON-like text of exactly ``size`` bytes (at least the fixed fields), no newline."""
    head = (
        f'{{"device_id":"dev-{i % 10_000:06d}","seq":{i},'
        '"observed_at":"2024-05-01T12:00:00.000Z","kind":"alert","severity":"warning",'
        '"lat":52.520008,"lon":13.404954,"confidence":0.87,"detail":"'
    )
    tail = '"}'
    pad = max(0, size - len(head) - len(tail))
    return (head + ("abcdefghij" * (pad // 10 + 1))[:pad] + tail).encode()


# -- the broker -----------------------------------------------------------------------------


class BenchError(Exception):
    """The run cannot go on (broker or tools missing, broker did not start)."""


def find_mosquitto() -> tuple[str, str]:
    """Paths of ``mosquitto`` and ``mosquitto_pub``; a clear error when either is missing."""
    broker = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None
    )
    pub = shutil.which("mosquitto_pub")
    if broker is None or pub is None:
        missing = "mosquitto" if broker is None else "mosquitto_pub"
        raise BenchError(f"{missing} not found; apt-get install -y mosquitto mosquitto-clients")
    return broker, pub


def free_port() -> int:
    """A TCP port on HOST that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Broker:
    """One Mosquitto on HOST and a free port, its config and log in a temporary directory."""

    def __init__(self, exe: str) -> None:
        self.exe = exe
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.root: Path | None = None

    def __enter__(self) -> Broker:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 10.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
        self.port = free_port()
        conf = self.root / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {HOST}\n"
            "allow_anonymous true\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 1000\n"
            "persistence false\n",
            encoding="utf-8",
        )
        with (self.root / "mosquitto.log").open("wb") as log_file:
            self.proc = subprocess.Popen(
                [self.exe, "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"mosquitto exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"mosquitto did not listen within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if self.root is None:
            return ""
        try:
            text = (self.root / "mosquitto.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the broker this object started (by its pid) and remove its directory."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self.proc = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def mosquitto_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "mosquitto (version unknown)"
    first = out.decode(errors="replace").splitlines()
    return first[0].strip() if first else "mosquitto (version unknown)"


# -- sessions and the queue (parent side, not measured) -------------------------------------


def connect_properties(session_expiry_s: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    return props


def prepare_session(port: int, client_id: str, *, create: bool, timeout_s: float = 10.0) -> None:
    """``create``: an empty session subscribed to DRAIN_FILTER at QoS 1, left disconnected.
    Otherwise: end the session of ``client_id`` and whatever it still holds."""
    connected = threading.Event()
    subscribed = threading.Event()
    problems: list[str] = []

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            problems.append(f"connect refused: {rc}")
        connected.set()

    def on_subscribe(c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any) -> None:
        if any(code.is_failure for code in codes):
            problems.append(f"subscribe refused: {codes}")
        subscribed.set()

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.connect(
        HOST,
        port,
        keepalive=30,
        clean_start=True,
        properties=connect_properties(SESSION_EXPIRY_S if create else 0),
    )
    client.loop_start()
    try:
        if not connected.wait(timeout_s):
            raise BenchError(f"session {client_id}: no CONNACK within {timeout_s:.0f} s")
        if create:
            client.subscribe(DRAIN_FILTER, qos=1)
            if not subscribed.wait(timeout_s):
                raise BenchError(f"session {client_id}: no SUBACK within {timeout_s:.0f} s")
        if problems:
            raise BenchError(f"session {client_id}: {'; '.join(problems)}")
    finally:
        client.disconnect()
        client.loop_stop()


def queue_messages(pub_exe: str, port: int, n: int, size: int, timeout_s: float) -> float:
    """Publish n QoS 1 lines to DRAIN_TOPIC with one ``mosquitto_pub -l``; seconds taken."""
    data = b"\n".join(json_payload(i, size) for i in range(n)) + b"\n"
    cmd = [pub_exe, "-h", HOST, "-p", str(port), "-V", "mqttv5", "-q", "1", "-t", DRAIN_TOPIC]
    started = time.monotonic()
    proc = subprocess.Popen(
        [*cmd, "-l"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        # EOF on stdin: mosquitto_pub finishes its in-flight QoS 1 publishes and exits
        _, err = proc.communicate(data, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise BenchError(
            f"mosquitto_pub did not finish {n:,} messages in {timeout_s:.0f} s"
        ) from exc
    if proc.returncode != 0:
        raise BenchError(
            f"mosquitto_pub exited {proc.returncode}: {err.decode(errors='replace')[:300]}"
        )
    return time.monotonic() - started


# -- workers (each in a subprocess of its own: its CPU time is the client's) -----------------


@dataclass
class Measure:
    """One run of one variant, as a worker reports it."""

    count: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    error: str = ""
    reasons: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def _lean_round(client: LeanClient, timeout_s: float) -> bool:
    """One round of IoLoop's select loop without the outgoing pump: select, then read.
    False once the connection is gone."""
    sock = client.socket()
    if sock is None:
        return False
    wlist = [sock] if client.want_write() else []
    if client.buffered():
        timeout_s = 0.0
    readable, _, _ = select.select([sock], wlist, [], timeout_s)
    if readable or client.buffered():
        rc = client.loop_read()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
    return client.socket() is not None


def _lean_finish(client: LeanClient) -> None:
    if client.socket() is not None:
        client.loop_write()
        client.disconnect()
        client.loop_write()


def drain_worker(variant: str, port: int, client_id: str, n: int, limit_s: float) -> Measure:
    """Reconnect to the prepared session and take its n messages; time and CPU until the n-th
    is received (and its acknowledgement queued)."""
    result = Measure()
    session: dict[str, Any] = {"present": None}
    last_at = [time.monotonic()]
    done = threading.Event()
    props = connect_properties(SESSION_EXPIRY_S)

    def on_connect(c: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            result.error = f"connect refused: {rc}"
            done.set()
        session["present"] = flags.session_present

    def stop_reason(started: float) -> str:
        now = time.monotonic()
        if session["present"] is False:
            return "the broker had no session for this client id"
        if now - started > limit_s:
            return f"not done within {limit_s:.0f} s"
        if now - last_at[0] > IDLE_LIMIT_S:
            return f"nothing received for {IDLE_LIMIT_S:.0f} s"
        return ""

    if variant in ("paho-auto", "paho-manual"):
        manual = variant == "paho-manual"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=manual,
        )

        def on_message(c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
            if manual:
                c.ack(m.mid, m.qos)
            result.count += 1
            if result.count == n:
                result.wall_s = time.perf_counter() - t0
                result.cpu_s = time.process_time() - c0
                done.set()
            last_at[0] = time.monotonic()

        client.on_connect = on_connect
        client.on_message = on_message

        def watchdog() -> None:
            started = time.monotonic()
            for _ in range(int(limit_s / 0.5) + 60):  # the time limit ends it first
                if done.wait(0.5):
                    break
                reason = stop_reason(started)
                if reason:
                    result.error = reason
                    break
            else:
                result.error = f"not done within {limit_s:.0f} s"
            client.disconnect()

        t0 = time.perf_counter()
        c0 = time.process_time()
        client.connect(HOST, port, keepalive=30, clean_start=False, properties=props)
        guard = threading.Thread(target=watchdog, daemon=True)
        guard.start()
        client.loop_forever(retry_first_connection=False)
        guard.join(5)
        return result

    if variant != "lean":
        raise BenchError(f"unknown drain variant {variant!r}")
    lean = own_loop_client(client_id, manual_ack=True)  # as IoLoop's
    pending: list[tuple[int, int]] = []

    def on_row(_topic: bytes, _payload: bytes, mid: int, qos: int) -> None:
        pending.append((mid, qos))

    def on_message_lean(_c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
        pending.append((m.mid, m.qos))  # PUBLISHes with properties; none are expected here

    lean.on_connect = on_connect
    lean.on_row = on_row
    lean.on_message = on_message_lean
    t0 = time.perf_counter()
    c0 = time.process_time()
    lean.connect(HOST, port, keepalive=30, clean_start=False, properties=props)
    started = time.monotonic()
    ack = lean.ack
    for _ in range(20 * n + 10_000):  # every round reads; the time limit below ends it first
        alive = _lean_round(lean, 0.5)
        if pending:
            for mid, qos in pending:
                if qos:
                    ack(mid, qos)
            result.count += len(pending)
            pending.clear()
            last_at[0] = time.monotonic()
            if result.count >= n:
                result.wall_s = time.perf_counter() - t0
                result.cpu_s = time.process_time() - c0
                break
        if not alive:
            result.error = "connection lost"
            break
        if lean.want_write():
            lean.loop_write()
        lean.loop_misc()
        reason = result.error or stop_reason(started)
        if reason:
            result.error = reason
            break
    else:
        result.error = "round limit reached"
    _lean_finish(lean)
    return result


def publish_worker(
    variant: str, port: int, client_id: str, n: int, size: int, window: int, limit_s: float
) -> Measure:
    """Publish n QoS 1 messages to FEEDBACK_TOPIC; time and CPU from the first publish until
    the n-th PUBACK has been handled."""
    result = Measure()
    reasons: Counter[str] = Counter()
    payloads = [json_payload(i, size) for i in range(DISTINCT_PAYLOADS)]
    connected = threading.Event()
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            result.error = f"connect refused: {rc}"
        connected.set()

    if variant == "paho-burst":
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        client.max_inflight_messages_set(window)

        def on_publish(_c: mqtt.Client, _u: Any, _mid: int, rc: ReasonCode, _p: Any) -> None:
            reasons[str(rc)] += 1
            result.count += 1
            if result.count == n:
                result.wall_s = time.perf_counter() - t0
                result.cpu_s = time.process_time() - c0
                done.set()

        client.on_connect = on_connect
        client.on_publish = on_publish
        client.connect(HOST, port, keepalive=30)
        client.loop_start()
        try:
            if not connected.wait(10) or result.error:
                result.error = result.error or "no CONNACK within 10 s"
                return result
            t0 = time.perf_counter()
            c0 = time.process_time()
            for i in range(n):
                client.publish(FEEDBACK_TOPIC, payloads[i % DISTINCT_PAYLOADS], qos=1)
            if not done.wait(max(0.0, limit_s - (time.perf_counter() - t0))):
                result.error = f"{result.count:,} of {n:,} acknowledged within {limit_s:.0f} s"
        finally:
            client.disconnect()
            client.loop_stop()
        result.reasons = dict(reasons)
        return result

    if variant != "lean-paced":
        raise BenchError(f"unknown publish variant {variant!r}")
    lean = own_loop_client(client_id)
    inflight = [0]

    def on_publish_lean(_c: mqtt.Client, _u: Any, _mid: int, rc: ReasonCode, _p: Any) -> None:
        reasons[str(rc)] += 1
        result.count += 1
        if inflight[0]:
            inflight[0] -= 1

    lean.on_connect = on_connect
    lean.on_publish = on_publish_lean
    lean.connect(HOST, port, keepalive=30)
    deadline = time.monotonic() + 10
    while not connected.is_set() and time.monotonic() < deadline:
        if not _lean_round(lean, 0.2):
            break
        if lean.want_write():
            lean.loop_write()
    if not connected.is_set() or result.error:
        result.error = result.error or "no CONNACK within 10 s"
        _lean_finish(lean)
        return result

    publish = lean.publish
    sent = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    started = time.monotonic()
    for _ in range(20 * n + 10_000):  # every round reads or writes; the time limit ends it first
        more = sent < n and inflight[0] < window
        if not _lean_round(lean, 0.0 if more else 0.5):
            result.error = "connection lost"
            break
        room = window - inflight[0]
        while sent < n and room > 0:  # IoLoop._pump_out
            publish(FEEDBACK_TOPIC, payloads[sent % DISTINCT_PAYLOADS], qos=1)
            sent += 1
            inflight[0] += 1
            room -= 1
        if lean.want_write():
            lean.loop_write()
        if result.count >= n:
            result.wall_s = time.perf_counter() - t0
            result.cpu_s = time.process_time() - c0
            break
        lean.loop_misc()
        if time.monotonic() - started > limit_s:
            result.error = f"{result.count:,} of {n:,} acknowledged within {limit_s:.0f} s"
            break
    else:
        result.error = "round limit reached"
    _lean_finish(lean)
    result.reasons = dict(reasons)
    return result


# -- the parent: runs workers, collects and prints ------------------------------------------


def run_worker(argv: list[str], limit_s: float) -> Measure:
    """Run one worker subprocess; kill it (by its pid) when it overstays the time limit."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=limit_s + 30, check=False)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        return Measure(error=f"killed after {limit_s + 30:.0f} s")
    for line in reversed(proc.stdout.decode(errors="replace").splitlines()):
        if line.startswith("RESULT "):
            return Measure(**json.loads(line[len("RESULT ") :]))
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    return Measure(error=f"worker exited {proc.returncode}: {err[-1] if err else 'no output'}")


@dataclass
class Row:
    label: str
    runs: list[Measure] = field(default_factory=list)

    def ok(self) -> list[Measure]:
        return [m for m in self.runs if not m.error and m.count and m.cpu_s > 0]

    def cpu_us(self) -> list[float]:
        return [m.cpu_s / m.count * 1e6 for m in self.ok()]


def print_table(title: str, rows: list[Row], repeat: int) -> None:
    width = max(len("variant"), *(len(row.label) for row in rows))
    print(f"\n{title}")
    header = (
        f"{'variant':<{width}} {'msgs/s':>9} {'µs CPU/msg':>11} {'min–max':>13} {'CPU ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    base: float | None = None
    for i, row in enumerate(rows):
        cpu = row.cpu_us()
        failed = [m.error for m in row.runs if m.error]
        if not cpu:
            print(f"{row.label:<{width}} FAILED: {failed[0] if failed else 'no result'}")
            continue
        median_cpu = statistics.median(cpu)
        rate = statistics.median(m.count / m.wall_s for m in row.ok() if m.wall_s > 0)
        if i == 0:
            base = median_cpu
        ratio = f"{median_cpu / base:.2f}" if base else "n/a"
        spread = f"{min(cpu):.1f}–{max(cpu):.1f}"
        note = f"  ({len(failed)} of {repeat} runs failed: {failed[0]})" if failed else ""
        print(
            f"{row.label:<{width}} {rate:>9,.0f} {median_cpu:>11.1f} {spread:>13} {ratio:>9}{note}"
        )
    print(
        f"median of {repeat} run{'s' if repeat > 1 else ''}; CPU ratio: µs CPU per message "
        f"over that of '{rows[0].label}' (lower is better)"
    )


def run_drain(args: argparse.Namespace, broker: Broker, pub_exe: str) -> list[Row]:
    rows = {key: Row(label) for key, label in DRAIN_VARIANTS.items()}
    for rep in range(args.repeat):
        for key in DRAIN_VARIANTS:
            client_id = f"bench-drain-{key}-{rep}"
            try:
                prepare_session(broker.port, client_id, create=True)
                queued_s = queue_messages(
                    pub_exe, broker.port, args.messages, args.payload_bytes, args.timeout
                )
            except BenchError as exc:
                rows[key].runs.append(Measure(error=str(exc)))
                continue
            worker_args = ["--_drain-worker", key, "--_port", str(broker.port)]
            worker_args += ["--_client-id", client_id, "--messages", str(args.messages)]
            worker_args += ["--timeout", str(args.timeout)]
            measure = run_worker(worker_args, args.timeout)
            try:
                prepare_session(broker.port, client_id, create=False)  # end it, whatever is left
            except (BenchError, OSError) as exc:
                print(f"  (could not end session {client_id}: {exc})")
            rows[key].runs.append(measure)
            status = measure.error or f"{measure.cpu_s / max(measure.count, 1) * 1e6:.1f} µs/msg"
            print(
                f"  round {rep + 1}: {DRAIN_VARIANTS[key]:<44} queued in {queued_s:5.1f} s, "
                f"drained {measure.count:,} in {measure.wall_s:5.1f} s: {status}"
            )
    return list(rows.values())


def run_publish(args: argparse.Namespace, broker: Broker) -> tuple[list[Row], Counter[str]]:
    rows = {
        key: Row(label.replace(" W", f" {args.window}")) for key, label in PUBLISH_VARIANTS.items()
    }
    reasons: Counter[str] = Counter()
    for rep in range(args.repeat):
        for key in PUBLISH_VARIANTS:
            worker_args = ["--_publish-worker", key, "--_port", str(broker.port)]
            worker_args += ["--_client-id", f"bench-pub-{key}-{rep}"]
            worker_args += ["--messages", str(args.messages), "--timeout", str(args.timeout)]
            worker_args += ["--feedback-bytes", str(args.feedback_bytes)]
            worker_args += ["--window", str(args.window)]
            measure = run_worker(worker_args, args.timeout)
            reasons.update(measure.reasons)
            rows[key].runs.append(measure)
            status = measure.error or f"{measure.cpu_s / max(measure.count, 1) * 1e6:.1f} µs/msg"
            print(
                f"  round {rep + 1}: {rows[key].label:<55} {measure.count:,} acknowledged in "
                f"{measure.wall_s:5.1f} s: {status}"
            )
    return list(rows.values()), reasons


def bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text.replace(",", "").replace("_", ""))
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:,} and {high:,}")
        return value

    return parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "CPU per message of the aggregator's MQTT client (LeanClient, driven as IoLoop "
            "drives it) against stock paho-mqtt: draining a queued session (receive path) and "
            "publishing QoS 1 feedback (publish path), on a Mosquitto this script starts."
        ),
        epilog=(
            "Starts its own Mosquitto on 127.0.0.1 (a free port, config in a temporary "
            "directory) and stops it at the end. Every variant runs in a subprocess of its own; "
            "one that does not finish within --timeout is reported as failed."
        ),
    )
    parser.add_argument(
        "--messages",
        type=bounded(1, 1_000_000),
        default=50_000,
        help="messages per run, in both measurements (1 to 1,000,000; default 50,000)",
    )
    parser.add_argument(
        "--repeat",
        type=bounded(1, 50),
        default=3,
        help="runs of each variant; the tables show medians (default 3)",
    )
    parser.add_argument(
        "--payload-bytes",
        type=bounded(120, 16_384),
        default=420,
        help="size of each drained message, JSON-like text (default 420, an alert)",
    )
    parser.add_argument(
        "--feedback-bytes",
        type=bounded(120, 16_384),
        default=250,
        help="size of each published message (default 250, a feedback message)",
    )
    parser.add_argument(
        "--window",
        type=bounded(1, 65_535),
        default=1000,
        help="QoS 1 publishes in flight: paho's max_inflight, LeanClient's pacing (default 1000)",
    )
    parser.add_argument(
        "--timeout",
        type=bounded(5, 3600),
        default=120,
        help="seconds one run of one variant may take before it counts as failed (default 120)",
    )
    parser.add_argument(
        "--only", choices=["drain", "publish"], default=None, help="run one measurement only"
    )
    # internal: one run of one variant, in a subprocess of its own
    parser.add_argument("--_drain-worker", choices=list(DRAIN_VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--_publish-worker", choices=list(PUBLISH_VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--_port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--_client-id", default="", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args._drain_worker or args._publish_worker:
        try:
            if args._drain_worker:
                measure = drain_worker(
                    args._drain_worker, args._port, args._client_id, args.messages, args.timeout
                )
            else:
                measure = publish_worker(
                    args._publish_worker,
                    args._port,
                    args._client_id,
                    args.messages,
                    args.feedback_bytes,
                    args.window,
                    args.timeout,
                )
        except (BenchError, OSError) as exc:
            measure = Measure(error=str(exc))
        print("RESULT " + measure.to_json(), flush=True)
        return 0

    try:
        broker_exe, pub_exe = find_mosquitto()
    except BenchError as exc:
        print(exc, file=sys.stderr)
        return 2
    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}")
    print(f"paho-mqtt {paho.mqtt.__version__}, {mosquitto_version(broker_exe)}")
    print(
        f"{args.messages:,} QoS 1 messages per run, {args.repeat} run(s) per variant, "
        f"limit {args.timeout} s per run"
    )
    started = time.monotonic()
    try:
        with Broker(broker_exe) as broker:
            print(f"broker: {HOST}:{broker.port}")
            if args.only in (None, "drain"):
                print(
                    f"\ndrain: {args.messages:,} messages of {args.payload_bytes} bytes queued "
                    f"into a disconnected session, then taken by the reconnecting subscriber"
                )
                drain_rows = run_drain(args, broker, pub_exe)
                print_table("drain (receive path)", drain_rows, args.repeat)
            if args.only in (None, "publish"):
                print(
                    f"\npublish: {args.messages:,} messages of {args.feedback_bytes} bytes to a "
                    f"topic without subscribers, until every PUBACK is handled"
                )
                publish_rows, reasons = run_publish(args, broker)
                print_table("publish (feedback path)", publish_rows, args.repeat)
                seen = ", ".join(f"{name} ×{count:,}" for name, count in reasons.most_common())
                print(f"PUBACK reasons seen: {seen or 'none'}")
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    print(f"\nrun took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
