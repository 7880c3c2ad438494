"""``gateway``: run and inspect the community warning gateway.

Every command works on one data directory (``--data-dir``, default ``./var``)::

    var/registry.yaml           devices and service accounts (password hashes only)
    var/broker/                 the embedded Mosquitto's config, accounts, TLS files, log, state
    var/devices/<id>.yaml       connection config handed to each provisioned device (mode 0600)
    var/accounts/<name>.*       service account credentials (the aggregator's among them)
    var/pool.db                 the community event pool (SQLite, WAL)
    var/snapshots/              snapshots, content-addressed by sha256

With ``CWG_POOL_URL=postgresql://…`` in the environment every command uses that PostgreSQL pool
instead of ``pool.db`` (and the snapshots are in its table): replicas on several machines share
it. ``pool_target`` is the one place a command finds its pool.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from aggregator.pool import queries
from aggregator.pool.reader import Reader, is_pool_url, open_reader, read_errors
from aggregator.tables import render_events

log = logging.getLogger("gateway")

EXAMPLES = """\
examples:
  gateway demo                              everything on this machine, live events in the terminal
  gateway broker --port 1883                start the embedded Mosquitto (keeps running)
  gateway run                               run the aggregator against that broker
  gateway provision cam-gate-01 --kind camera --lat 27.5512 --lon 120.5498
  gateway events --limit 20 --grid 330383001001
  gateway dead-letters --reason invalid_json
  gateway run --http-port 8080              aggregator + operator API and dashboard
  gateway accounts add lx-op --level community --scope 330383001001
  gateway catalogue                         the warning types, departments and dedup windows
  gateway grids                             streets, communities and grid counts
  gateway retention --keep-days 90 --dry-run   what removing alerts older than 90 days would do
