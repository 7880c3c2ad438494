"""Operators against ingest: does watching, polling or guessing passwords slow the pool writer?

Starts Mosquitto, the service (ingest here, the operator API in its own process) and the load
generator under a temporary directory, and measures ingest p99 (``observed_at`` to the commit of
the alert's batch) in pairs of runs in this one invocation, the baseline first:

1. **dashboard users**: N simulated users (default 100, in a process of their own), each holding
   a live stream (WebSocket) filtered to one community and polling that community's event list
   every 5 s, at 6,000 alerts/s from 16 devices — against the same load with nobody watching;
2. **login flood**: 8 clients posting wrong passwords to ``/api/v1/auth/token`` as fast as they
   are answered, at 5,000 alerts/s — against the same load without them.

    python bench/bench_operators.py [--alerts 60000] [--users 100] [--repeat 1] [--api-nice 0]
        [--clients-nice 0] [--clients-idle] [--user-does stream+poll|stream|poll] [--skip-users]
        [--skip-flood] [--json report.json]

Every run is bounded (``--alerts`` per run). The box is shared by the broker, the load
generator, the service and the simulated users: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import random
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from argon2 import PasswordHasher
from pydantic import SecretStr

from aggregator.access.auth import Level
from aggregator.broker.launcher import BrokerSettings, MosquittoBroker
from aggregator.broker.registry import AccountRole, DeviceRegistry
from aggregator.config import HttpSettings, MqttSettings, Settings
from aggregator.grids import GridIndex, default_grid_file
from aggregator.service import Service
from simulators.loadgen import LoadConfig, LoadReport, loop_seconds, machine_description, run_load
from simulators.stack import CredentialsDir

PASSWORD = secrets.token_urlsafe(16)  # the simulated operators' own, made per run
POLL_S = 5.0
FLOOD_CLIENTS = 8


IDLE = -1  # as a niceness: SCHED_IDLE (--clients-idle)


def _yield_cpu(nice: int) -> None:
    """Lower this process's claim on the CPU: a niceness, or with ``IDLE`` Linux's SCHED_IDLE
    policy, under which it runs only on a core that nothing else wants and never preempts a
    server thread that wakes (a nice-19 process still takes its time slice first). That is
    the nearest a shared 2-core box comes to clients on machines of their own."""
    if nice == IDLE:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(nice)


# -- the simulated dashboard users (a process of their own) ---------------------------------


async def _user(
    base: str, token: str, community: str, stop: asyncio.Event, tally: dict[str, Any]
) -> None:
    from websockets.asyncio.client import connect

    ws_url = base.replace("http", "ws", 1) + f"/api/v1/stream?grid={community}"
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:

        async def poll() -> None:
            await asyncio.sleep(random.uniform(0, POLL_S))  # users do not poll in step
            while not stop.is_set():
                started = time.monotonic()
                r = await http.get("/api/v1/events", params={"grid": community, "limit": 50})
                tally["poll_ms"].append((time.monotonic() - started) * 1000)
                tally["polls"] += 1
                if r.status_code != 200:
                    tally["poll_errors"] += 1
                await asyncio.sleep(max(0.0, POLL_S - (time.monotonic() - started)))

        poller = asyncio.create_task(poll() if "poll" in tally["does"] else asyncio.sleep(0))
        if "stream" not in tally["does"]:
            tally["connected"] += 1
            await stop.wait()
            poller.cancel()
            return
        try:
            async with connect(ws_url, max_queue=None) as ws:
                await ws.send(orjson.dumps({"token": token}).decode())
                tally["connected"] += 1
                while not stop.is_set():
                    try:
                        text = await asyncio.wait_for(ws.recv(), timeout=0.5)
                    except TimeoutError:
                        continue
                    tally["frames"] += 1
                    message = orjson.loads(text)
                    # a frame is one item or a batch of them (all due in one tick)
                    for item in message["items"] if message.get("kind") == "batch" else [message]:
                        kind = item.get("kind")
                        if kind == "event":
                            tally["events"] += 1
                        elif kind == "dropped":
                            tally["dropped"] += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
            tally["closed"] += 1
            tally["close_reasons"].append(repr(exc)[:120])
        finally:
            poller.cancel()


async def _users(base: str, tokens: list[tuple[str, str]], n: int, does: str, control: str) -> None:
    stop = asyncio.Event()
    tally: dict[str, Any] = {
        "connected": 0, "frames": 0, "events": 0, "dropped": 0, "closed": 0, "polls": 0,
        "poll_errors": 0, "poll_ms": [], "close_reasons": [], "does": does,
    }  # fmt: skip
    tasks = [
        asyncio.create_task(_user(base, *tokens[i % len(tokens)], stop, tally)) for i in range(n)
    ]
    flag = Path(control)
    began = time.monotonic()
    while not flag.exists():  # the parent writes this file to stop us
        Path(control + ".connected").write_text(str(tally["connected"]))
        await asyncio.sleep(0.2)
    stop.set()
    # what the users would have polled had none of them been starved of CPU or kept waiting
    tally["polls_due"] = int(n * (time.monotonic() - began) / POLL_S) if "poll" in does else 0
    await asyncio.gather(*tasks, return_exceptions=True)
    lat = sorted(tally.pop("poll_ms"))
    tally["poll_p50_ms"] = lat[len(lat) // 2] if lat else None
    tally["poll_p99_ms"] = lat[int(len(lat) * 0.99)] if lat else None
    Path(control + ".result").write_text(json.dumps(tally))


def users_main(
    base: str, tokens: list[tuple[str, str]], n: int, does: str, nice: int, control: str
) -> None:
    # The simulated browsers stand for operators' own machines: with --clients-nice their CPU
    # yields to the server's, as it would not be on the server at all.
    _yield_cpu(nice)
    asyncio.run(_users(base, tokens, n, does, control))


# -- the login flood (a process of its own) ------------------------------------------------


async def _flood(base: str, control: str) -> None:
    counts: dict[str, int] = {}

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            while not Path(control).exists():
                r = await http.post(
                    "/api/v1/auth/token",
                    json={"username": f"user{i % 3}", "password": f"wrong-{random.random()}"},
                )
                counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1

    await asyncio.gather(*(client(i) for i in range(FLOOD_CLIENTS)))
    Path(control + ".result").write_text(json.dumps(counts))


def flood_main(base: str, nice: int, control: str) -> None:
    _yield_cpu(nice)
    asyncio.run(_flood(base, control))


# -- the runs -------------------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _p99(report: LoadReport) -> float:
    return float(report.latency_ms.get("p99", float("inf")))


def _line(label: str, report: LoadReport) -> str:
    lat = report.latency_ms
    return (
        f"{label:<28} {report.ingest_rate:>8,.0f} alerts/s  p50 {lat.get('p50', 0):7.1f} ms  "
        f"p99 {lat.get('p99', 0):7.1f} ms  max {lat.get('max', 0):7.1f} ms  "
        f"{'zero loss' if report.zero_loss else 'LOSS'}"
    )


def _with_process(
    target: Any, args: tuple[Any, ...], control: Path, ready: Any, run: Any, timeout: float = 60
) -> tuple[LoadReport, dict[str, Any]]:
    ctx = mp.get_context("spawn")
    process = ctx.Process(target=target, args=(*args, str(control)), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline or not process.is_alive():
                raise RuntimeError("the simulated clients did not come up")
            time.sleep(0.2)
        report = run()
    finally:
        control.write_text("stop")
        process.join(60)
        if process.is_alive():
            process.kill()
    result_file = Path(str(control) + ".result")
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    return report, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alerts", type=int, default=60_000, help="alerts per run")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--users-rate", type=float, default=6000)
    ap.add_argument("--flood-rate", type=float, default=5000)
    ap.add_argument("--publishers", type=int, default=16)
    ap.add_argument(
        "--api-nice",
        type=int,
        default=HttpSettings().nice,
        help="niceness of the API process (default: the http.nice setting's)",
    )
    ap.add_argument(
        "--clients-nice",
        type=int,
        default=0,
        help="niceness of the simulated users' and flooders' process (they stand for other "
        "machines; 19 keeps their CPU from the server's measurement)",
    )
    ap.add_argument(
        "--clients-idle",
        action="store_true",
        help="run the simulated users and flooders under SCHED_IDLE (only on otherwise idle "
        "CPU: the closest stand-in for operators' own machines; overrides --clients-nice)",
    )
    ap.add_argument(
        "--user-does",
        choices=["stream+poll", "stream", "poll"],
        default="stream+poll",
        help="what each simulated user does (to see which costs what)",
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="pairs of runs (baseline, then load) per part"
    )
    ap.add_argument("--skip-users", action="store_true")
    ap.add_argument("--skip-flood", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.clients_idle:
        args.clients_nice = IDLE
    logging.basicConfig(level=logging.WARNING)

    machine = machine_description()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; "
        f"5M-addition loop {loop_seconds():.2f} s; API niceness {args.api_nice}, simulated "
        f"clients' {'SCHED_IDLE' if args.clients_nice == IDLE else args.clients_nice}"
    )
    root = Path(tempfile.mkdtemp(prefix="cwg-bench-ops-"))
    registry = DeviceRegistry(root / "registry.yaml")
    _, agg_password = registry.add_account("aggregator", AccountRole.AGGREGATOR)
    registry.save()
    broker = MosquittoBroker(BrokerSettings(state_dir=root / "broker"), registry)
    service: Service | None = None
    out: dict[str, Any] = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        broker.start()
        settings = Settings(
            data_dir=root / "data",
            mqtt=MqttSettings(
                port=broker.port, password=SecretStr(agg_password), client_id="cwg-bench-ops"
            ),
            http=HttpSettings(nice=args.api_nice),
        )
        # The library's default argon2 cost: what a login flood would make the API compute
        # if nothing stopped it.
        service = Service(settings, port=0, log_level="warning", password_hasher=PasswordHasher())
        communities = [c.code for c in GridIndex.from_geojson(default_grid_file()).communities()]
        for i, code in enumerate(communities):
            service.auth.create_account(
                f"user{i}", Level.COMMUNITY, scope_code=code, password=PASSWORD
            )
        service.start()
        assert service.aggregator.ingest.wait_connected(15), "the aggregator did not connect"
        provisioner = CredentialsDir(
            root / "devices",
            registry=root / "registry.yaml",
            broker_state=root / "broker",
            broker_host=broker.host,
            broker_port=broker.port,
        )
        pool = settings.pool
        seed = iter(range(1000))
        cpu_api: list[float] = []  # the API process's CPU seconds per second, per run

        def load(rate: float) -> LoadReport:
            ingest0, api0 = cpu_seconds(os.getpid()), cpu_seconds(service.api_pid)
            started = time.monotonic()
            config = LoadConfig(
                rate=rate,
                count=args.alerts,
                mode="raw",
                publishers=args.publishers,
                seed=next(seed),
                drain_timeout_s=120,
            )
            report = run_load(config, provisioner, pool)
            took = time.monotonic() - started
            ingest = cpu_seconds(os.getpid()) - ingest0
            api = cpu_seconds(service.api_pid) - api0
            print(
                f"  CPU over {took:.1f} s: pool-writer process {ingest / took:.0%} of a core "
                f"({ingest / report.sent * 1e6:.0f} µs per alert), API process {api / took:.0%} "
                f"({api / took * 1000:.0f} ms per second)"
            )
            cpu_api.append(api / took)
            return report

        run_load(LoadConfig(rate=2000, count=4000, mode="raw"), provisioner, pool)  # warm-up

        if not args.skip_users:
            with httpx.Client(base_url=service.url, timeout=30) as http:
                tokens = [
                    (
                        http.post(
                            "/api/v1/auth/token",
                            json={"username": f"user{i}", "password": PASSWORD},
                        ).json()["access_token"],
                        code,
                    )
                    for i, code in enumerate(communities)
                ]
            out["users"] = []
            for rep in range(args.repeat):
                none = load(args.users_rate)
                print(_line("nobody watching", none))
                control = root / f"users-{rep}.stop"
                connected = Path(str(control) + ".connected")

                def users_ready(connected: Path = connected) -> bool:
                    return connected.exists() and connected.read_text() == str(args.users)

                watched, users = _with_process(
                    users_main,
                    (service.url, tokens, args.users, args.user_does, args.clients_nice),
                    control,
                    users_ready,
                    lambda: load(args.users_rate),
                )
                print(_line(f"{args.users} dashboard users", watched))
                ratio = _p99(watched) / _p99(none)
                print(
                    f"  users: {users.get('connected')} streams, {users.get('events')} event "
                    f"notices received in {users.get('frames')} frames, "
                    f"{users.get('dropped')} dropped, {users.get('closed')} "
                    f"closed; {users.get('polls')} polls of ~{users.get('polls_due')} due (p50 "
                    f"{users.get('poll_p50_ms') or 0:.0f} ms, p99 "
                    f"{users.get('poll_p99_ms') or 0:.0f} ms, {users.get('poll_errors')} errors)"
                )
                print(f"  ingest p99 with users / without: {ratio:.2f}  (target ≤ 1.20)")
                out["users"].append(
                    {
                        "none": json.loads(none.to_json()),
                        "watched": json.loads(watched.to_json()),
                        "clients": users,
                        "p99_ratio": ratio,
                        "api_cpu_s_per_s": {"none": cpu_api[-2], "watched": cpu_api[-1]},
                    }
                )
            ratios = sorted(r["p99_ratio"] for r in out["users"])
            print(
                f"users: p99 ratios {', '.join(f'{r:.2f}' for r in ratios)}; median "
                f"{ratios[len(ratios) // 2]:.2f}"
            )

        if not args.skip_flood:
            out["flood"] = []
            for rep in range(args.repeat):
                quiet = load(args.flood_rate)
                print(_line("no login flood", quiet))
                control = root / f"flood-{rep}.stop"
                flooded, answers = _with_process(
                    flood_main,
                    (service.url, args.clients_nice),
                    control,
                    lambda: True,
                    lambda: load(args.flood_rate),
                )
                print(_line(f"{FLOOD_CLIENTS} clients flooding logins", flooded))
                ratio = _p99(flooded) / _p99(quiet)
                print(f"  login answers by status: {answers}")
                print(f"  ingest p99 during the flood / without: {ratio:.2f}  (target ≤ 1.20)")
                out["flood"].append(
                    {
                        "none": json.loads(quiet.to_json()),
                        "flooded": json.loads(flooded.to_json()),
                        "answers": answers,
                        "p99_ratio": ratio,
                    }
                )
            ratios = sorted(r["p99_ratio"] for r in out["flood"])
            print(
                f"flood: p99 ratios {', '.join(f'{r:.2f}' for r in ratios)}; median "
                f"{ratios[len(ratios) // 2]:.2f}"
            )
    finally:
        if service is not None:
            service.stop()
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"5M-addition loop after: {loop_seconds():.2f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
