"""Fuzz ingest at length: ``--examples N`` payloads (default 100,000) through a throw-away Mosquitto
into a throw-away aggregator, each checked as in ``tests/aggregator/test_fuzz_ingest.py``.

    .venv/bin/python scripts/fuzz_ingest.py --examples 100000

Prints progress every ``--every`` messages and, at the end, the outcome and rejection counts, the
MQTT I/O restarts (must be 0) and the log records with a traceback (must be none). Exits 1 on any
failure, naming the payload that caused it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the payload strategies live beside the CI test

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.aggregator.fuzz_support import DEVICE, FuzzStack, alert_payloads  # noqa: E402


class _Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100_000, help="how many payloads")
    parser.add_argument("--every", type=int, default=1000, help="progress every N messages")
    parser.add_argument("--window", type=int, default=64, help="messages awaiting feedback")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: fixed)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    tracebacks = _Tracebacks()
    logging.getLogger().addHandler(tracebacks)
    stack = FuzzStack()
    started = time.monotonic()
    print(f"fuzz: broker {stack.broker.host}:{stack.broker.port}, device {DEVICE}")
    print(f"fuzz: pool {stack.settings.pool}")

    @settings(
        max_examples=args.examples,
        deadline=None,
        derandomize=args.seed is None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(payload=alert_payloads())
    def run(payload: bytes) -> None:
        stack.submit(payload, window=args.window)
        done = stack.tally.sent
        if done and done % args.every == 0:
            rate = done / (time.monotonic() - started)
            print(
                f"fuzz: {done}/{args.examples} checked ({rate:.0f}/s) {dict(stack.tally.outcomes)}",
                flush=True,
            )

    failed = False
    try:
        if args.seed is not None:
            from hypothesis import seed

            seed(args.seed)(run)()
        else:
            run()
        stack.drain()
    except Exception as exc:  # noqa: BLE001 - any failure is reported, then torn down
        print(f"fuzz: FAILED: {exc}", file=sys.stderr)
        failed = True
    finally:
        restarts = stack.io_restarts()
        stack.close()
    tally = stack.tally
    print(f"fuzz: {tally.sent} messages in {time.monotonic() - started:.0f} s")
    print(f"fuzz: outcomes {dict(tally.outcomes)}")
    print(f"fuzz: rejections {dict(tally.reasons)}")
    print(f"fuzz: I/O restarts {restarts}, log records with a traceback {len(tracebacks.records)}")
    for record in tracebacks.records[:5]:
        print(f"fuzz:   {record.levelname} {record.getMessage()[:300]}")
    return 1 if failed or restarts or tracebacks.records else 0


if __name__ == "__main__":
    sys.exit(main())
