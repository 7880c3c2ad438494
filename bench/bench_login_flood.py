"""Ingest latency while clients flood the operator login, as a ratio to none in the same run.

Starts Mosquitto (``simulators.stack.GatewayStack``) and the whole service (aggregator and the
API with the real argon2 cost, ``aggregator.service.Service``) under a temporary directory,
then alternates load runs without and with ``--flooders`` clients posting wrong passwords to
``/api/v1/auth/token`` as fast as they are answered, and prints ingest p50/p99 of each and the
p99 ratio (flood / none; target ≤ 1.20).

    python bench/bench_login_flood.py [--alerts 30000] [--rate 5000] [--publishers 16]
        [--flooders 8] [--pairs 2] [--limiter on|off] [--json report.json]

``--limiter off`` raises the free failures to the settings' maxima, so that nearly every
attempt reaches argon2: what is left is the bounded password checker alone
(``CWG_ACCESS__LOGIN_WORKERS`` threads, the rest refused at once).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from aggregator.access.auth import Level
from aggregator.broker.registry import AccountRole
from aggregator.config import AccessSettings, MqttSettings, Settings
from aggregator.service import Service
from simulators.loadgen import LoadConfig, loop_seconds, machine_description, run_load
from simulators.stack import GatewayStack

TARGET_RATIO = 1.20


class Flood:
    """``n`` threads posting wrong logins until stopped; counts the answers by status."""

    def __init__(self, url: str, n: int) -> None:
        self.url = url
        self.n = n
        self.stop = threading.Event()
        self.statuses: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            k = 0
            while not self.stop.is_set():
                k += 1
                # Half guess at the real account, half spray made-up names.
                user = "operator" if k % 2 else f"guess-{i}-{k}"
                try:
                    r = http.post(
                        "/api/v1/auth/token", json={"username": user, "password": f"wrong-{k}"}
                    )
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                with self._lock:
                    self.statuses[status] += 1

    def __enter__(self) -> Flood:
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"flood-{i}", daemon=True)
            for i in range(self.n)
        ]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(35)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alerts", type=int, default=30_000, help="alerts per run (≤ 500,000)")
    parser.add_argument("--rate", type=float, default=5000, help="offered alerts per second")
    parser.add_argument("--publishers", type=int, default=16)
    parser.add_argument("--flooders", type=int, default=8, help="login-flooding clients")
    parser.add_argument("--pairs", type=int, default=2, help="none/flood pairs (≤ 10)")
    parser.add_argument("--limiter", choices=["on", "off"], default="on")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    if not 1 <= args.alerts <= 500_000 or not 1 <= args.pairs <= 10:
        parser.error("--alerts 1..500,000 and --pairs 1..10")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    machine = machine_description()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; "
        f"speed now: 5M-addition loop {loop_seconds():.2f} s"
    )
    access = (
        AccessSettings()
        if args.limiter == "on"
        else AccessSettings(login_free_failures_user=1000, login_free_failures_addr=10_000)
    )
    stack = GatewayStack()
    runs: list[dict[str, Any]] = []
    try:
        stack.start(aggregator=False)
        account = stack.add_account("bench-aggregator", AccountRole.AGGREGATOR)
        settings = Settings(
            data_dir=stack.root / "data",
            mqtt=MqttSettings(
                host=account.host,
                port=account.port,
                username=account.username,
                password=SecretStr(account.password),
                client_id=f"bench-agg-{uuid.uuid4().hex[:8]}",
            ),
            access=access,
        )
        service = Service(settings, port=0, log_level="warning")
        service.auth.create_account("operator", Level.ADMIN, password=uuid.uuid4().hex)
        with service:
            if not service.aggregator.ingest.wait_connected(15):
                raise SystemExit("the aggregator did not connect")
            time.sleep(0.5)
            for pair in range(args.pairs):
                for flood in (False, True):
                    config = LoadConfig(
                        rate=args.rate,
                        count=args.alerts,
                        mode="raw",
                        publishers=args.publishers,
                        seed=7 + pair,
                    )
                    if flood:
                        with Flood(service.url, args.flooders) as f:
                            time.sleep(1.0)  # the flood is under way before the load starts
                            report = run_load(config, stack, settings.pool)
                        statuses = dict(f.statuses)
                    else:
                        report = run_load(config, stack, settings.pool)
                        statuses = {}
                    lat = report.latency_ms
                    row = {
                        "flood": flood,
                        "ingest_rate": report.ingest_rate,
                        "p50_ms": lat.get("p50", float("nan")),
                        "p99_ms": lat.get("p99", float("nan")),
                        "zero_loss": report.zero_loss,
                        "logins": statuses,
                    }
                    runs.append(row)
                    print(
                        f"{'flood' if flood else 'none '}  {report.ingest_rate:8,.0f} alerts/s  "
                        f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                        f"zero loss {report.zero_loss}"
                        + (f"  login answers {statuses}" if flood else "")
                    )
    finally:
        stack.stop()
    none = statistics.median(r["p99_ms"] for r in runs if not r["flood"])
    flooded = statistics.median(r["p99_ms"] for r in runs if r["flood"])
    ratio = flooded / none if none else float("inf")
    print(
        f"ingest p99, median of {args.pairs}: none {none:.1f} ms, {args.flooders} login "
        f"flooders {flooded:.1f} ms: ratio {ratio:.2f} (target ≤ {TARGET_RATIO:.2f}: "
        f"{'MET' if ratio <= TARGET_RATIO else 'NOT MET'}); limiter {args.limiter}"
    )
    if args.json is not None:
        out = {"machine": machine, "args": vars(args) | {"json": str(args.json)}, "runs": runs,
               "p99_ratio": ratio}  # fmt: skip
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0 if all(r["zero_loss"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
