"""The synthetic camera serves an MJPEG stream that OpenCV reads like an IP camera."""

from __future__ import annotations

import urllib.request

import cv2
import pytest

from simulators.camera import DEFAULT_VIDEO, SyntheticCamera


@pytest.mark.parametrize("video", [DEFAULT_VIDEO, None], ids=["vtest.avi", "generated"])
def test_cv2_reads_frames_from_the_stream(video: object) -> None:
    if video is not None and not DEFAULT_VIDEO.exists():
        pytest.fail(f"{DEFAULT_VIDEO} is missing: apt-get install -y opencv-doc")
    with SyntheticCamera(video, fps=25) as cam:  # type: ignore[arg-type]
        assert cam.url.startswith("http://127.0.0.1:")
        cap = cv2.VideoCapture(cam.url)
        try:
            frames = [cap.read() for _ in range(5)]
        finally:
            cap.release()
        assert all(ok for ok, _ in frames)
        shapes = {f.shape for _, f in frames}
        assert shapes == ({(576, 768, 3)} if video else {(360, 640, 3)})
        with urllib.request.urlopen(f"http://127.0.0.1:{cam.port}/snapshot.jpg", timeout=5) as r:
            assert r.headers["Content-Type"] == "image/jpeg"
            assert r.read(3) == b"\xff\xd8\xff"
