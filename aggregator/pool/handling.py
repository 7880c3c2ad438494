"""Handling metrics of the event pool (Longgang 8.6) and what is overdue (督办, 8.6 / 9).

For the events registered in a window, grouped by department, community, grid or warning type:

* **处置率** handling rate: closed / registered.
* **按期处置率** on-time rate: closed by the handling deadline / due, where *due* counts the
  events that are closed or already past their deadline (an open event whose deadline is still
  ahead is not late yet and counts in neither).
* **overdue**: open past the deadline now — the events supervision (督办) chases.

Deadlines are each event's ``deadline_at``: registration plus its type's handling deadline from
the warning catalogue (Longgang 8.1). The first-time rate (一次性处置率) needs a step that sends
a handled event back for re-handling (Jiangsu 6.3), which the lifecycle does not have yet; it is
not computed rather than shown as a constant 100 %.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from aggregator.grids import COMMUNITY_LENGTH, GridIndex
from aggregator.pool.reader import Reader
from contract import Catalogue


class GroupBy(StrEnum):
    DEPARTMENT = "department"
    COMMUNITY = "community"
    GRID = "grid"
    TYPE = "type"


_KEY_SQL = {
    GroupBy.DEPARTMENT: "e.department",
    GroupBy.COMMUNITY: f"substr(e.grid_code, 1, {COMMUNITY_LENGTH})",
    GroupBy.GRID: "e.grid_code",
    GroupBy.TYPE: "e.type",
}


@dataclass(slots=True)
class Handling:
    """The counts of one group; the rates follow from them."""

    key: str
    registered: int = 0
    closed: int = 0
    closed_on_time: int = 0
    overdue: int = 0  # open past the deadline now
    close_seconds: list[float] = field(default_factory=list, repr=False)

    @property
    def open(self) -> int:
        return self.registered - self.closed

    @property
    def due(self) -> int:
        return self.closed + self.overdue

    @property
    def handling_rate(self) -> float | None:
        return self.closed / self.registered if self.registered else None

    @property
    def on_time_rate(self) -> float | None:
        return self.closed_on_time / self.due if self.due else None

    @property
    def median_close_s(self) -> float | None:
        return statistics.median(self.close_seconds) if self.close_seconds else None

    def add(
        self, closed_at: float | None, registered_at: float, deadline_at: float, now: float
    ) -> None:
        self.registered += 1
        if closed_at is not None:
            self.closed += 1
            self.close_seconds.append(max(0.0, closed_at - registered_at))
            if closed_at <= deadline_at:
                self.closed_on_time += 1
        elif deadline_at < now:
            self.overdue += 1


def handling_stats(
    conn: Reader,
    by: GroupBy,
    now: float,
    *,
    where: Sequence[str] = (),
    params: Sequence[object] = (),
) -> tuple[Handling, list[Handling]]:
    """The whole selection and its groups (most registered first). ``where`` holds SQL
    conditions on the events (alias ``e``) with ``params`` bound in order: the caller's scope,
    a grid prefix, the registration window."""
    cond = " AND ".join(where) or "1=1"
    total = Handling("all")
    groups: dict[str, Handling] = {}
    for key, closed_at, registered_at, deadline_at in conn.execute(
        f"SELECT {_KEY_SQL[by]}, e.closed_at, e.registered_at, e.deadline_at FROM events e"
        f" WHERE {cond}",
        list(params),
    ):
        total.add(closed_at, registered_at, deadline_at, now)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Handling(key)
        group.add(closed_at, registered_at, deadline_at, now)
    rows = sorted(groups.values(), key=lambda h: (-h.registered, h.key))
    return total, rows


def group_name(by: GroupBy, key: str, catalogue: Catalogue, grids: GridIndex) -> str:
    """What operators call a group: the department's or type's Chinese name, the area's name."""
    if by is GroupBy.DEPARTMENT:
        department = catalogue.departments.get(key)
        return department.zh if department else key
    if by is GroupBy.TYPE:
        wt = catalogue.types.get(key)
        return wt.zh if wt else key
    area = grids.get(key) if by is GroupBy.GRID else grids.area(key)
    return area.name if area else key
