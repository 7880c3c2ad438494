"""Fuzzing ingest through a real broker into a real aggregator: payload strategies and the stack.

``alert_payloads()`` draws alert messages from the contract's JSON Schema
(``contract/schema/alert-v1.json``, read by a small schema-to-strategy translator: objects,
strings with patterns and lengths, bounded numbers, arrays, anyOf, enums, $ref), steered towards
messages the aggregator accepts (the topic's device id, a catalogue type, a recent time, a position
in the sample grids) and then, most of the time, mutated: random bytes, truncated JSON, deep
nesting, overflowing and huge numbers, NaN and Infinity tokens, extreme times with offsets, 1 MB
strings, unicode edge cases, duplicate keys, wrong types, garbage base64 snapshots.

``FuzzStack`` starts Mosquitto, the aggregator (its MQTT I/O in a child process, as in
production) and one device account, and ``send`` publishes one payload as that device and
returns what became of it, read from the device's feedback and the pool. Used by
``tests/aggregator/test_fuzz_ingest.py`` and ``scripts/fuzz_ingest.py``.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import queue
import shutil
import socket
import sqlite3
import tempfile
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.broker.launcher import BrokerSettings, MosquittoBroker
from aggregator.broker.registry import AccountRole, DeviceKind, DeviceRegistry
from aggregator.config import BatchSettings, MqttSettings, Settings
from aggregator.grids import GridIndex, default_grid_file
from aggregator.pool.sqlite import connect
from aggregator.service import Aggregator, build_aggregator
from contract import FeedbackV1, Outcome, default_catalogue, parse_feedback

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "contract" / "schema"
DEVICE = "fuzz-cam-01"
GRIDS = GridIndex.from_geojson(default_grid_file())
TYPES = sorted(default_catalogue().types)


# ---------------------------------------------------------------- JSON Schema → strategy

_I64 = (-(2**63), 2**63 - 1)


def from_schema(schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """A hypothesis strategy for values valid by ``schema`` (the subset pydantic emits)."""
    root = root or schema
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(root["$defs"][name], root))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, root) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        # unbounded integers come from RAW_NUMBERS: orjson writes no more than 64 bits
        return st.integers(schema.get("minimum", _I64[0]), schema.get("maximum", _I64[1]))
    if kind == "number":
        return st.floats(
            schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False
        )
    if kind == "string":
        return _string(schema)
    if kind == "array":
        if "prefixItems" in schema:
            return st.tuples(*(from_schema(s, root) for s in schema["prefixItems"])).map(list)
        return st.lists(
            from_schema(schema.get("items", {}), root),
            min_size=schema.get("minItems", 0),
            max_size=min(schema.get("maxItems", 4), 4),
        )
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        fixed = {k: from_schema(v, root) for k, v in props.items() if k in required}
        optional = {k: from_schema(v, root) for k, v in props.items() if k not in required}
        return st.fixed_dictionaries(fixed, optional=optional)
    # no type: any JSON value
    return json_values


def _string(schema: dict[str, Any]) -> Any:
    max_len = schema.get("maxLength", 40)
    if schema.get("format") == "date-time":
        return st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat())
    if "pattern" in schema:
        return st.from_regex(schema["pattern"], fullmatch=True).filter(lambda s: len(s) <= max_len)
    return st.text(max_size=min(max_len, 40))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(*_I64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def alert_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / "alert-v1.json").read_text("utf-8"))
    return schema


# ---------------------------------------------------------------- plausible alerts


def _inside() -> Any:
    points = []
    for community in GRIDS.communities()[:3]:
        for grid in GRIDS.by_prefix(community.code)[:3]:
            p = grid.polygon.representative_point()
            points.append((p.y, p.x))
    return st.sampled_from(points)


def _recent() -> Any:
    return st.integers(-86_400, 60).map(
        lambda s: (datetime.now(UTC) + timedelta(seconds=s)).isoformat()
    )


_ALERTS = from_schema(alert_schema())
_INSIDE = _inside()
_RECENT = _recent()
_IDS = itertools.count()
# a JPEG start and 600 kB of zeros: a snapshot over the 512 KiB limit
_BIG_JPEG = b'"' + base64.b64encode(b"\xff\xd8\xff" + b"\0" * 600_000) + b'"'


@st.composite
def plausible_alert(draw: Any) -> dict[str, Any]:
    """A schema-valid alert, its fields steered (each with some chance) towards acceptance."""
    d: dict[str, Any] = dict(draw(_ALERTS))
    if draw(st.integers(0, 9)) < 8:
        d["device_id"] = DEVICE
    if draw(st.integers(0, 9)) < 8:
        d["type"] = draw(st.sampled_from(TYPES))
    if draw(st.integers(0, 9)) < 8:
        d["observed_at"] = draw(_RECENT)
    if draw(st.integers(0, 9)) < 7:
        lat, lon = draw(_INSIDE)
        d["location"] = {**d.get("location", {}), "lat": lat, "lon": lon}
    if draw(st.integers(0, 9)) < 8:
        # unique per message, most of the time: hypothesis favours small draws, and ids that
        # repeat would turn most outcomes into duplicates
        d["alert_id"] = f"{DEVICE}-{next(_IDS)}"
    d.pop("snapshot", None)  # drawn below: a pattern-free base64 string is never a JPEG
    if draw(st.integers(0, 19)) == 0:
        d["snapshot"] = base64.b64encode(b"\xff\xd8\xff" + draw(st.binary(max_size=64))).decode()
    return d


# ---------------------------------------------------------------- mutations

RAW_NUMBERS = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1E+400",
    b"1e-400",
    b"9" * 400,
    b"-" + b"9" * 400,
    str(2**63).encode(),
    str(2**64).encode(),
    str(-(2**63) - 1).encode(),
    str(2**63 - 1).encode(),
    b"1.7976931348623157e308",
    b"0.1e309",
    b"123456789012345678901234567890.5",
]
EXTREME_TIMES = [
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "0001-01-01T00:59:59+00:59",
    "2026-02-29T00:00:00Z",
    "2026-01-01T24:00:00Z",
    "2026-01-01T00:00:00+24:00",
    "2026-01-01T00:00:00",
    "1970-01-01T00:00:00-23:59",
]
UNICODE = [
    b'"\\ud800"',
    b'"\\udfff\\ud800"',
    b'"a\\u0000b"',
    b'"\\u202eevil\\u202c"',
    '"\U0001f525火灾"'.encode(),
    b'"e\\u0301"',
    b'"\xed\xa0\x80"',  # a surrogate encoded in UTF-8: invalid UTF-8
    b'"\xff"',
    b'"\\uFFFF\\uFFFE"',
]
FIELDS = [
    "alert_id",
    "device_id",
    "seq",
    "type",
    "severity",
    "confidence",
    "observed_at",
    "description",
    "snapshot",
    "vendor",
]
WRONG_TYPES = [b"null", b"true", b"[]", b"{}", b'"7"', b"7", b"-1", b"0.5", b'""', b"[1,2]"]


def _raw_field(d: dict[str, Any], key: str, raw: bytes, where: str) -> bytes:
    """``d`` as JSON with ``key`` set to the raw JSON text ``raw`` at the top or inside
    ``location`` / ``evidence`` / ``evidence.objects[0]``."""
    marker = f"__raw_{uuid.uuid4().hex}__"
    d = json.loads(json.dumps(d))  # a deep copy
    if where == "top":
        d[key] = marker
    elif where == "location":
        d.setdefault("location", {})
        if not isinstance(d["location"], dict):
            d["location"] = {}
        d["location"][key] = marker
    elif where == "evidence":
        d["evidence"] = {"detector": "x", key: marker}
    else:
        d["evidence"] = {"objects": [{"cls": "car", "score": 0.5, key: marker}]}
    return orjson.dumps(d).replace(orjson.dumps(marker), raw)


@st.composite
def alert_payloads(draw: Any) -> bytes:
    """One payload: a plausible alert, and most of the time one mutation of it."""
    d = draw(plausible_alert())
    kind = draw(
        st.sampled_from(
            [
                "none",
                "none",
                "bytes",
                "truncate",
                "nest",
                "number",
                "time",
                "big_string",
                "unicode",
                "duplicate_key",
                "wrong_type",
                "snapshot",
            ]
        )
    )
    where = draw(st.sampled_from(["top", "location", "evidence", "object"]))
    if kind == "bytes":
        return bytes(draw(st.binary(max_size=300)))
    if kind == "truncate":
        raw = orjson.dumps(d)
        return raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    if kind == "nest":
        depth = draw(st.sampled_from([10, 100, 199, 200, 201, 255, 256, 1000, 5000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return _raw_field(d, "vendor", opener * depth + b"1" + closer * depth, where)
    if kind == "number":
        key = draw(st.sampled_from(["lat", "lon", "seq", "confidence", "score", "track_id", "x"]))
        return _raw_field(d, key, draw(st.sampled_from(RAW_NUMBERS)), where)
    if kind == "time":
        d["observed_at"] = draw(st.sampled_from(EXTREME_TIMES))
        return orjson.dumps(d)
    if kind == "big_string":
        key = draw(st.sampled_from(["description", "vendor", "alert_id"]))
        size = draw(st.sampled_from([1000, 1001, 100_000, 1_000_000, 1_100_000]))
        unit = draw(st.sampled_from([b"x", b"\\u00e9"]))
        # ``size`` bytes of JSON text: within the broker's packet limit, around the aggregator's
        text = unit * (size // len(unit))
        return _raw_field(d, key, b'"' + text + b'"', where)
    if kind == "unicode":
        key = draw(st.sampled_from([*FIELDS, "unicode_key"]))
        edge: bytes = draw(st.sampled_from(UNICODE))
        if key == "unicode_key":  # the edge case as a key name
            return orjson.dumps(d)[:-1] + b"," + edge + b":1}"
        return _raw_field(d, key, edge, where)
    if kind == "duplicate_key":
        key = draw(st.sampled_from(FIELDS))
        value = draw(st.sampled_from([*WRONG_TYPES, *RAW_NUMBERS[:4]]))
        raw = orjson.dumps(d)
        first = draw(st.booleans())
        dup = b'"%s":%s' % (key.encode(), value)
        return (b"{" + dup + b"," + raw[1:]) if first else (raw[:-1] + b"," + dup + b"}")
    if kind == "wrong_type":
        key = draw(st.sampled_from([*FIELDS, "location", "evidence", "lat", "objects"]))
        return _raw_field(d, key, draw(st.sampled_from(WRONG_TYPES)), where)
    if kind == "snapshot":
        garbage = draw(
            st.sampled_from(
                [
                    b'"not base64!"',
                    b'"QUJD"',  # base64 of ABC: not a JPEG
                    b'"/9j/"',  # base64 of a JPEG start, cut short
                    b'"/9j/4A=="',
                    b'"/9j/4A="',  # bad padding
                    _BIG_JPEG,
                    b'"' + b"A" * 700_001 + b'"',
                    b'"\\/9j\\/4A=="',  # escaped slashes
                ]
            )
        )
        return _raw_field(d, "snapshot", garbage, "top")
    return orjson.dumps(d)


# ---------------------------------------------------------------- the stack


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    sent: int = 0


class FuzzStack:
    """Mosquitto, the aggregator and one device account on loopback, in a throw-away directory.

    ``send`` publishes a payload as the device (QoS 1) and returns the feedback about it, after
    checking that the message ended as exactly one alert row, out-of-area row or dead letter."""

    def __init__(self, root: Path | None = None, *, linger_ms: float = 1) -> None:
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="cwg-fuzz-"))
        registry = DeviceRegistry(self.root / "registry.yaml")
        _, agg_password = registry.add_account("aggregator", AccountRole.AGGREGATOR)
        _, self._device_password = registry.add_device(DEVICE, DeviceKind.CAMERA, "fuzz camera")
        registry.save()
        self.broker = MosquittoBroker(BrokerSettings(state_dir=self.root / "state"), registry)
        self.broker.start()
        self.topics = self.broker.topics
        self.settings = Settings(
            data_dir=self.root / "agg",
            mqtt=MqttSettings(
                host=self.broker.host,
                port=self.broker.port,
                password=agg_password,
                client_id=f"agg-{uuid.uuid4().hex[:8]}",
                topic_prefix=self.broker.settings.topic_prefix,
            ),
            batch=BatchSettings(max_messages=200, min_messages=1, linger_ms=linger_ms),
        )
        self.aggregator: Aggregator = build_aggregator(self.settings, grids=GRIDS)
        self.aggregator.start()
        if not self.aggregator.ingest.wait_connected(10):
            self.close()
            raise RuntimeError("the aggregator did not connect to the fuzz broker")
        self.feedback: queue.Queue[FeedbackV1] = queue.Queue()
        self.client = self._device_client()
        self.db = connect(self.settings.pool, readonly=True)
        self.tally = Tally()
        self._pending: deque[bytes] = deque()

    def _device_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5,
            client_id=DEVICE,  # a device may connect only under its own id
        )
        client.username_pw_set(DEVICE, self._device_password)
        client.on_message = self._on_feedback
        client.connect(self.broker.host, self.broker.port)
        # one message at a time: Nagle would hold each small publish for the delayed ACK
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.loop_start()
        result, _ = client.subscribe(self.topics.feedback(DEVICE), qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS, result
        return client

    def _on_feedback(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        for fb in parse_feedback(message.payload):
            self.feedback.put(fb)

    def io_restarts(self) -> int:
        transport = self.aggregator.ingest._transport
        return int(transport._incarnation) - 1  # type: ignore[attr-defined]

    def send(self, payload: bytes, timeout: float = 20.0) -> FeedbackV1:
        """Publish ``payload`` as the device; its feedback, once its row is checked."""
        self.drain(timeout)
        self.submit(payload, window=1)
        return self.settle(timeout)

    def submit(self, payload: bytes, window: int = 0, timeout: float = 20.0) -> None:
        """Publish ``payload`` as the device; then, while more than ``window`` messages await
        their feedback, settle the oldest. A window keeps messages flowing (a round trip is
        mostly waiting) while every one is still checked, in order: a device's feedback comes
        in the order its messages arrived."""
        info = self.client.publish(self.topics.alert(DEVICE), payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        self._pending.append(payload)
        while len(self._pending) > window:
            self.settle(timeout)

    def drain(self, timeout: float = 20.0) -> None:
        while self._pending:
            self.settle(timeout)

    def settle(self, timeout: float = 20.0) -> FeedbackV1:
        """Wait for the oldest pending message's feedback and check what became of it."""
        payload = self._pending.popleft()
        try:
            fb = self.feedback.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no feedback within {timeout} s for a payload of {len(payload)} bytes: "
                f"{payload[:300]!r}"
            ) from None
        self.tally.sent += 1
        self.tally.outcomes[fb.outcome.value] += 1
        try:
            if fb.alert_id is not None:  # the feedback is about this message
                assert fb.alert_id.encode() in payload, (fb.alert_id, "not in the payload")
            self.check(fb, payload)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; feedback {fb!r}; payload {payload[:300]!r}") from exc
        return fb

    def check(self, fb: FeedbackV1, payload: bytes) -> None:
        """The message ended as exactly one row of the kind its feedback names."""
        db = self.db
        if fb.outcome is Outcome.REJECTED:
            assert fb.reason is not None, fb
            assert fb.dead_letter_id is not None, fb
            self.tally.reasons[fb.reason.value] += 1
            row = db.execute(
                "SELECT reason, detail FROM dead_letters WHERE id=?", (fb.dead_letter_id,)
            ).fetchone()
            assert row is not None, fb
            assert row[0] == fb.reason.value
            assert row[1], "a dead letter without a detail"
            assert fb.reason.value != "internal_error", (fb.detail, payload[:300])
            if fb.alert_id is not None:  # a rejected alert is not also pooled
                assert _one(db, "SELECT COUNT(*) FROM alerts WHERE alert_id=?", fb.alert_id) in (
                    0,
                    1,  # an earlier example with this id may have been accepted
                )
        elif fb.outcome is Outcome.OUT_OF_AREA:
            assert _one(db, "SELECT COUNT(*) FROM out_of_area WHERE alert_id=?", fb.alert_id) == 1
        else:
            assert fb.outcome in (Outcome.ACCEPTED, Outcome.MERGED, Outcome.DUPLICATE), fb
            assert _one(db, "SELECT COUNT(*) FROM alerts WHERE alert_id=?", fb.alert_id) == 1

    def close(self) -> None:
        steps = []
        if hasattr(self, "client"):
            steps += [self.client.disconnect, self.client.loop_stop, self.db.close]
        steps += [self.aggregator.stop, self.broker.stop]
        for step in steps:
            try:
                step()
            except Exception:  # tear down as much as there is
                logging.getLogger(__name__).warning(
                    "fuzz stack teardown step failed", exc_info=True
                )
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


def _one(db: sqlite3.Connection, sql: str, *params: Any) -> int:
    return int(db.execute(sql, params).fetchone()[0])
