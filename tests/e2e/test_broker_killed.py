"""A broker that dies loses what it acknowledged; the edge outbox makes up for it.

* Mosquitto is SIGKILLed three times within its first minute (before its first autosave, so
  each time it comes back without the sessions and the messages it had acknowledged) while a
  device raises ~500 alerts/s through the edge agent's outbox and publisher. Afterwards every
  alert_id is in the pool exactly once: the alerts the dead broker had acknowledged got no
  feedback and were sent again.
* After a broker restart the edge publisher and the aggregator are both back within a few
  seconds (capped, jittered reconnect delays).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from aggregator.config import Settings
from aggregator.service import Aggregator, build_aggregator

from .ingest_kit import AlertStream, fast_dir, tally, wait_for

if TYPE_CHECKING:
    from tests.conftest import BrokerHandle

DEVICE = "sensor-001"


def start_aggregator(broker: BrokerHandle, data_dir: Path) -> Aggregator:
    aggregator = build_aggregator(
        Settings.model_validate(
            {
                "data_dir": data_dir,
                "mqtt": {
                    "host": broker.host,
                    "port": broker.port,
                    "password": broker.password("aggregator"),
                    "client_id": "agg-broker-killed",
                    "topic_prefix": broker.prefix,
                },
                "batch": {"max_messages": 200, "linger_ms": 10},
            }
        )
    )
    aggregator.start()
    assert aggregator.ingest.wait_connected(5)
    return aggregator


@pytest.mark.slow
@pytest.mark.parametrize(
    "autosave_s",
    [
        # Never saved before it dies: it comes back empty, without the aggregator's session
        # and subscriptions, so what devices publish until the aggregator subscribes again is
        # acknowledged and dropped (the case of the issue; only the outbox's resends save it).
        3600,
        None,  # the broker's own setting
    ],
    ids=["never-saved", "default-autosave"],
)
def test_broker_sigkilled_three_times_early_loses_no_alert(
    broker_factory: Callable[..., BrokerHandle], tmp_path: Path, autosave_s: int | None
) -> None:
    options = {} if autosave_s is None else {"autosave_interval_s": autosave_s}
    broker = broker_factory(**options)
    born = time.monotonic()
    aggregator = start_aggregator(broker, tmp_path / "agg")
    with fast_dir(tmp_path / "edge") as edge_dir:
        stream = AlertStream(broker, DEVICE, edge_dir / "outbox.db", feedback_timeout_s=2.0)
        try:
            stream.start()
            wait_for(stream.publisher.connected.is_set, 10, "the device's connection")
            rate, seconds = 500, 30
            stream.produce(rate, seconds)
            kills = []
            for at in (6.0, 14.0, 22.0):  # seconds into the run, each a fresh broker's life
                time.sleep(max(0.0, at - (time.monotonic() - born)))
                broker.kill()
                kills.append(round(time.monotonic() - born, 1))
                time.sleep(0.5)
                broker.start()
            assert kills[-1] < 60, kills
            stream.join(seconds + 30)
            raised = list(stream.ids)
            assert len(raised) >= rate * seconds * 0.9, len(raised)
            # Every alert is answered by the aggregator (resends included), then counted.
            wait_for(lambda: stream.outbox.depth() == 0, 45, "every alert answered")
            result = tally(aggregator.settings.pool, DEVICE, raised)
            resent = stream.outbox.resent_total()
            feedback = stream.publisher.stats.feedback
            print(
                f"\nbroker SIGKILLed at {kills} s: raised {result.raised}, stored "
                f"{result.stored}, lost {result.lost}, doubled {result.doubled}; resent for want "
                f"of feedback {resent}, of which the broker had lost about "
                f"{max(0, resent - feedback['duplicate'])}; feedback {dict(feedback)}"
            )
            assert (result.lost, result.doubled, result.unknown) == (0, 0, 0), result
            assert result.stored == len(raised)
        finally:
            stream.stop()
            aggregator.stop()


@pytest.mark.slow
def test_edge_and_aggregator_reconnect_within_seconds_of_the_broker(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    aggregator = start_aggregator(broker, tmp_path / "agg")
    with fast_dir(tmp_path / "edge") as edge_dir:
        stream = AlertStream(broker, DEVICE, edge_dir / "outbox.db")
        try:
            stream.start()
            wait_for(stream.publisher.connected.is_set, 10, "the device's connection")
            for round_ in range(2):
                broker.stop()
                wait_for(lambda: not stream.publisher.connected.is_set(), 5, "the disconnect")
                # Long enough for both backoffs to reach their cap (the old ones grew to 30 s).
                time.sleep(6)
                broker.start()
                back = time.monotonic()
                wait_for(stream.publisher.connected.is_set, 10, "the device back")
                edge_s = time.monotonic() - back
                assert aggregator.ingest.wait_connected(10)
                # The aggregator is back when an alert raised now is answered.
                stream.produce(20, 0.1)
                stream.join(5)
                wait_for(lambda: stream.outbox.depth() == 0, 10, "an answer after the restart")
                both_s = time.monotonic() - back
                print(f"\nround {round_}: edge back in {edge_s:.2f} s, answered in {both_s:.2f} s")
                assert edge_s < 6
                assert both_s < 6
        finally:
            stream.stop()
            aggregator.stop()
