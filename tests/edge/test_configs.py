"""Device configuration files: every sample loads, every typical mistake names its key and line."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from contract import default_catalogue
from edge.cli import main as cli_main
from edge.config import ConfigError, DeviceConfig, ThresholdRule, json_schema, load_config
from edge.detector import load_manifest
from edge.sensors import CsvReplaySensor, SensorSourceError, read_csv

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "firmware-configs"
SAMPLES = sorted(CONFIG_DIR.glob("*.yaml"))
GRIDS = ROOT / "aggregator" / "data" / "grids" / "longgang.geojson"


def test_there_is_a_sample_for_every_use_case() -> None:
    kinds: set[str] = set()
    for path in SAMPLES:
        cfg = load_config(path)
        kinds |= {r.type for r in cfg.rules}
        kinds |= {s.kind for s in cfg.sensors}
    assert {
        "fire_lane_occupied",
        "ebike_in_lift",
        "crowd_gathering",
        "zone_intrusion",
        "smoke_alarm",
        "water_level",
        "gas_leak",
        "noise_over_limit",
        "manhole_displaced",
        "sewage_discharge",
    } <= kinds
    assert {"smoke", "water_level", "gas", "noise", "manhole_tilt"} <= kinds


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_loads_and_is_consistent(path: Path) -> None:
    cfg = load_config(path)
    assert path.stem == cfg.device.device_id  # one file per device, named after it
    assert cfg.credentials.password_env or cfg.credentials.password_file  # never inline
    catalogue = default_catalogue()
    for rule in cfg.rules:
        assert rule.type in catalogue.types
    for sensor in cfg.sensors:
        rows = read_csv(sensor.source.path)  # replay files exist and parse
        assert rows
    for rule in cfg.rules:
        if isinstance(rule, ThresholdRule):
            sensor = next(s for s in cfg.sensors if s.name == rule.sensor)
            quantities = {r.quantity for r in read_csv(sensor.source.path)}
            assert rule.quantity in quantities, f"{rule.type}: replay has no {rule.quantity}"
    if cfg.camera is not None:
        manifest = load_manifest()
        entry = manifest.get(cfg.camera.detector.model)
        known = {c for c in entry.classes if c}
        assert set(cfg.camera.detector.classes or []) <= known
        for rule in cfg.rules:
            classes = getattr(rule, "classes", ["person"])
            assert set(classes) <= known, f"{rule.type}: the model lacks {set(classes) - known}"


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_is_inside_the_longgang_grids(path: Path) -> None:
    shapely = pytest.importorskip("shapely.geometry")
    if not GRIDS.exists():
        pytest.skip("grid file not generated yet")
    cfg = load_config(path)
    features = json.loads(GRIDS.read_text(encoding="utf-8"))["features"]
    point = shapely.Point(cfg.geo.lon, cfg.geo.lat)
    assert any(shapely.shape(f["geometry"]).contains(point) for f in features)


def test_committed_schema_matches_the_models() -> None:
    assert (CONFIG_DIR / "schema.json").read_text(encoding="utf-8") == json_schema(), (
        "regenerate: edge-agent schema > firmware-configs/schema.json"
    )


def test_every_field_is_described() -> None:
    schema = DeviceConfig.model_json_schema()
    missing: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for name, prop in node.get("properties", {}).items():
                if "description" not in prop:
                    missing.append(f"{path}.{name}")
            for key, value in node.items():
                walk(value, f"{path}.{key}" if key != "properties" else path)
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    walk(schema, "")
    assert missing == []


BASE = CONFIG_DIR / "cam-fire-lane-01.yaml"


def mutated(tmp_path: Path, text_from: str, text_to: str, base: Path = BASE) -> Path:
    text = base.read_text(encoding="utf-8")
    assert text_from in text
    out = tmp_path / "device.yaml"
    out.write_text(text.replace(text_from, text_to, 1), encoding="utf-8")
    return out


def line_of(path: Path, needle: str) -> int:
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            return n
    raise AssertionError(needle)


# (text replaced, replacement, the key path the error must name, a line that must be named)
MISTAKES = [
    pytest.param(
        "    min_dwell_s: 60",
        "    min_dwel_s: 60",
        "rules.0.min_dwel_s",
        "min_dwel_s",
        id="unknown-key-in-rule",
    ),
    pytest.param(
        "  sample_fps: 2",
        "  sample_fps: 2\n  fps: 5",
        "camera.fps",
        "  fps: 5",
        id="unknown-key-in-section",
    ),
    pytest.param("  lat: 27.5612", "  lat: north", "geo.lat", "lat: north", id="not-a-number"),
    pytest.param("  lat: 27.5612", "  lat: 127.5", "geo.lat", "lat: 127.5", id="out-of-range"),
    pytest.param(
        "    zone: fire_lane", "    zone: lane", "rules.0.zone", "zone: lane", id="unknown-zone"
    ),
    pytest.param(
        "  - type: fire_lane_occupied",
        "  - type: fire_lane",
        "rules.0",
        "type: fire_lane",
        id="unknown-rule-type",
    ),
    pytest.param(
        "  device_id: cam-fire-lane-01",
        "  device_id: cam/fire",
        "device.device_id",
        "cam/fire",
        id="bad-device-id",
    ),
    pytest.param(
        "  password_env: CWG_PASSWORD_CAM_FIRE_LANE_01",
        "  password_env: X\n  password_file: /run/x",
        "credentials",
        "credentials:",
        id="two-password-sources",
    ),
    pytest.param(
        "  password_env: CWG_PASSWORD_CAM_FIRE_LANE_01",
        "  password: hunter2",
        "credentials.password",
        "password: hunter2",
        id="inline-password-refused",
    ),
    pytest.param("  kind: camera", "  kind: sensor", "camera", "camera:", id="kind-mismatch"),
    pytest.param(
        "  fire_lane: [[580, 60], [768, 60], [768, 140], [580, 140]]",
        "  fire_lane: [[580, 60], [768, 60]]",
        "zones.fire_lane",
        "fire_lane: [[",
        id="zone-too-few-points",
    ),
    pytest.param(
        "  topic_prefix: cwg",
        "  topic_prefix: cwg/#",
        "broker.topic_prefix",
        "topic_prefix",
        id="wildcard-prefix",
    ),
]


@pytest.mark.parametrize(("old", "new", "key", "line_text"), MISTAKES)
def test_mistake_names_key_path_and_line(
    tmp_path: Path, old: str, new: str, key: str, line_text: str
) -> None:
    path = mutated(tmp_path, old, new)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert any(p.startswith(f"{key} ") or p.startswith(f"{key}:") for p in problems), problems
    expected_line = line_of(path, line_text)
    assert any(f"(line {expected_line})" in p for p in problems), problems


def test_sensor_rule_must_name_a_sensor(tmp_path: Path) -> None:
    path = mutated(
        tmp_path, "    sensor: kitchen", "    sensor: hall", CONFIG_DIR / "sensor-gas-01.yaml"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith("rules.0.sensor (line ")


def test_hysteresis_must_be_below_the_limit(tmp_path: Path) -> None:
    path = mutated(
        tmp_path, "    off_below: 300", "    off_below: 900", CONFIG_DIR / "sensor-gas-01.yaml"
    )
    with pytest.raises(ConfigError, match="off_below"):
        load_config(path)


def test_unknown_time_zone(tmp_path: Path) -> None:
    path = mutated(
        tmp_path,
        "timezone: Asia/Shanghai}",
        "timezone: Mars/Olympus}",
        CONFIG_DIR / "cam-intrusion-01.yaml",
    )
    with pytest.raises(ConfigError, match=r"rules\.0\.active_hours\.timezone \(line 36\)"):
        load_config(path)


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("device: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_password_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(BASE)
    monkeypatch.delenv("CWG_PASSWORD_CAM_FIRE_LANE_01", raising=False)
    with pytest.raises(ConfigError, match="CWG_PASSWORD_CAM_FIRE_LANE_01"):
        cfg.credentials.password()
    monkeypatch.setenv("CWG_PASSWORD_CAM_FIRE_LANE_01", "s3cret")
    assert cfg.credentials.password() == "s3cret"
    secret = tmp_path / "pw"
    secret.write_text("from-file\n", encoding="utf-8")
    data = yaml.safe_load(BASE.read_text(encoding="utf-8"))
    data["credentials"] = {"username": "cam-fire-lane-01", "password_file": str(secret)}
    assert DeviceConfig.model_validate(data).credentials.password() == "from-file"


def test_validate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["validate", *map(str, SAMPLES)]) == 0
    assert capsys.readouterr().out.count(": ok") == len(SAMPLES)
    bad = mutated(tmp_path, "    min_dwell_s: 60", "    min_dwel_s: 60")
    assert cli_main(["validate", str(BASE), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "INVALID" in err
    assert "rules.0.min_dwel_s (line" in err


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("time,quantity,value\n0,x,1\n", "header"),
        ("timestamp,quantity,value\n", "no readings"),
        ("timestamp,quantity,value\n5,x,1\n2,x,1\n", "backwards"),
        ("timestamp,quantity,value\n0,x,loud\n", "row 2"),
        ("timestamp,quantity,value\n2026-11-23T10:00:00,x,1\n", "UTC offset"),
    ],
)
def test_bad_replay_files(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "r.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SensorSourceError, match=error):
        read_csv(path)


def test_replay_keeps_gaps_and_iso_times(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text(
        "# comment\ntimestamp,quantity,value\n"
        "2026-11-23T10:00:00+08:00,noise_db,50\n\n2026-11-23T10:00:30+08:00,noise_db,71.5\n",
        encoding="utf-8",
    )
    rows = read_csv(path)
    assert [(r.offset_s, r.quantity, r.value) for r in rows] == [
        (0.0, "noise_db", 50.0),
        (30.0, "noise_db", 71.5),
    ]
    sensor = CsvReplaySensor("mic", path, speed=300)  # 30 s of gap become 0.1 s
    stop = threading.Event()
    started = time.monotonic()
    samples = list(sensor.readings(stop))
    assert [s.value for s in samples] == [50.0, 71.5]
    assert 0.08 <= time.monotonic() - started < 2
    assert samples[1].ts - samples[0].ts == pytest.approx(0.1, abs=0.08)
