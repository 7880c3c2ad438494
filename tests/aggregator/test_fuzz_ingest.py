"""Fuzz: payloads from the contract's JSON Schema and mutations of them, through the real broker
into the real aggregator. Every message must end as exactly one alert row, out-of-area row or dead
letter with a reason (never ``internal_error``, which means a fault of ours); the MQTT I/O process
is never restarted; nothing logs a traceback; and a valid alert sent afterwards lands.

``CWG_FUZZ_EXAMPLES`` sets the number of examples (default 2,000, as in CI); for a long run use
``scripts/fuzz_ingest.py --examples 100000``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from contract import Outcome

from .conftest import grid_in_community, interior, make_alert
from .fuzz_support import DEVICE, FuzzStack, alert_payloads

EXAMPLES = int(os.environ.get("CWG_FUZZ_EXAMPLES", "2000"))


class _Tracebacks(logging.Handler):
    """Records every log record that carries a traceback, or is an error, from any logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStack]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    fuzz = FuzzStack(root)
    yield fuzz
    fuzz.close()


@pytest.fixture(scope="module")
def tracebacks() -> Iterator[_Tracebacks]:
    handler = _Tracebacks()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,
    # no shrinking: a failure surfaces a few examples late (see the window below) and names
    # its payload, and a broken stack would make every shrink step wait for a timeout
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
    ],
)
@given(payload=alert_payloads())
def test_every_fuzzed_message_ends_as_exactly_one_row(
    stack: FuzzStack, tracebacks: _Tracebacks, payload: bytes
) -> None:
    # up to 64 messages in flight, each checked in order as its feedback comes (a failure names
    # its payload; it may surface a few examples after the one that caused it)
    stack.submit(payload, window=64)


def test_after_the_fuzz_nothing_restarted_or_logged_a_traceback_and_a_valid_alert_lands(
    stack: FuzzStack, tracebacks: _Tracebacks
) -> None:
    stack.drain()
    tally = stack.tally
    print(f"fuzz: {tally.sent} messages, outcomes {dict(tally.outcomes)}")
    print(f"fuzz: rejections {dict(tally.reasons)}")
    assert tally.sent >= EXAMPLES
    # the mix reaches every stage: some accepted, some out of area, many kinds of rejection
    assert tally.outcomes[Outcome.ACCEPTED.value] + tally.outcomes[Outcome.MERGED.value] > 0
    assert tally.outcomes[Outcome.OUT_OF_AREA.value] > 0
    assert len(tally.reasons) >= 5, tally.reasons
    assert stack.io_restarts() == 0
    assert not tracebacks.records, [r.getMessage() for r in tracebacks.records[:5]]
    good = make_alert(DEVICE, *interior(grid_in_community(0)), seq=1)
    fb = stack.send(good.to_json())
    assert (fb.alert_id, fb.outcome) in (
        (good.alert_id, Outcome.ACCEPTED),
        (good.alert_id, Outcome.MERGED),
    )
    rows = stack.db.execute("SELECT COUNT(*) FROM dead_letters WHERE reason='internal_error'")
    assert rows.fetchone()[0] == 0
