"""``gateway-sim``: simulated devices for people integrating with the community warning gateway.

Every command either starts its own throw-away gateway (``--start-stack``: Mosquitto and the
aggregator on free loopback ports, in a temporary directory) or talks to one you run
(``--broker HOST:PORT`` with device credentials from ``--credentials DIR``, and ``--pool PATH``
where the command reads results).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from aggregator.grids import GridIndex, default_grid_file
from simulators.errors import SimulatorError
from simulators.stack import CredentialsDir, GatewayStack, Provisioner, StackOptions

log = logging.getLogger(__name__)

EPILOG = """examples:
  gateway-sim scenario --start-stack --builtin          run the packaged scenario library
  gateway-sim scenario --start-stack my-lane.yaml       run your own scenario file
  gateway-sim fleet --start-stack --cameras 20 --sensors 10 --duration 120 --time-scale 10
  gateway-sim fleet --plan-only --seed 3 --duration 60  print the message plan, send nothing
  gateway-sim load --start-stack --rate 5000 --count 50000 --json load.json
  gateway-sim camera --fps 10                           MJPEG stream for the edge agent
  gateway-sim scenario --broker 127.0.0.1:1883 --credentials var/devices \\
      --registry var/registry.yaml --broker-state var/broker --pool var/pool.db my.yaml
