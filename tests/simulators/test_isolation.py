"""Tests sharing a module's stack stay apart, as pytest users expect.

The integrator's report: one test raised ``water_level`` from two gauges in grid …01000005, the
scenario file of the next test did the same, and the scenario failed with ``devices=4`` where it
expected 2 — the second test's alerts had merged into the first test's event. The ``gateway``
fixture now gives each test its own clock origin, past every merge window of the others.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from contract import Outcome
from simulators.gateway import Gateway
from simulators.stack import GatewayStack

GRID = "33038300100101000005"


def _two_gauges(gateway: Gateway) -> None:
    g1 = gateway.device("gauge-1", "sensor", grid=GRID)
    g2 = gateway.device("gauge-2", "sensor", grid=GRID)
    assert gateway.raise_alert(g1, "water_level").outcome is Outcome.ACCEPTED
    assert gateway.raise_alert(g2, "water_level").outcome is Outcome.MERGED


def test_a_test_raises_water_level_from_two_gauges(gateway: Gateway) -> None:
    _two_gauges(gateway)
    (event,) = gateway.events(type="water_level", grid_prefix=GRID)
    assert len(event.device_ids) == 2


def test_the_next_tests_scenario_does_the_same_and_stays_apart(
    gateway: Gateway, tmp_path: Path
) -> None:
    path = tmp_path / "gauges.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "two gauges, one rising pond",
                "devices": [
                    {"id": "gauge-1", "kind": "sensor", "at": {"grid": GRID}},
                    {"id": "gauge-2", "kind": "sensor", "at": {"grid": GRID, "east_m": 20}},
                ],
                "steps": [
                    {"t": 0, "device": "gauge-1", "alert": {"type": "water_level"}},
                    {"t": 30, "device": "gauge-2", "alert": {"type": "water_level"}},
                ],
                "expect": [
                    {"events": {"type": "water_level", "grid": GRID, "count": 1, "devices": 2}}
                ],
            }
        )
    )
    gateway.run_scenario(path)


def test_and_a_third_test_again(gateway: Gateway) -> None:
    _two_gauges(gateway)
    (event,) = gateway.events(type="water_level", grid_prefix=GRID)
    assert len(event.device_ids) == 2
    # the pool as a whole holds every test's event, each with its own two gauges
    every = gateway.events(type="water_level", grid_prefix=GRID, mine=False)
    assert len(every) >= 3
    assert all(len(e.device_ids) == 2 for e in every)


def test_clock_origins_are_apart_by_more_than_every_merge_window(
    gateway_stack: GatewayStack,
) -> None:
    one, two = Gateway(gateway_stack), Gateway(gateway_stack)
    try:
        longest = max(t.merge_window_s for t in one.catalogue.types.values())
        assert two.origin_shift_s - one.origin_shift_s > 2 * longest
        # the origin moves what a device reports, not when it reports it
        cam = one.device("cam", grid=GRID)
        sent = cam.alert("smoke_fire")
        lag = time.time() - sent.observed_at.timestamp()
        assert abs(lag - one.origin_shift_s) < 60
    finally:
        one.close()
        two.close()


def test_a_test_may_opt_out_and_share_the_present(gateway_stack: GatewayStack) -> None:
    gw = Gateway(gateway_stack, isolate=False)
    try:
        assert gw.origin_shift_s == 0.0
    finally:
        gw.close()
