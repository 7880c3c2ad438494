"""Generate the sample management-grid (网格) file for Longgang city (龙港市, GB/T 2260 330383).

The area is a jittered lattice of cells a few hundred metres across (GB/T 34300: 300–500
households per urban grid), rotated to follow the city's NNE-running main roads. Every lattice
vertex and every edge midpoint is computed once and shared by all the cells that touch it, so
grids tile their community, and communities tile their street, with identical border coordinates:
no gaps, no overlaps. Two cells are dedicated grids (专属网格): a school and a market.

Names are sample names, not the city's real administrative units. The output is deterministic
byte for byte: a fixed seed, no trigonometry at run time (rotation and degree scales are literal
constants, so no platform's libm can change a digit), coordinates rounded to 7 decimals.

    python scripts/gen_grids.py                 # writes aggregator/data/grids/longgang.geojson
    python scripts/gen_grids.py --out x.geojson # anywhere else
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20_190_925  # the day Longgang became a city; any fixed value would do
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "aggregator/data/grids/longgang.geojson"

COUNTY_CODE = "330383"
COUNTY_NAME = "龙港市"
COUNTY_NAME_EN = "Longgang City"

# Centre of the sample area and the length of one degree there on the WGS-84 ellipsoid
# (latitude 27.55°), rounded to the metre: plenty for a sample drawn in metres.
LAT0 = 27.55
LON0 = 120.55
M_PER_DEG_LON = 98_767.0
M_PER_DEG_LAT = 110_812.0
# Lattice rotation of 12° anticlockwise; cos and sin are literals so libm cannot change a digit.
COS_R = 0.9781476007338057
SIN_R = 0.20791169081775934

COLS = 12
ROWS = 12
CELL_W = 370.0  # metres, east-west
CELL_H = 340.0  # metres, north-south
CORNER_JITTER = 0.16  # fraction of a cell
MID_JITTER = 0.10

# Street (片区) boundary: in row r (0 = south), columns < STREET_SPLIT[r] belong to street 001.
STREET_SPLIT = (6, 6, 6, 5, 5, 5, 6, 6, 7, 7, 6, 6)
# Community boundary inside each street: in column c, rows >= COMMUNITY_SPLIT[c] are the northern
# community (community 001), the others the southern one (community 002).
COMMUNITY_SPLIT = (6, 6, 5, 5, 6, 6, 7, 6, 6, 5, 5, 6)


@dataclass(frozen=True)
class Unit:
    code: str
    name: str
    name_en: str


STREETS = (
    Unit(f"{COUNTY_CODE}001", "新城片区", "Xincheng Area"),
    Unit(f"{COUNTY_CODE}002", "老城片区", "Laocheng Area"),
)
# (street index, north?) → community
COMMUNITIES = {
    (0, True): Unit(f"{STREETS[0].code}001", "龙翔社区", "Longxiang Community"),
    (0, False): Unit(f"{STREETS[0].code}002", "海港社区", "Haigang Community"),
    (1, True): Unit(f"{STREETS[1].code}001", "江滨社区", "Jiangbin Community"),
    (1, False): Unit(f"{STREETS[1].code}002", "华中社区", "Huazhong Community"),
}
# Lattice cells that are dedicated grids instead of regular ones: (row, col) → (name, name_en,
# households living inside, e.g. staff quarters).
DEDICATED = {
    (8, 2): ("龙港实验学校专属网格", "Longgang Experimental School Dedicated Grid", 24),
    (3, 9): ("华中农贸市场专属网格", "Huazhong Farmers' Market Dedicated Grid", 56),
}
KIND_CODE = {"regular": "01", "dedicated": "02"}

Point = tuple[float, float]  # (lon, lat)
Vertices = dict[tuple[int, int], Point]


def _to_lonlat(x: float, y: float) -> Point:
    """Local metres (east, north) from the area's centre → rounded WGS-84 lon/lat."""
    xr = x * COS_R - y * SIN_R
    yr = x * SIN_R + y * COS_R
    return (round(LON0 + xr / M_PER_DEG_LON, 7), round(LAT0 + yr / M_PER_DEG_LAT, 7))


def _lattice(rng: random.Random) -> tuple[Vertices, Vertices, Vertices]:
    """Jittered corners (row, col), horizontal-edge midpoints and vertical-edge midpoints."""
    x0 = -COLS * CELL_W / 2
    y0 = -ROWS * CELL_H / 2

    corners_m: dict[tuple[int, int], tuple[float, float]] = {}
    for i in range(ROWS + 1):
        for j in range(COLS + 1):
            dx = rng.uniform(-CORNER_JITTER, CORNER_JITTER) * CELL_W
            dy = rng.uniform(-CORNER_JITTER, CORNER_JITTER) * CELL_H
            corners_m[i, j] = (x0 + j * CELL_W + dx, y0 + i * CELL_H + dy)

    # Edge midpoints bend each shared border a little so cells look like blocks between roads,
    # not like a spreadsheet; each is stored once so both neighbours use the same coordinates.
    h_mid: Vertices = {}  # edge from corner (i, j) to (i, j + 1)
    for i in range(ROWS + 1):
        for j in range(COLS):
            (ax, ay), (bx, by) = corners_m[i, j], corners_m[i, j + 1]
            dx = rng.uniform(-MID_JITTER, MID_JITTER) * CELL_W
            dy = rng.uniform(-MID_JITTER, MID_JITTER) * CELL_H
            h_mid[i, j] = _to_lonlat((ax + bx) / 2 + dx, (ay + by) / 2 + dy)
    v_mid: Vertices = {}  # edge from corner (i, j) to (i + 1, j)
    for i in range(ROWS):
        for j in range(COLS + 1):
            (ax, ay), (bx, by) = corners_m[i, j], corners_m[i + 1, j]
            dx = rng.uniform(-MID_JITTER, MID_JITTER) * CELL_W
            dy = rng.uniform(-MID_JITTER, MID_JITTER) * CELL_H
            v_mid[i, j] = _to_lonlat((ax + bx) / 2 + dx, (ay + by) / 2 + dy)

    corners = {key: _to_lonlat(x, y) for key, (x, y) in corners_m.items()}
    return corners, h_mid, v_mid


