"""Device configuration (one YAML file per device in ``firmware-configs/``).

Every model refuses unknown keys and describes every field; ``load_config`` reports a bad file
as ``key.path (line N): message`` so that an installer can find the mistake. Secrets never sit
in the file: the MQTT password comes from an environment variable or a file reference.
"""

from __future__ import annotations

import json
import os
from datetime import time
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contract import Severity
from contract.messages import DEVICE_ID_PATTERN
from edge.detector import DetectorConfig

CAMERA_RULE_TYPES = ("fire_lane_occupied", "ebike_in_lift", "crowd_gathering", "zone_intrusion")
SENSOR_RULE_TYPES = (
    "smoke_alarm",
    "water_level",
    "gas_leak",
    "noise_over_limit",
    "manhole_displaced",
    "sewage_discharge",
)


class ConfigError(Exception):
    """A device configuration file that cannot be read or does not validate."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Identity(_Strict):
    device_id: str = Field(pattern=DEVICE_ID_PATTERN, description="unique device id, topic-safe")
    kind: Literal["camera", "sensor", "hub"] = Field(
        description="camera: video AI; sensor: one IoT sensor; hub: several sensors"
    )
    description: str = Field(default="", max_length=200, description="where it is, for people")


class Credentials(_Strict):
    username: str = Field(min_length=1, description="MQTT user name; by convention the device id")
    password_env: str | None = Field(
        default=None, description="name of the environment variable holding the MQTT password"
    )
    password_file: str | None = Field(
        default=None, description="path of a file whose content (stripped) is the MQTT password"
    )

    @model_validator(mode="after")
    def _one_source(self) -> Credentials:
        if self.password_env and self.password_file:
            raise ValueError("give password_env or password_file, not both")
        return self

    def password(self) -> str | None:
        """Resolve the password now; raises ConfigError naming the missing variable or file."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(
                    "credentials.password_env",
                    [f"environment variable {self.password_env} is not set"],
                )
            return value
        if self.password_file:
            try:
                return Path(self.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError("credentials.password_file", [str(exc)]) from exc
        return None


class Tls(_Strict):
    ca_file: str = Field(description="PEM file of the CA that signed the broker's certificate")
    cert_file: str | None = Field(default=None, description="client certificate (mutual TLS)")
    key_file: str | None = Field(default=None, description="client private key (mutual TLS)")


class Broker(_Strict):
    host: str = Field(default="127.0.0.1", description="MQTT broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="MQTT broker port")
    tls: Tls | None = Field(default=None, description="TLS settings; absent means plain TCP")
    topic_prefix: str = Field(default="cwg", description="first level of every contract topic")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keep-alive, seconds")
    reconnect_min_s: float = Field(
        default=0.5, gt=0, le=60, description="first reconnect delay; grows, randomized"
    )
    reconnect_max_s: float = Field(
        default=2.0,
        gt=0,
        le=600,
        description="largest reconnect delay, seconds; small, so the device is back within a "
        "few seconds of the broker (the jitter still spreads a fleet's reconnects)",
    )
    max_inflight: int = Field(
        default=1000, ge=1, le=10_000, description="alerts published but not yet acknowledged"
    )
    max_payload_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="a larger alert is sent without its snapshot; keep at or below the broker's "
        "message size limit (Mosquitto answers an oversized message with a reason code paho "
        "cannot read and the connection drops)",
    )

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "+#") or value.endswith("/"):
            raise ValueError("no wildcards (+ #) and no trailing '/'")
        return value


class Geo(_Strict):
    lat: float = Field(ge=-90, le=90, description="WGS-84 latitude of the device, degrees")
    lon: float = Field(ge=-180, le=180, description="WGS-84 longitude of the device, degrees")
    floor: int | None = Field(default=None, ge=-10, le=200, description="building floor")
    accuracy_m: float | None = Field(default=None, ge=0, description="position accuracy, metres")
    homography: (
        tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]
        | None
    ) = Field(
        default=None,
        description="3×3 matrix mapping image pixels (x, y) to ground (lon, lat); "
        "absent: every alert carries the device position",
    )


Polygon = Annotated[
    list[tuple[float, float]],
    Field(min_length=3, description="polygon vertices (x, y) in image pixels"),
]


class CameraSource(_Strict):
    url: str = Field(description="video file path, rtsp:// or http:// (MJPEG) URL, or device index")
    sample_fps: float = Field(
        default=5.0, gt=0, le=60, description="frames per second handed to the detector"
    )
    detector: DetectorConfig = Field(description="which model detects objects, and thresholds")
    snapshot_max_bytes: int = Field(
        default=200_000, ge=10_000, le=512 * 1024, description="cap of the alert's JPEG snapshot"
    )
    loop: bool = Field(default=False, description="start a video file again at its end (demos)")
    realtime: bool = Field(
        default=True,
        description="pace file sources at their frame rate; false reads as fast as detection runs",
    )
    queue_frames: int = Field(
        default=4, ge=1, le=100, description="frames waiting for detection; oldest dropped beyond"
    )


