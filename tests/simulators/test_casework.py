"""The demo's simulated community operators and departments: they take every case from
registration to closing through the real API, some late and some sent back, on a case clock
running far faster than the wall clock."""

from __future__ import annotations

import time

import pytest

from aggregator.cases import ClockName
from simulators.casework import CaseworkConfig, CaseWorkers
from simulators.gateway import Gateway
from simulators.stack import StackOptions

# (grid, warning type): different places and types, so each alert is a case of its own
INCIDENTS = [
    ("33038300100101000005", "fire_lane_occupied"),
    ("33038300100101000010", "water_level"),
    ("33038300100201000005", "street_vending"),
    ("33038300100201000012", "exposed_garbage"),
    ("33038300200101000005", "crowd_gathering"),
    ("33038300200101000020", "manhole_displaced"),
    ("33038300200201000005", "smoke_fire"),
    ("33038300200201000020", "sewage_discharge"),
    ("33038300100101000020", "thrown_object"),
    ("33038300200101000030", "noise_over_limit"),
]


@pytest.fixture(scope="module")
def gateway_options() -> StackOptions:
    return StackOptions(api=True)


def test_simulated_desks_close_cases_some_late_some_sent_back(gateway: Gateway) -> None:
    events = []
    for i, (grid, type_) in enumerate(INCIDENTS):
        cam = gateway.device(f"cam-{i}", grid=grid)
        fb = gateway.raise_alert(cam, type_)
        assert fb.event_id is not None
        events.append(fb.event_id)
    assert len(set(events)) == len(INCIDENTS)
    workers = CaseWorkers(
        gateway.stack,
        gateway.catalogue,
        gateway.grids,
        CaseworkConfig(
            seed=3,
            late_share=0.4,
            send_back_share=0.5,
            self_handle_share=0.2,
            not_ours_share=0.0,
            extension_share=0.5,
            interval_s=0.2,
        ),
        speed=6000,  # 100 case-clock minutes a second: the slowest feedback (30 h) in 18 s
        prefix=gateway.tag,
    )
    try:
        deadline = time.monotonic() + 90
        states: dict[int, str] = {}
        while time.monotonic() < deadline:
            workers.tick()
            states = {e: gateway.case(e)["state"] for e in events}
            if all(s == "closed" for s in states.values()):
                break
            time.sleep(0.2)
        assert all(s == "closed" for s in states.values()), (states, workers.summary())
    finally:
        workers.close()
    steps = workers.stats.steps
    assert steps["verify"] == len(INCIDENTS)
    assert steps["whistle"] + steps["self_handle"] == len(INCIDENTS)
    assert steps["whistle"] >= 3
    assert steps["accept_feedback"] == len(INCIDENTS) - steps["self_handle"]
    assert workers.stats.sent_back >= 1
    cases = [gateway.case(e) for e in events]
    assert sum(c["send_backs"] for c in cases) == workers.stats.sent_back
    assert all(c["outcome"] == "handled" for c in cases)
    # some stage ran late, and the department clocks the late steps belong to say so
    late = [d["clock"] for c in cases for d in c["deadlines"] if d["late"] and not d["running"]]
    assert late, workers.summary()
    assert set(late) <= {c.value for c in ClockName}
    assert workers.stats.late >= 1