def _cell_ring(
    i: int,
    j: int,
    corners: Vertices,
    h_mid: Vertices,
    v_mid: Vertices,
) -> list[list[float]]:
    """Exterior ring of cell (row i, col j), anticlockwise as RFC 7946 asks, closed."""
    ring = [
        corners[i, j],
        h_mid[i, j],
        corners[i, j + 1],
        v_mid[i, j + 1],
        corners[i + 1, j + 1],
        h_mid[i + 1, j],
        corners[i + 1, j],
        v_mid[i, j],
        corners[i, j],
    ]
    return [[lon, lat] for lon, lat in ring]


def _community_of(i: int, j: int) -> tuple[int, Unit]:
    street = 0 if j < STREET_SPLIT[i] else 1
    return street, COMMUNITIES[street, i >= COMMUNITY_SPLIT[j]]


def build() -> dict[str, Any]:
    """The FeatureCollection as a plain dict, features sorted by grid code."""
    rng = random.Random(SEED)
    corners, h_mid, v_mid = _lattice(rng)
    # Households come from their own stream so that changing the geometry's draws does not
    # reshuffle every household count (and vice versa).
    households_rng = random.Random(SEED + 1)

    sequence: dict[tuple[str, str], int] = {}
    features: list[dict[str, Any]] = []
    # North to south, west to east: grid 000001 is a community's north-west corner.
    for i in reversed(range(ROWS)):
        for j in range(COLS):
            street_index, community = _community_of(i, j)
            street = STREETS[street_index]
            households = households_rng.randint(300, 500)
            if (i, j) in DEDICATED:
                kind = "dedicated"
                name, name_en, households = DEDICATED[i, j]
            else:
                kind = "regular"
            seq = sequence[community.code, kind] = sequence.get((community.code, kind), 0) + 1
            code = f"{community.code}{KIND_CODE[kind]}{seq:06d}"
            if kind == "regular":
                name = f"{community.name}第{seq:02d}网格"
                name_en = f"{community.name_en} Grid {seq:02d}"
            features.append(
                {
                    "type": "Feature",
                    "id": code,
                    "properties": {
                        "code": code,
                        "name": name,
                        "name_en": name_en,
                        "kind": kind,
                        "households": households,
                        "community_code": community.code,
                        "community_name": community.name,
                        "community_name_en": community.name_en,
                        "street_code": street.code,
                        "street_name": street.name,
                        "street_name_en": street.name_en,
                        "county_code": COUNTY_CODE,
                        "county_name": COUNTY_NAME,
                        "county_name_en": COUNTY_NAME_EN,
                    },
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [_cell_ring(i, j, corners, h_mid, v_mid)],
                    },
                }
            )
    features.sort(key=lambda f: f["properties"]["code"])
    return {
        "type": "FeatureCollection",
        "name": "longgang-sample-grids",
        "metadata": {
            "sample": True,
            "description": (
                "Sample management grids (网格) for Longgang city (龙港市). Codes follow the "
                "project's 20-digit scheme; street (片区), community and grid names are sample "
                "names, and the polygons are synthetic, not official boundaries."
            ),
            "code_scheme": (
                "county 6 (GB/T 2260) + street 3 + community 3 + kind 2 "
                "(01 regular 网格, 02 dedicated 专属网格) + sequence 6"
            ),
            "crs": "WGS-84 (EPSG:4326), [lon, lat], 7 decimals",
            "generator": "scripts/gen_grids.py",
            "seed": SEED,
        },
        "features": features,
    }


def render(collection: dict[str, Any]) -> str:
    """One feature per line: small, and a changed grid shows up as one changed line in a diff."""
    header = {k: v for k, v in collection.items() if k != "features"}
    head = json.dumps(header, ensure_ascii=False, indent=1)[:-2]  # drop the closing "\n}"
    lines = [
        json.dumps(feature, ensure_ascii=False, separators=(",", ":"))
        for feature in collection["features"]
    ]
    return head + ',\n "features": [\n' + ",\n".join(lines) + "\n ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output GeoJSON file")
    args = parser.parse_args(argv)
    out: Path = args.out
    collection = build()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(render(collection).encode("utf-8"))

    counts: dict[str, int] = {}
    for feature in collection["features"]:
        props = feature["properties"]
        counts[props["community_name"]] = counts.get(props["community_name"], 0) + 1
    summary = ", ".join(f"{name} {n}" for name, n in counts.items())
    sys.stdout.write(f"wrote {out}: {len(collection['features'])} grids ({summary})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