class CsvSource(_Strict):
    type: Literal["csv"] = Field(description="replay of a CSV file: timestamp,quantity,value")
    path: str = Field(description="CSV file; relative paths are relative to this config file")
    speed: float = Field(
        default=1.0, gt=0, description="replay speed; 0 gaps are kept; 10 = ten times faster"
    )
    loop: bool = Field(default=False, description="start again at the end of the file")


class SensorConfig(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="sensor name in rules")
    kind: Literal["smoke", "water_level", "gas", "noise", "manhole_tilt", "turbidity"] = Field(
        description="what the sensor measures"
    )
    source: CsvSource = Field(description="where readings come from")
    unit: str = Field(max_length=16, description="unit of the readings, e.g. dB, m, ppm, deg")


class _RuleBase(_Strict):
    name: str | None = Field(default=None, description="rule name in logs; default: the type")
    severity: Severity | None = Field(
        default=None, description="override of the catalogue's default severity"
    )
    cooldown_s: float = Field(
        default=300, ge=0, description="after an alert, the same object/zone stays quiet this long"
    )
    description: str = Field(default="", max_length=200, description="alert text, for people")


class _CameraRuleBase(_RuleBase):
    zone: str = Field(description="name of a zone in `zones`")
    min_score: float = Field(default=0.0, ge=0, le=1, description="ignore weaker detections")


class FireLaneRule(_CameraRuleBase):
    type: Literal["fire_lane_occupied"] = Field(description="vehicle parked in a fire lane")
    classes: list[str] = Field(
        default=["car", "truck", "bus", "motorcycle"], min_length=1, description="vehicle classes"
    )
    min_dwell_s: float = Field(default=60, ge=0, description="seconds in the lane before alerting")
    cooldown_scope: Literal["object", "zone"] = Field(
        default="object", description="cooldown per tracked vehicle, or per zone"
    )


class EbikeInLiftRule(_CameraRuleBase):
    type: Literal["ebike_in_lift"] = Field(description="two-wheeler inside a lift car")
    classes: list[str] = Field(
        default=["bicycle", "motorcycle"], min_length=1, description="two-wheeler classes"
    )
    min_dwell_s: float = Field(default=1.0, ge=0, description="seconds seen before alerting")
    cooldown_scope: Literal["object", "zone"] = Field(
        default="zone", description="cooldown per tracked object, or per zone"
    )


class CrowdRule(_CameraRuleBase):
    type: Literal["crowd_gathering"] = Field(description="many people in a zone for a while")
    min_count: int = Field(ge=2, description="people in the zone at once")
    min_duration_s: float = Field(default=30, ge=0, description="seconds the count must hold")


class ActiveHours(_Strict):
    start: time = Field(description="local time the window opens, HH:MM")
    end: time = Field(description="local time it closes; earlier than start crosses midnight")
    timezone: str = Field(default="Asia/Shanghai", description="IANA time zone of the window")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}; e.g. Asia/Shanghai") from exc
        return value


class IntrusionRule(_CameraRuleBase):
    type: Literal["zone_intrusion"] = Field(description="person inside a restricted zone")
    classes: list[str] = Field(default=["person"], min_length=1, description="intruder classes")
    min_dwell_s: float = Field(default=0, ge=0, description="seconds inside before alerting")
    active_hours: ActiveHours | None = Field(
        default=None, description="only within this daily window; absent: always"
    )
    cooldown_scope: Literal["object", "zone"] = Field(
        default="zone", description="cooldown per tracked person, or per zone"
    )


class ThresholdRule(_RuleBase):
    type: Literal[
        "smoke_alarm",
        "water_level",
        "gas_leak",
        "noise_over_limit",
        "manhole_displaced",
        "sewage_discharge",
    ] = Field(description="warning type raised when the sensor's value crosses the limit")
    sensor: str = Field(description="name of a sensor in `sensors`")
    quantity: str = Field(description="quantity of the readings, e.g. noise_db, gas_ppm")
    on_at: float = Field(description="alert when the value is at or above this")
    off_below: float | None = Field(
        default=None, description="re-arm only below this (hysteresis); default: on_at"
    )
    hold_s: float = Field(
        default=0, ge=0, description="debounce: the value must stay over the limit this long"
    )
    repeat_s: float | None = Field(
        default=None, gt=0, description="while still over the limit, alert again this often"
    )
    confidence: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="fixed alert confidence (e.g. a certified alarm contact); default: grows "
        "from 0.6 at the limit with the distance past it",
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> ThresholdRule:
        if self.off_below is not None and self.off_below > self.on_at:
            raise ValueError(f"off_below ({self.off_below}) must not exceed on_at ({self.on_at})")
        return self


RuleConfig = Annotated[
    FireLaneRule | EbikeInLiftRule | CrowdRule | IntrusionRule | ThresholdRule,
    Field(discriminator="type"),
]