"""


def builtin_scenarios() -> list[Path]:
    folder = resources.files("simulators") / "scenarios"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml"))


def case_scenarios() -> list[Path]:
    """The packaged scenarios with operator and department steps (they need the API)."""
    folder = resources.files("simulators") / "scenarios" / "cases"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml"))


def _add_target(p: argparse.ArgumentParser, *, pool: bool) -> None:
    g = p.add_argument_group("which gateway")
    g.add_argument(
        "--start-stack",
        action="store_true",
        help="start a throw-away Mosquitto + aggregator for this run (needs mosquitto installed)",
    )
    g.add_argument("--broker", metavar="HOST:PORT", help="a running gateway's MQTT broker")
    g.add_argument(
        "--credentials",
        type=Path,
        metavar="DIR",
        help="device credential files <device_id>.yaml (as written by the gateway's provisioning)",
    )
    g.add_argument(
        "--registry", type=Path, help="device registry file: provision missing devices into it"
    )
    g.add_argument(
        "--broker-state",
        type=Path,
        metavar="DIR",
        help="the broker's state directory (it is reloaded after provisioning)",
    )
    g.add_argument("--prefix", default="cwg", help="the contract's topic prefix (default cwg)")
    g.add_argument(
        "--grids",
        type=Path,
        default=None,
        metavar="GEOJSON",
        help="the gateway's grid file (default: the packaged Longgang sample)",
    )
    if pool:
        g.add_argument("--pool", type=Path, help="the aggregator's SQLite pool file to read")


@contextlib.contextmanager
def _target(
    args: argparse.Namespace, *, need_pool: bool, api: bool = False
) -> Iterator[tuple[Provisioner, Path | None]]:
    if args.start_stack:
        options = StackOptions(topic_prefix=args.prefix, grid_file=args.grids, api=api)
        with GatewayStack(options=options) as stack:
            print(
                f"started a gateway: broker {stack.host}:{stack.port}, pool {stack.pool_path}",
                file=sys.stderr,
            )
            yield stack, stack.pool_path
        return
    if not args.broker or not args.credentials:
        raise SimulatorError(
            "say which gateway: --start-stack, or --broker HOST:PORT with --credentials DIR"
        )
    if need_pool and not getattr(args, "pool", None):
        raise SimulatorError("--pool PATH is needed to check results on a running gateway")
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        raise SimulatorError(f"--broker {args.broker!r}: expected HOST:PORT")
    yield (
        CredentialsDir(
            args.credentials,
            topic_prefix=args.prefix,
            registry=args.registry,
            broker_state=args.broker_state,
            broker_host=host,
            broker_port=int(port),
        ),
        getattr(args, "pool", None),
    )


def _grids(args: argparse.Namespace) -> GridIndex:
    return GridIndex.from_geojson(args.grids or default_grid_file())


# ------------------------------------------------------------------------------- commands


def cmd_scenario(args: argparse.Namespace) -> int:
    from simulators.scenario import ScenarioRunner, load_scenario, run_files

    paths = [
        *args.files,
        *(builtin_scenarios() if args.builtin else []),
        *(case_scenarios() if args.cases else []),
    ]
    if not paths:
        raise SimulatorError("give scenario files, or --builtin / --cases for the packaged library")
    # validate every file before anything starts (a list: any() would stop at the first)
    loaded = [load_scenario(p) for p in paths]
    operator_steps = any(sc.has_operator_steps for sc in loaded)
    if args.check_only:
        print(f"{len(paths)} scenario file(s) valid")
        return 0
    if operator_steps and not args.start_stack:
        raise SimulatorError(
            "operator and department steps run on a stack this command starts: --start-stack"
        )
    with _target(args, need_pool=True, api=operator_steps) as (prov, pool):
        assert pool is not None
        runner = ScenarioRunner(
            prov,
            pool,
            grids=_grids(args),
            max_payload_bytes=args.max_payload_bytes,
            operators=prov if isinstance(prov, GatewayStack) and operator_steps else None,
        )
        results = run_files(runner, paths, timeout_s=args.timeout)
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} scenarios passed")
    return 1 if failed else 0


def cmd_fleet(args: argparse.Namespace) -> int:
    from simulators.fleet import Fleet, FleetConfig, FleetPlan, devices_from_registry

    config = FleetConfig(
        seed=args.seed,
        cameras=args.cameras,
        sensors=args.sensors,
        rate=args.rate,
        duration_s=args.duration,
        count=args.count,
        time_scale=args.time_scale,
        incident_share=args.incidents,
        out_of_area_share=args.out_of_area,
        offline_per_hour=args.offline_per_hour,
        malformed_share=args.malformed,
        id_prefix=args.id_prefix,
    )
    grids = _grids(args)
    devices = devices_from_registry(args.devices_from, grids) if args.devices_from else None
    if args.plan_only:
        origin = (
            datetime.fromisoformat(args.origin) if args.origin else datetime(2026, 1, 1, tzinfo=UTC)
        )
        plan = FleetPlan(config, grids=grids, devices=devices)
        digest = hashlib.sha256()
        for a in plan.actions(origin):
            digest.update(repr(a.key()).encode())
            print(
                json.dumps(
                    {
                        "t": round(a.t, 3),
                        "device": a.device_id,
                        "action": a.kind,
                        "topic": a.topic,
                        "label": a.label,
                        "bytes": len(a.payload),
                    },
                    ensure_ascii=False,
                )
            )
        print(f"plan sha256 {digest.hexdigest()}", file=sys.stderr)
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with _target(args, need_pool=False) as (prov, _pool):
        fleet = Fleet(
            config,
            prov,
            plan=FleetPlan(config, grids=grids, topics=prov.topics, devices=devices),
            console=Console(stderr=True),
            progress=not args.no_progress,
        )
        fleet.run(stop)
        fleet.print_summary()
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from simulators.loadgen import MAX_SMALL_FLEET, LoadConfig, preprovision_fleet, run_load

    config = LoadConfig(
        rate=args.rate,
        count=args.count,
        duration_s=args.duration,
        mode=args.mode,
        publishers=args.publishers,
        snapshot=args.snapshot,
        alert_ids=args.alert_ids,
        workers=args.workers,
        connect_rate=args.connect_rate,
        telemetry_interval_s=args.telemetry_interval,
        progress=not args.no_progress,
    )
    if args.start_stack and config.n_publishers > MAX_SMALL_FLEET:
        # A fleet: its accounts go into the registry before the broker starts, which loads
        # them at once (live, each account costs the broker a save of its whole file).
        tag = f"ld{uuid.uuid4().hex[:6]}"
        stack = GatewayStack(options=StackOptions(topic_prefix=args.prefix, grid_file=args.grids))
        try:
            fleet = preprovision_fleet(stack, tag, config.n_publishers)
            stack.start()
            print(
                f"started a gateway: broker {stack.host}:{stack.port}, pool {stack.pool_path}, "
                f"{config.n_publishers:,} device accounts",
                file=sys.stderr,
            )
            report = run_load(config, fleet, stack.pool_path, grids=_grids(args), run_tag=tag)
        finally:
            stack.stop()
    else:
        with _target(args, need_pool=True) as (prov, pool):
            assert pool is not None
            report = run_load(config, prov, pool, grids=_grids(args))
    print(report.summary())
    if args.json:
        args.json.write_text(report.to_json() + "\n", encoding="utf-8")
    return 0 if report.zero_loss else 1


def cmd_camera(args: argparse.Namespace) -> int:
    from simulators.camera import DEFAULT_VIDEO, SyntheticCamera

    video = None if args.generated else (args.video or DEFAULT_VIDEO)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with SyntheticCamera(video, fps=args.fps, port=args.port) as cam:
        print(f"serving {cam.url}  (also /snapshot.jpg); Ctrl-C stops", flush=True)
        stop.wait(args.duration)
    return 0


# ------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway-sim",
        description="Simulated cameras and sensors for testing an integration with the community "
        "warning gateway: scenarios with expectations (for CI), a device fleet, a load "
        "generator, and a synthetic MJPEG camera.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "scenario",
        help="play scenario files and check the pool; exits 1 with a diff if any expectation fails",
        description="Play YAML scenarios (devices, timed alerts, bad messages, offline periods) "
        "and check expectations on the event pool and the devices' feedback.",
    )
    p.add_argument("files", nargs="*", type=Path, metavar="FILE", help="scenario YAML files")
    p.add_argument("--builtin", action="store_true", help="also run the packaged scenarios")
    p.add_argument(
        "--cases",
        action="store_true",
        help="also run the packaged case scenarios (operator and department steps on the "
        "case clock; with --start-stack)",
    )
    p.add_argument("--check-only", action="store_true", help="validate the files, send nothing")
    p.add_argument("--timeout", type=float, default=None, help="override each scenario's timeout")
    p.add_argument(
        "--max-payload-bytes",
        type=int,
        default=1024 * 1024,
        help="the gateway's payload limit, for the 'oversized' bad input (default 1 MiB)",
    )
    _add_target(p, pool=True)
    p.set_defaults(func=cmd_scenario)

    p = sub.add_parser(
        "fleet",
        help="run a seeded fleet of cameras and sensors (alerts, telemetry, status, faults)",
        description="A deterministic fleet: the same --seed gives the same messages.",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--sensors", type=int, default=6)
    p.add_argument("--rate", type=float, default=1.0, help="alerts per simulated second")
    p.add_argument("--duration", type=float, default=120, help="simulated seconds")
    p.add_argument("--count", type=int, default=None, help="stop after this many alerts")
    p.add_argument("--time-scale", type=float, default=1.0, help="simulated seconds per second")
    p.add_argument("--incidents", type=float, default=0.15, help="share of multi-device incidents")
    p.add_argument("--out-of-area", type=float, default=0.02, help="share placed off the map")
    p.add_argument("--offline-per-hour", type=float, default=0.5, help="link losses per device")
    p.add_argument("--malformed", type=float, default=0.0, help="share of malformed alerts")
    p.add_argument("--id-prefix", default="sim", help="device ids start with this")
    p.add_argument(
        "--devices-from",
        type=Path,
        metavar="REGISTRY",
        help="use the cameras and sensors of this device registry (with their positions) "
        "instead of generating --cameras/--sensors",
    )
    p.add_argument("--plan-only", action="store_true", help="print the plan as JSON lines")
    p.add_argument("--origin", help="simulated clock origin for --plan-only (RFC 3339)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_target(p, pool=False)
    p.set_defaults(func=cmd_fleet)

    p = sub.add_parser(
        "load",
        help="push valid alerts at a target rate; report throughput, latency and loss",
        description="Bounded load: give --count, --duration or both.",
    )
    p.add_argument("--rate", type=float, default=2000, help="alerts per second")
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--duration", type=float, default=None, help="seconds")
    p.add_argument(
        "--mode",
        choices=["mosquitto_pub", "paho", "raw"],
        default="mosquitto_pub",
        help="mosquitto_pub processes (default); paho clients on the lean QoS 1 path; or raw:"
        " paho connects, then QoS 1 packets are framed and written straight to the socket",
    )
    p.add_argument(
        "--publishers",
        type=int,
        default=None,
        help="device connections, each its own account (more than 64: --mode raw; with "
        "--start-stack they are registered before the broker starts)",
    )
    p.add_argument("--workers", type=int, default=None, help="generator processes (default 2)")
    p.add_argument(
        "--connect-rate", type=float, default=500, help="new connections per second (500)"
    )
    p.add_argument(
        "--telemetry-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="raw mode: each device also sends a telemetry/v1 (QoS 0) this often",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--snapshot", action="store_true", help="attach a small JPEG to each alert")
    p.add_argument(
        "--alert-ids",
        choices=["uuid7", "uuid4"],
        default="uuid7",
        help="uuid7 (default): the edge agent's time-ordered ids; uuid4: random ids, which cost"
        " the pool's unique index more as it grows",
    )
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON")
    _add_target(p, pool=True)
    p.set_defaults(func=cmd_load)

    p = sub.add_parser(
        "camera",
        help="serve an MJPEG stream on 127.0.0.1 for the edge agent",
        description="http://127.0.0.1:PORT/stream (multipart/x-mixed-replace) from a looping "
        "video or generated frames.",
    )
    p.add_argument("--video", type=Path, default=None, help="video file (default: vtest.avi)")
    p.add_argument("--generated", action="store_true", help="generated frames instead of video")
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=cmd_camera)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    started = time.monotonic()
    try:
        code: int = args.func(args)
    except SimulatorError as exc:
        print(f"gateway-sim: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"gateway-sim: invalid options:\n{exc}", file=sys.stderr)
        return 2
    log.info("done in %.1f s", time.monotonic() - started)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