"""


POOL_HELP = (
    "The pool is DATA_DIR/pool.db (or $CWG_POOL_PATH), unless $CWG_POOL_URL names a PostgreSQL "
    "pool (postgresql://user:password@host:port/db): set it in the environment, not on the "
    "command line, so that its password stays out of process lists and shell history."
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the registry, broker state, pool and snapshots live (default: "
        "$CWG_DATA_DIR, else ./var). " + POOL_HELP,
    )


def pool_target(data_dir: Path | None) -> tuple[Path | str, str]:
    """The pool a command works on, found as ``gateway run`` finds it (``Settings``:
    ``CWG_POOL_URL``, else ``CWG_POOL_PATH``, else ``pool.db`` in the data directory), and its
    name for messages (never the password)."""
    from aggregator.config import Settings

    settings = Settings() if data_dir is None else Settings(data_dir=data_dir)
    return settings.pool_target, settings.pool_label


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Community warning gateway: devices publish alerts over MQTT; the aggregator "
        "deduplicates them, geo-tags them to management grids and registers events in the "
        "community event pool.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="start broker, aggregator and a simulated fleet; show events live (Ctrl-C stops)",
    )
    _common(p)
    p.add_argument("--devices", type=int, default=24, help="simulated devices (default 24)")
    p.add_argument("--rate", type=float, default=2.0, help="alerts per second, fleet-wide")
    p.add_argument("--http-port", type=int, default=8080, help="dashboard/API port (0: none)")
    p.add_argument("--seed", type=int, default=7, help="fleet random seed")
    p.add_argument(
        "--duration",
        type=float,
        default=0,
        help="stop after this many seconds (0: run until Ctrl-C)",
    )
    p.add_argument(
        "--case-speed",
        type=float,
        default=60.0,
        help="simulated operators and departments work the cases on a case clock this many "
        "times the wall clock (default 60: a minute a second; 0: no simulated operators)",
    )

    p = sub.add_parser("broker", help="start the embedded Mosquitto with generated config")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="plain listener address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="plain listener port (0: any free)")
    _tls_options(p)

    p = sub.add_parser("run", help="run the aggregator (and optionally the API/dashboard)")
    _common(p)
    p.add_argument(
        "--broker",
        default=None,
        help="HOST:PORT of the broker (default: the one `gateway broker` started on --data-dir)",
    )
    p.add_argument(
        "--password-file",
        type=Path,
        default=None,
        help="the aggregator account's password (default: DATA_DIR/accounts/aggregator.password)",
    )
    p.add_argument("--client-id", default=None, help="MQTT client id (stable per replica)")
    p.add_argument("--share-group", default=None, help="shared subscription group for replicas")
    p.add_argument("--grid-file", type=Path, default=None, help="GeoJSON grids (default: sample)")
    p.add_argument("--http-port", type=int, default=0, help="also serve API/dashboard on this port")
    p.add_argument("--http-host", default="127.0.0.1", help="address the API/dashboard binds to")
    p.add_argument("--certfile", type=Path, default=None, help="HTTPS: PEM certificate (chain)")
    p.add_argument("--keyfile", type=Path, default=None, help="HTTPS: PEM private key")
    p.add_argument(
        "--dev-https",
        action="store_true",
        help="HTTPS with a certificate for --http-host, localhost and 127.0.0.1 signed by the "
        "development CA in DATA_DIR/broker/tls (made if missing): development only",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="loopback port of ingest's Prometheus metrics (CWG_METRICS_PORT; default: "
        "none without --http-port, any free port with it)",
    )
    p.add_argument(
        "--tsdb-url",
        default=None,
        help="InfluxDB v2 write API base URL for time series (InfluxDB 2.x/3.x, VictoriaMetrics; "
        "default $CWG_TSDB_URL); token from $CWG_TSDB_TOKEN",
    )
    p.add_argument("--tsdb-org", default=None, help="default $CWG_TSDB_ORG, else cwg")
    p.add_argument("--tsdb-bucket", default=None, help="default $CWG_TSDB_BUCKET, else cwg")

    p = sub.add_parser("provision", help="register a device: credentials, ACL, its config file")
    _common(p)
    p.add_argument("device_id", help="the device's id (letters, digits, - _ .)")
    p.add_argument("--kind", choices=["camera", "sensor", "hub"], required=True)
    p.add_argument("--name", default=None, help="a human name, e.g. 'North gate camera'")
    p.add_argument("--lat", type=float, default=None, help="installed position, WGS-84")
    p.add_argument("--lon", type=float, default=None)
    p.add_argument("--out", type=Path, default=None, help="where to write DEVICE_ID.yaml")
    p.add_argument(
        "--broker-host",
        default=None,
        help="the broker's name as the device reaches it (default: the TLS listener's address; "
        "it must be in the server certificate)",
    )
    p.add_argument(
        "--edge-config",
        type=Path,
        default=None,
        metavar="TEMPLATE",
        help="also write DEVICE_ID.edge.yaml, an edge-agent config: sources, zones and rules "
        "from TEMPLATE (a config of the same kind), identity, credentials (by file), broker, "
        "TLS CA and --lat/--lon from provisioning",
    )
    _tls_options(p)

    p = sub.add_parser("events", help="list events in the pool, newest first")
    _common(p)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--type", default=None, help="warning type code")
    p.add_argument("--grid", default=None, help="grid code prefix (any level)")
    p.add_argument("--status", default=None)
    p.add_argument("--follow", action="store_true", help="keep refreshing (Ctrl-C stops)")

    p = sub.add_parser("dead-letters", help="show rejected messages and why")
    _common(p)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--reason", default=None, help="e.g. invalid_json, unknown_type")
    p.add_argument("--device", default=None)

    p = sub.add_parser(
        "handling",
        help="handling rate, on-time rate and overdue events (Longgang 8.6) per department, "
        "community, grid or type",
        description="For the events registered in the window: 处置率 (closed / registered), "
        "按期处置率 (closed by the deadline / due, where due = closed + open past the "
        "deadline) and the events open past their deadline now (督办).",
    )
    _common(p)
    p.add_argument(
        "--by", choices=["department", "community", "grid", "type"], default="department"
    )
    p.add_argument("--grid", default=None, help="grid code prefix (any level)")
    p.add_argument(
        "--days", type=float, default=None, help="only events registered in the last N days"
    )

    p = sub.add_parser(
        "accounts",
        help="operator accounts: add, list, disable, enable, passwd (gateway accounts --help)",
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER)

    from aggregator.cli.audit import add_parsers as add_case_parsers

    add_case_parsers(sub, _common)
    from aggregator.cli.retention import add_parser as add_retention_parser

    add_retention_parser(sub, _common)
    sub.add_parser("catalogue", help="print the warning catalogue")
    p = sub.add_parser("grids", help="print the grid hierarchy")
    p.add_argument("--grid-file", type=Path, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["accounts"]:  # its own parser, with its own --help
        from aggregator.access.auth import main_accounts

        return main_accounts(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    handler = _COMMANDS[args.command]
    try:
        if getattr(args, "data_dir", "") is None:
            # every command finds the data directory, and the pool in it, as Settings does
            from aggregator.config import Settings

            args.data_dir = Settings().data_dir
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from pydantic import ValidationError

        from aggregator.errors import AggregatorError

        # a CWG_* setting refused (its value is not echoed: it may hold a password)
        if isinstance(exc, (AggregatorError, OSError, ValidationError, *read_errors())):
            log.error("%s", exc)
            return 2
        raise


# ---------------------------------------------------------------------------- broker


def _tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-port",
        type=int,
        default=8883,
        help="the devices' TLS listener (default 8883; 0: any free port)",
    )
    p.add_argument("--no-tls", action="store_true", help="no TLS listener (loopback-only use)")
    p.add_argument("--tls-host", default="0.0.0.0", help="TLS listener address")  # noqa: S104
    p.add_argument(
        "--tls-name",
        action="append",
        default=None,
        help="a host name or address devices use, for the generated server certificate "
        "(repeatable; default localhost and 127.0.0.1)",
    )
    p.add_argument("--cafile", type=Path, default=None, help="operator PKI: CA for devices")
    p.add_argument("--certfile", type=Path, default=None, help="operator PKI: server cert")
    p.add_argument("--keyfile", type=Path, default=None, help="operator PKI: server key")


def _broker_settings(
    data_dir: Path, host: str = "127.0.0.1", port: int = 0, args: Any = None
) -> Any:
    from aggregator.broker.launcher import BrokerSettings

    tls: dict[str, Any] = {}
    if args is not None and not args.no_tls:
        tls = {
            "tls_port": args.tls_port,
            "tls_host": args.tls_host,
            "tls_cafile": args.cafile,
            "tls_certfile": args.certfile,
            "tls_keyfile": args.keyfile,
        }
        if args.tls_name:
            tls["tls_server_names"] = tuple(args.tls_name)
    return BrokerSettings(state_dir=(data_dir / "broker").absolute(), host=host, port=port, **tls)


def ensure_aggregator_account(data_dir: Path) -> Path:
    """The aggregator's own broker account, created on first use; returns its password file."""
    from aggregator.broker.launcher import provision_account, write_auth_files
    from aggregator.broker.registry import DeviceRegistry, atomic_write

    secret = data_dir / "accounts" / "aggregator.password"
    registry_path = data_dir / "registry.yaml"
    registry = DeviceRegistry.load(registry_path, missing_ok=True)
    if "aggregator" in registry:
        if not secret.exists():  # the secret file was lost: issue a new password
            secret.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(secret, registry.set_password("aggregator") + "\n", mode=0o600)
            registry.save()
            write_auth_files(_broker_settings(data_dir), registry)
        return secret
    (data_dir / "accounts").mkdir(parents=True, exist_ok=True)
    provision_account(
        registry_path,
        "aggregator",
        "aggregator",
        settings=_broker_settings(data_dir),
        out_dir=data_dir / "accounts",
        broker_port=1883,
    )
    return secret


