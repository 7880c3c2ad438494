"""A small bounded load run through the real broker: zero loss and sane latency figures."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from aggregator.geo import GridIndex, default_grid_file
from contract import AlertV1, default_catalogue
from simulators.loadgen import LoadConfig, build_templates, percentiles, render, run_load, stamp_now
from simulators.stack import GatewayStack


def test_templates_render_valid_unique_alerts() -> None:
    templates = build_templates(
        "dev-1",
        8,
        random.Random(1),
        GridIndex.from_geojson(default_grid_file()),
        default_catalogue(),
        snapshot=True,
    )
    alerts = [
        AlertV1.model_validate_json(render(t, f"run-dev-1-{i}", i, stamp_now()), strict=True)
        for i, t in enumerate(templates)
    ]
    assert [a.alert_id for a in alerts] == [f"run-dev-1-{i}" for i in range(8)]
    assert [a.seq for a in alerts] == list(range(8))
    assert all(a.snapshot_bytes() for a in alerts)
    assert len({a.type for a in alerts}) > 1


def test_load_is_always_bounded() -> None:
    with pytest.raises(ValidationError, match="always bounded"):
        LoadConfig(rate=100)
    assert LoadConfig(rate=100, duration_s=3, count=1000).total == 300


def test_percentiles() -> None:
    p = percentiles([i / 1000 for i in range(1, 101)])
    assert p["p50"] == pytest.approx(50)
    assert p["p99"] == pytest.approx(99)
    assert p["max"] == pytest.approx(100)


@pytest.mark.parametrize(
    ("mode", "publishers"), [("mosquitto_pub", None), ("paho", None), ("paho", 5)]
)
def test_small_run_has_zero_loss(
    gateway_stack: GatewayStack, mode: str, publishers: int | None
) -> None:
    # 5 paho publishers: one worker process serves 3 clients on its loop, the other 2
    report = run_load(
        LoadConfig(rate=1000, count=2000, mode=mode, publishers=publishers),
        gateway_stack,
        gateway_stack.pool_path,
    )
    assert report.publishers == (publishers or 2)
    assert report.errors == []
    assert report.sent == report.pooled == 2000
    assert report.zero_loss
    lat = report.latency_ms
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 10_000
    assert 500 < report.send_rate < 1500
    assert report.ingest_rate > 300
    summary = report.summary()
    assert "ZERO LOSS" in summary
    assert "p99" in summary
