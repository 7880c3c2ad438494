"""Ingest throughput and latency: alerts through the real broker into the pool, next to a bare
paho subscriber counting the same stream in the same run.

Starts Mosquitto and the aggregator (``simulators.stack.GatewayStack``) under a temporary
directory, pushes N valid alerts with the load generator (by default two processes writing
pre-framed QoS 1 packets on connections paho opened; ``--mode paho`` for paho clients on the
lean QoS 1 path, ``--mode mosquitto_pub`` for the C client), and reports
alerts/s, p50/p99 latency from ``observed_at`` to the commit of the
alert's batch, the zero-loss check, and the ratio to the bare subscriber's rate.

    python bench/bench_ingest.py [--alerts 100000] [--rate 12000] [--mode raw|paho|mosquitto_pub]
        [--publishers N] [--alert-ids uuid7|uuid4] [--batch-size 1000]
        [--linger-ms 20] [--min-batch 400] [--receive-maximum 4000] [--feedback-qos 1]
        [--baseline before|concurrent|none] [--backend sqlite|postgres|both]
        [--pool-url URL] [--replicas N] [--json report.json]

``--backend`` picks the pool: the SQLite file (default), PostgreSQL, or one run of each in
this order, the same stream, and the PostgreSQL/SQLite ratio. PostgreSQL is the server of
``--pool-url`` (each run gets a database of its own created there when the account may, else
the URL's database, runs told apart by their alert ids), or without it a throwaway PostgreSQL 15
started as the tests start it (``tests/pgsupport.py``) and then restarted with ``fsync=on``,
since the test server runs without it: commits here are durable as in the field.
Pass the URL through the environment (``--pool-url "$CWG_POOL_URL"``) to keep a password
out of shell history; it is never printed.

``--replicas N`` (N ≥ 2, PostgreSQL) measures N aggregator replicas (``gateway run`` processes,
each with its own data directory and MQTT session, on one shared subscription and one database)
against one replica run the same way, the same stream in the same run, and prints the ratio.
On a 2-core machine broker, generator, PostgreSQL and the replicas share two cores: the ratio
says what a second replica buys there, not on a machine each.

By default the bare subscriber counts the stream first, alone on the broker, and then the
same stream (same generator, count, rate and seed) goes to the aggregator: on a 2-core machine
a concurrent stock-paho subscriber takes most of a core, and the ratio would then measure the
two fighting for it (``--baseline concurrent`` shows that).

Target on a 2-core machine: ≥ 10,000 alerts/s sustained, p99 ≤ 250 ms, zero loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pgserver import postgres  # bench/ is the script's directory: on sys.path

from aggregator.broker.registry import AccountRole
from contract import DeviceChannel
from simulators.loadgen import (
    LoadConfig,
    count_subscriber,
    loop_seconds,
    machine_description,
    run_load,
)
from simulators.stack import GatewayStack, StackOptions

TARGET_RATE = 10_000
TARGET_P99_MS = 250.0
ROOT = Path(__file__).resolve().parents[1]
REPLICA_GROUP = "bench-replicas"


def start_bare_subscriber(stack: GatewayStack, expected: int, name: str) -> tuple[Any, Any]:
    """The bare paho subscriber in its own process, subscribed; returns (process, results)."""
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    account = stack.add_account(name, AccountRole.AGGREGATOR)
    ready = ctx.Event()
    process = ctx.Process(
        target=count_subscriber,
        args=(
            account.host,
            account.port,
            account.username,
            account.password,
            stack.topics.device_filter(DeviceChannel.ALERT),
            expected,
            ready,
            results,
        ),
        daemon=True,
    )
    process.start()
    if not ready.wait(30):
        process.kill()
        raise SystemExit("the bare subscriber did not subscribe within 30 s")
    return process, results


def bare_result(process: Any, results: Any) -> dict[str, float] | None:
    try:
        bare: dict[str, float] | None = results.get(timeout=60)
    except queue.Empty:
        bare = None
    process.join(5)
    if process.is_alive():
        process.kill()
    return bare


def run_once(
    args: argparse.Namespace, tls: bool, pool_url: str | None = None
) -> tuple[Any, Any, bool, float, float]:
    """One stack, one load run; prints its figures."""
    options = StackOptions(
        pool_url=pool_url,
        device_tls=tls,
        batch_max_messages=args.batch_size,
        batch_linger_ms=args.linger_ms,
        batch_min_messages=args.min_batch,
        receive_maximum=args.receive_maximum,
        feedback_qos=args.feedback_qos,
        feedback_batching=args.feedback_batching == "on",
        notice_update_interval_ms=args.notice_interval_ms,
    )
    config = LoadConfig(
        rate=args.rate,
        count=args.alerts,
        mode=args.mode,
        publishers=args.publishers,
        alert_ids=args.alert_ids,
    )
    print(
        f"devices: {'TLS listener' if tls else 'plain MQTT on loopback'}; pool: "
        + ("PostgreSQL" if pool_url else "SQLite")
    )
    loop_before = loop_seconds()
    started = time.monotonic()
    bare: dict[str, float] | None = None
    stack = GatewayStack(options=options)
    try:
        stack.start(aggregator=False)
        if args.baseline == "before":
            process, results = start_bare_subscriber(stack, args.alerts, "bench-counter-before")
            sending = run_load(config, stack, None)
            print(f"baseline stream: {sending.sent:,} sent at {sending.send_rate:,.0f}/s")
            bare = bare_result(process, results)
        stack.start_aggregator()
        baseline: Any = None
        if args.baseline == "concurrent":
            baseline = start_bare_subscriber(stack, args.alerts, "bench-counter")
        report = run_load(config, stack, stack.pool_target)
        print(report.summary())
        if baseline is not None:
            bare = bare_result(*baseline)
    finally:
        stack.stop()
    elapsed = time.monotonic() - started
    loop_after = loop_seconds()
    p99 = report.latency_ms.get("p99", float("inf"))
    print(
        f"aggregator      {report.ingest_rate:>9,.0f} alerts/s  p50 "
        f"{report.latency_ms.get('p50', float('nan')):,.1f} ms  p99 {p99:,.1f} ms"
    )
    if bare:
        ratio = report.ingest_rate / bare["rate"] if bare["rate"] else 0.0
        print(f"bare paho sub   {bare['rate']:>9,.0f} msgs/s   ({bare['count']:,} counted)")
        print(f"ratio           {ratio:>9.2f}  (aggregator / bare subscriber, same stream)")
    elif args.baseline != "none":
        print("bare paho sub   no result (it did not finish within its time limit)")
    verdict = report.zero_loss and report.ingest_rate >= TARGET_RATE and p99 <= TARGET_P99_MS
    print(
        f"target ≥ {TARGET_RATE:,}/s, p99 ≤ {TARGET_P99_MS:.0f} ms, zero loss: "
        f"{'MET' if verdict else 'NOT MET'}  (run took {elapsed:.1f} s; 5M-addition loop "
        f"{loop_before:.2f} s before, {loop_after:.2f} s after)"
    )
    return report, bare, verdict, loop_before, loop_after


class Replica:
    """``gateway run`` as a process of its own (a replica shares nothing with the others but
    the broker and the database), on the shared subscription ``REPLICA_GROUP``."""

    def __init__(
        self, root: Path, name: str, host: str, port: int, account: Any, env: dict[str, str]
    ) -> None:
        self.name = name
        self.data_dir = root / f"replica-{name}"
        self.data_dir.mkdir(parents=True)
        password_file = self.data_dir / "aggregator.password"
        password_file.write_text(account.password)
        password_file.chmod(0o600)
        self.log = root / f"replica-{name}.log"
        with socket.socket() as probe:  # a free loopback port for its Prometheus metrics
            probe.bind(("127.0.0.1", 0))
            self.metrics_port = int(probe.getsockname()[1])
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "aggregator.cli", "run",
                    "--data-dir", str(self.data_dir),
                    "--broker", f"{host}:{port}",
                    "--password-file", str(password_file),
                    "--client-id", f"bench-replica-{name}-{uuid.uuid4().hex[:6]}",
                    "--share-group", REPLICA_GROUP,
                    "--metrics-port", str(self.metrics_port),
                ],
                cwd=ROOT,
                env={**os.environ, "CWG_MQTT__USERNAME": account.username, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_connected(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while "connected session_present=" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"replica {self.name} did not connect:\n{tail}")
            time.sleep(0.1)

    def alerts(self) -> int:
        """Alerts this replica committed (its own ``cwg_alerts_total``, every outcome)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return -1
        return int(
            sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "cwg_alerts_total"
            )
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def replica_env(args: argparse.Namespace, pool_url: str) -> dict[str, str]:
    """The aggregator knobs of this run, as ``gateway run`` reads them (Settings, CWG_*)."""
    return {
        "CWG_POOL_URL": pool_url,
        "CWG_BATCH__MAX_MESSAGES": str(args.batch_size),
        "CWG_BATCH__LINGER_MS": str(args.linger_ms),
        "CWG_BATCH__MIN_MESSAGES": str(args.min_batch),
        "CWG_MQTT__RECEIVE_MAXIMUM": str(args.receive_maximum),
        "CWG_MQTT__FEEDBACK_QOS": str(args.feedback_qos),
        "CWG_MQTT__FEEDBACK_BATCHING": "true" if args.feedback_batching == "on" else "false",
        "CWG_NOTICES__UPDATE_INTERVAL_MS": str(args.notice_interval_ms),
    }


