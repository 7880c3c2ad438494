"""``gateway demo``: broker, aggregator and a simulated fleet on the sample area, events live.

Everything runs on this machine on free loopback ports under ``<data-dir>/demo`` (wiped at each
start, so every demo begins with an empty pool). Ctrl-C stops the fleet, then the aggregator
(it commits what it holds), then the broker: nothing is left running.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from aggregator.cli import render_events
from aggregator.pool import connect
from simulators.fleet import Fleet, FleetConfig
from simulators.stack import GatewayStack, StackOptions

log = logging.getLogger(__name__)


def _counts(db: sqlite3.Connection) -> dict[str, int]:
    one = lambda sql: int(db.execute(sql).fetchone()[0])  # noqa: E731
    return {
        "events": one("SELECT count(*) FROM events"),
        "alerts": one("SELECT count(*) FROM alerts"),
        "merged": one("SELECT count(*) FROM alerts WHERE outcome='merged'"),
        "out of area": one("SELECT count(*) FROM out_of_area"),
        "dead letters": one("SELECT count(*) FROM dead_letters"),
        "devices online": one("SELECT count(*) FROM devices WHERE state='online'"),
    }


def _screen(pool_path: Path, header: str, rows: int) -> Group:
    if not pool_path.exists():
        return Group(Text(header), Text("waiting for the first alert…"))
    with closing(connect(pool_path, readonly=True)) as db:
        counts = _counts(db)
        events = db.execute(
            "SELECT e.*, (SELECT group_concat(device_id, ', ') FROM event_devices d"
            " WHERE d.event_id = e.id) AS devices FROM events e"
            " ORDER BY e.updated_at DESC LIMIT ?",
            (rows,),
        ).fetchall()
    stats = "  ".join(f"[bold]{v}[/] {k}" for k, v in counts.items())
    return Group(
        Panel(Text.from_markup(f"{header}\n{stats}"), title="community warning gateway · demo"),
        render_events(events, title="latest events (most recently updated first)"),
    )


def run_demo(args: argparse.Namespace) -> int:
    console = Console()
    root: Path = (args.data_dir / "demo").absolute()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    stack = GatewayStack(root, StackOptions(batch_linger_ms=20))
    http: Callable[[], None] | None = None
    try:
        console.print("[bold]starting Mosquitto and the aggregator…[/]")
        stack.start()
        url = None
        if args.http_port:
            http, url = _start_http(stack, args.http_port)
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
            stack,
            console=console,
            progress=False,
        )
        fleet_thread = threading.Thread(target=fleet.run, args=(stop,), name="demo-fleet")
        fleet_thread.start()
        header = (
            f"broker [bold]{stack.host}:{stack.port}[/]   pool [bold]{stack.pool_path}[/]   "
            f"fleet {args.devices} devices at {args.rate:g} alerts/s"
            + (f"\ndashboard [bold]{url}[/]" if url else "")
            + "\n[dim]Ctrl-C stops everything[/]"
        )
        started = time.monotonic()
        with Live(
            _screen(stack.pool_path, header, 15), console=console, refresh_per_second=2
        ) as live:
            while not stop.wait(0.5):
                live.update(_screen(stack.pool_path, header, 15))
                if args.duration and time.monotonic() - started > args.duration:
                    stop.set()
        console.print("[bold]stopping…[/]")
        fleet_thread.join(30)
        console.print(fleet.summary.table())
    finally:
        stop.set()
        if http is not None:
            http()
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.print(f"stopped; see the pool with: gateway events --data-dir {stack.root / 'data'}")
    return 0


def _start_http(stack: GatewayStack, port: int) -> tuple[Callable[[], None] | None, str | None]:
    """The operators' dashboard and API on the stack's pool, if this build has them."""
    try:
        from aggregator.api.server import start_background  # type: ignore[attr-defined]
    except ImportError:
        log.info("no API/dashboard in this build; the terminal shows the events")
        return None, None
    agg: Any = stack.aggregator
    stopper, url = start_background(agg, host="127.0.0.1", port=port, dev=True)
    return stopper, url