def cmd_broker(args: argparse.Namespace) -> int:
    from aggregator.broker.launcher import MosquittoBroker
    from aggregator.broker.registry import DeviceRegistry

    ensure_aggregator_account(args.data_dir)
    registry = DeviceRegistry.load(args.data_dir / "registry.yaml")
    settings = _broker_settings(args.data_dir, args.host, args.port, args)
    with MosquittoBroker(settings, registry) as broker:
        print(f"broker listening on {broker.host}:{broker.port} (state in {settings.state_dir})")
        if broker.tls_port is not None:
            print(
                f"devices: TLS on {settings.tls_host}:{broker.tls_port}, CA {broker.ca_file} "
                "(provisioning hands it out)"
            )
        print("provision devices with: gateway provision DEVICE_ID --kind camera")
        _wait_for_signal()
    return 0


def _wait_for_signal(duration: float = 0) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait(duration or None)


# ---------------------------------------------------------------------------- aggregator


def _broker_address(args: argparse.Namespace) -> tuple[str, int]:
    from aggregator.broker.launcher import read_runtime

    if args.broker:
        host, _, port = args.broker.rpartition(":")
        return host or "127.0.0.1", int(port)
    runtime = read_runtime((args.data_dir / "broker").absolute())
    if runtime is None:
        raise SystemExit(
            f"no broker is running on {args.data_dir}: start one with `gateway broker "
            f"--data-dir {args.data_dir}` or pass --broker HOST:PORT"
        )
    return runtime.host, runtime.port


