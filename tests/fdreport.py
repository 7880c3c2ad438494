"""Opt-in pytest plugin: which tests leave file descriptors or threads behind.

Enable with ``CWG_TEST_FD_REPORT=1`` (it is registered by ``tests/conftest.py`` and does
nothing otherwise). Around each test (setup, call and teardown) it records the process's open
descriptors (``/proc/self/fd`` and what each points to) and its threads, and at the end of the
session prints the tests that left the most behind, with what the new descriptors are
(``socket:[…]``, ``pipe:[…]``, ``anon_inode:inotify``, a file path) and the new threads' names.

Counted after a ``gc.collect()``: an object nobody references any more but that still holds a
socket is counted separately ("freed by gc"), because over a long session it is only released
whenever the collector happens to run. A module- or session-scoped fixture shows up on the
first test that uses it (and is given back at the teardown of the last one).
``CWG_TEST_FD_REPORT=<n>`` prints the top ``n`` (default 15).
"""

from __future__ import annotations

import gc
import os
import re
import threading
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass, field

import pytest

ENV = "CWG_TEST_FD_REPORT"
_FD_DIR = "/proc/self/fd"


def open_fds() -> dict[int, str]:
    """This process's open descriptors and what each refers to (a vanished one is skipped)."""
    fds: dict[int, str] = {}
    for name in os.listdir(_FD_DIR):
        try:
            fds[int(name)] = os.readlink(f"{_FD_DIR}/{name}")
        except OSError:  # the listing's own descriptor, or one closed meanwhile
            continue
    return fds


def thread_names() -> list[str]:
    return [t.name for t in threading.enumerate()]


def kind_of(target: str) -> str:
    """A descriptor's kind for grouping: ``socket``, ``pipe``, ``anon_inode:…`` or a path with
    the per-test temporary folder folded away."""
    if target.startswith(("socket:", "pipe:")):
        return target.split(":", 1)[0]
    if target.startswith("anon_inode:"):
        return target
    return re.sub(r"/pytest-\d+/[^/]+/", "/<tmp>/", target)


def _diff(before: dict[int, str], after: dict[int, str]) -> list[str]:
    """Descriptors present after and not before (same number pointing elsewhere counts)."""
    return [t for fd, t in after.items() if before.get(fd) != t]


def _summary(targets: list[str]) -> str:
    counts = Counter(kind_of(t) for t in targets)
    return ", ".join(f"{n}×{k}" for k, n in counts.most_common(4))


@dataclass
class _Left:
    nodeid: str
    fds: list[str]
    freed_by_gc: list[str]
    threads: list[str]


@dataclass
class FdReport:
    top: int
    results: list[_Left] = field(default_factory=list)
    start_fds: int = 0
    start_threads: int = 0

    def pytest_sessionstart(self) -> None:
        self.start_fds = len(open_fds())
        self.start_threads = threading.active_count()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, None, None]:
        gc.collect()
        before = open_fds()
        threads_before = Counter(thread_names())
        yield
        raw = open_fds()
        gc.collect()
        after = open_fds()
        self.results.append(
            _Left(
                item.nodeid,
                _diff(before, after),
                _diff(after, raw),
                list((Counter(thread_names()) - threads_before).elements()),
            )
        )

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        tr = terminalreporter
        gc.collect()
        end_fds, end_threads = len(open_fds()), threading.active_count()
        tr.section("descriptors and threads left behind")
        tr.write_line(
            f"session: {self.start_fds} -> {end_fds} descriptors, "
            f"{self.start_threads} -> {end_threads} threads over {len(self.results)} tests; "
            f"{sum(len(r.freed_by_gc) for r in self.results)} descriptors were freed only by gc"
        )
        worst = sorted(
            (r for r in self.results if r.fds or r.threads or r.freed_by_gc),
            key=lambda r: (len(r.fds), len(r.threads), len(r.freed_by_gc)),
            reverse=True,
        )[: self.top]
        for r in worst:
            gc_freed = len(r.freed_by_gc)
            tr.write_line(
                f"{len(r.fds):+4d} fd {len(r.threads):+3d} thr gc:{gc_freed:<3d} {r.nodeid}"
            )
            if r.freed_by_gc:
                tr.write_line(f"        freed by gc: {_summary(r.freed_by_gc)}")
            if r.fds:
                tr.write_line(f"        fds: {_summary(r.fds)}")
            if r.threads:
                tr.write_line(f"        threads: {', '.join(sorted(set(r.threads)))[:200]}")


def pytest_configure(config: pytest.Config) -> None:
    value = os.environ.get(ENV, "")
    if value and value != "0":
        top = int(value) if value.isdigit() and int(value) > 1 else 15
        config.pluginmanager.register(FdReport(top), "cwg-fdreport")
