"""Edge vision loop throughput: source → detect → track → annotate + JPEG (only when a new
object is confirmed, as an alert would need), against the bare onnxruntime session on the same
frames already preprocessed, both in the same run.

    python bench/bench_edge.py [--frames 60] [--threads 2] [--model ID] [--video PATH]

Both run in alternating chunks of a few frames, so load from other processes on a shared
machine falls on both alike; the ratio is the median over chunks.

Prints frames/s of both, their ratio (the loop's overhead; target >= 0.85) and how many
cameras sampled at 2 fps one such box serves.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Generator
from pathlib import Path

import cv2
import numpy as np

from edge.annotate import annotate, encode_jpeg_capped
from edge.detector import DetectorConfig, OnnxDetector, load_detector
from edge.sources import open_source
from edge.tracker import Tracker

VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
CAMERA_FPS = 2.0
TIME_LIMIT_S = 120.0


def read_frames(video: Path, count: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(video))
    frames: list[np.ndarray] = []
    try:
        while len(frames) < count:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        cap.release()
    return frames


def vision_loop(
    detector: OnnxDetector, video: Path, stats: dict[str, int]
) -> Generator[None, None, None]:
    """The whole loop, one frame per ``next()``: source, detect, track, and annotate + JPEG
    only when a new object is confirmed (what an alert would need)."""
    tracker = Tracker()
    announced: set[int] = set()
    fps = cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FPS) or 10.0
    # Every frame of the clip, read as fast as the loop takes them: nothing dropped.
    source = open_source(str(video), sample_fps=fps, realtime=False, loop=True)
    try:
        for stamp, frame in source.frames():
            tracks = tracker.update(detector.detect(frame), stamp)
            new = [t for t in tracks if t.track_id not in announced]
            if new:
                announced.update(t.track_id for t in new)
                encode_jpeg_capped(annotate(frame, tracks, None))
                stats["snapshots"] += 1
            stats["frames"] += 1
            yield
    finally:
        source.close()


def measure(
    detector: OnnxDetector, video: Path, tensors: list[np.ndarray], chunk: int
) -> tuple[float, float, float, int]:
    """Bare session and whole loop in alternating chunks of frames, so that load from other
    processes falls on both alike. Returns bare fps, loop fps, median chunk ratio, snapshots."""
    stats = {"frames": 0, "snapshots": 0}
    loop = vision_loop(detector, video, stats)
    next(loop)  # open the source and warm up outside the clock
    bare_s = loop_s = 0.0
    ratios: list[float] = []
    deadline = time.monotonic() + TIME_LIMIT_S
    try:
        for start in range(0, len(tensors), chunk):
            part = tensors[start : start + chunk]
            t0 = time.perf_counter()
            for tensor in part:
                detector.infer(tensor)
            t1 = time.perf_counter()
            for _ in part:
                next(loop)
            t2 = time.perf_counter()
            bare_s += t1 - t0
            loop_s += t2 - t1
            ratios.append((t1 - t0) / (t2 - t1))
            if time.monotonic() > deadline:
                break
    finally:
        loop.close()
    frames = stats["frames"] - 1
    return frames / bare_s, frames / loop_s, statistics.median(ratios), stats["snapshots"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60, help="frames per measurement (<=500)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    parser.add_argument("--model", default=None, help="model id (default: the manifest's)")
    parser.add_argument("--video", type=Path, default=VTEST, help="clip to run on")
    parser.add_argument("--chunk", type=int, default=5, help="frames per alternating chunk")
    args = parser.parse_args()
    count = max(1, min(args.frames, 500))
    if not args.video.exists():
        sys.exit(f"{args.video} is missing (apt-get install -y opencv-doc)")

    detector = load_detector(DetectorConfig(model=args.model, threads=args.threads))
    frames = read_frames(args.video, count)
    count = len(frames)
    tensors = [detector.preprocess(f)[0] for f in frames]
    for tensor in tensors[:5]:  # warm-up: first runs allocate
        detector.infer(tensor)

    bare, full, ratio, snaps = measure(detector, args.video, tensors, args.chunk)
    cameras = math.floor(full / CAMERA_FPS)
    print(f"model {detector.model_id}, {args.threads} threads, {count} frames of {args.video.name}")
    print(f"bare onnxruntime session : {bare:7.1f} frames/s ({1000 / bare:.1f} ms)")
    print(f"whole vision loop        : {full:7.1f} frames/s ({1000 / full:.1f} ms)")
    print(f"  (source + preprocess + detect + NMS + track; {snaps} annotated JPEG snapshots)")
    print(f"load average while measuring: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"ratio loop / bare        : {ratio:7.2f}  (median over chunks; target >= 0.85)")
    print(f"cameras at {CAMERA_FPS:g} fps one {args.threads}-core box serves: {cameras}")


if __name__ == "__main__":
    main()