class OutboxConfig(_Strict):
    path: str | None = Field(
        default=None,
        description="SQLite file of undelivered alerts, relative to the agent's state directory; "
        "default <device_id>.outbox.db",
    )
    max_rows: int = Field(default=10_000, ge=1, description="undelivered alerts kept at most")
    max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="bytes of undelivered alerts kept at most"
    )
    feedback_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="an alert the broker acknowledged but the aggregator has not answered for "
        "within this time is published again (same alert_id); the wait doubles with each "
        "resend of the same alert, up to 8 times this",
    )


class HeartbeatConfig(_Strict):
    interval_s: float = Field(default=30, gt=0, le=3600, description="status heartbeat period")
    telemetry_interval_s: float = Field(
        default=10, gt=0, le=3600, description="sensor telemetry batch period"
    )


class DeviceConfig(_Strict):
    """One edge device: who it is, where it is, what it watches, and where it reports."""

    schema_version: Literal[1] = Field(default=1, description="version of this file format")
    device: Identity = Field(description="identity of the device")
    credentials: Credentials = Field(description="MQTT credentials (password by reference)")
    broker: Broker = Field(default_factory=Broker, description="MQTT broker")
    geo: Geo = Field(description="where the device is")
    camera: CameraSource | None = Field(default=None, description="video source and detector")
    sensors: list[SensorConfig] = Field(default_factory=list, description="sensor sources")
    zones: dict[str, Polygon] = Field(default_factory=dict, description="zone name → polygon")
    rules: list[RuleConfig] = Field(default_factory=list, description="warning rules")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="alert outbox")
    heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig, description="health")

    @model_validator(mode="after")
    def _consistent(self) -> DeviceConfig:
        kind = self.device.kind
        if kind == "camera" and self.camera is None:
            raise KeyPathError(("camera",), "device.kind is camera but there is no camera section")
        if kind != "camera" and self.camera is not None:
            raise KeyPathError(("camera",), f"device.kind is {kind}: remove the camera section")
        if kind in ("sensor", "hub") and not self.sensors:
            raise KeyPathError(("sensors",), f"device.kind is {kind} but sensors is empty")
        if kind == "sensor" and len(self.sensors) > 1:
            raise KeyPathError(
                ("sensors",), "device.kind sensor has exactly one sensor; use kind hub for more"
            )
        names = [s.name for s in self.sensors]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise KeyPathError(("sensors", i, "name"), f"sensor name {name!r} is used twice")
        if not self.rules:
            raise KeyPathError(("rules",), "no rules: the device would never raise an alert")
        for i, rule in enumerate(self.rules):
            if isinstance(rule, ThresholdRule):
                if rule.sensor not in names:
                    raise KeyPathError(
                        ("rules", i, "sensor"), f"no sensor named {rule.sensor!r}; known: {names}"
                    )
            else:
                if self.camera is None:
                    raise KeyPathError(("rules", i, "type"), f"a {rule.type} rule needs a camera")
                if rule.zone not in self.zones:
                    raise KeyPathError(
                        ("rules", i, "zone"),
                        f"no zone named {rule.zone!r}; known: {sorted(self.zones)}",
                    )
        return self


class KeyPathError(ValueError):
    """A cross-field mistake that knows which key it is about."""

    def __init__(self, loc: tuple[int | str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def _key_line(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest YAML node on ``loc`` (pydantic's error location)."""
    node = root
    line = None if node is None else node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _format_loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def validate_data(
    data: Any, *, source: str = "<config>", root: yaml.Node | None = None
) -> DeviceConfig:
    try:
        return DeviceConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            origin = err.get("ctx", {}).get("error")
            if isinstance(origin, KeyPathError):
                line = _key_line(root, origin.loc)
                where = _format_loc(origin.loc) + (f" (line {line})" if line else "")
                problems.append(f"{where}: {origin.message}")
                continue
            # pydantic puts the union member's tag into the path (rules.0.zone_intrusion.zone);
            # the document has no such key, so it is left out of the path a person reads.
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _RULE_TAGS))
            line = _key_line(root, loc)
            where = _format_loc(loc) + (f" (line {line})" if line else "")
            problems.append(f"{where}: {err['msg']}")
        raise ConfigError(source, problems) from exc


_RULE_TAGS = frozenset(CAMERA_RULE_TYPES + SENSOR_RULE_TYPES)


def load_config(path: Path | str) -> DeviceConfig:
    """Read and validate one device file; ConfigError names the key path and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(p, [str(exc)]) from exc
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(p, [f"not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError(p, ["(top level) (line 1): expected a mapping of sections"])
    cfg = validate_data(data, source=str(p), root=root)
    return _resolve_paths(cfg, p.parent)


def _resolve_paths(cfg: DeviceConfig, base: Path) -> DeviceConfig:
    """CSV replay files are named relative to the config file that names them."""
    sensors = [
        s.model_copy(
            update={"source": s.source.model_copy(update={"path": str(base / s.source.path)})}
        )
        if not Path(s.source.path).is_absolute()
        else s
        for s in cfg.sensors
    ]
    return cfg.model_copy(update={"sensors": sensors})


def json_schema() -> str:
    return json.dumps(DeviceConfig.model_json_schema(), indent=2, ensure_ascii=False) + "\n"
