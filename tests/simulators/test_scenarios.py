"""Every packaged scenario passes against the real stack; a wrong expectation fails readably."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from simulators.cli import builtin_scenarios, main
from simulators.errors import ScenarioError
from simulators.gateway import Gateway
from simulators.scenario import Scenario, load_scenario
from simulators.stack import GatewayStack

SCENARIOS = builtin_scenarios()


def test_library_covers_every_warning_type() -> None:
    from contract import default_catalogue

    used = {
        step.alert.type
        for path in SCENARIOS
        for step in load_scenario(path).steps
        if step.alert is not None
    }
    assert set(default_catalogue().types) <= used


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_passes(gateway: Gateway, path: Path) -> None:
    result = gateway.run_scenario(path, check=False)
    assert result.ok, result.report()
    assert result.sent > 0


def _wrong(tmp_path: Path) -> Path:
    """The three-cameras scenario, claiming two events where the pool will hold one."""
    raw = yaml.safe_load(
        next(p for p in SCENARIOS if p.stem == "dedup-three-cameras-one-fire").read_text()
    )
    raw["name"] = "deliberately wrong"
    raw["timeout_s"] = 2
    raw["expect"][0]["events"]["count"] = 2
    raw["expect"].append({"dead_letters": {"reason": "invalid_json", "count": 1}})
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


TWO_DAYS = 2 * 86400.0  # past every merge window: the library's run of this scenario stays apart


def test_wrong_expectation_fails_with_a_diff(gateway: Gateway, tmp_path: Path) -> None:
    result = gateway.run_scenario(_wrong(tmp_path), check=False, origin_shift_s=TWO_DAYS)
    assert not result.ok
    report = result.report()
    assert report.startswith("FAIL deliberately wrong: 3/5 expectations held")
    assert "FAIL [0] events type=smoke_fire grid=330383001001" in report
    assert "expected: count=2 devices=3 alerts=3" in report
    assert "actual:   count=1; event " in report
    assert "devices=3 [cam-north, cam-east, cam-south] alerts=3" in report
    assert "FAIL [4] dead_letters reason=invalid_json" in report
    assert "expected: reason=invalid_json count=1" in report
    assert "ok   [1] feedback device=cam-north outcome=accepted" in report

    with pytest.raises(AssertionError, match="expected: count=2"):
        gateway.run_scenario(_wrong(tmp_path), origin_shift_s=2 * TWO_DAYS)


def test_cli_exits_nonzero_with_the_diff(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["scenario", "--start-stack", str(_wrong(tmp_path))])
    out = capsys.readouterr().out
    assert code == 1
    assert "expected: count=2 devices=3 alerts=3" in out
    assert "0/1 scenarios passed" in out


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        (
            {"steps": [{"t": 0, "device": "ghost", "alert": {"type": "smoke_fire"}}]},
            "unknown device 'ghost'",
        ),
        (
            {
                "steps": [
                    {
                        "t": 0,
                        "device": "cam-north",
                        "alert": {"type": "smoke_fire"},
                        "offline": True,
                    }
                ]
            },
            "exactly one of: alert, bad, offline, online",
        ),
        ({"expect": [{"events": {"count": 1, "colour": 2}}]}, "expect.0.events.colour"),
    ],
)
def test_invalid_scenarios_are_refused_with_the_key_path(
    tmp_path: Path, patch: dict[str, object], message: str
) -> None:
    raw = yaml.safe_load(
        next(p for p in SCENARIOS if p.stem == "dedup-three-cameras-one-fire").read_text()
    )
    raw.update(patch)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    with pytest.raises(ScenarioError, match="invalid scenario") as info:
        load_scenario(path)
    assert message in str(info.value)


def test_unknown_type_and_grid_are_refused_before_sending(gateway: Gateway) -> None:
    sc = Scenario.model_validate(
        {
            "name": "typo",
            "devices": [{"id": "c", "kind": "camera", "at": {"grid": "99999999999999999999"}}],
            "steps": [{"t": 0, "device": "c", "alert": {"type": "smoke_fire"}}],
            "expect": [{"events": {"count": 1}}],
        }
    )
    with pytest.raises(ScenarioError, match="unknown grid code"):
        gateway.run_scenario(sc)


def test_cli_against_a_running_gateway(
    gateway_stack: GatewayStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The way an integrator points the runner at a gateway they run: credentials files, and
    devices it lacks provisioned into their registry (the broker reloads)."""
    path = tmp_path / "pond.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "pond level, from outside",
                "places": {"pond": {"grid": "33038300100201000030"}},
                "devices": [
                    {"id": "pond-gauge", "kind": "sensor", "at": {"place": "pond"}},
                    {"id": "pond-cam", "kind": "camera", "at": {"place": "pond", "east_m": 30}},
                ],
                "steps": [
                    {"t": 0, "device": "pond-gauge", "alert": {"type": "water_level"}},
                    {"t": 5, "device": "pond-cam", "alert": {"type": "zone_intrusion"}},
                ],
                "expect": [
                    {"events": {"type": "water_level", "count": 1, "department": "emergency"}},
                    {"feedback": {"device": "pond-cam", "outcome": "accepted", "count": 1}},
                ],
            }
        )
    )
    creds = tmp_path / "devices"
    args = [
        "scenario",
        # devices go to the device listener (TLS, verified with the CA provisioning hands out)
        "--broker", f"{gateway_stack.host}:{gateway_stack.device_endpoint.port}",
        "--credentials", str(creds),
        "--registry", str(gateway_stack.registry_path),
        "--broker-state", str(gateway_stack.broker_settings.state_dir),
        "--pool", str(gateway_stack.pool_path),
        str(path),
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().out
    assert "1/1 scenarios passed" in capsys.readouterr().out
    assert len(list(creds.glob("*.yaml"))) == 2
    # Without credentials or a registry to provision into, it says what is missing.
    assert (
        main(
            [
                "scenario",
                "--broker",
                "127.0.0.1:1",
                "--credentials",
                str(tmp_path / "none"),
                "--pool",
                str(gateway_stack.pool_path),
                str(path),
            ]
        )
        == 2
    )
    assert "no credentials for device" in capsys.readouterr().err


def test_operator_steps_need_a_stack_with_the_api(gateway: Gateway) -> None:
    from simulators.cli import case_scenarios

    with pytest.raises(ScenarioError, match="operator steps need the gateway's API"):
        gateway.run_scenario(case_scenarios()[0])
