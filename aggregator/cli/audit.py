"""``gateway audit verify``, ``gateway audit export EVENT_ID`` and ``gateway cases``: the case
audit trail and the cases, read from the pool through the read model (either backend)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aggregator.cases.audit import dump_jsonl, verify
from aggregator.pool import cases as store
from aggregator.pool.reader import Reader

OpenPool = Callable[[Path], Reader]


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "audit",
        help="the case audit trail: verify its hash chain, export a case's rows",
        description="verify: read every audit row in order and check each row's sha256, its "
        "link to the row before and the recorded head; prints every problem and exits 1 if "
        "there is any. export EVENT_ID: the case's rows as JSON lines (every field and hash).",
    )
    audit = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    common(audit.add_parser("verify", help="check the whole chain; exit 1 on any problem"))
    e = audit.add_parser("export", help="one case's rows as JSON lines")
    common(e)
    e.add_argument("event_id", type=int)
    e.add_argument("--output", type=Path, default=None, help="file (default: stdout)")

    p = sub.add_parser(
        "cases",
        help="list cases: state, version, departments, next deadline; "
        "`cases metrics`: the handling rates (8.6)",
    )
    common(p)
    p.add_argument(
        "view",
        nargs="?",
        choices=["list", "metrics"],
        default="list",
        help="list (default) or metrics: 处置率, 按期处置率, 一次性处置率 and overdue per group",
    )
    from aggregator.cli.case_metrics import add_arguments as add_metrics_arguments

    add_metrics_arguments(p)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument(
        "--box",
        choices=["overdue"],
        default=None,
        help="only cases past a running deadline",
    )


@dataclass(frozen=True)
class _Everyone:
    """The CLI reads every case (whoever runs it can read the pool anyway)."""

    username: str = "cli"
    level: str = "admin"
    scope_code: str = ""
    department: str | None = None


def cmd_audit(args: argparse.Namespace, open_pool: OpenPool) -> int:
    with closing(open_pool(args.data_dir)) as db:
        if args.audit_command == "export":
            data = dump_jsonl(store.audit_rows(db, event_id=args.event_id))
            if args.output is not None:
                args.output.write_bytes(data)
            else:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            return 0
        rows = list(store.iter_audit(db))
        head_seq, head_hash = store.audit_head(db)
    problems = verify(rows, head=head_hash)
    if rows and rows[-1].seq != head_seq and not problems:
        print(f"head: recorded seq {head_seq}, newest row {rows[-1].seq}")
        return 1
    for p in problems:
        print(f"seq {p.seq}: {p.kind.value}: {p.detail}")
    if problems:
        print(f"audit trail NOT intact: {len(problems)} problem(s) in {len(rows)} rows")
        return 1
    print(f"audit trail intact: {len(rows)} rows, head {head_hash}")
    return 0


def cmd_cases(args: argparse.Namespace, open_pool: OpenPool) -> int:
    from contract import default_catalogue

    if args.view == "metrics":
        from aggregator.cli.case_metrics import cmd_metrics

        return cmd_metrics(args, open_pool)

    with closing(open_pool(args.data_dir)) as db:
        rows = store.list_cases(
            db, default_catalogue(), _Everyone(), box=args.box, limit=args.limit
        )
    table = Table(title=f"cases ({len(rows)})")
    for column in ("event", "state", "v", "type", "community", "lead", "assignee", "next due"):
        table.add_column(column)
    for r in rows:
        due = (
            datetime.fromtimestamp(r.next_due_at, UTC).isoformat(timespec="minutes")
            if r.next_due_at is not None
            else ""
        )
        table.add_row(
            str(r.event_id),
            r.case.state.value,
            str(r.case.version),
            r.type_code,
            r.case.community_code,
            r.case.lead_department or "",
            r.case.assignee or "",
            due,
        )
    Console().print(table)
    return 0
