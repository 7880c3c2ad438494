"""CPU per alert of the ingest worker's stages, without MQTT: decode+geo-tag (``assemble``),
the pool transaction (``commit_batch``), and the feedback and notices built after it.

Builds the aggregator exactly as ``gateway run`` does (``build_aggregator``, a real SQLite
file in a temporary directory), feeds it batches of valid alerts rendered by the load
generator's templates (the stream ``bench/bench_ingest.py`` sends), and prints µs per alert of
each stage, with the cost of only parsing the same JSON (``orjson.loads``) measured in the same
run as the baseline. Runs twice in one process: with Python's default garbage-collector
thresholds, then with the aggregator's (``aggregator.gctune.tune_gc``).

    python bench/bench_pipeline.py [--alerts 100000] [--batch 1000] [--devices 8]
        [--compare-devices 64,5000]

``--compare-devices`` measures the writer's stages for each fleet size in one run (CPU time of
the writer's thread, so a busy machine inflates it little; tuned GC,
alerts validated by the MQTT I/O loop's ``Prevalidator`` first, as in the service, so the
assemble stage is what the writer does), with events created per 1,000 alerts and devices per
batch: a city's fleet (one alert per device per batch) against a few busy devices.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

from aggregator.config import BatchSettings, MqttSettings, Settings
from aggregator.gctune import tune_gc
from aggregator.grids import GridIndex, default_grid_file
from aggregator.ingest.assemble import Inbound, Prevalidator
from aggregator.service import build_aggregator
from contract import Topics, load_catalogue
from simulators.loadgen import build_templates, machine_description, render, stamp_now

STAGES = (
    "parse only (orjson.loads)",
    "assemble (decode, geo-tag)",
    "commit_batch (dedup, SQL)",
    "feedback + notices",
)


def measure(
    args: argparse.Namespace, tuned_gc: bool, prevalidated: bool = False
) -> dict[str, float]:
    """Median µs per alert of each stage, on a fresh aggregator in a temporary directory; with
    ``prevalidated``, alerts come validated by the I/O loop (its cost is a stage of its own),
    and the counts of events created and devices per batch are added."""
    grids = GridIndex.from_geojson(default_grid_file())
    catalogue = load_catalogue()
    rng = random.Random(args.seed)
    devices = [f"cam-{i:03d}" for i in range(args.devices)]
    templates = {d: build_templates(d, 64, rng, grids, catalogue, snapshot=False) for d in devices}
    topics = Topics("cwg")
    stages: dict[str, list[float]] = {name: [] for name in (PREVALIDATE, *STAGES)}
    created = 0
    devices_per_batch: list[int] = []
    gc.unfreeze()
    gc.set_threshold(*DEFAULT_GC)
    with tempfile.TemporaryDirectory(prefix="cwg-bench-pipeline-") as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            mqtt=MqttSettings(client_id="bench"),
            batch=BatchSettings(max_messages=args.batch),
        )
        agg = build_aggregator(settings, grids=grids)
        if tuned_gc:
            tune_gc()  # what Aggregator.start() does
        ingest, pipeline, pool = agg.ingest, agg.ingest.pipeline, agg.pool
        checker = Prevalidator(pipeline.topics, pipeline.catalogue, pipeline.limits)
        # Comparing fleets: this thread's CPU time, which other processes on a busy machine
        # do not inflate (SQLite's waits for the disk are not counted: a ceiling on CPU only).
        clock = time.thread_time if prevalidated else time.perf_counter
        seq = 0
        deadline = time.monotonic() + 600
        while seq < args.alerts and time.monotonic() < deadline:
            n = min(args.batch, args.alerts - seq)
            stamp = stamp_now()
            batch = []
            for _ in range(n):
                seq += 1
                device = devices[seq % len(devices)]
                payload = render(templates[device][seq % 64], f"bench-{device}-{seq}", seq, stamp)
                batch.append(Inbound(topics.alert(device), payload, time.time(), seq % 65535, 1))
            tp = clock()
            if prevalidated:
                now = datetime.now(UTC)
                for m in batch:
                    m.pre = checker.check(m.topic, m.payload, now)
            t0 = clock()
            for m in batch:
                orjson.loads(m.payload)
            t1 = clock()
            assembled = pipeline.assemble(batch)
            t2 = clock()
            result = pool.commit_batch(assembled.batch)
            t3 = clock()
            ingest._feedback(result, assembled)
            ingest._notices(result)
            t4 = clock()
            stages[PREVALIDATE].append((t0 - tp) / n * 1e6)
            for name, t in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                stages[name].append(t / n * 1e6)
            created += len(result.created)
            devices_per_batch.append(len(assembled.batch.seen))
        agg.pool.close()
    out = {name: statistics.median(values) for name, values in stages.items()}
    out[CREATED] = created / max(seq, 1) * 1000
    out[DEVICES] = statistics.median(devices_per_batch) if devices_per_batch else 0.0
    return out


DEFAULT_GC = gc.get_threshold()
PREVALIDATE = "I/O loop: prevalidate"
CREATED = "events created per 1,000 alerts"
DEVICES = "devices per batch (median)"


def compare_devices(args: argparse.Namespace, counts: list[int]) -> int:
    """The writer's stages side by side for each fleet size (tuned GC, prevalidated)."""
    runs = {}
    for count in counts:
        args.devices = count
        runs[count] = measure(args, tuned_gc=True, prevalidated=True)
    header = "".join(f"{f'{c:,} devices':>15s}" for c in counts)
    print(f"  {'CPU µs per alert':34s}{header}")
    for name in (PREVALIDATE, *STAGES[1:]):
        print(f"  {name:34s}" + "".join(f"{runs[c][name]:15.1f}" for c in counts))
    totals = {c: sum(runs[c][name] for name in STAGES[1:]) for c in counts}
    print(f"  {'writer total':34s}" + "".join(f"{totals[c]:15.1f}" for c in counts))
    for name in (CREATED, DEVICES):
        print(f"  {name:34s}" + "".join(f"{runs[c][name]:15.0f}" for c in counts))
    base = counts[0]
    for c in counts[1:]:
        print(
            f"  writer cost with {c:,} devices: {totals[c] / totals[base]:.2f}× that with "
            f"{base:,} ({1e6 / totals[c]:,.0f} against {1e6 / totals[base]:,.0f} alerts/s on one "
            "core)"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=100_000, help="alerts per run (≤ 1,000,000)")
    parser.add_argument("--batch", type=int, default=1000, help="alerts per transaction")
    parser.add_argument("--devices", type=int, default=8, help="devices the alerts come from")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--compare-devices",
        default=None,
        help="comma-separated fleet sizes (e.g. 64,5000): the writer's stages for each",
    )
    args = parser.parse_args()
    if not 1 <= args.alerts <= 1_000_000 or not 1 <= args.batch <= 20_000:
        parser.error("--alerts must be 1..1,000,000 and --batch 1..20,000")
    if args.compare_devices:
        counts = [int(c) for c in args.compare_devices.split(",")]
        if len(counts) < 2 or not all(1 <= c <= 20_000 for c in counts):
            parser.error("--compare-devices takes two or more sizes of 1..20,000")
        machine = machine_description()
        print(f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}")
        print(f"{args.alerts:,} alerts in batches of {args.batch:,} for each fleet size")
        return compare_devices(args, counts)

    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}")
    print(
        f"{args.alerts:,} alerts from {args.devices} devices in batches of {args.batch:,}, twice:"
    )
    print(f"Python's default GC thresholds {DEFAULT_GC}, then the aggregator's (tune_gc)")
    runs = {"default GC": measure(args, tuned_gc=False), "tuned GC": measure(args, tuned_gc=True)}
    parse = runs["default GC"][STAGES[0]]
    print(f"  {'µs per alert':30s} {'default GC':>11s} {'tuned GC':>11s}")
    for name in STAGES:
        print(f"  {name:30s} {runs['default GC'][name]:11.1f} {runs['tuned GC'][name]:11.1f}")
    totals = {k: sum(v[name] for name in STAGES[1:]) for k, v in runs.items()}
    print(f"  {'worker total':30s} {totals['default GC']:11.1f} {totals['tuned GC']:11.1f}")
    for k, total in totals.items():
        print(
            f"  {k}: {1e6 / total:,.0f} alerts/s on one core, {total / parse:.1f}× the cost of "
            "only parsing the JSON"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
