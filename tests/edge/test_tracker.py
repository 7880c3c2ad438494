"""The IoU tracker on scripted detections: ids, confirmation, expiry."""

from __future__ import annotations

import numpy as np
import pytest

from edge.detector import Detection
from edge.tracker import Tracker, iou_matrix


def det(
    cls: str, x: float, y: float, w: float = 40, h: float = 80, score: float = 0.8
) -> Detection:
    return Detection(cls=cls, score=score, box=(x, y, x + w, y + h))


def test_iou_matrix() -> None:
    a = np.array([[0, 0, 10, 10], [100, 100, 110, 110]], dtype=np.float64)
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10]], dtype=np.float64)
    m = iou_matrix(a, b)
    assert m.shape == (2, 2)
    assert m[0, 0] == pytest.approx(50 / 150)
    assert m[0, 1] == pytest.approx(1.0)
    assert m[1].tolist() == [0.0, 0.0]
    assert iou_matrix(a, np.zeros((0, 4))).shape == (2, 0)


def test_confirmed_after_min_hits_and_id_kept_while_moving() -> None:
    tracker = Tracker(min_hits=2)
    assert tracker.update([det("person", 100, 100)], now=0.0) == []
    ids = set()
    for step in range(1, 8):
        tracks = tracker.update([det("person", 100 + 10 * step, 100 + 3 * step)], now=step * 0.5)
        assert len(tracks) == 1
        ids.add(tracks[0].track_id)
        assert tracks[0].hits == step + 1
        assert tracks[0].box[0] == 100 + 10 * step
    assert len(ids) == 1
    track = tracker.tracks[0]
    assert track.first_seen == 0.0
    assert track.last_seen == 3.5
    assert track.dwell_s == 3.5


def test_new_object_gets_new_id_and_both_are_followed() -> None:
    tracker = Tracker(min_hits=1)
    (first,) = tracker.update([det("person", 100, 100)], now=0.0)
    tracks = tracker.update([det("person", 105, 100), det("person", 400, 300)], now=0.5)
    by_x = sorted(tracks, key=lambda t: t.box[0])
    assert by_x[0].track_id == first.track_id
    assert by_x[1].track_id != first.track_id
    # Ids follow their objects when both move and the list order flips.
    again = tracker.update([det("person", 410, 300), det("person", 110, 100)], now=1.0)
    assert {t.track_id: t.box[0] for t in again} == {
        by_x[0].track_id: 110,
        by_x[1].track_id: 410,
    }


def test_short_gap_keeps_id_long_gap_expires() -> None:
    tracker = Tracker(max_age_s=2.0, min_hits=1)
    (a,) = tracker.update([det("car", 200, 200, 120, 60)], now=0.0)
    assert tracker.update([], now=1.0) == []  # not visible now, but remembered
    assert len(tracker.tracks) == 1
    (b,) = tracker.update([det("car", 202, 200, 120, 60)], now=1.5)
    assert b.track_id == a.track_id
    assert tracker.update([], now=4.0) == []
    assert tracker.tracks == []  # expired 2 s after it was last seen
    (c,) = tracker.update([det("car", 202, 200, 120, 60)], now=4.5)
    assert c.track_id != a.track_id
    assert c.hits == 1


def test_unconfirmed_tracks_are_not_reported() -> None:
    tracker = Tracker(min_hits=3)
    assert tracker.update([det("person", 10, 10)], now=0.0) == []
    assert tracker.update([det("person", 12, 10)], now=0.5) == []
    (t,) = tracker.update([det("person", 14, 10)], now=1.0)
    assert t.hits == 3


def test_class_must_match_but_vehicle_kinds_are_one_object() -> None:
    tracker = Tracker(min_hits=1)
    (person,) = tracker.update([det("person", 100, 100)], now=0.0)
    (car,) = tracker.update([det("car", 100, 100)], now=0.5)
    assert car.track_id != person.track_id
    # The same van called "truck" a moment later is still the same track.
    (van,) = tracker.update([det("truck", 101, 100)], now=1.0)
    assert van.track_id == car.track_id
    assert van.cls == "truck"


def test_velocity_prediction_keeps_a_fast_walker() -> None:
    tracker = Tracker(min_hits=1, iou_threshold=0.3)
    (t0,) = tracker.update([det("person", 0, 100)], now=0.0)
    (t1,) = tracker.update([det("person", 20, 100)], now=1.0)
    assert t1.track_id == t0.track_id
    # 35 px a step on a 40 px wide box: without prediction the IoU would be 0.07.
    x = 20.0
    for step in range(2, 6):
        x += 35
        (t,) = tracker.update([det("person", x, 100)], now=float(step))
        assert t.track_id == t0.track_id


def test_one_detection_feeds_one_track() -> None:
    tracker = Tracker(min_hits=1)
    tracker.update([det("person", 100, 100), det("person", 104, 100)], now=0.0)
    tracks = tracker.update([det("person", 102, 100)], now=0.5)
    assert len(tracks) == 1
    assert len(tracker.tracks) == 2


@pytest.mark.parametrize("kwargs", [{"iou_threshold": 0.0}, {"max_age_s": 0.0}, {"min_hits": 0}])
def test_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Tracker(**kwargs)  # type: ignore[arg-type]
