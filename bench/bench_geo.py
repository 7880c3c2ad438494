"""Geo-tagging throughput: ``GridIndex.locate_many`` (one STRtree query) against a naive loop
that asks every grid polygon in turn (``shapely.contains`` per grid over all points), both on the
same random points in the same run.

    python bench/bench_geo.py [--points 200000] [--grids path.geojson]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import shapely

from aggregator.grids import GridIndex, default_grid_file


def naive_locate(index: GridIndex, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
    """Index of each point's grid (-1 for none), testing every grid against every point."""
    points = shapely.points(lons, lats)
    result = np.full(lats.size, -1, dtype=np.int64)
    for i, grid in enumerate(index.grids):  # code order: the first grid to claim a point wins
        inside = shapely.contains(grid.polygon, points) & (result < 0)
        result[inside] = i
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200_000, help="points per measurement")
    parser.add_argument("--grids", type=Path, default=default_grid_file(), help="grid file")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    index = GridIndex.from_geojson(args.grids)
    # Sample the grids' bounding box widened by 10 %, so some points fall outside every grid.
    min_lon, min_lat, max_lon, max_lat = shapely.total_bounds([g.polygon for g in index.grids])
    pad_lon, pad_lat = (max_lon - min_lon) * 0.1, (max_lat - min_lat) * 0.1
    rng = np.random.default_rng(args.seed)
    lats = rng.uniform(min_lat - pad_lat, max_lat + pad_lat, args.points)
    lons = rng.uniform(min_lon - pad_lon, max_lon + pad_lon, args.points)

    start = time.perf_counter()
    found = index.locate_many(lats, lons)
    tree_seconds = time.perf_counter() - start

    start = time.perf_counter()
    naive = naive_locate(index, lats, lons)
    naive_seconds = time.perf_counter() - start

    # Random points land on a border with probability zero, so both methods must agree.
    agree = bool(np.array_equal(index.locate_indices(lats, lons), naive))
    inside = sum(g is not None for g in found) / args.points
    print(f"grids: {len(index)}, points: {args.points:,} ({inside:.0%} inside a grid)")
    print(f"locate_many (STRtree):     {args.points / tree_seconds:>12,.0f} points/s")
    print(f"naive loop over polygons:  {args.points / naive_seconds:>12,.0f} points/s")
    print(f"speed-up: {naive_seconds / tree_seconds:.1f}x; results agree: {agree}")


if __name__ == "__main__":
    main()
