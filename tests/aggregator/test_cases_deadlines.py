"""Stage deadlines: elapsed time, and working days on China's calendar in Asia/Shanghai."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from aggregator.cases.deadlines import (
    SHANGHAI,
    CalendarRangeError,
    ChinaWorkCalendar,
    Span,
    add_working_days,
    default_calendar,
    parse_span,
)
from aggregator.errors import ConfigError


def sh(*args: int) -> datetime:
    return datetime(*args, tzinfo=SHANGHAI)  # type: ignore[misc]


FIVE = Span(working_days=5)


@pytest.mark.parametrize(
    ("start", "deadline"),
    [
        # A weekend: Fri 27 Nov → Mon 30, Tue 1, Wed 2, Thu 3, Fri 4 Dec → 24:00 Fri 4 Dec.
        (sh(2026, 11, 27, 10, 0), sh(2026, 12, 5)),
        # Started on a Saturday: the count begins on Monday.
        (sh(2026, 11, 28, 10, 0), sh(2026, 12, 5)),
        # The Thursday before National Day: Mid-Autumn 25–27 Sep, National Day 1–7 Oct; working
        # days 28, 29, 30 Sep, 8, 9 Oct → 24:00 Fri 9 Oct.
        (sh(2026, 9, 24, 16, 0), sh(2026, 10, 10)),
        # The adjusted working Saturday 10 Oct 2026 counts: 8, 9, 10 (Sat), 12, 13 Oct.
        (sh(2026, 9, 30, 11, 0), sh(2026, 10, 14)),
        # The adjusted working Sunday 20 Sep 2026 counts: 20 (Sun), 21, 22, 23, 24 Sep.
        (sh(2026, 9, 18, 9, 0), sh(2026, 9, 25)),
        # Spring Festival 2026: 13 Feb, 14 Feb (adjusted Saturday), then off 15–23 Feb; 24, 25,
        # 26 Feb → 24:00 Thu 26 Feb.
        (sh(2026, 2, 12, 17, 30), sh(2026, 2, 27)),
        # The day is Shanghai's, not UTC's: 17:00 UTC Thursday is 01:00 Friday in Shanghai.
        (datetime(2026, 11, 26, 17, 0, tzinfo=UTC), sh(2026, 12, 5)),
        (datetime(2026, 11, 26, 15, 0, tzinfo=UTC), sh(2026, 12, 4)),
    ],
)
def test_five_working_days(start: datetime, deadline: datetime) -> None:
    got = FIVE.deadline(start, default_calendar())
    assert got == deadline
    assert got.tzinfo is SHANGHAI


@pytest.mark.parametrize(
    ("span", "start", "deadline"),
    [
        ("PT30M", sh(2026, 10, 1, 23, 50), sh(2026, 10, 2, 0, 20)),  # a holiday changes nothing
        ("PT1H", sh(2026, 11, 28, 9, 0), sh(2026, 11, 28, 10, 0)),
        ("PT24H", sh(2026, 9, 30, 18, 0), sh(2026, 10, 1, 18, 0)),
        ("PT2H", datetime(2026, 11, 2, 23, 0, tzinfo=UTC), sh(2026, 11, 3, 9, 0)),
        ({"working_days": 1}, sh(2026, 10, 9, 12, 0), sh(2026, 10, 11)),  # Sat 10 Oct works
        ({"working_days": 3}, sh(2026, 12, 4, 8, 0), sh(2026, 12, 10)),
    ],
)
def test_spans(span: object, start: datetime, deadline: datetime) -> None:
    assert parse_span(span).deadline(start, default_calendar()) == deadline


def test_package_calendar_days() -> None:
    cal = default_calendar()
    assert cal.is_working_day(date(2026, 10, 10))  # Saturday, adjusted working day
    assert not cal.is_working_day(date(2026, 10, 5))  # Monday, National Day
    assert not cal.is_working_day(date(2026, 11, 29))  # an ordinary Sunday
    assert cal.is_working_day(date(2026, 11, 30))
    assert cal.known_years() == (2004, 2026)


def test_spring_festival_2027_is_not_known_yet() -> None:
    # chinese-calendar 1.11.0 (the newest release) stops at 2026: the State Council's 2027
    # schedule is not in it. A deadline in 2027 is an error naming the year, never a guess.
    with pytest.raises(CalendarRangeError, match=r"2027 are not known .*2004–2026"):
        FIVE.deadline(sh(2027, 2, 4, 10, 0), default_calendar())
    # Across New Year too: 29, 30, 31 Dec 2026 and then 2027.
    with pytest.raises(CalendarRangeError, match="2027"):
        FIVE.deadline(sh(2026, 12, 28, 10, 0), default_calendar())
    # Elapsed spans need no calendar.
    assert Span(elapsed=timedelta(hours=24)).deadline(
        sh(2027, 2, 4, 10, 0), default_calendar()
    ) == sh(2027, 2, 5, 10, 0)


def test_a_holiday_file_adds_a_year(tmp_path: Path) -> None:
    # Test data in the file's format, NOT the State Council's 2027 notice: a Spring Festival
    # week off from Fri 5 to Thu 11 Feb (the weekday ones listed) and Sunday 14 Feb worked.
    path = tmp_path / "holidays.yaml"
    path.write_text(
        "2027:\n"
        "  holidays: [2027-01-01, 2027-02-05, 2027-02-08, 2027-02-09, 2027-02-10, 2027-02-11]\n"
        "  workdays: [2027-02-14]\n",
        encoding="utf-8",
    )
    cal = ChinaWorkCalendar(path)
    assert cal.known_years() == (2004, 2027)
    # Thu 4 Feb → 12 Fri, 14 Sun (worked), 15, 16, 17 → 24:00 Wed 17 Feb.
    assert FIVE.deadline(sh(2027, 2, 4, 10, 0), cal) == sh(2027, 2, 18)
    # 2026 still comes from the package: National Day as before.
    assert FIVE.deadline(sh(2026, 9, 24, 16, 0), cal) == sh(2026, 10, 10)
    # New Year: 29, 30, 31 Dec, (1 Jan off), 4, 5 Jan → 24:00 Tue 5 Jan.
    assert FIVE.deadline(sh(2026, 12, 28, 10, 0), cal) == sh(2027, 1, 6)
    with pytest.raises(CalendarRangeError, match="2028"):
        cal.is_working_day(date(2028, 1, 3))


@pytest.mark.parametrize(
    "text",
    [
        "2027:\n  holidays: [2026-12-31]\n",  # a date outside its year
        "2027:\n  holiday: [2027-02-05]\n",  # a misspelt key
        "2027: [1, 2]\n",
    ],
)
def test_a_bad_holiday_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "holidays.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="holiday file"):
        ChinaWorkCalendar(path)


@pytest.mark.parametrize(
    "bad",
    ["PT0S", "-PT1H", {"working_days": 0}, {"working_days": 5, "elapsed": "PT1H"}, "soon"],
)
def test_bad_spans(bad: object) -> None:
    with pytest.raises(ValueError):  # pydantic's ValidationError is one
        parse_span(bad)


def test_naive_start_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        add_working_days(datetime(2026, 11, 2, 9), 5, default_calendar())
    with pytest.raises(ValueError, match="aware"):
        Span(elapsed=timedelta(hours=1)).deadline(datetime(2026, 11, 2, 9), default_calendar())
