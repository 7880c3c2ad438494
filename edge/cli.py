"""``edge-agent``: run an edge device, check its configuration, try the detector, see its outbox."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from edge.config import ConfigError, DeviceConfig, json_schema, load_config

logger = logging.getLogger("edge")

_DESCRIPTION = """\
The edge agent of the community warning gateway. It watches one camera or a set of sensors,
applies the warning rules of its configuration file, and sends each warning as an alert to
the MQTT broker. Alerts wait in a local outbox file until the broker has acknowledged them,
so a network outage or a restart loses none.
"""

_EPILOG = """\
commands:
  run CONFIG           run the device described by CONFIG until Ctrl-C / SIGTERM
  validate CONFIG...   check configuration files; names the key and line of each mistake
  schema               print the JSON Schema of configuration files
  detect INPUT ...     run the detector on a photo or clip (see: edge-agent detect --help)
  outbox CONFIG        show the outbox: alerts waiting, delivered, dropped per type/severity

examples:
  edge-agent validate firmware-configs/*.yaml
  CWG_PASSWORD_CAM_FIRE_LANE_01=... edge-agent run firmware-configs/cam-fire-lane-01.yaml
  edge-agent outbox firmware-configs/cam-fire-lane-01.yaml --state-dir /var/lib/edge-agent

The MQTT password is never in the configuration file: `credentials.password_env` names an
environment variable, or `credentials.password_file` a file, that holds it.
"""


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (for log collectors)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(threadName)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run one device", description="Run the device until stopped.")
    run.add_argument("config", type=Path, help="the device's YAML configuration")
    run.add_argument(
        "--state-dir",
        type=Path,
        default=Path("."),
        help="directory of the outbox file (a relative outbox.path is taken from here)",
    )
    run.add_argument(
        "--exit-when-done",
        action="store_true",
        help="stop when every source has ended (a video file, a sensor replay) and the outbox "
        "has drained; for CI and replays",
    )
    run.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    run.add_argument("--log-json", action="store_true", help="log one JSON object per line")

    val = sub.add_parser(
        "validate",
        help="check configuration files",
        description="Check configuration files; each mistake is printed with its key path and "
        "line. Exit status 0 when all are valid, 1 otherwise.",
    )
    val.add_argument("configs", type=Path, nargs="+", help="YAML files to check")

    sub.add_parser("schema", help="print the configuration JSON Schema")

    sub.add_parser(
        "detect",
        help="run the detector on a photo or clip (edge-agent detect --help)",
        add_help=False,
    )

    box = sub.add_parser("outbox", help="show the outbox of a device")
    box.add_argument("config", type=Path, help="the device's YAML configuration")
    box.add_argument("--state-dir", type=Path, default=Path("."), help="as given to `run`")
    box.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _outbox_path(cfg: DeviceConfig, state_dir: Path) -> Path:
    path = Path(cfg.outbox.path or f"{cfg.device.device_id}.outbox.db")
    return path if path.is_absolute() else state_dir / path


def _cmd_validate(paths: Sequence[Path]) -> int:
    bad = 0
    for path in paths:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            bad += 1
            print(f"{path}: INVALID", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
            continue
        print(f"{path}: ok ({cfg.device.kind} {cfg.device.device_id}, {len(cfg.rules)} rules)")
    return 1 if bad else 0


def _cmd_outbox(config: Path, state_dir: Path, as_json: bool) -> int:
    from edge.outbox import Outbox

    cfg = load_config(config)
    path = _outbox_path(cfg, state_dir)
    if not path.exists():
        print(f"no outbox at {path} (the agent has not run with this state directory)")
        return 1
    box = Outbox(path, max_rows=cfg.outbox.max_rows, max_bytes=cfg.outbox.max_bytes)
    try:
        stats = box.stats()
    finally:
        box.close()
    if as_json:
        print(
            json.dumps(
                {
                    "path": str(path),
                    "depth": stats.depth,
                    "depth_bytes": stats.depth_bytes,
                    "delivered_kept": stats.delivered,
                    "next_seq": stats.next_seq,
                    "dropped_total": stats.dropped_total,
                    "dropped": [
                        {"type": t, "severity": s, "count": c}
                        for (t, s), c in sorted(stats.dropped.items())
                    ],
                    "overflow_grown": stats.overflow_grown,
                    "awaiting_feedback": stats.awaiting_feedback,
                    "resent": stats.resent,
                }
            )
        )
        return 0
    print(f"outbox {path}")
    print(f"  waiting for delivery: {stats.depth} alerts, {stats.depth_bytes} bytes")
    print(f"  limits:               {cfg.outbox.max_rows} alerts, {cfg.outbox.max_bytes} bytes")
    print(f"  of which awaiting the aggregator's feedback: {stats.awaiting_feedback}")
    print(f"  delivered (kept):     {stats.delivered}")
    print(f"  sent again (no feedback in time): {stats.resent}")
    print(f"  next seq:             {stats.next_seq}")
    print(f"  dropped when full:    {stats.dropped_total}")
    for (type_code, severity), count in sorted(stats.dropped.items()):
        print(f"    {type_code:<22} {severity:<8} {count}")
    if stats.overflow_grown:
        print(f"  grown past limits (critical only): {stats.overflow_grown} times")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from edge.agent import build_agent
    from edge.detector import DetectorError
    from edge.outbox import OutboxError
    from edge.publisher import PublisherError
    from edge.sensors import SensorSourceError
    from edge.sources import SourceError

    _setup_logging(args.log_level, args.log_json)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"{exc.path}: INVALID", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    try:
        agent = build_agent(cfg, state_dir=args.state_dir)
    except ConfigError as exc:  # the password reference cannot be resolved
        print(f"error: {args.config}: {exc.path}: {'; '.join(exc.problems)}", file=sys.stderr)
        return 2
    except (DetectorError, SourceError, SensorSourceError, OutboxError, PublisherError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        agent.request_stop()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    return agent.run(exit_when_done=args.exit_when_done)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "detect":
        # The detector tool has its own options and help; hand it everything after `detect`.
        from edge.detect_cli import main as detect_main

        return detect_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    if args.command == "validate":
        return _cmd_validate(args.configs)
    if args.command == "schema":
        sys.stdout.write(json_schema())
        return 0
    if args.command == "outbox":
        try:
            return _cmd_outbox(args.config, args.state_dir, args.json)
        except ConfigError as exc:
            print(f"{exc}", file=sys.stderr)
            return 2
    return _cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
