"""Terminal tables of the pool, shared by ``gateway events`` and ``gateway demo``: outside
``cli/`` so that the demo (a simulator the CLI starts) does not import the CLI back."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from rich.table import Table

from aggregator.pool.reader import Row


def render_events(rows: Sequence[Row], title: str | None = None) -> Table:
    from contract import default_catalogue

    catalogue = default_catalogue()
    table = Table(title=title, expand=False, header_style="bold")
    for col in ("id", "time (UTC)", "type", "severity", "community › grid", "alerts", "devices",
                "status"):  # fmt: skip
        table.add_column(col, overflow="fold")
    colours = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "green"}
    for r in rows:
        wt = catalogue.types.get(r["type"])
        name = f"{wt.zh} {wt.en}" if wt else r["type"]
        table.add_row(
            str(r["id"]),
            datetime.fromtimestamp(r["last_observed_at"], UTC).strftime("%H:%M:%S"),
            name,
            f"[{colours.get(r['severity'], '')}]{r['severity']}[/]",
            " › ".join(r["address"].split(" › ")[-2:]),
            str(r["alert_count"]),
            r["devices"] or "",
            r["status"],
        )
    return table
