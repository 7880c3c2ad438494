"""``gateway demo``: broker, aggregator and a simulated fleet on the sample area, events live.

Everything runs on this machine on free loopback ports under ``<data-dir>/demo`` (wiped at each
start, so every demo begins with an empty pool). Ctrl-C stops the fleet, then the aggregator
(it commits what it holds), then the broker: nothing is left running.

Simulated community operators and departments (``simulators/casework.py``) work the cases
through the API on a case clock running ``--case-speed`` times the wall clock (60: a minute a
second), some late and some sent back, so the dashboard's inbox, countdowns and handling tab
move while one watches. ``--case-speed 0`` leaves the cases to the people at the dashboard.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import threading
import time
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

from pydantic import SecretStr
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from aggregator.access.auth import Level
from aggregator.broker.launcher import BrokerSettings, MosquittoBroker
from aggregator.broker.registry import AccountRole, DeviceRegistry
from aggregator.clock import OffsetFileClock
from aggregator.config import MqttSettings, Settings
from aggregator.pool import queries
from aggregator.service import Service
from aggregator.tables import render_events
from simulators.casework import CaseworkConfig, CaseWorkers
from simulators.desk import Account, Desk
from simulators.fleet import Fleet, FleetConfig
from simulators.stack import CredentialsDir

log = logging.getLogger(__name__)


def _screen(pool: Path | str, header: str, rows: int) -> Group:
    # a PostgreSQL pool (CWG_POOL_URL) exists from the start; the SQLite file once ingest made it
    if isinstance(pool, Path) and not pool.exists():
        return Group(Text(header), Text("waiting for the first alert…"))
    with closing(queries.open_reader(pool)) as db:
        counts = queries.pool_counts(db)
        events = queries.latest_events(db, by_update=True, limit=rows)
    stats = "  ".join(f"[bold]{v}[/] {k.replace('_', ' ')}" for k, v in asdict(counts).items())
    return Group(
        Panel(Text.from_markup(f"{header}\n{stats}"), title="community warning gateway · demo"),
        render_events(events, title="latest events (most recently updated first)"),
    )


class _DemoDesks:
    """The simulated operators' way in: accounts on the demo's pool, sessions on its API."""

    def __init__(self, service: Service, clock: OffsetFileClock) -> None:
        self.service = service
        self.clock = clock

    def add_operator(
        self,
        username: str,
        level: Level | str,
        *,
        scope_code: str = "",
        department: str | None = None,
    ) -> Account:
        op, password = self.service.auth.create_account(
            username, level, scope_code=scope_code, department=department
        )
        return Account(op.username, password, str(op.level), op.scope_code, op.department)

    def desk(self, account: Account) -> Desk:
        return Desk(self.service.url, account)


def run_demo(args: argparse.Namespace) -> int:
    console = Console()
    if not getattr(args, "verbose", False):
        # the live table is the demo's output; `gateway -v demo` shows the service's logs too
        logging.getLogger().setLevel(logging.WARNING)
    root: Path = (args.data_dir / "demo").absolute()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    registry = DeviceRegistry(root / "registry.yaml")
    _, agg_password = registry.add_account("aggregator", AccountRole.AGGREGATOR)
    registry.save()
    broker = MosquittoBroker(BrokerSettings(state_dir=root / "broker"), registry)
    service: Service | None = None
    workers: CaseWorkers | None = None
    threads: list[threading.Thread] = []
    case_speed = float(getattr(args, "case_speed", 60.0) or 0.0)
    clock = OffsetFileClock(root / "case-clock") if case_speed > 0 else None
    try:
        console.print("[bold]starting Mosquitto, the aggregator and the dashboard…[/]")
        broker.start()
        settings = Settings(
            data_dir=root / "data",
            # the demo's dashboard login is admin/admin: development mode, never the default
            dev=True,
            # the simulated operators' compressed case clock (a demo, never production)
            test_clock_file=clock.path if clock is not None else None,
            mqtt=MqttSettings(
                port=broker.port, password=SecretStr(agg_password), client_id="cwg-demo"
            ),
        )
        service = Service(settings, port=args.http_port or 0, log_level="warning")
        service.start()
        provisioner = CredentialsDir(
            root / "devices",
            registry=root / "registry.yaml",
            broker_state=root / "broker",
            broker_host=broker.host,
            broker_port=broker.port,
        )
        fleet = Fleet(
            FleetConfig(
                seed=args.seed,
                cameras=max(1, args.devices * 2 // 3),
                sensors=max(1, args.devices - args.devices * 2 // 3),
                rate=args.rate,
                duration_s=None,
                incident_share=0.25,
                out_of_area_share=0.03,
                malformed_share=0.02,
                offline_per_hour=2.0,
            ),
            provisioner,
            console=console,
            progress=False,
        )
        fleet_thread = threading.Thread(target=fleet.run, args=(stop,), name="demo-fleet")
        fleet_thread.start()
        threads.append(fleet_thread)
        if clock is not None:
            desks = _DemoDesks(service, clock)
            running = service

            def work() -> None:
                # the accounts are made here: hashing their passwords takes seconds that the
                # screen need not wait for
                nonlocal workers
                workers = CaseWorkers(
                    desks,
                    running.aggregator.catalogue,
                    running.aggregator.grids,
                    CaseworkConfig(seed=args.seed),
                    speed=case_speed,
                )
                workers.run(stop)

            work_thread = threading.Thread(target=work, name="demo-cases")
            work_thread.start()
            threads.append(work_thread)
        pool_path = settings.pool_target
        header = (
            f"broker [bold]{broker.host}:{broker.port}[/]   pool [bold]{settings.pool_label}[/]   "
            f"fleet {args.devices} devices at {args.rate:g} alerts/s\n"
            f"dashboard [bold]{service.url}/[/] (login admin / admin)   "
            "[dim]Ctrl-C stops everything[/]"
        )
        if clock is not None:
            header += (
                f"\nsimulated operators and departments on a case clock {case_speed:g}× the "
                "wall clock"
            )

        def screen() -> Group:
            shown = header if workers is None else f"{header}\n{workers.summary()}"
            return _screen(pool_path, shown, 15)

        started = time.monotonic()
        with Live(screen(), console=console, refresh_per_second=2) as live:
            while not stop.wait(0.5):
                live.update(screen())
                if args.duration and time.monotonic() - started > args.duration:
                    stop.set()
        console.print("[bold]stopping…[/]")
        for thread in threads:
            thread.join(30)
        console.print(fleet.summary.table())
        if workers is not None:
            console.print(workers.summary())
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        if workers is not None:
            workers.close()
        if service is not None:
            service.stop()
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.print(f"stopped; see the pool with: gateway events --data-dir {root / 'data'}")
    return 0
