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
        [--baseline before|concurrent|none] [--json report.json]

By default the bare subscriber counts the stream first, alone on the broker, and then the
same stream (same generator, count, rate and seed) goes to the aggregator: on a 2-core machine
a concurrent stock-paho subscriber takes most of a core, and the ratio would then measure the
two fighting for it (``--baseline concurrent`` shows that).

Target on a 2-core machine: ≥ 10,000 alerts/s sustained, p99 ≤ 250 ms, zero loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import queue
import time
from pathlib import Path
from typing import Any

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


def run_once(args: argparse.Namespace, tls: bool) -> tuple[Any, Any, bool, float, float]:
    """One stack, one load run; prints its figures."""
    options = StackOptions(
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
    print(f"devices: {'TLS listener' if tls else 'plain MQTT on loopback'}")
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
        report = run_load(config, stack, stack.pool_path)
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
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    if not 1 <= args.alerts <= 2_000_000:
        parser.error("--alerts must be between 1 and 2,000,000")
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
    results = [run_once(args, tls) for tls in runs]
    report, bare, verdict, loop_before, loop_after = results[-1]
    if len(results) == 2:
        plain, tls_report = results[0][0], results[1][0]
        ratio = tls_report.ingest_rate / plain.ingest_rate if plain.ingest_rate else 0.0
        p99_plain = plain.latency_ms.get("p99", float("nan"))
        p99_tls = tls_report.latency_ms.get("p99", float("nan"))
        print(
            f"TLS / plain     {ratio:>9.2f}  ingest rate ({tls_report.ingest_rate:,.0f} against "
            f"{plain.ingest_rate:,.0f}/s); p99 {p99_tls:,.1f} against {p99_plain:,.1f} ms"
        )
    if args.json is not None:
        out = {
            "machine": machine | {"loop_s_before": loop_before, "loop_s_after": loop_after},
            "aggregator": vars(args) | {"json": str(args.json)},
            "load": json.loads(report.to_json()),
            "bare_subscriber": bare,
            "target_met": verdict,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0 if all(r[0].zero_loss for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
