"""Drawing detections, tracks and zones on a frame, and size-capped JPEG encoding."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from edge.detector import Detection
from edge.tracker import Track

__all__ = ["SnapshotTooLargeError", "annotate", "encode_jpeg_capped"]

logger = logging.getLogger(__name__)

_ZONE_COLOUR = (0, 200, 255)  # BGR amber: zones read as "marked area", not as an object
_FONT = cv2.FONT_HERSHEY_SIMPLEX
# JPEG qualities tried before the image is scaled down; below ~40 text becomes unreadable.
_QUALITIES = (85, 75, 65, 55, 45)
_SCALE_STEP = 0.75
_MIN_SIDE = 64


class SnapshotTooLargeError(ValueError):
    """Even the smallest allowed rendering does not fit the byte cap."""


def _colour(key: str) -> tuple[int, int, int]:
    # Stable per class (or track): the same object keeps its colour across snapshots.
    h = zlib.crc32(key.encode())
    return (64 + h % 192, 64 + (h >> 8) % 192, 64 + (h >> 16) % 192)


def _label(frame: np.ndarray, text: str, x: int, y: int, colour: tuple[int, int, int]) -> None:
    scale = max(0.4, min(frame.shape[:2]) / 900)
    thick = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
    y_top = max(0, y - th - base - 2)
    x = max(0, min(x, frame.shape[1] - tw - 4))  # keep labels of edge objects on the image
    cv2.rectangle(frame, (x, y_top), (x + tw + 4, y_top + th + base + 2), colour, -1)
    cv2.putText(frame, text, (x + 2, y_top + th + 1), _FONT, scale, (0, 0, 0), thick, cv2.LINE_AA)


def annotate(
    frame_bgr: np.ndarray,
    detections_or_tracks: Sequence[Detection | Track],
    zones: Mapping[str, Sequence[tuple[float, float]]] | None = None,
) -> np.ndarray:
    """Return a copy of the frame with zones (pixel polygons), boxes and labels drawn."""
    out = frame_bgr.copy()
    line = max(1, round(min(out.shape[:2]) / 300))
    for name, polygon in (zones or {}).items():
        pts = np.round(np.asarray(polygon, dtype=np.float64)).astype(np.int32)
        if len(pts) < 2:
            continue
        overlay = out.copy()
        cv2.fillPoly(overlay, [pts], _ZONE_COLOUR)
        cv2.addWeighted(overlay, 0.2, out, 0.8, 0, dst=out)
        cv2.polylines(out, [pts], True, _ZONE_COLOUR, line, cv2.LINE_AA)
        top = pts[np.argmin(pts[:, 1])]
        _label(out, name, int(top[0]), int(top[1]) + 2, _ZONE_COLOUR)
    for obj in detections_or_tracks:
        x1, y1, x2, y2 = (round(v) for v in obj.box)
        if isinstance(obj, Track):
            text = f"#{obj.track_id} {obj.cls} {obj.score:.2f}"
            colour = _colour(f"track{obj.track_id}")
        else:
            text = f"{obj.cls} {obj.score:.2f}"
            colour = _colour(obj.cls)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, line + 1)
        _label(out, text, x1, y1, colour)
    return out


def encode_jpeg_capped(frame_bgr: np.ndarray, max_bytes: int = 200_000) -> bytes:
    """Encode as JPEG no larger than ``max_bytes``: lower the quality, then scale down."""
    if max_bytes <= 0:
        raise ValueError("max_bytes must be > 0")
    img = frame_bgr
    while True:
        for quality in _QUALITIES:
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise ValueError(f"cannot encode a frame of shape {img.shape} as JPEG")
            if buf.size <= max_bytes:
                if img is not frame_bgr:
                    logger.debug(
                        "snapshot scaled to %dx%d at quality %d to fit %d bytes",
                        img.shape[1],
                        img.shape[0],
                        quality,
                        max_bytes,
                    )
                return buf.tobytes()
        h, w = img.shape[:2]
        nw, nh = int(w * _SCALE_STEP), int(h * _SCALE_STEP)
        if min(nw, nh) < _MIN_SIDE:
            raise SnapshotTooLargeError(
                f"a {w}x{h} frame does not fit in {max_bytes} bytes even at quality "
                f"{_QUALITIES[-1]}"
            )
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
