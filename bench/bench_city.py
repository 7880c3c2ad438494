"""A city's fleet at its peak: thousands of device connections, each with its own account,
through the real broker into the pool.

The city: 5,000 cameras and 50,000 sensors across 30 communities. Normally they send a few
alerts a minute in all (a camera about one a minute, a sensor one every ten); at the peak,
ten times that. This benchmark stands for the peak with 5,000 device connections sending
about one alert per second each (5,000 alerts/s in total) plus telemetry (one telemetry/v1,
QoS 0, per device every 30 s). The 50,000 sensors are not 50,000 connections here: most of a
city's sensors reach the broker through community-site gateways and bridges, and a 2-core box
cannot hold the TLS sessions of 55,000 devices beside the broker and the aggregator.

Starts Mosquitto and the aggregator (``simulators.stack.GatewayStack``) under a temporary
directory. The devices are registered before the broker starts, so that it loads their
accounts from the registry (the figures below say how long that takes, and what the live
path would cost per device on a broker holding the fleet). Then the load generator
(``simulators.loadgen``, raw mode: paho connects and authenticates each device, at a bounded
connect rate, then QoS 1 PUBLISH frames are written straight to the sockets from an epoll
loop in a few processes) sends for ``--duration`` seconds, and the report gives connect time,
send and ingest rates, latency from ``observed_at`` to the commit of the alert's batch, and
the zero-loss check (alerts pooled == alerts sent).

    python bench/bench_city.py [--devices 5000] [--rate 5000] [--duration 40]
        [--connect-rate 500] [--telemetry-interval 30] [--workers 2] [--tls on|off]
        [--hot-sample 100] [--backend sqlite|postgres|both] [--pool-url URL] [--json report.json]

Target on a 2-core machine: 5,000 connections, ≥ 5,000 alerts/s, p99 ≤ 250 ms, zero loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pgserver import postgres  # bench/ is the script's directory: on sys.path

from aggregator.broker.registry import DeviceKind
from simulators.errors import StackError
from simulators.loadgen import (
    LoadConfig,
    loop_seconds,
    machine_description,
    preprovision_fleet,
    run_load,
)
from simulators.stack import DeviceSpec, GatewayStack, StackOptions

TARGET_CONNECTIONS = 5_000
TARGET_RATE = 5_000
TARGET_P99_MS = 250.0


def cpu_seconds() -> tuple[float, float]:
    """(this process, its finished children): user + system CPU seconds."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def child_pids() -> set[int]:
    """This process's children now (every thread's), from /proc (Linux)."""
    pids: set[int] = set()
    for children in Path("/proc/self/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids |= {int(x) for x in children.read_text().split()}
    return pids


class CpuSampler:
    """Once a second: wall clock, the aggregator's CPU (this process's threads, where the
    pool writer runs and the load generator's parent only waits, plus the aggregator's own
    child processes, its MQTT I/O loop) and the broker's. Gives the cores each used in the
    steady state of the run, without the connects and the drain."""

    def __init__(self, broker_pid: int, aggregator_children: set[int]) -> None:
        self.broker_pid = broker_pid
        self.aggregator_children = aggregator_children
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(OSError):
                aggregator = cpu_seconds()[0] + sum(
                    process_cpu_seconds(pid) for pid in self.aggregator_children
                )
                self.samples.append((time.time(), aggregator, process_cpu_seconds(self.broker_pid)))

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def cores(self, start: float, end: float) -> tuple[float, float]:
        """(aggregator, broker) cores used between two wall-clock times."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return 0.0, 0.0
        (t0, a0, b0), (t1, a1, b1) = inside[0], inside[-1]
        return (a1 - a0) / (t1 - t0), (b1 - b0) / (t1 - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5_000, help="device connections")
    parser.add_argument("--rate", type=float, default=5_000, help="alerts per second, in total")
    parser.add_argument("--duration", type=float, default=40, help="seconds of sending (≤ 120)")
    parser.add_argument("--connect-rate", type=float, default=500, help="connections per second")
    parser.add_argument(
        "--telemetry-interval", type=float, default=30, help="seconds between a device's telemetry"
    )
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument(
        "--tls",
        choices=["on", "off"],
        default="on",
        help="devices on the broker's TLS listener (on, default, as in the field) or plain",
    )
    parser.add_argument(
        "--hot-sample",
        type=int,
        default=10,
        help="after the run, provision this many more devices on the running broker and "
        "time it (0: skip)",
    )
    parser.add_argument(
        "--feedback-qos",
        type=int,
        choices=[0, 1],
        default=1,
        help="aggregator mqtt.feedback_qos: a city fleet's feedback is one message per alert "
        "(one device, one alert per batch: nothing to coalesce)",
    )
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--linger-ms", type=float, default=20)
    parser.add_argument("--min-batch", type=int, default=400)
    parser.add_argument("--receive-maximum", type=int, default=4000)
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres", "both"],
        default="sqlite",
        help="the pool: SQLite (default), PostgreSQL, or one run of each",
    )
    parser.add_argument(
        "--pool-url",
        default=None,
        help="PostgreSQL server (postgresql://…; the run gets a database of its own there); "
        'default: a throwaway PostgreSQL 15. Pass it as "$CWG_POOL_URL" to keep a password '
        "out of shell history",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the report here (with --backend both: NAME.sqlite.json and "
        "NAME.postgres.json)",
    )
    args = parser.parse_args()
    if not 1 <= args.devices <= 20_000:
        parser.error("--devices must be between 1 and 20,000")
    if not 0 < args.duration <= 120:
        parser.error("--duration must be in (0, 120] seconds")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    machine = machine_description()
    loop_before = loop_seconds()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; "
        f"speed now: 5M-addition loop {loop_before:.2f} s"
    )
    print(
        f"fleet: {args.devices:,} devices at {args.rate / args.devices:.2f} alerts/s each "
        f"({args.rate:,.0f}/s in total) for {args.duration:g} s, telemetry every "
        f"{args.telemetry_interval:g} s, connect rate {args.connect_rate:g}/s, "
        f"{args.workers} generator processes, devices over "
        + ("TLS" if args.tls == "on" else "plain MQTT")
    )
    backends = {"sqlite": ["sqlite"], "postgres": ["postgres"], "both": ["sqlite", "postgres"]}[
        args.backend
    ]
    reports: dict[str, Any] = {}
    with postgres(args.pool_url) if "postgres" in backends else nullcontext(None) as fresh_pg:
        for backend in backends:
            url = fresh_pg() if backend == "postgres" and fresh_pg is not None else None
            print(f"pool: {'PostgreSQL' if url else 'SQLite'}")
            reports[backend] = run_city(args, machine, loop_before, url, backend)
    if len(reports) == 2:
        lite, pg = reports["sqlite"], reports["postgres"]
        ratio = pg.ingest_rate / lite.ingest_rate if lite.ingest_rate else 0.0
        print(
            f"PostgreSQL / SQLite {ratio:.2f}: {pg.ingest_rate:,.0f} against "
            f"{lite.ingest_rate:,.0f} alerts/s; p99 {pg.latency_ms.get('p99', float('nan')):,.1f}"
            f" against {lite.latency_ms.get('p99', float('nan')):,.1f} ms"
        )
    return 0 if all(r.zero_loss for r in reports.values()) else 1


def run_city(
    args: argparse.Namespace,
    machine: dict[str, Any],
    loop_before: float,
    pool_url: str | None,
    backend: str,
) -> Any:
    """One stack (broker, aggregator on the given pool), one fleet run; prints its figures."""
    options = StackOptions(
        device_tls=args.tls == "on",
        batch_max_messages=args.batch_size,
        batch_linger_ms=args.linger_ms,
        batch_min_messages=args.min_batch,
        receive_maximum=args.receive_maximum,
        feedback_qos=args.feedback_qos,
        pool_url=pool_url,
    )
    tag = f"city{uuid.uuid4().hex[:4]}"
    config = LoadConfig(
        rate=args.rate,
        duration_s=args.duration,
        mode="raw",
        publishers=args.devices,
        workers=args.workers,
        connect_rate=args.connect_rate,
        telemetry_interval_s=args.telemetry_interval,
        progress=True,
    )
    stack = GatewayStack(options=options)
    started = time.monotonic()
    hot: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        provisioner = preprovision_fleet(stack, tag, args.devices)
        provision_s = time.monotonic() - t0
        t0 = time.monotonic()
        stack.start()
        start_s = time.monotonic() - t0
        print(
            f"provisioning: {args.devices:,} accounts into the registry in {provision_s:.1f} s; "
            f"broker and aggregator up (accounts loaded from it) in {start_s:.1f} s"
        )
        assert stack.broker is not None
        assert stack.broker.pid is not None
        assert stack.aggregator is not None
        broker_pid = stack.broker.pid
        broker_cpu0 = process_cpu_seconds(broker_pid)
        me0, kids0 = cpu_seconds()
        # Started with the stack, before the generator's: the broker and the aggregator's own.
        aggregator_children = child_pids() - {broker_pid}
        with CpuSampler(broker_pid, aggregator_children) as sampler:
            report = run_load(config, provisioner, stack.pool_target, run_tag=tag)
        me1, kids1 = cpu_seconds()
        broker_cpu = process_cpu_seconds(broker_pid) - broker_cpu0
        print(report.summary())
        if args.hot_sample:
            specs = [
                DeviceSpec(f"{tag}-hot{i:03d}", DeviceKind.CAMERA) for i in range(args.hot_sample)
            ]
            t0 = time.monotonic()
            try:
                stack.provision(specs)
            except StackError as exc:
                # The plugin saves its whole file after every command: on a large fleet the
                # answer can take longer than the launcher waits. That is the finding.
                print(
                    f"live provisioning on a broker holding {args.devices:,} accounts: "
                    f"{args.hot_sample} more not done after {time.monotonic() - t0:.1f} s ({exc})"
                )
            else:
                hot = {"devices": args.hot_sample, "seconds": time.monotonic() - t0}
                print(
                    f"live provisioning on a broker holding {args.devices:,} accounts: "
                    f"{args.hot_sample} more in {hot['seconds']:.1f} s "
                    f"({hot['seconds'] / args.hot_sample * 1000:,.0f} ms per device)"
                )
    finally:
        stack.stop()
    elapsed = time.monotonic() - started
    loop_after = loop_seconds()
    # CPU per alert: the aggregator's pool writer runs in this process (its threads), the
    # generator in its finished children, the broker is read from /proc (the aggregator's I/O
    # process is still running: only the steady-state figures below count it). Covers the
    # whole sending window and the drain, so it is a ceiling for the steady state.
    pooled = max(report.pooled, 1)
    cpu = {
        "aggregator_us_per_alert": (me1 - me0) / pooled * 1e6,
        "generator_us_per_alert": (kids1 - kids0) / pooled * 1e6,
        "broker_us_per_alert": broker_cpu / pooled * 1e6,
    }
    print(
        "CPU per alert (whole run, connects and drain included): aggregator main process "
        f"{cpu['aggregator_us_per_alert']:,.0f} µs, broker {cpu['broker_us_per_alert']:,.0f} µs, "
        f"generator {cpu['generator_us_per_alert']:,.0f} µs"
    )
    # Steady state: from 5 s after the first send to the last send.
    agg_cores, broker_cores = sampler.cores(
        report.started_at + 5, report.started_at + report.send_seconds
    )
    steady = {
        "aggregator_cores": agg_cores,
        "broker_cores": broker_cores,
        "aggregator_us_per_alert": agg_cores / report.send_rate * 1e6 if report.send_rate else 0,
        "broker_us_per_alert": broker_cores / report.send_rate * 1e6 if report.send_rate else 0,
        "generator_us_per_alert": report.generator_cpu_us,
    }
    print(
        f"steady state (sending, {report.send_rate:,.0f} alerts/s offered): aggregator "
        f"{agg_cores:.2f} cores = {steady['aggregator_us_per_alert']:,.0f} µs/alert, broker "
        f"{broker_cores:.2f} cores = {steady['broker_us_per_alert']:,.0f} µs/alert, generator "
        f"{report.generator_cpu_us:,.0f} µs/alert"
    )
    p99 = report.latency_ms.get("p99", float("inf"))
    verdict = (
        report.zero_loss
        and report.publishers >= TARGET_CONNECTIONS
        and report.ingest_rate >= TARGET_RATE
        and p99 <= TARGET_P99_MS
    )
    print(
        f"target {TARGET_CONNECTIONS:,} connections, ≥ {TARGET_RATE:,}/s, p99 ≤ "
        f"{TARGET_P99_MS:.0f} ms, zero loss: {'MET' if verdict else 'NOT MET'}  (run took "
        f"{elapsed:.1f} s; 5M-addition loop {loop_before:.2f} s before, {loop_after:.2f} s after)"
    )
    if args.json is not None:
        out = {
            "machine": machine | {"loop_s_before": loop_before, "loop_s_after": loop_after},
            "args": vars(args) | {"json": str(args.json), "pool_url": None, "backend": backend},
            "provision_s": provision_s,
            "stack_start_s": start_s,
            "load": json.loads(report.to_json()),
            "cpu": cpu,
            "cpu_steady": steady,
            "hot_provisioning": hot,
            "target_met": verdict,
        }
        path = args.json if args.backend != "both" else args.json.with_suffix(f".{backend}.json")
        path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    raise SystemExit(main())