def run_replicas(args: argparse.Namespace, n: int, pool_url: str) -> Any:
    """``n`` replicas (processes) on one fresh database, one load run through the broker."""
    config = LoadConfig(
        rate=args.rate,
        count=args.alerts,
        mode=args.mode,
        publishers=args.publishers,
        alert_ids=args.alert_ids,
    )
    stack = GatewayStack(options=StackOptions(device_tls=args.tls == "on"))
    replicas: list[Replica] = []
    try:
        stack.start(aggregator=False)
        account = stack.add_account("bench-replicas", AccountRole.AGGREGATOR)
        env = {**replica_env(args, pool_url), "CWG_MQTT__TOPIC_PREFIX": stack.topics.prefix}
        for i in range(n):
            replicas.append(Replica(stack.root, str(i), stack.host, stack.port, account, env))
        for r in replicas:
            r.wait_connected()
        time.sleep(0.5)  # the subscriptions registered before the first alert
        report = run_load(config, stack, pool_url)
        shares = [r.alerts() for r in replicas]
        if n > 1:
            print("  per replica: " + ", ".join(f"{a:,} alerts" for a in shares))
    finally:
        for r in replicas:
            r.stop()
        stack.stop()
    print(report.summary())
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=100_000, help="alerts to push (≤ 2,000,000)")
    parser.add_argument("--rate", type=float, default=12_000, help="offered alerts per second")
    parser.add_argument(
        "--mode",
        choices=["mosquitto_pub", "paho", "raw"],
        default="raw",
        help="load generator, 2 processes: raw (default) connects with paho, then frames QoS 1"
        " PUBLISH packets and parses PUBACKs itself; paho publishes through paho clients on the"
        " lean QoS 1 path; mosquitto_pub runs one C client per publisher, fed lines",
    )
    parser.add_argument("--publishers", type=int, default=None, help="publishing clients")
    parser.add_argument(
        "--alert-ids",
        choices=["uuid7", "uuid4"],
        default="uuid7",
        help="uuid7 (default): the edge agent's ids, in time order per device; uuid4: random"
        " ids, as a device of another make might send",
    )
    parser.add_argument(
        "--batch-size", type=int, default=1000, help="aggregator batch.max_messages"
    )
    parser.add_argument("--linger-ms", type=float, default=20, help="aggregator batch.linger_ms")
    parser.add_argument(
        "--min-batch",
        type=int,
        default=400,
        help="aggregator batch.min_messages: a batch this large stops lingering (set it to "
        "--batch-size for a linger on every batch)",
    )
    parser.add_argument(
        "--receive-maximum", type=int, default=4000, help="aggregator mqtt.receive_maximum"
    )
    parser.add_argument("--feedback-qos", type=int, choices=[0, 1], default=1)
    parser.add_argument(
        "--feedback-batching",
        choices=["on", "off"],
        default="on",
        help="aggregator mqtt.feedback_batching: one feedback-batch/v1 per device and commit "
        "(on), or one feedback/v1 per alert (off)",
    )
    parser.add_argument(
        "--notice-interval-ms",
        type=float,
        default=1000,
        help="aggregator notices.update_interval_ms (0: an updated notice per event and batch)",
    )
    parser.add_argument(
        "--baseline",
        choices=["before", "concurrent", "none"],
        default="before",
        help="when the bare paho subscriber counts the stream: 'before' the aggregator starts "
        "(the same stream: generator, count, rate and seed, on the same broker, alone), "
        "'concurrent'ly with it (both share the cores), or not at all",
    )
    parser.add_argument(
        "--tls",
        choices=["off", "on", "compare"],
        default="off",
        help="devices publish over the broker's TLS listener (on), plain MQTT on loopback "
        "(off, default), or one run of each in this order and the TLS/plain ratio (compare)",
    )
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres", "both"],
        default="sqlite",
        help="the pool: SQLite (default), PostgreSQL, or one run of each and their ratio",
    )
    parser.add_argument(
        "--pool-url",
        default=None,
        help="PostgreSQL server to use (postgresql://…; runs get databases of their own there); "
        'default: a throwaway PostgreSQL 15. Pass it as "$CWG_POOL_URL" to keep a password '
        "out of shell history",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="N ≥ 2: also N replicas against 1 on PostgreSQL (gateway run processes, shared "
        "subscription), the same stream, and their ratio",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    if not 1 <= args.alerts <= 2_000_000:
        parser.error("--alerts must be between 1 and 2,000,000")
    if not 1 <= args.replicas <= 8:
        parser.error("--replicas must be between 1 and 8")
    if args.pool_url is not None and not args.pool_url.startswith("postgresql://"):
        parser.error("--pool-url must be a postgresql:// URL")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    machine = machine_description()
    loop_before = loop_seconds()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; "
        f"speed now: 5M-addition loop {loop_before:.2f} s"
    )
    print(
        f"aggregator: batch {args.batch_size}, linger {args.linger_ms} ms below "
        f"{args.min_batch}, receive_maximum "
        f"{args.receive_maximum}, feedback QoS {args.feedback_qos} batching "
        f"{args.feedback_batching}, notice interval {args.notice_interval_ms:g} ms; "
        f"alert ids {args.alert_ids}; baseline {args.baseline}"
    )
    runs = {"off": [False], "on": [True], "compare": [False, True]}[args.tls]
    backends = {"sqlite": ["sqlite"], "postgres": ["postgres"], "both": ["sqlite", "postgres"]}[
        args.backend
    ]
    use_pg = "postgres" in backends or args.replicas > 1
    results: dict[tuple[str, bool], tuple[Any, Any, bool, float, float]] = {}
    replica_reports: dict[int, Any] = {}
    with postgres(args.pool_url) if use_pg else contextlib.nullcontext(None) as fresh_pg:
        for backend in backends:
            for tls in runs:
                url = fresh_pg() if backend == "postgres" and fresh_pg is not None else None
                results[backend, tls] = run_once(args, tls, url)
        if args.replicas > 1 and fresh_pg is not None:
            for n in (1, args.replicas):
                print(f"replicas: {n} on PostgreSQL (gateway run processes, shared subscription)")
                replica_reports[n] = run_replicas(args, n, fresh_pg())
    report, bare, verdict, loop_before, loop_after = list(results.values())[-1]
    for backend in backends:
        if len(runs) == 2:
            plain, tls_report = results[backend, False][0], results[backend, True][0]
            print(f"{backend}: " + ratio_line("TLS / plain", tls_report, plain))
    for tls in runs:
        if len(backends) == 2:
            lite, pg = results["sqlite", tls][0], results["postgres", tls][0]
            print(("TLS: " if tls else "plain: ") + ratio_line("PostgreSQL / SQLite", pg, lite))
    if replica_reports:
        one, many = replica_reports[1], replica_reports[args.replicas]
        for n, r in replica_reports.items():
            p99 = r.latency_ms.get("p99", float("nan"))
            print(
                f"{n} replica(s)    {r.ingest_rate:>9,.0f} alerts/s  p99 {p99:,.1f} ms  "
                f"{'zero loss' if r.zero_loss else f'LOST {r.lost:,}'}"
            )
        print(ratio_line(f"{args.replicas} replicas / 1", many, one))
    if args.json is not None:
        out = {
            "machine": machine | {"loop_s_before": loop_before, "loop_s_after": loop_after},
            "aggregator": vars(args) | {"json": str(args.json), "pool_url": None},
            "load": json.loads(report.to_json()),
            "bare_subscriber": bare,
            "target_met": verdict,
            "runs": [
                {"backend": b, "tls": t, "load": json.loads(r[0].to_json()), "target_met": r[2]}
                for (b, t), r in results.items()
            ],
            "replicas": {str(n): json.loads(r.to_json()) for n, r in replica_reports.items()},
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    every = [r[0] for r in results.values()] + list(replica_reports.values())
    return 0 if all(r.zero_loss for r in every) else 1


def ratio_line(what: str, a: Any, b: Any) -> str:
    """``a``'s ingest rate against ``b``'s, and their p99s."""
    ratio = a.ingest_rate / b.ingest_rate if b.ingest_rate else 0.0
    return (
        f"{what:15s} {ratio:>9.2f}  ingest rate ({a.ingest_rate:,.0f} against "
        f"{b.ingest_rate:,.0f}/s); p99 {a.latency_ms.get('p99', float('nan')):,.1f} against "
        f"{b.latency_ms.get('p99', float('nan')):,.1f} ms"
    )


if __name__ == "__main__":
    raise SystemExit(main())
