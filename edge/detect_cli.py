"""``edge-agent detect``: run the detector on a photo or a video and draw what it sees.

For installers: point a camera, grab a still or a clip, and check that the objects the rules
care about are found and that each zone covers the right ground.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import yaml

from edge.annotate import annotate
from edge.detector import Detection, DetectorConfig, DetectorError, load_detector
from edge.sources import SourceError, open_source
from edge.tracker import Track, Tracker

__all__ = ["build_parser", "load_zones", "main"]

logger = logging.getLogger(__name__)

Zones = dict[str, list[tuple[float, float]]]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_VIDEO_OUT = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}

_EPILOG = """\
examples:
  edge-agent detect still.jpg --out checked.jpg
  edge-agent detect still.jpg --out checked.jpg --zones device.yaml
  edge-agent detect clip.mp4 --out checked.mp4 --max-frames 100
  edge-agent detect clip.mp4 --out frames/ --fps 1      (one annotated JPEG per frame)

zones file: either a device configuration (its `zones:` section is used) or a plain map
  fire_lane: [[120, 400], [620, 400], [700, 570], [60, 570]]
with polygon corners in pixels of the camera image, x to the right, y down from the top-left.
Each printed object says which zone it stands in: the bottom-centre of its box, where it
touches the ground, is the point tested.

Output: one line per object, e.g.
  frame 3  t=1.50s  #7 car 0.81  box=[412,300,598,420]  zone=fire_lane
(#7 is the tracker's id, shown for video once the object was seen twice.)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent detect",
        description="Detect objects in a photo or video, print them, and save a copy with "
        "boxes, labels and zones drawn on it.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input",
        help="photo (jpg/png…), video file (mp4/avi…), or a camera: rtsp:// or http:// MJPEG "
        "URL or device index such as 0 (use --max-frames to stop)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="where to write: an image for a photo; for a video a .mp4/.avi file, "
        "or a folder to get one JPEG per frame",
    )
    parser.add_argument("--model", help="model id from models/manifest.yaml (default: its default)")
    parser.add_argument("--zones", type=Path, help="YAML file with zone polygons (see below)")
    parser.add_argument(
        "--max-frames", type=int, default=None, help="stop a video after this many frames"
    )
    parser.add_argument(
        "--fps", type=float, default=5.0, help="video frames per second to analyse (default 5)"
    )
    parser.add_argument(
        "--score", type=float, default=None, help="minimum score 0–1 (default: the model's)"
    )
    parser.add_argument(
        "--classes",
        help="comma-separated classes to keep, e.g. person,car,motorcycle (default: all)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the model")
    return parser


def load_zones(path: Path) -> Zones:
    """Zones from a device configuration (its ``zones:``) or a plain name → polygon map."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(raw, Mapping) and isinstance(raw.get("zones"), Mapping):
        raw = raw["zones"]
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a map of zone name to a list of [x, y] points")
    zones: Zones = {}
    for name, points in raw.items():
        try:
            polygon = [(float(p[0]), float(p[1])) for p in points]
        except (TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"{path}: zone {name!r} is not a list of [x, y] points") from exc
        if len(polygon) < 3:
            raise ValueError(f"{path}: zone {name!r} needs at least 3 points")
        zones[str(name)] = polygon
    return zones


def zone_of(box: tuple[float, float, float, float], zones: Zones) -> str | None:
    """The first zone containing the box's bottom-centre (where the object stands)."""
    point = ((box[0] + box[2]) / 2, box[3])
    for name, polygon in zones.items():
        contour = np.asarray(polygon, dtype=np.float32).reshape(-1, 1, 2)
        if cv2.pointPolygonTest(contour, point, False) >= 0:
            return name
    return None


def _print_objects(objects: Sequence[Detection | Track], zones: Zones, prefix: str) -> None:
    if not objects:
        print(f"{prefix}  (nothing found)")
    for obj in objects:
        ident = f"#{obj.track_id} " if isinstance(obj, Track) else ""
        box = ",".join(str(round(v)) for v in obj.box)
        where = zone_of(obj.box, zones) if zones else None
        zone_text = f"  zone={where}" if where else ("  zone=-" if zones else "")
        print(f"{prefix}  {ident}{obj.cls} {obj.score:.2f}  box=[{box}]{zone_text}")


def _run_image(args: argparse.Namespace, detector_config: DetectorConfig, zones: Zones) -> int:
    frame = cv2.imread(args.input, cv2.IMREAD_COLOR)
    if frame is None:
        print(f"error: cannot read image {args.input}", file=sys.stderr)
        return 2
    detector = load_detector(detector_config)
    detections = detector.detect(frame)
    _print_objects(detections, zones, "image")
    out = Path(args.out)
    if out.suffix.lower() not in _IMAGE_SUFFIXES:
        out = out / (Path(args.input).stem + "_detected.jpg") if out.is_dir() else out
    if not cv2.imwrite(str(out), annotate(frame, detections, zones)):
        print(f"error: cannot write {out}", file=sys.stderr)
        return 2
    print(f"wrote {out}  ({len(detections)} objects, model {detector.model_id})")
    return 0


def _run_video(args: argparse.Namespace, detector_config: DetectorConfig, zones: Zones) -> int:
    detector = load_detector(detector_config)
    tracker = Tracker()
    out = Path(args.out)
    to_folder = out.suffix.lower() not in _VIDEO_OUT
    if to_folder:
        out.mkdir(parents=True, exist_ok=True)
    writer: cv2.VideoWriter | None = None
    frames = 0
    # A camera that cannot be reached is given up on after a few tries: this is a check tool.
    source = open_source(args.input, args.fps, realtime=False, max_failures=3)
    try:
        for stamp, frame in source.frames():
            tracks = tracker.update(detector.detect(frame), stamp)
            _print_objects(tracks, zones, f"frame {frames}  t={stamp:.2f}s")
            drawn = annotate(frame, tracks, zones)
            if to_folder:
                cv2.imwrite(str(out / f"frame_{frames:05d}.jpg"), drawn)
            else:
                if writer is None:
                    fourcc = cv2.VideoWriter.fourcc(*_VIDEO_OUT[out.suffix.lower()])
                    h, w = drawn.shape[:2]
                    writer = cv2.VideoWriter(str(out), fourcc, args.fps, (w, h))
                    if not writer.isOpened():
                        print(f"error: cannot write video {out}", file=sys.stderr)
                        return 2
                writer.write(drawn)
            frames += 1
            if args.max_frames is not None and frames >= args.max_frames:
                break
    finally:
        source.close()
        if writer is not None:
            writer.release()
    if frames == 0:
        print(f"error: no frames read from {args.input}", file=sys.stderr)
        return 2
    print(f"wrote {out}  ({frames} frames, model {detector.model_id})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_frames is not None and args.max_frames < 1:
        print("error: --max-frames must be at least 1", file=sys.stderr)
        return 2
    try:
        zones = load_zones(args.zones) if args.zones else {}
        classes = (
            [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
        )
        detector_config = DetectorConfig(
            model=args.model, score_threshold=args.score, classes=classes, threads=args.threads
        )
        if Path(args.input).suffix.lower() in _IMAGE_SUFFIXES:
            return _run_image(args, detector_config, zones)
        return _run_video(args, detector_config, zones)
    except (DetectorError, SourceError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
