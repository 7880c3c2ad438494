"""``gateway retention --keep-days N [--dry-run]``: remove the raw alerts (and dead letters and
out-of-area rows) received more than N days ago, on either pool backend, while the gateway
runs. Events, cases and audit chains stay (aggregator/pool/retention.py says how and why)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from aggregator.pool.retention import (
    BATCH_ROWS,
    TABLES_KEPT,
    Progress,
    RetentionReport,
    apply_retention,
    is_retention_fault,
)

# Exit codes: what a script or timer running the command can tell apart.
DONE = 0
STOPPED = 1  # stopped part-way (pool locked or unreachable, another job running): run again
REFUSED = 2  # nothing done: no number of days, no pool, a bad setting

DESCRIPTION = """\
Remove the raw alerts received more than N days ago from the event pool: the alert rows
(each message as received, its outcome and position), and the dead letters and out-of-area
rows received before the same cut (the running gateway also removes those by itself after
CWG_DEAD_LETTERS__RETENTION_DAYS, 30 by default). Nothing else is removed: every event
stays with its alert and device counts as stored, its devices and its log, and so do cases,
audit chains, supervision items, webhook deliveries and all snapshots and evidence photos.
An event whose alerts are gone still lists and shows; its alert list is then empty.

It runs beside a running gateway. On SQLite it deletes at most --batch-rows alerts per
transaction and pauses between them, so the pool writer keeps committing; on PostgreSQL it
drops each month of alerts that ends before the cut whole (its partition), then deletes the
rest of the partly old month the same way. Each step commits on its own: if it stops
(Ctrl-C, the pool locked or unreachable), what it did stays, and running it again carries on.

A removed alert's id is forgotten: were a device to send that alert again, it would be pooled
again as new. Keep alerts longer than any device may hold unconfirmed alerts in its outbox
(days, not hours). The SQLite file does not shrink: the freed pages take new alerts.
"""

EPILOG = """\
examples:
  gateway retention --keep-days 90 --dry-run    what would go, changing nothing
  gateway retention --keep-days 90              remove it (progress on stderr)
  CWG_RETENTION__ALERT_DAYS=90 gateway retention   the same, the days from the setting

Run it daily, e.g. a cron line or systemd timer with the gateway's environment:
  17 3 * * *  gateway retention --data-dir /srv/cwg

exit codes: 0 done (or dry run), 1 stopped part-way (pool locked or unreachable, another
retention job running): run it again, 2 nothing done (no --keep-days and no
CWG_RETENTION__ALERT_DAYS, no pool, a bad setting).
"""


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "retention",
        help="remove raw alerts, dead letters and out-of-area rows older than N days "
        "(events, cases and audit chains stay); --dry-run shows what would go",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(p)
    p.add_argument(
        "--keep-days",
        type=_days,
        default=None,
        metavar="N",
        help="keep what was received in the last N days (a whole number, at least 1); "
        "default: $CWG_RETENTION__ALERT_DAYS",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="count what would be removed (and, on PostgreSQL, which monthly partitions would "
        "be dropped); change nothing",
    )
    p.add_argument(
        "--batch-rows",
        type=int,
        default=BATCH_ROWS,
        metavar="ROWS",
        help=f"alerts deleted per transaction (default {BATCH_ROWS:,}): fewer holds the "
        "pool's write lock for less time",
    )


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if days < 1:
        raise argparse.ArgumentTypeError("keep at least 1 day (alerts are pooled as they come)")
    return days


def cmd_retention(
    args: argparse.Namespace, pool_target: Callable[[Path], tuple[Path | str, str]]
) -> int:
    from aggregator.config import Settings

    days = args.keep_days
    if days is None:
        days = Settings(data_dir=args.data_dir).retention.alert_days
    if days is None:
        print(
            "gateway retention: say how many days of alerts to keep: --keep-days N, or set "
            "CWG_RETENTION__ALERT_DAYS (nothing was removed)",
            file=sys.stderr,
        )
        return REFUSED
    if args.batch_rows < 1:
        print("gateway retention: --batch-rows must be at least 1", file=sys.stderr)
        return REFUSED
    target, label = pool_target(args.data_dir)
    if not isinstance(target, str) and not Path(target).is_file():
        print(
            f"gateway retention: no event pool at {label}: check --data-dir (or "
            "$CWG_POOL_PATH / $CWG_POOL_URL); nothing was removed",
            file=sys.stderr,
        )
        return REFUSED
    cut = time.time() - days * 86400
    verb = "would remove" if args.dry_run else "removing"
    print(f"pool: {label}")
    print(f"keeping what was received since {_utc(cut)} ({days} days); {verb} what is older")
    shown = [time.monotonic()]

    def progress(p: Progress) -> None:
        # at most every 2 s: a city's run takes thousands of steps
        if args.dry_run or time.monotonic() - shown[0] < 2.0:
            return
        shown[0] = time.monotonic()
        print(
            f"  … {p.alerts:,} alerts removed in {p.steps:,} steps (received up to "
            f"{_utc(p.reached)})",
            file=sys.stderr,
            flush=True,
        )

    try:
        report = apply_retention(
            target, cut, dry_run=args.dry_run, batch_rows=args.batch_rows, progress=progress
        )
    except Exception as exc:
        if not is_retention_fault(exc):
            raise
        print(
            f"gateway retention: stopped part-way: {exc}\nWhat was removed so far stays "
            "removed; run the command again to carry on (a locked pool: the gateway held the "
            "write lock for over 10 s, try --batch-rows smaller).",
            file=sys.stderr,
        )
        return STOPPED
    _print_report(report, args.batch_rows)
    return DONE


def _print_report(r: RetentionReport, batch_rows: int) -> None:
    dry = r.dry_run
    for p in r.partitions:
        rows = f"more than {p.rows:,}" if p.more else f"{p.rows:,}"
        print(
            f"partition {p.name} ({_utc(p.start)} to {_utc(p.end)}): {rows} alerts, "
            f"{'would be dropped' if dry else 'dropped'} whole"
        )
    rest = "received before the cut" if not r.partitions else "of the partly old month"
    if dry:
        print(f"alerts {rest}: {r.alerts:,} would be removed, {batch_rows:,} per transaction")
    else:
        steps = f"{r.steps:,} step{'' if r.steps == 1 else 's'}"
        print(f"alerts {rest}: {r.alerts:,} removed in {steps} ({r.seconds:.1f} s)")
    print(
        f"dead letters: {r.dead_letters:,}, out-of-area rows: {r.out_of_area:,} "
        f"{'would be removed' if dry else 'removed'}"
    )
    print(f"kept: {TABLES_KEPT}")
    if dry:
        print("dry run: nothing was changed")


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")
