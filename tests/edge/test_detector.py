"""The committed detector on real photos and video frames shipped by registry packages."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError
from skimage import data

from edge import detect_cli
from edge.annotate import SnapshotTooLargeError, annotate, encode_jpeg_capped
from edge.detector import (
    DEFAULT_MANIFEST,
    Detection,
    DetectorConfig,
    DetectorError,
    ModelIntegrityError,
    ModelNotFoundError,
    OnnxDetector,
    file_sha256,
    load_detector,
    load_manifest,
)
from edge.tracker import Track

VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")

# Drawn by hand on skimage's astronaut (512x512): Eileen Collins from the top of her head to
# the bottom edge, her left arm at x≈10 and her right shoulder at x≈365. The flag and the
# model of the shuttle on the right are not part of her.
ASTRONAUT_BOX = (10.0, 10.0, 365.0, 512.0)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def bgr(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def astronaut() -> np.ndarray:
    return bgr(data.astronaut())  # type: ignore[no-untyped-call]


def motorcycles() -> tuple[np.ndarray, np.ndarray]:
    left, right, _ = data.stereo_motorcycle()  # type: ignore[no-untyped-call]
    return bgr(left), bgr(right)


def vtest_frame(index: int) -> np.ndarray:
    if not VTEST.exists():
        pytest.fail(f"{VTEST} is missing: apt-get install -y opencv-doc")
    cap = cv2.VideoCapture(str(VTEST))
    try:
        frame = None
        for _ in range(index + 1):
            ok, frame = cap.read()
            assert ok
        assert frame is not None
        return frame
    finally:
        cap.release()


@pytest.fixture(scope="module")
def detector() -> OnnxDetector:
    return load_detector(DetectorConfig(threads=2))


def test_manifest_matches_committed_files() -> None:
    manifest = load_manifest()
    assert manifest.get(None).id == manifest.default
    for entry in manifest.models:
        if not entry.committed:
            continue
        path = DEFAULT_MANIFEST.parent / entry.file
        assert path.stat().st_size == entry.size_bytes
        assert file_sha256(path) == entry.sha256
        # The repository carries the model: it must stay small.
        assert entry.size_bytes <= 16 * 1024 * 1024


def test_default_model_is_nanodet_with_coco_classes(detector: OnnxDetector) -> None:
    assert detector.model_id == "nanodet-m-416"
    assert detector.model_version
    names = detector.entry.classes
    assert len(names) == 80
    assert names[0] == "person"
    assert {"car", "truck", "bus", "bicycle", "motorcycle"} <= set(filter(None, names))


def test_astronaut_is_one_person(detector: OnnxDetector) -> None:
    found = detector.detect(astronaut())
    people = [d for d in found if d.cls == "person"]
    assert len(people) == 1, found
    person = people[0]
    assert iou(person.box, ASTRONAUT_BOX) > 0.8
    assert person.score > 0.5
    cx = (person.box[0] + person.box[2]) / 2
    assert cx < 256  # she stands on the left half


def test_motorcycle_photo(detector: OnnxDetector) -> None:
    for photo in motorcycles():
        h, w = photo.shape[:2]
        bikes = [d for d in detector.detect(photo) if d.cls == "motorcycle"]
        assert len(bikes) == 1
        x1, y1, x2, y2 = bikes[0].box
        # The motorcycle fills most of the photo.
        assert (x2 - x1) * (y2 - y1) > 0.4 * w * h
        assert w / 3 < (x1 + x2) / 2 < 2 * w / 3


def test_pedestrians_on_walkway(detector: OnnxDetector) -> None:
    frame = vtest_frame(2)
    found = detector.detect(frame)
    people = [d for d in found if d.cls == "person"]
    assert len(people) >= 3
    h, w = frame.shape[:2]
    for d in found:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 < x2 <= w
        assert 0 <= y1 < y2 <= h
        assert detector.score_threshold <= d.score <= 1
    # Sorted best first.
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    # Nothing left that NMS should have removed: same-class boxes barely overlap.
    for i, a in enumerate(people):
        for b in people[i + 1 :]:
            assert iou(a.box, b.box) < detector.nms_iou


def test_classes_filter_and_threshold() -> None:
    frame = vtest_frame(2)
    cars_only = load_detector(DetectorConfig(classes=["car", "truck", "bus"], threads=1))
    found = cars_only.detect(frame)
    assert found
    assert {d.cls for d in found} <= {"car", "truck", "bus"}
    strict = load_detector(DetectorConfig(score_threshold=0.75, threads=1))
    assert all(d.score >= 0.75 for d in strict.detect(frame))


def test_empty_scene_finds_nothing(detector: OnnxDetector) -> None:
    assert detector.detect(np.full((480, 640, 3), 127, dtype=np.uint8)) == []


def test_rejects_a_non_bgr_frame(detector: OnnxDetector) -> None:
    with pytest.raises(ValueError, match="HxWx3"):
        detector.detect(np.zeros((100, 100), dtype=np.uint8))


def test_detection_is_immutable() -> None:
    d = Detection(cls="person", score=0.9, box=(1.0, 2.0, 3.0, 4.0))
    with pytest.raises(AttributeError):
        d.score = 0.1  # type: ignore[misc]


def test_config_refuses_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="modle"):
        DetectorConfig.model_validate({"modle": "nanodet-m-416"})


def test_unknown_model_and_class_are_refused() -> None:
    with pytest.raises(ModelNotFoundError, match="no model 'yolo-huge'"):
        load_detector(DetectorConfig(model="yolo-huge"))
    with pytest.raises(DetectorError, match="unicorn"):
        load_detector(DetectorConfig(classes=["person", "unicorn"]))


def test_tampered_model_file_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.yaml"
    shutil.copyfile(DEFAULT_MANIFEST, manifest)
    entry = load_manifest(manifest).get(None)
    (tmp_path / entry.file).write_bytes(b"not the model")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_detector(DetectorConfig(manifest=manifest))
    (tmp_path / entry.file).unlink()
    with pytest.raises(ModelNotFoundError, match="missing"):
        load_detector(DetectorConfig(manifest=manifest))


# --------------------------------------------------------------------------- other models


def test_ssd_model_through_the_same_interface() -> None:
    """The optional SSD entry (``ssd_tf`` decoder), when it was built on this machine."""
    entry = load_manifest().get("ssd-mobilenet-v2-coco")
    if not (DEFAULT_MANIFEST.parent / entry.file).exists():
        pytest.skip("not built: python scripts/build_model.py ssd-mobilenet-v2-coco")
    ssd = load_detector(DetectorConfig(model="ssd-mobilenet-v2-coco"))
    assert ssd.model_id == "ssd-mobilenet-v2-coco"
    people = [d for d in ssd.detect(astronaut()) if d.cls == "person"]
    assert len(people) == 1
    assert iou(people[0].box, ASTRONAUT_BOX) > 0.7
    walkway = ssd.detect(vtest_frame(2))
    assert sum(d.cls == "person" for d in walkway) >= 2
    assert all(d.cls is not None for d in walkway)


# --------------------------------------------------------------------------- annotate


def test_annotate_draws_on_a_copy() -> None:
    frame = np.full((240, 320, 3), 90, dtype=np.uint8)
    original = frame.copy()
    drawn = annotate(
        frame,
        [
            Detection("car", 0.9, (40, 60, 160, 140)),
            Track(7, "person", (200, 50, 260, 200), 0.8, 0, 1, 3),
        ],
        {"fire_lane": [(0, 200), (320, 200), (320, 240), (0, 240)]},
    )
    assert np.array_equal(frame, original)
    assert drawn.shape == frame.shape
    assert not np.array_equal(drawn[60, 40:160], original[60, 40:160])  # box edge
    assert not np.array_equal(drawn[220, 100], original[220, 100])  # zone tint
    assert np.array_equal(drawn[20, 300], original[20, 300])  # untouched corner


def test_jpeg_is_capped_by_quality_then_size() -> None:
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(720, 1280, 3), dtype=np.uint8)  # compresses badly
    big = encode_jpeg_capped(noise, max_bytes=200_000)
    assert len(big) <= 200_000
    img = cv2.imdecode(np.frombuffer(big, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    assert img.shape[1] < 1280  # quality alone was not enough: it was scaled down
    smooth = np.full((720, 1280, 3), 120, dtype=np.uint8)
    kept = cv2.imdecode(np.frombuffer(encode_jpeg_capped(smooth), np.uint8), cv2.IMREAD_COLOR)
    assert kept is not None
    assert kept.shape == smooth.shape  # fits at once: full size
    with pytest.raises(SnapshotTooLargeError):
        encode_jpeg_capped(noise, max_bytes=500)


# --------------------------------------------------------------------------- detect CLI


def test_detect_cli_on_a_photo_with_zones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = tmp_path / "astronaut.png"
    cv2.imwrite(str(photo), astronaut())
    zones = tmp_path / "device.yaml"
    zones.write_text(
        "device_id: cam-1\nzones:\n"
        "  left_half: [[0, 0], [256, 0], [256, 512], [0, 512]]\n"
        "  right_half: [[256, 0], [512, 0], [512, 512], [256, 512]]\n"
    )
    out = tmp_path / "checked.jpg"
    assert detect_cli.main([str(photo), "--out", str(out), "--zones", str(zones)]) == 0
    text = capsys.readouterr().out
    assert "person" in text
    # Her feet (bottom-centre of the box) are in the left half.
    assert "zone=left_half" in text
    drawn = cv2.imread(str(out))
    assert drawn is not None
    assert drawn.shape == (512, 512, 3)


def test_detect_cli_on_a_video_writes_frames(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "frames"
    code = detect_cli.main(
        [str(VTEST), "--out", str(out), "--fps", "2", "--max-frames", "3", "--classes", "person"]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "frame_00000.jpg",
        "frame_00001.jpg",
        "frame_00002.jpg",
    ]
    text = capsys.readouterr().out
    assert "t=1.00s" in text
    assert "#" in text
    assert "person" in text
    assert "car" not in text


def test_detect_cli_help_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        detect_cli.main(["--help"])
    assert exc.value.code == 0
    assert "zones" in capsys.readouterr().out
    assert detect_cli.main([str(tmp_path / "none.jpg"), "--out", str(tmp_path / "o.jpg")]) == 2
    bad = tmp_path / "zones.yaml"
    bad.write_text("lane: [[0, 0], [1, 1]]\n")
    photo = tmp_path / "p.png"
    cv2.imwrite(str(photo), np.zeros((64, 64, 3), np.uint8))
    code = detect_cli.main([str(photo), "--out", str(tmp_path / "o.png"), "--zones", str(bad)])
    assert code == 2
    assert "at least 3 points" in capsys.readouterr().err


def test_nms_merges_vehicle_kinds_but_not_other_classes(detector: OnnxDetector) -> None:
    names = detector.entry.classes
    car, truck, person = names.index("car"), names.index("truck"), names.index("person")
    boxes = np.array(
        [[10, 10, 100, 100], [12, 10, 100, 102], [10, 10, 100, 100], [300, 300, 350, 400]],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    ids = np.array([car, truck, person, person], dtype=np.int64)
    # The van seen as car and as truck is one box; the person on the same spot stays.
    assert detector._nms(boxes, scores, ids) == [0, 2, 3]
    separate = load_detector(DetectorConfig(merge_classes=[], threads=1))
    assert separate._nms(boxes, scores, ids) == [0, 1, 2, 3]


def test_detect_cli_writes_an_annotated_video(tmp_path: Path) -> None:
    out = tmp_path / "checked.avi"
    assert detect_cli.main([str(VTEST), "--out", str(out), "--fps", "2", "--max-frames", "4"]) == 0
    cap = cv2.VideoCapture(str(out))
    try:
        frames = 0
        while cap.read()[0]:
            frames += 1
        assert frames == 4
        assert int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 768
    finally:
        cap.release()
