"""The test clock: the system clock plus what a file says, moved atomically, seen at once."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from aggregator.clock import OffsetFileClock, SystemClock, clock_for
from aggregator.config import Settings


def test_no_file_is_the_system_clock(tmp_path: Path) -> None:
    assert isinstance(clock_for(None), SystemClock)
    clock = clock_for(tmp_path / "clock")
    assert isinstance(clock, OffsetFileClock)
    assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 1


def test_moves_are_seen_at_once_even_within_one_timestamp_tick(tmp_path: Path) -> None:
    writer, reader = OffsetFileClock(tmp_path / "clock"), OffsetFileClock(tmp_path / "clock")
    for minutes in range(1, 50):  # same-length text, written faster than mtime ticks
        writer.set(minutes * 60.0)
        assert reader.offset_s() == minutes * 60.0
    assert writer.advance(2400) == 49 * 60.0 + 2400
    ahead = (reader.now() - datetime.now(UTC)).total_seconds()
    assert abs(ahead - (49 * 60 + 2400)) < 1
    assert not [p for p in tmp_path.iterdir() if p.name != "clock"]  # no temporary left


def test_a_spoiled_file_keeps_the_last_offset(tmp_path: Path) -> None:
    clock = OffsetFileClock(tmp_path / "clock")
    clock.set(90)
    assert clock.offset_s() == 90
    (tmp_path / "clock").write_text("ninety\n")
    assert clock.offset_s() == 90


def test_the_setting(tmp_path: Path) -> None:
    assert Settings().test_clock_file is None
    assert Settings(test_clock_file=tmp_path / "c").test_clock_file == tmp_path / "c"
