"""Grid file loading, the shipped Longgang sample, and point-in-grid location."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.errors import ConfigError
from aggregator.grids import GridFileError, GridIndex, GridKind, default_grid_file

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "scripts" / "gen_grids.py"


@pytest.fixture(scope="module")
def index() -> GridIndex:
    return GridIndex.from_geojson(default_grid_file())


@pytest.fixture(scope="module")
def shipped() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(default_grid_file().read_text(encoding="utf-8"))
    return data


def _covering_codes(index: GridIndex, lat: float, lon: float) -> list[str]:
    """Brute force: every grid whose polygon covers the point (border included)."""
    point = shapely.Point(lon, lat)
    return [g.code for g in index.grids if g.polygon.covers(point)]


def _ring_vertices(index: GridIndex) -> dict[tuple[float, float], list[str]]:
    """(lon, lat) of every polygon vertex → codes of the grids having it."""
    owners: dict[tuple[float, float], list[str]] = {}
    for grid in index.grids:
        for lon, lat in list(grid.polygon.exterior.coords)[:-1]:
            owners.setdefault((lon, lat), []).append(grid.code)
    return owners


# -- the shipped sample -----------------------------------------------------------------------


def test_shipped_file_has_the_hierarchy(index: GridIndex, shipped: dict[str, Any]) -> None:
    assert default_grid_file().stat().st_size < 1_000_000
    assert shipped["metadata"]["sample"] is True
    assert "sample" in shipped["metadata"]["description"]

    [county] = index.counties()
    assert (county.code, county.name) == ("330383", "龙港市")
    streets = index.streets("330383")
    assert len(streets) >= 2
    communities = index.communities()
    big = [c for c in communities if c.grid_count >= 30]
    assert len(big) >= 3
    assert sum(c.grid_count for c in communities) == len(index) == county.grid_count
    for community in communities:
        assert community.parent_code in {s.code for s in streets}
        assert len(index.by_prefix(community.code)) == community.grid_count
        assert community.name.endswith("社区")
        assert community.name_en.endswith("Community")

    assert [g.code for g in index.grids] == sorted(g.code for g in index.grids)
    kinds = Counter(g.kind for g in index.grids)
    assert kinds[GridKind.DEDICATED] >= 1
    for grid in index.grids:
        assert len(grid.code) == 20
        assert grid.code[12:14] == grid.kind.code
        assert [lv.level for lv in grid.path] == ["county", "street", "community", "grid"]
        assert [lv.code for lv in grid.path] == [
            grid.code[:6],
            grid.code[:9],
            grid.code[:12],
            grid.code,
        ]
        assert grid.name
        assert grid.name_en
        assert grid.households is not None
        if grid.kind is GridKind.REGULAR:
            assert 300 <= grid.households <= 500  # GB/T 34300: 300–500 households per grid


def test_shipped_grids_are_a_few_hundred_metres_across(index: GridIndex) -> None:
    m_per_deg_lat = 110_812.0
    m_per_deg_lon = 111_320.0 * math.cos(math.radians(27.55))
    for grid in index.grids:
        min_lon, min_lat, max_lon, max_lat = grid.polygon.bounds
        width = (max_lon - min_lon) * m_per_deg_lon
        height = (max_lat - min_lat) * m_per_deg_lat
        assert 200 < width < 800
        assert 200 < height < 800
        lat, lon = grid.centroid
        assert 27.4 < lat < 27.7
        assert 120.4 < lon < 120.7


def test_shipped_grids_tile_each_community_with_shared_borders(index: GridIndex) -> None:
    for community in index.communities():
        polygons = [g.polygon for g in index.by_prefix(community.code)]
        union = shapely.union_all(polygons)
        # One piece, no holes, and no area counted twice: no gaps and no overlaps.
        assert union.geom_type == "Polygon"
        assert len(union.interiors) == 0
        assert sum(p.area for p in polygons) == pytest.approx(union.area, rel=1e-9)

    whole = shapely.union_all([g.polygon for g in index.grids])
    assert whole.geom_type == "Polygon"
    assert len(whole.interiors) == 0
    assert sum(g.polygon.area for g in index.grids) == pytest.approx(whole.area, rel=1e-9)

    # Neighbours share their border vertex for vertex, across community borders too.
    owners = _ring_vertices(index)
    touching_pairs = 0
    for a in index.grids:
        for b in index.grids:
            if a.code < b.code and a.polygon.intersection(b.polygon).length > 0:
                touching_pairs += 1
                shared = set(a.polygon.exterior.coords) & set(b.polygon.exterior.coords)
                assert len(shared) == 3  # two corners and the edge's midpoint
                assert all(b.code in owners[v] for v in shared)
    assert touching_pairs > 200
    cross_community = [codes for codes in owners.values() if len({c[:12] for c in codes}) > 1]
    assert cross_community


def test_generator_is_reproducible_and_matches_the_committed_file(tmp_path: Path) -> None:
    outputs = []
    for name in ("a.geojson", "b.geojson"):
        out = tmp_path / name
        subprocess.run(
            [sys.executable, str(GENERATOR), "--out", str(out)], check=True, capture_output=True
        )
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] == default_grid_file().read_bytes()


# -- locating points --------------------------------------------------------------------------


def test_interior_point_gets_the_full_path(index: GridIndex) -> None:
    grid = index.get("33038300200201000005")
    assert grid is not None
    inside = grid.polygon.representative_point()
    found = index.locate(inside.y, inside.x)
    assert found == grid
    assert [(lv.level, lv.code, lv.name) for lv in found.path] == [
        ("county", "330383", "龙港市"),
        ("street", "330383002", "老城片区"),
        ("community", "330383002002", "华中社区"),
        ("grid", "33038300200201000005", "华中社区第05网格"),
    ]
    lat, lon = grid.centroid
    assert index.locate(lat, lon) == grid  # lattice cells are convex enough to hold their centroid


def test_dedicated_grid_is_located(index: GridIndex) -> None:
    [school] = [g for g in index.grids if g.kind is GridKind.DEDICATED and "学校" in g.name]
    point = school.polygon.representative_point()
    found = index.locate(point.y, point.x)
    assert found is not None
    assert found.code == school.code
    assert found.code[12:14] == "02"


def test_shared_vertex_goes_to_the_lowest_code(index: GridIndex) -> None:
    owners = _ring_vertices(index)
    # A lattice corner where four grids of two communities meet.
    corners = [
        (v, codes)
        for v, codes in owners.items()
        if len(codes) == 4 and len({c[:12] for c in codes}) == 2
    ]
    assert corners
    for (lon, lat), codes in corners:
        assert sorted(_covering_codes(index, lat, lon)) == sorted(codes)
        expected = min(codes)
        results = {index.locate(lat, lon) for _ in range(5)}
        assert {g.code for g in results if g} == {expected}
        assert len(results) == 1
        bulk = index.locate_many([lat] * 3, [lon] * 3)
        assert [g.code if g else None for g in bulk] == [expected] * 3


def test_point_on_a_shared_edge_goes_to_the_lowest_code(index: GridIndex) -> None:
    checked = 0
    for a in index.grids:
        ring = list(a.polygon.exterior.coords)
        for (x1, y1), (x2, y2) in itertools.pairwise(ring):
            # A segment's midpoint is exactly on it whenever both sums round exactly (about
            # one segment in four); the brute-force check below keeps only those, since a
            # point a hair off the border is not a tie at all.
            lon, lat = (x1 + x2) / 2, (y1 + y2) / 2
            covering = _covering_codes(index, lat, lon)
            if len(covering) < 2:
                continue
            assert len(covering) == 2
            checked += 1
            expected = index.get(min(covering))
            assert index.locate(lat, lon) == expected
            assert index.locate(lat, lon) == expected
            assert index.locate_many([lat, lat], [lon, lon]) == [expected, expected]
    assert checked >= 20


def test_exact_border_in_a_file_with_axis_aligned_grids(tmp_path: Path) -> None:
    # Four squares on an exact 0.001° lattice: borders at lon 120.551 and lat 27.551 exactly.
    # Codes run against the geometry (the south-east square has the smallest code) and the
    # features are listed in no particular order, so neither order can decide the tie.
    squares = {
        "33038300100101000004": (120.550, 27.551),  # north-west
        "33038300100101000003": (120.551, 27.551),  # north-east
        "33038300100101000002": (120.550, 27.550),  # south-west
        "33038300100101000001": (120.551, 27.550),  # south-east
    }
    features = [
        _feature(code, _square(lon, lat, 0.001))
        for code, (lon, lat) in sorted(squares.items(), key=lambda kv: kv[1])
    ]
    path = tmp_path / "squares.geojson"
    path.write_text(json.dumps(_collection(features)), encoding="utf-8")
    grids = GridIndex.from_geojson(path)

    def code_at(lat: float, lon: float) -> str | None:
        grid = grids.locate(lat, lon)
        return grid.code if grid else None

    assert code_at(27.5515, 120.5505) == "33038300100101000004"
    assert code_at(27.5515, 120.551) == "33038300100101000003"  # north: NW | NE
    assert code_at(27.5505, 120.551) == "33038300100101000001"  # south: SW | SE
    assert code_at(27.551, 120.5505) == "33038300100101000002"  # west: NW / SW
    assert code_at(27.551, 120.551) == "33038300100101000001"  # the corner of all four
    assert code_at(27.552, 120.550) == "33038300100101000004"  # outer corner, one grid
    assert code_at(27.5521, 120.5505) is None
    lats = [27.5515, 27.5515, 27.5505, 27.551, 27.551, 27.5521]
    lons = [120.5505, 120.551, 120.551, 120.5505, 120.551, 120.5505]
    assert [g.code if g else None for g in grids.locate_many(lats, lons)] == [
        code_at(lat, lon) for lat, lon in zip(lats, lons, strict=True)
    ]


def test_outside_and_non_finite_points_get_none(index: GridIndex) -> None:
    assert index.locate(27.0, 120.0) is None
    assert index.locate(0.0, 0.0) is None
    assert index.locate(91.0, 200.0) is None
    assert index.locate(math.nan, 120.55) is None
    assert index.locate(27.55, math.nan) is None
    assert index.locate(math.inf, -math.inf) is None
    inside = index.grids[0].polygon.representative_point()
    result = index.locate_many(
        np.array([math.nan, inside.y, 27.0, inside.y]),
        np.array([120.55, inside.x, 120.0, math.nan]),
    )
    assert result == [None, index.grids[0], None, None]
    assert index.locate_many([], []) == []
    with pytest.raises(ValueError, match="latitudes"):
        index.locate_many([27.55, 27.56], [120.55])


@settings(max_examples=300, deadline=None)
@given(
    st.floats(min_value=27.525, max_value=27.575),
    st.floats(min_value=120.52, max_value=120.58),
)
def test_locate_agrees_with_brute_force(index: GridIndex, lat: float, lon: float) -> None:
    covering = _covering_codes(index, lat, lon)
    found = index.locate(lat, lon)
    assert (found.code if found else None) == (min(covering) if covering else None)
    assert index.locate_many([lat], [lon]) == [found]


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=8))
def test_vertices_agree_with_brute_force(
    index: GridIndex, grid_pick: int, vertex_pick: int
) -> None:
    grid = index.grids[grid_pick % len(index)]
    coords = list(grid.polygon.exterior.coords)
    lon, lat = coords[vertex_pick % len(coords)]
    covering = _covering_codes(index, lat, lon)
    assert grid.code in covering
    found = index.locate(lat, lon)
    assert found is not None
    assert found.code == min(covering)
    assert index.locate_many([lat, lat], [lon, lon]) == [found, found]


def test_locate_many_agrees_with_locate_in_bulk(index: GridIndex) -> None:
    rng = np.random.default_rng(11)
    lats = rng.uniform(27.525, 27.575, 5_000)
    lons = rng.uniform(120.52, 120.58, 5_000)
    # Throw in every vertex so that borders are in the batch too.
    vertices = list(_ring_vertices(index))
    lats = np.concatenate([lats, [lat for _, lat in vertices]])
    lons = np.concatenate([lons, [lon for lon, _ in vertices]])
    bulk = index.locate_many(lats, lons)
    assert bulk == [index.locate(lat, lon) for lat, lon in zip(lats, lons, strict=True)]
    assert any(g is None for g in bulk)
    assert sum(g is not None for g in bulk) > 1_000


# -- lookups and export -------------------------------------------------------------------------


def test_lookups(index: GridIndex) -> None:
    assert len(index.by_prefix("330383")) == len(index)
    assert index.by_prefix("") == list(index.grids)
    assert index.by_prefix("330384") == []
    dedicated = index.by_prefix("33038300100102")  # a community's dedicated grids
    assert dedicated
    assert all(g.kind is GridKind.DEDICATED for g in dedicated)
    street = index.area("330383001")
    assert street is not None
    assert (street.level, street.name, street.name_en) == ("street", "新城片区", "Xincheng Area")
    assert [c.code for c in index.communities("330383001")] == ["330383001001", "330383001002"]
    assert street.grid_count == sum(c.grid_count for c in index.communities(street.code))
    assert street.households == sum(g.households or 0 for g in index.by_prefix(street.code))
    assert index.get("33038300100101000001") == index.grids[0]
    assert index.get("33038300100101999999") is None
    assert index.area("999999") is None


def test_to_geojson_round_trips(index: GridIndex) -> None:
    collection = index.to_geojson()
    assert collection["type"] == "FeatureCollection"
    assert collection["metadata"]["sample"] is True
    again = GridIndex.from_dict(json.loads(json.dumps(collection, ensure_ascii=False)))
    assert again.grids == index.grids
    assert again.streets() == index.streets()
    assert again.communities() == index.communities()
    for a, b in zip(again.grids, index.grids, strict=True):
        assert shapely.equals_exact(a.polygon, b.polygon, tolerance=0)


# -- bad files ----------------------------------------------------------------------------------


def _square(lon: float, lat: float, size: float) -> list[list[list[float]]]:
    return [
        [
            [lon, lat],
            [lon + size, lat],
            [lon + size, lat + size],
            [lon, lat + size],
            [lon, lat],
        ]
    ]


def _feature(code: str, rings: list[list[list[float]]]) -> dict[str, Any]:
    kind = {"01": "regular", "02": "dedicated"}[code[12:14]]
    return {
        "type": "Feature",
        "properties": {
            "code": code,
            "name": f"网格{code[-2:]}",
            "name_en": f"Grid {code[-2:]}",
            "kind": kind,
            "households": 400,
            "community_code": code[:12],
            "community_name": "样例社区",
            "street_code": code[:9],
            "street_name": "样例片区",
            "county_code": code[:6],
            "county_name": "龙港市",
        },
        "geometry": {"type": "Polygon", "coordinates": rings},
    }


def _collection(features: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": features}


def _set(path: str, value: Any) -> Any:
    def mutate(collection: dict[str, Any]) -> None:
        target: Any = collection["features"][7]
        *parents, last = path.split(".")
        for key in parents:
            target = target[key]
        target[last] = value

    return mutate


def _duplicate(collection: dict[str, Any]) -> None:
    collection["features"][7]["properties"]["code"] = collection["features"][2]["properties"][
        "code"
    ]


BOWTIE = [[[120.55, 27.55], [120.552, 27.552], [120.552, 27.55], [120.55, 27.552], [120.55, 27.55]]]
UNCLOSED = [[[120.55, 27.55], [120.552, 27.55], [120.552, 27.552], [120.55, 27.552]]]


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        pytest.param(_duplicate, "duplicate code, first used by feature 2", id="duplicate-code"),
        pytest.param(
            _set("properties.code", "3303830010010100008"), "must be 20 ASCII digits", id="short"
        ),
        pytest.param(
            _set("properties.code", "330383001001010000080"), "must be 20 ASCII digits", id="long"
        ),
        pytest.param(
            _set("properties.code", "３３0383001001010000008"[:20]),
            "must be 20 ASCII digits",
            id="full-width-digits",
        ),
        pytest.param(
            _set("properties.street_code", "330383002"),
            "street_code 330383002 is not a prefix",
            id="street-prefix",
        ),
        pytest.param(
            _set("properties.community_code", "330383001002"),
            "community_code 330383001002 is not a prefix",
            id="community-prefix",
        ),
        pytest.param(
            _set("properties.county_code", "330382"),
            "county_code 330382 is not a prefix",
            id="county-prefix",
        ),
        pytest.param(_set("properties.kind", "dedicated"), "needs digits 02", id="kind-digits"),
        pytest.param(
            _set("geometry.coordinates", BOWTIE), "invalid polygon: Self-intersection", id="bowtie"
        ),
        pytest.param(_set("geometry.coordinates", UNCLOSED), "must end where it starts", id="open"),
        pytest.param(_set("geometry.type", "LineString"), "geometry", id="not-a-polygon"),
        pytest.param(
            _set("properties.community_name", "别名社区"),
            "community 330383001001 is named '别名社区' here but '龙翔社区' in feature 0",
            id="inconsistent-name",
        ),
        pytest.param(_set("properties.name", ""), "properties.name", id="empty-name"),
    ],
)
def test_bad_feature_is_named(
    tmp_path: Path, shipped: dict[str, Any], mutate: Any, problem: str
) -> None:
    collection = copy.deepcopy(shipped)
    mutate(collection)
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps(collection, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(GridFileError) as caught:
        GridIndex.from_geojson(path)
    error = caught.value
    assert error.index == 7
    assert error.code == collection["features"][7]["properties"]["code"]
    assert problem in str(error)
    assert f"feature 7 (code {error.code})" in str(error)
    assert str(path) in str(error)
    assert isinstance(error, ConfigError)  # a bad data file stops startup like a bad config


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(b"{not json", "not JSON", id="not-json"),
        pytest.param(b'{"type": "Feature"}', "type", id="not-a-collection"),
        pytest.param(b'{"type": "FeatureCollection", "features": []}', "features", id="empty"),
    ],
)
def test_bad_file_is_refused(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.geojson"
    path.write_bytes(content)
    with pytest.raises(GridFileError, match=problem) as caught:
        GridIndex.from_geojson(path)
    assert caught.value.index is None


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GridFileError, match="cannot read"):
        GridIndex.from_geojson(tmp_path / "absent.geojson")


def test_overlapping_grids_load_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    features = [
        _feature("33038300100101000002", _square(120.550, 27.550, 0.002)),
        _feature("33038300100101000001", _square(120.551, 27.550, 0.002)),
        # A dedicated grid drawn inside a regular one instead of cut out of it.
        _feature("33038300100102000001", _square(120.5505, 27.5505, 0.0002)),
    ]
    path = tmp_path / "overlap.geojson"
    path.write_text(json.dumps(_collection(features)), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="aggregator.grids"):
        grids = GridIndex.from_geojson(path)
    assert "33038300100101000001 and 33038300100101000002 overlap" in caplog.text
    assert "33038300100101000002 and 33038300100102000001 overlap" in caplog.text
    assert len(caplog.records) == 2
    in_both = grids.locate(27.551, 120.5515)
    assert in_both is not None
    assert in_both.code == "33038300100101000001"
    in_dedicated = grids.locate(27.5506, 120.5506)
    assert in_dedicated is not None
    assert in_dedicated.code == "33038300100101000002"  # smallest code wins, as on a border


def test_multipolygon_and_extra_properties_are_accepted(tmp_path: Path) -> None:
    feature = _feature("33038300100102000001", _square(120.550, 27.550, 0.001))
    feature["geometry"] = {
        "type": "MultiPolygon",
        "coordinates": [_square(120.550, 27.550, 0.001), _square(120.560, 27.550, 0.001)],
    }
    feature["properties"]["fid"] = 17  # what a GIS export adds
    path = tmp_path / "campus.geojson"
    path.write_text(json.dumps(_collection([feature])), encoding="utf-8")
    grids = GridIndex.from_geojson(path)
    [grid] = grids.grids
    assert grid.kind is GridKind.DEDICATED
    assert grids.locate(27.5505, 120.5605) == grid
    assert grids.locate(27.5505, 120.5555) is None