def cmd_run(args: argparse.Namespace) -> int:
    from aggregator.config import Settings

    host, port = _broker_address(args)
    password_file = args.password_file or args.data_dir / "accounts" / "aggregator.password"
    # Command-line values win over CWG_* variables; paths not given derive from --data-dir.
    overrides: dict[str, Any] = {"data_dir": args.data_dir}
    if args.grid_file:
        overrides["grid_file"] = args.grid_file
    settings = Settings(**overrides)
    mqtt = settings.mqtt.model_copy(
        update={
            "host": host,
            "port": port,
            "password_file": password_file if settings.mqtt.password is None else None,
            **({"client_id": args.client_id} if args.client_id else {}),
            **({"share_group": args.share_group} if args.share_group else {}),
        }
    )
    settings = settings.model_copy(update={"mqtt": mqtt})
    if args.metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": args.metrics_port})
    certfile, keyfile = args.certfile, args.keyfile
    if args.dev_https:
        certfile, keyfile = dev_https_files(args.data_dir, args.http_host)
    if certfile is not None or keyfile is not None:
        from aggregator.config import HttpSettings

        http = HttpSettings.model_validate(
            {**settings.http.model_dump(), "certfile": certfile, "keyfile": keyfile}
        )
        settings = settings.model_copy(update={"http": http})
    if args.http_port:
        from aggregator.fanout.timeseries import TimeSeriesSettings
        from aggregator.service import run_service

        url = args.tsdb_url or settings.tsdb_url
        timeseries = (
            TimeSeriesSettings(
                url=url,
                token=settings.tsdb_token,
                org=args.tsdb_org or settings.tsdb_org,
                bucket=args.tsdb_bucket or settings.tsdb_bucket,
            )
            if url
            else None
        )
        return run_service(settings, args.http_host, args.http_port, timeseries=timeseries)
    return run_aggregator(
        settings, metrics=args.metrics_port is not None or settings.metrics_port != 0
    )


def dev_https_files(data_dir: Path, host: str) -> tuple[Path, Path]:
    """A server certificate for the API signed by the development CA (the broker's, so one CA
    file is all a development client needs to trust)."""
    from aggregator.broker import devca

    ca_dir = data_dir / "broker" / "tls"
    out = data_dir / "https"
    for folder in (ca_dir, out):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    import ipaddress

    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False
    # a wildcard bind address is not a name a client verifies against
    names = list(dict.fromkeys([*([] if wildcard else [host]), "localhost", "127.0.0.1"]))
    devca.ensure(
        ca_dir / "ca.crt", ca_dir / "ca.key", out / "server.crt", out / "server.key", names
    )
    print(f"HTTPS with a development certificate; clients trust {ca_dir / 'ca.crt'}", flush=True)
    return out / "server.crt", out / "server.key"


