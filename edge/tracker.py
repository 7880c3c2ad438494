"""A light IoU multi-object tracker: stable ids for detections across sampled frames.

Matching is greedy on IoU between each track's predicted box and the new detections of the
same class. The prediction moves the last box by a smoothed velocity, so a pedestrian
sampled at 2 fps still overlaps its own track. A track is reported once it has been matched
``min_hits`` times and forgotten ``max_age_s`` after it was last seen.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edge.detector import Detection

__all__ = ["DEFAULT_CLASS_GROUPS", "Track", "Tracker", "iou_matrix"]

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

# A van is "car" in one frame and "truck" in the next; it is still the same vehicle.
DEFAULT_CLASS_GROUPS: tuple[frozenset[str], ...] = (frozenset({"car", "truck", "bus"}),)

# Weight of the newest velocity sample: damps jitter of the detector's boxes.
_VELOCITY_SMOOTHING = 0.5


@dataclass
class Track:
    """One object followed over time."""

    track_id: int
    cls: str
    box: Box
    score: float
    first_seen: float
    last_seen: float
    hits: int
    velocity: tuple[float, float] = field(default=(0.0, 0.0))  # px/s of the box centre

    @property
    def dwell_s(self) -> float:
        return self.last_seen - self.first_seen

    def predicted(self, now: float) -> Box:
        dt = now - self.last_seen
        dx, dy = self.velocity[0] * dt, self.velocity[1] * dt
        x1, y1, x2, y2 = self.box
        return (x1 + dx, y1 + dy, x2 + dx, y2 + dy)


def iou_matrix(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """IoU of every box in a (N, 4) with every box in b (M, 4), boxes x1y1x2y2."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


class Tracker:
    """Assigns stable ids to detections; not thread-safe (one tracker per camera)."""

    def __init__(
        self,
        iou_threshold: float = 0.3,
        max_age_s: float = 2.0,
        min_hits: int = 2,
        class_groups: Sequence[Collection[str]] = DEFAULT_CLASS_GROUPS,
    ) -> None:
        if not 0 < iou_threshold <= 1:
            raise ValueError("iou_threshold must be in (0, 1]")
        if max_age_s <= 0 or min_hits < 1:
            raise ValueError("max_age_s must be > 0 and min_hits >= 1")
        self.iou_threshold = iou_threshold
        self.max_age_s = max_age_s
        self.min_hits = min_hits
        # Classes a detector confuses with each other still continue one track.
        self._group: dict[str, str] = {}
        for i, group in enumerate(class_groups):
            for name in group:
                self._group[name] = f"group{i}"
        self._tracks: list[Track] = []
        self._next_id = 1

    @property
    def tracks(self) -> list[Track]:
        """Every live track, confirmed or not, seen now or not."""
        return list(self._tracks)

    def update(self, detections: list[Detection], now: float) -> list[Track]:
        """Feed one frame's detections; return the confirmed tracks visible in it."""
        self._tracks = [t for t in self._tracks if now - t.last_seen <= self.max_age_s]
        matched_tracks: set[int] = set()
        matched_dets: set[int] = set()
        if self._tracks and detections:
            predicted = np.array([t.predicted(now) for t in self._tracks], dtype=np.float64)
            boxes = np.array([d.box for d in detections], dtype=np.float64)
            iou = iou_matrix(predicted, boxes)
            det_keys = [self._key(d.cls) for d in detections]
            same_cls = np.array(
                [[self._key(t.cls) == k for k in det_keys] for t in self._tracks], dtype=bool
            )
            iou = np.where(same_cls, iou, 0.0)
            # Greedy: best overlap first; each track and detection used at most once.
            ti, di = np.nonzero(iou >= self.iou_threshold)
            order = np.argsort(-iou[ti, di], kind="stable")
            for k in order:
                t_idx, d_idx = int(ti[k]), int(di[k])
                if t_idx in matched_tracks or d_idx in matched_dets:
                    continue
                matched_tracks.add(t_idx)
                matched_dets.add(d_idx)
                self._follow(self._tracks[t_idx], detections[d_idx], now)
        for d_idx, det in enumerate(detections):
            if d_idx not in matched_dets:
                self._tracks.append(
                    Track(
                        track_id=self._next_id,
                        cls=det.cls,
                        box=det.box,
                        score=det.score,
                        first_seen=now,
                        last_seen=now,
                        hits=1,
                    )
                )
                self._next_id += 1
        return [t for t in self._tracks if t.last_seen == now and t.hits >= self.min_hits]

    def _key(self, cls: str) -> str:
        return self._group.get(cls, cls)

    @staticmethod
    def _follow(track: Track, det: Detection, now: float) -> None:
        dt = now - track.last_seen
        if dt > 0:
            ox = (track.box[0] + track.box[2]) / 2
            oy = (track.box[1] + track.box[3]) / 2
            nx = (det.box[0] + det.box[2]) / 2
            ny = (det.box[1] + det.box[3]) / 2
            # The first measured velocity is taken as is: there is nothing to smooth it with.
            a = _VELOCITY_SMOOTHING if track.hits > 1 else 1.0
            track.velocity = (
                a * (nx - ox) / dt + (1 - a) * track.velocity[0],
                a * (ny - oy) / dt + (1 - a) * track.velocity[1],
            )
        track.box = det.box
        track.cls = det.cls
        track.score = det.score
        track.last_seen = now
        track.hits += 1
