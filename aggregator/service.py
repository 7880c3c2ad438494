"""The aggregator, composed: read ``build_aggregator`` top to bottom to see the whole service."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from aggregator.config import Settings
from aggregator.fanout.metrics import Metrics
from aggregator.gctune import tune_gc
from aggregator.grids import GridIndex, default_grid_file
from aggregator.ingest.assemble import Pipeline
from aggregator.ingest.decode import DecodeLimits
from aggregator.ingest.worker import BatchSink, MqttIngest
from aggregator.pool.snapshots import SnapshotStore
from aggregator.pool.sqlite import EventPool
from contract import Catalogue, Topics, load_catalogue

log = logging.getLogger(__name__)


@dataclass
class Aggregator:
    settings: Settings
    catalogue: Catalogue
    grids: GridIndex
    pool: EventPool
    snapshots: SnapshotStore
    metrics: Metrics
    ingest: MqttIngest
    sinks: list[BatchSink] = field(default_factory=list)

    def start(self) -> None:
        tune_gc()
        self.ingest.start()

    def stop(self) -> None:
        self.ingest.stop()
        self.pool.close()

    def __enter__(self) -> Aggregator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_aggregator(
    settings: Settings,
    *,
    sinks: Sequence[BatchSink] = (),
    metrics: Metrics | None = None,
    grids: GridIndex | None = None,
) -> Aggregator:
    """Validate every input, open the pool, wire the stages. Nothing connects until start()."""
    catalogue = load_catalogue(settings.catalogue_file)
    grids = grids or GridIndex.from_geojson(settings.grid_file or default_grid_file())
    pool = EventPool(
        settings.pool,
        catalogue,
        ref_lat=grids.reference_latitude(),
        dead_letter_keep_bytes=settings.dead_letters.keep_bytes,
    )
    snapshots = SnapshotStore(settings.snapshots)
    metrics = metrics or Metrics()
    pipeline = Pipeline(
        Topics(settings.mqtt.topic_prefix),
        catalogue,
        grids,
        snapshots,
        DecodeLimits(
            max_payload_bytes=settings.max_payload_bytes,
            max_clock_skew=timedelta(seconds=settings.max_clock_skew_s),
        ),
    )
    ingest = MqttIngest(
        settings.mqtt,
        settings.batch,
        pipeline,
        pool,
        metrics,
        sinks,
        notices=settings.notices,
        dead_letters=settings.dead_letters,
    )
    log.info(
        "aggregator built pool=%s grids=%s types=%s",
        settings.pool,
        len(grids),
        len(catalogue.types),
    )
    return Aggregator(settings, catalogue, grids, pool, snapshots, metrics, ingest, list(sinks))