def run_aggregator(settings: Any, *, metrics: bool = False) -> int:
    from prometheus_client import start_http_server

    from aggregator.service import build_aggregator

    agg = build_aggregator(settings)
    agg.start()
    if metrics:
        server, _ = start_http_server(
            settings.metrics_port, addr="127.0.0.1", registry=agg.metrics.registry
        )
        log.info("ingest metrics on http://127.0.0.1:%s/metrics", server.server_port)
    log.info("aggregator running; Ctrl-C stops")
    try:
        _wait_for_signal()
    finally:
        agg.stop()
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from aggregator.broker.launcher import provision_device
    from aggregator.broker.registry import DeviceLocation

    location = (
        DeviceLocation(lat=args.lat, lon=args.lon)
        if args.lat is not None and args.lon is not None
        else None
    )
    out = args.out or args.data_dir / "devices"
    out.mkdir(parents=True, exist_ok=True)
    creds = provision_device(
        args.data_dir / "registry.yaml",
        args.device_id,
        args.kind,
        settings=_broker_settings(args.data_dir, port=1883, args=args),
        out_dir=out,
        name=args.name,
        location=location,
        broker_host=args.broker_host,
    )
    print(f"provisioned {creds.device_id} ({creds.kind}); hand this file to the device:")
    print(f"  {out / (creds.device_id + '.yaml')}  (contains its password; mode 0600)")
    if creds.broker.ca_file is not None:
        print(f"  {creds.broker.ca_file}  (the CA it verifies the broker's TLS listener with)")
    if args.edge_config is not None:
        from aggregator.broker.launcher import write_edge_config

        path = write_edge_config(
            args.edge_config, creds, out, location=location, description=args.name
        )
        print(f"  {path}  (edge-agent config; its password in {creds.device_id}.password)")
    return 0


# ---------------------------------------------------------------------------- inspecting


def _open_pool(data_dir: Path) -> Reader:
    target, label = pool_target(data_dir)
    if not is_pool_url(target) and not Path(target).exists():
        raise SystemExit(f"no event pool at {label}: run the aggregator first (gateway run)")
    return open_reader(target)


def events_table(db: Reader, args: argparse.Namespace) -> Table:
    rows = queries.latest_events(
        db, type_=args.type, grid_prefix=args.grid, status=args.status, limit=args.limit
    )
    return render_events(rows)


def cmd_events(args: argparse.Namespace) -> int:
    console = Console()
    db = _open_pool(args.data_dir)
    if not args.follow:
        console.print(events_table(db, args))
        return 0
    from rich.live import Live

    with Live(events_table(db, args), console=console, refresh_per_second=2) as live:
        while True:
            time.sleep(1)
            live.update(events_table(db, args))


