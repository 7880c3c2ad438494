"""Operator and department steps on a clock that time compression moves: SLA outcomes asserted
through the real API (accounts of each role), on a stack that runs the API process too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from contract import Outcome
from simulators.cli import case_scenarios, main
from simulators.desk import StepRefused
from simulators.gateway import Gateway
from simulators.scenario import Scenario, load_scenario
from simulators.stack import StackOptions

CASES = case_scenarios()
LANE = "33038300100101000005"
COMMUNITY = LANE[:12]


@pytest.fixture(scope="module")
def gateway_options() -> StackOptions:
    return StackOptions(api=True)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_case_scenario_passes(gateway: Gateway, path: Path) -> None:
    result = gateway.run_scenario(path, check=False)
    assert result.ok, result.report()
    # the scenario's time compression: two and a half simulated hours in seconds
    assert result.elapsed_s < 60


def _raw(name: str) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(next(p for p in CASES if p.stem == name).read_text())
    return raw


def test_an_acceptance_in_time_fails_the_late_expectation_with_a_diff(
    gateway: Gateway, tmp_path: Path
) -> None:
    raw = _raw("accept-late-send-back")
    raw["timeout_s"] = 3
    for step in raw["steps"]:
        if step.get("as") == "police" and step.get("do") == "accept":
            step["t"] = 1000  # 14.7 minutes after the whistle: in time
    path = tmp_path / "in-time.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    result = gateway.run_scenario(path, check=False)
    assert not result.ok
    report = result.report()
    assert "FAIL [1] case lane" in report
    assert "expected: state=closed outcome=handled send_backs=1 late=['accept']" in report
    assert "actual:   state=closed outcome=handled send_backs=1 late=[]" in report
    assert "accept(round 0) on time" in report
    assert "FAIL [3] sla clock=accept" in report
    assert "actual:   late=0 on_time=2" in report
    assert "ok   [2] case pond" in report
    # the gateway's own figures count the acceptance in time too
    assert "FAIL [5] handling by=department key=police" in report
    assert "expected: registered=1 handled=1 first_time=0 due=1 on_time=0" in report
    assert "actual:   registered=1 handled=1 first_time=0 due=1 on_time=1" in report
    assert "FAIL [6] handling by=person key=police" in report
    assert "ok   [7] handling by=person key=emergency" in report


def test_a_step_refused_otherwise_than_expected_fails(gateway: Gateway, tmp_path: Path) -> None:
    raw = _raw("accept-late-send-back")
    raw["timeout_s"] = 3
    # claim the police may verify: the API answers 403, the report says so
    raw["steps"] = [
        s for s in raw["steps"] if not (s.get("as") == "police" and s.get("do") == "verify")
    ]
    raw["steps"].insert(2, {"t": 30, "as": "police", "case": "lane", "do": "verify"})
    path = tmp_path / "police-verify.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    result = gateway.run_scenario(path, check=False)
    failed = [c for c in result.checks if not c.ok]
    assert [c.title for c in failed] == ["step t=30 as=police do=verify case=lane"]
    assert failed[0].expected == "done"
    assert failed[0].actual.startswith("HTTP 403: ")


def test_a_pytest_user_drives_the_case_and_the_clock(gateway: Gateway) -> None:
    """What an integrator writes in Python: the department accepts after 40 minutes, the
    acceptance is late; the overdue box shows the case while it waits."""
    cam = gateway.device("lane-cam", grid=LANE)
    fb = gateway.raise_alert(cam, "fire_lane_occupied")
    assert fb.outcome is Outcome.ACCEPTED
    assert fb.event_id is not None
    case = fb.event_id
    community = gateway.operator("longxiang", "community", scope=COMMUNITY)
    police = gateway.operator("police", "department", department="police")
    community.step(case, "verify")
    community.step(case, "whistle", lead_department="police")
    assert case not in [c["event_id"] for c in police.inbox("overdue")]
    gateway.advance_clock(31 * 60)
    assert case in [c["event_id"] for c in police.inbox("overdue")]
    assert gateway.case(case)["overdue"] is True
    gateway.advance_clock(9 * 60)
    out = police.step(case, "accept")
    assert out["to_state"] == "dept_handling"
    (accept,) = [d for d in gateway.case(case)["deadlines"] if d["clock"] == "accept"]
    assert accept["late"] is True
    assert accept["running"] is False
    with pytest.raises(StepRefused) as refused:
        police.step(case, "accept")
    assert refused.value.status == 409


def test_operator_steps_are_checked_before_anything_is_sent() -> None:
    base: dict[str, Any] = {
        "name": "typos",
        "accounts": {"comm": {"level": "community", "scope": COMMUNITY}},
        "devices": [{"id": "c", "kind": "camera", "at": {"grid": LANE}}],
        "expect": [{"case": {"case": "a1", "state": "closed"}}],
    }
    alert = {"t": 0, "device": "c", "alert": {"type": "smoke_fire", "alert_id": "a1"}}
    bad = [
        ({"t": 1, "as": "comm", "case": "a1", "do": "whistel"}, "unknown action 'whistel'"),
        ({"t": 1, "as": "nobody", "case": "a1", "do": "verify"}, "unknown account 'nobody'"),
        ({"t": 1, "as": "comm", "case": "a2", "do": "verify"}, "no alert is named 'a2'"),
        ({"t": 1, "as": "comm", "do": "verify"}, "names the account (as) and the case"),
        (
            {"t": 1, "as": "comm", "case": "a1", "do": "verify", "device": "c"},
            "takes no device action",
        ),
    ]
    for step, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Scenario.model_validate({**base, "steps": [alert, step]})
    with pytest.raises(ValueError, match="a department account names its department"):
        Scenario.model_validate(
            {**base, "accounts": {"p": {"level": "department"}}, "steps": [alert]}
        )
    with pytest.raises(ValueError, match="handling: unknown account 'nobody'"):
        Scenario.model_validate(
            {
                **base,
                "steps": [alert],
                "expect": [{"handling": {"by": "person", "key": "nobody", "handled": 1}}],
            }
        )
    for path in CASES:
        assert load_scenario(path).has_operator_steps


def test_cli_runs_the_case_library_on_a_stack_it_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["scenario", "--start-stack", "--cases"]) == 0, capsys.readouterr().out
    assert f"{len(CASES)}/{len(CASES)} scenarios passed" in capsys.readouterr().out
    # against a gateway someone else runs, operator steps are refused up front
    code = main(["scenario", "--broker", "127.0.0.1:1", "--credentials", "x", "--cases"])
    assert code == 2
    assert "--start-stack" in capsys.readouterr().err


def test_the_case_scenario_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    """The same steps, clocks and figures on a PostgreSQL pool."""
    from simulators.stack import GatewayStack

    with GatewayStack(tmp_path / "stack", StackOptions(api=True, pool_url=pg_url)) as stack:
        gw = Gateway(stack)
        try:
            result = gw.run_scenario(CASES[0], check=False)
        finally:
            gw.close()
    assert result.ok, result.report()
