"""The clock the case lifecycle reads: when a step happens, which deadline has passed.

In production it is the system clock. For tests and simulations (``Settings.test_clock_file``,
``CWG_TEST_CLOCK_FILE``) it runs ahead of the system clock by a number of seconds kept in a
file, which a simulator moves forward: "the department accepts 40 minutes after the whistle"
then takes the simulator one write instead of forty minutes. The file is read whenever the
clock is (a few microseconds), so every process of the gateway — the API process, the
supervision timer — sees a move at once. Ingest keeps the system clock: what devices observed
and when the pool received it are never simulated.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

__all__ = ["Clock", "OffsetFileClock", "SystemClock", "clock_for"]

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class OffsetFileClock:
    """The system clock plus the seconds written in ``path`` (none or no file: 0)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0.0

    def offset_s(self) -> float:
        # Read every time: a few microseconds, and no stat-based cache can tell two writes
        # within one timestamp tick apart.
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0.0
        except OSError as exc:
            log.warning("test clock file %s unreadable, offset kept: %s", self.path, exc)
            return self._offset
        try:
            self._offset = float(text) if text else 0.0
        except ValueError:
            # set() renames, so never half-written; a hand-edited file can be wrong
            log.warning("test clock file %s holds no number, offset kept", self.path)
        return self._offset

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset_s())

    def set(self, offset_s: float) -> None:
        """Move the clock to ``offset_s`` seconds ahead of the system clock (atomically: a
        reader sees the old offset or the new one)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(f"{offset_s:.6f}\n", encoding="ascii")
        os.replace(tmp, self.path)

    def advance(self, seconds: float) -> float:
        """Move the clock ``seconds`` further; returns the new offset."""
        offset = self.offset_s() + seconds
        self.set(offset)
        return offset


def clock_for(test_clock_file: Path | None) -> Clock:
    """The system clock, or with a test clock file the clock that file moves."""
    if test_clock_file is None:
        return SystemClock()
    log.warning("case clock runs from the test clock file %s: not for production", test_clock_file)
    return OffsetFileClock(test_clock_file)