def cmd_handling(args: argparse.Namespace) -> int:
    from aggregator.config import Settings
    from aggregator.grids import GridIndex, default_grid_file
    from aggregator.pool.handling import GroupBy, Handling, group_name
    from contract import load_catalogue

    db = _open_pool(args.data_dir)
    now = time.time()
    since = None if args.days is None else now - args.days * 86400
    by = GroupBy(args.by)
    total, groups = queries.EventStats(db, queries.EVERYTHING, args.grid, since).handling(by, now)
    # names from the same catalogue and grid files as `gateway run` (CWG_* variables)
    settings = Settings(data_dir=args.data_dir)
    catalogue = load_catalogue(settings.catalogue_file)
    grids = GridIndex.from_geojson(settings.grid_file or default_grid_file())

    def pct(rate: float | None) -> str:
        return "–" if rate is None else f"{rate:.0%}"

    table = Table(header_style="bold", title=f"handling by {by.value} (Longgang 8.6)")
    for col in (
        "key",
        "name",
        "registered",
        "closed",
        "处置率",
        "on time",
        "按期处置率",
        "open",
        "overdue (督办)",
        "median to close",
    ):
        table.add_column(col, justify="right" if col not in ("key", "name") else "left")

    def add(h: Handling, label: str) -> None:
        median = h.median_close_s
        table.add_row(
            h.key,
            label,
            str(h.registered),
            str(h.closed),
            pct(h.handling_rate),
            str(h.closed_on_time),
            pct(h.on_time_rate),
            str(h.open),
            str(h.overdue),
            "–" if median is None else f"{median / 60:.0f} min",
        )

    for h in groups:
        add(h, group_name(by, h.key, catalogue, grids))
    table.add_section()
    add(total, "all")
    Console().print(table)
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    db = _open_pool(args.data_dir)
    rows = queries.dead_letters(db, reason=args.reason, device_id=args.device, limit=args.limit)
    table = Table(header_style="bold")
    for col in ("id", "received (UTC)", "device", "reason", "detail", "payload (start)"):
        table.add_column(col, overflow="fold")
    for r in rows:
        payload = bytes(r["payload"][:80]).decode("utf-8", "replace")
        table.add_row(
            str(r["id"]),
            datetime.fromtimestamp(r["received_at"], UTC).strftime("%Y-%m-%d %H:%M:%S"),
            r["device_id"] or "?",
            r["reason"],
            r["detail"][:200],
            payload,
        )
    Console().print(table)
    return 0


def cmd_catalogue(args: argparse.Namespace) -> int:
    from contract import default_catalogue

    cat = default_catalogue()
    table = Table(header_style="bold", title="warning catalogue")
    for col in ("code", "名称", "name", "source", "App. A", "department", "severity", "deadline",
                "radius m", "window s"):  # fmt: skip
        table.add_column(col)
    for wt in cat.types.values():
        dep = cat.departments[wt.department]
        table.add_row(
            wt.code,
            wt.zh,
            wt.en,
            wt.source.value,
            f"A.{wt.appendix_item}" if wt.appendix_item else "-",
            f"{dep.zh} {dep.en}",
            wt.severity.value,
            str(wt.handling_deadline),
            f"{wt.merge_radius_m:g}",
            f"{wt.merge_window_s:g}",
        )
    Console().print(table)
    return 0


def cmd_grids(args: argparse.Namespace) -> int:
    from aggregator.grids import GridIndex, default_grid_file

    index = GridIndex.from_geojson(args.grid_file or default_grid_file())
    table = Table(header_style="bold", title=f"{len(index)} grids")
    for col in ("street code", "street", "community code", "community", "grids"):
        table.add_column(col)
    for street in index.streets():
        for community in index.communities(street.code):
            table.add_row(
                street.code,
                street.name,
                community.code,
                community.name,
                str(len(index.by_prefix(community.code))),
            )
    Console().print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from simulators.demo import run_demo

    return run_demo(args)


def cmd_audit(args: argparse.Namespace) -> int:
    from aggregator.cli import audit

    return audit.cmd_audit(args, _open_pool)


def cmd_cases(args: argparse.Namespace) -> int:
    from aggregator.cli import audit

    return audit.cmd_cases(args, _open_pool)


def cmd_retention(args: argparse.Namespace) -> int:
    from aggregator.cli import retention

    return retention.cmd_retention(args, pool_target)


_COMMANDS = {
    "demo": cmd_demo,
    "broker": cmd_broker,
    "run": cmd_run,
    "provision": cmd_provision,
    "events": cmd_events,
    "dead-letters": cmd_dead_letters,
    "handling": cmd_handling,
    "catalogue": cmd_catalogue,
    "grids": cmd_grids,
    "audit": cmd_audit,
    "cases": cmd_cases,
    "retention": cmd_retention,
}

if __name__ == "__main__":
    sys.exit(main())
