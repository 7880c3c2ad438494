"""Stage deadlines (Longgang 8): elapsed-time spans and China's working days, in Asia/Shanghai.

A span is either elapsed time (``PT30M``, ``PT24H``: the deadline is the start plus that much
time, whatever the calendar says) or a number of working days. Working days follow the
statutory holidays and the adjusted working days (调休上班, often a Saturday or Sunday) that the
State Council announces each year, as the ``chinese-calendar`` package records them; years the
package does not know yet can be added from the State Council's notice in a small YAML file
(see :class:`ChinaWorkCalendar`). A date outside every known year is an error, never a guess.

Counting follows the Civil Code (民法典 §201, §203): the day the clock starts is not counted, and
the period ends at 24:00 of its last day — so ``5 working days`` from a whistle on a Thursday at
16:00 ends at 24:00 of the fifth working day after that Thursday, local time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

import chinese_calendar
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aggregator.errors import AggregatorError, ConfigError

__all__ = [
    "SHANGHAI",
    "CalendarRangeError",
    "ChinaWorkCalendar",
    "Span",
    "WorkCalendar",
    "add_working_days",
    "default_calendar",
    "parse_span",
]

# Every deadline is computed in China's civil time; tzdata is a dependency so that the zone
# exists on hosts without a system zoneinfo database.
SHANGHAI = ZoneInfo("Asia/Shanghai")

# A working-day count beyond this is a data error, not a deadline (and bounds the loop below).
MAX_WORKING_DAYS = 366


class CalendarRangeError(AggregatorError):
    """A working-day deadline reaches a year whose holidays are not known."""


class WorkCalendar(Protocol):
    """Which days are working days. Raises CalendarRangeError for a day it does not know."""

    def is_working_day(self, day: date) -> bool: ...


class _YearOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    holidays: tuple[date, ...] = Field(
        default=(), description="statutory days off that fall on Monday–Friday"
    )
    workdays: tuple[date, ...] = Field(
        default=(), description="adjusted working days (调休上班) that fall on a weekend"
    )


class _HolidayFile(BaseModel):
    """``{year: {holidays: [...], workdays: [...]}}``, transcribed from the State Council's
    annual notice (国务院办公厅关于<year>年部分节假日安排的通知)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    years: dict[int, _YearOverride]

    @model_validator(mode="after")
    def _dates_in_their_year(self) -> _HolidayFile:
        for year, spec in self.years.items():
            for day in (*spec.holidays, *spec.workdays):
                if day.year != year:
                    raise ValueError(f"years.{year}: {day.isoformat()} is not in {year}")
        return self


class ChinaWorkCalendar:
    """China's working days: ``chinese-calendar`` plus optional years from a holiday file.

    The holiday file is for the weeks between the State Council's notice (usually November)
    and a ``chinese-calendar`` release that includes it; a year in the file replaces what the
    package says about that year. Upgrading the package (``pip install -U chinese-calendar``)
    is the other way to learn a new year.
    """

    def __init__(self, holiday_file: Path | str | None = None) -> None:
        self._years: dict[int, tuple[frozenset[date], frozenset[date]]] = {}
        if holiday_file is not None:
            self._years = _load_holiday_file(Path(holiday_file))

    def known_years(self) -> tuple[int, int]:
        """The first and last year this calendar knows (the package's range, widened by the
        file where the file continues it)."""
        first = min(chinese_calendar.holidays).year
        last = max(chinese_calendar.holidays).year
        for year in sorted(self._years):
            if year == last + 1:
                last = year
        return first, last

    def is_working_day(self, day: date) -> bool:
        override = self._years.get(day.year)
        if override is not None:
            holidays, workdays = override
            if day in workdays:
                return True
            return day.weekday() < 5 and day not in holidays
        try:
            return bool(chinese_calendar.is_workday(day))
        except NotImplementedError as exc:
            first, last = self.known_years()
            raise CalendarRangeError(
                f"the working days of {day.year} are not known (this calendar knows "
                f"{first}–{last}); upgrade chinese-calendar or add {day.year} from the State "
                "Council's holiday notice to the holiday file"
            ) from exc


def _load_holiday_file(path: Path) -> dict[int, tuple[frozenset[date], frozenset[date]]]:
    try:
        with path.open(encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
        parsed = _HolidayFile.model_validate({"years": raw or {}})
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"holiday file {path}: {exc}") from exc
    return {
        year: (frozenset(spec.holidays), frozenset(spec.workdays))
        for year, spec in parsed.years.items()
    }


_DEFAULT: list[ChinaWorkCalendar] = []


def default_calendar() -> ChinaWorkCalendar:
    """The package's calendar without a holiday file (built once)."""
    if not _DEFAULT:
        _DEFAULT.append(ChinaWorkCalendar())
    return _DEFAULT[0]


def add_working_days(start: datetime, days: int, calendar: WorkCalendar) -> datetime:
    """24:00 (Asia/Shanghai) of the ``days``-th working day after ``start``'s local date."""
    if start.tzinfo is None:
        raise ValueError("deadline arithmetic needs an aware datetime")
    if not 1 <= days <= MAX_WORKING_DAYS:
        raise ValueError(f"working days must be 1…{MAX_WORKING_DAYS}, not {days}")
    day = start.astimezone(SHANGHAI).date()
    counted = 0
    # Holidays never run longer than a few weeks, so 3×days+30 calendar days always suffice.
    for _ in range(3 * days + 30):
        day += timedelta(days=1)
        if calendar.is_working_day(day):
            counted += 1
            if counted == days:
                return datetime.combine(day + timedelta(days=1), dt.time(), tzinfo=SHANGHAI)
    raise CalendarRangeError(f"no {days} working days found after {start.isoformat()}")


class Span(BaseModel):
    """How long a stage may take: elapsed time, or whole working days."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    elapsed: timedelta | None = Field(default=None, description="elapsed time (ISO 8601)")
    working_days: int | None = Field(
        default=None, ge=1, le=MAX_WORKING_DAYS, description="working days (China)"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Span:
        if (self.elapsed is None) == (self.working_days is None):
            raise ValueError("a span is either elapsed time or working days")
        if self.elapsed is not None and self.elapsed <= timedelta(0):
            raise ValueError("an elapsed span must be positive")
        return self

    def deadline(self, start: datetime, calendar: WorkCalendar) -> datetime:
        """The deadline of a stage that starts at ``start`` (aware), in Asia/Shanghai."""
        if start.tzinfo is None:
            raise ValueError("deadline arithmetic needs an aware datetime")
        if self.elapsed is not None:
            return (start + self.elapsed).astimezone(SHANGHAI)
        assert self.working_days is not None  # the validator guarantees one of the two
        return add_working_days(start, self.working_days, calendar)

    def describe(self) -> str:
        if self.working_days is not None:
            return f"{self.working_days} working days"
        assert self.elapsed is not None
        return _iso_duration(self.elapsed)


def parse_span(value: object) -> Span:
    """A span from YAML: an ISO 8601 duration string, a timedelta or ``{working_days: N}``."""
    if isinstance(value, Span):
        return value
    if isinstance(value, Mapping):
        return Span.model_validate(dict(value))
    return Span.model_validate({"elapsed": value})


def _iso_duration(delta: timedelta) -> str:
    # Hours, never days: in ISO 8601 "P1D" is a calendar day, and these spans are elapsed time.
    seconds = int(delta.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    text += f"{secs}S" if secs or not text else ""
    return "PT" + text
