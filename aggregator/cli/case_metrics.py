"""``gateway cases metrics --by community|department|person --days N``: the handling metrics
(Longgang 8.6) of the cases registered in the last N days, from the pool through the read model
(either backend), as a table or ``--json`` (the API's shape). "Now" is the case clock
(``CWG_TEST_CLOCK_FILE`` moves it in simulations), as for the API."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from aggregator.cases.metrics import By, Figures, case_figures, figures_by
from aggregator.clock import clock_for
from aggregator.config import Settings
from aggregator.pool.reader import Reader
from aggregator.pool.supervision import metric_cases
from contract import load_catalogue

OpenPool = Callable[[Path], Reader]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``gateway cases metrics`` adds to ``gateway cases``."""
    p.add_argument(
        "--by",
        choices=[b.value for b in By],
        default=By.COMMUNITY.value,
        help="metrics: per community, lead department or person (default: community)",
    )
    p.add_argument(
        "--days",
        type=float,
        default=None,
        help="metrics: the cases registered in the last N days (default: all)",
    )
    p.add_argument("--json", action="store_true", help="metrics: JSON, as the API answers")


class _Everyone:
    """The CLI reads every case (whoever runs it can read the pool anyway)."""

    username = "cli"
    level = "admin"
    scope_code = ""
    department: str | None = None


def _as_dict(f: Figures) -> dict[str, Any]:
    return {
        "key": f.key,
        "registered": f.registered,
        "not_ours": f.not_ours,
        "closed": f.closed,
        "handled": f.handled,
        "not_handled": f.not_handled,
        "first_time": f.first_time,
        "due": f.due,
        "on_time": f.on_time,
        "overdue": f.overdue,
        "handling_rate": f.handling_rate,
        "on_time_rate": f.on_time_rate,
        "first_time_rate": f.first_time_rate,
        "stages": {
            str(clock): {
                "due": s.due,
                "on_time": s.on_time,
                "overdue": s.overdue,
                "on_time_rate": s.on_time_rate,
            }
            for clock, s in sorted(f.stages.items())
        },
    }


def cmd_metrics(args: argparse.Namespace, open_pool: OpenPool) -> int:
    settings = Settings(data_dir=args.data_dir)
    catalogue = load_catalogue(settings.catalogue_file)
    now = clock_for(settings.test_clock_file).now()
    if args.days is not None and args.days <= 0:
        raise SystemExit("--days must be positive")
    since = None if args.days is None else now - timedelta(days=args.days)
    by = By(args.by)
    with closing(open_pool(args.data_dir)) as db:
        cases = metric_cases(db, catalogue, _Everyone(), since=since)
    groups = figures_by(cases, by, now)
    total = case_figures(cases, now)
    if args.json:
        print(
            json.dumps(
                {
                    "by": by.value,
                    "since": None if since is None else since.isoformat(),
                    "until": None,
                    "at": now.isoformat(),
                    "total": _as_dict(total),
                    "groups": [_as_dict(f) for f in groups.values()],
                },
                ensure_ascii=False,
                indent=1,
            )
        )
        return 0

    def rate(value: float | None, part: int, whole: int) -> str:
        return "–" if value is None else f"{value:.0%} ({part}/{whole})"

    period = "all cases" if args.days is None else f"cases of the last {args.days:g} days"
    table = Table(title=f"handling metrics per {by.value} ({period})", header_style="bold")
    for column in (
        by.value,
        "registered",
        "处置率",
        "按期处置率",
        "一次性处置率",
        "overdue",
        "not ours",
    ):
        table.add_column(column, justify="left" if column == by.value else "right")
    for f in [*groups.values(), total]:
        table.add_row(
            f.key or "total",
            str(f.registered),
            rate(f.handling_rate, f.handled, f.registered),
            rate(f.on_time_rate, f.on_time, f.due),
            rate(f.first_time_rate, f.first_time, f.closed),
            str(f.overdue),
            str(f.not_ours),
        )
    Console().print(table)
    return 0
