"""Frame sources: sampling, drop-oldest under a slow consumer, reconnect with backoff.

The live-stream tests serve a real MJPEG stream (multipart/x-mixed-replace) from an HTTP
server on 127.0.0.1 that the test stops and starts again.
"""

from __future__ import annotations

import itertools
import random
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.sources import Backoff, SourceError, open_source

VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
VTEST_FRAMES = 795  # 10 fps, 79.5 s


@pytest.fixture
def vtest() -> str:
    if not VTEST.exists():
        pytest.fail(f"{VTEST} is missing: apt-get install -y opencv-doc")
    return str(VTEST)


# --------------------------------------------------------------------------- files


def test_file_sampled_at_configured_rate(vtest: str) -> None:
    source = open_source(vtest, sample_fps=2.0)
    got = list(source.frames())
    source.close()
    # 10 fps sampled at 2 fps: every fifth frame, none dropped.
    assert len(got) == VTEST_FRAMES // 5 + (1 if VTEST_FRAMES % 5 else 0)
    stamps = [t for t, _ in got]
    assert stamps[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert np.allclose(np.diff(stamps), 0.5)
    assert got[0][1].shape == (576, 768, 3)
    assert source.stats.frames_read == VTEST_FRAMES
    assert source.stats.frames_sampled == len(got)
    assert source.stats.frames_dropped == 0
    assert source.finished


def test_looped_file_keeps_time_moving(vtest: str) -> None:
    source = open_source(vtest, sample_fps=1.0, loop=True)
    stamps = []
    for stamp, _ in source.frames():
        stamps.append(stamp)
        if len(stamps) == 85:  # 80 a pass: this crosses into the second pass
            break
    source.close()
    assert all(b > a for a, b in itertools.pairwise(stamps))
    assert source.stats.opens == 2


def test_close_stops_the_reader(vtest: str) -> None:
    source = open_source(vtest, sample_fps=10.0)
    frames = source.frames()
    next(frames)
    source.close()
    assert source._thread is not None
    assert not source._thread.is_alive()
    assert source.stats.frames_read < VTEST_FRAMES


def test_missing_file_and_bad_rate() -> None:
    with pytest.raises(SourceError, match="not found"):
        open_source("/nonexistent/clip.mp4", sample_fps=1.0)
    with pytest.raises(SourceError, match="sample_fps"):
        open_source("rtsp://127.0.0.1:1/x", sample_fps=0)


def test_slow_consumer_gets_recent_frames_and_oldest_are_dropped(vtest: str) -> None:
    # Played at its own speed, a file behaves like a camera: the reader never waits.
    source = open_source(vtest, sample_fps=10.0, realtime=True, queue_size=2)
    started = time.monotonic()
    received: list[tuple[float, float]] = []  # (video time, wall time since start)
    for stamp, _ in source.frames():
        received.append((stamp, time.monotonic() - started))
        time.sleep(0.4)  # a detector far slower than the camera
        if len(received) == 6:
            break
    source.close()
    read = source.stats.frames_read
    assert read >= 18  # ~2.4 s of 10 fps video went by while only 6 were used
    assert source.stats.frames_dropped >= read - 6 - 2 - 2
    gaps = np.diff([s for s, _ in received])
    assert (gaps > 0.15).all()  # frames in between were skipped
    # Each frame handed over is at most a queue's worth behind the live edge.
    for stamp, wall in received[1:]:
        assert wall - stamp < 0.7


# --------------------------------------------------------------------------- backoff


def test_backoff_grows_is_jittered_and_capped() -> None:
    runs = []
    for seed in (1, 2):
        b = Backoff(base_s=0.5, cap_s=4.0, rng=random.Random(seed))
        runs.append([b.next_delay() for _ in range(8)])
    for delays in runs:
        for n, d in enumerate(delays):
            ceiling = min(4.0, 0.5 * 2**n)
            assert ceiling / 2 <= d <= ceiling
        assert max(delays) <= 4.0
        assert delays[-1] > delays[0] * 2
    assert runs[0] != runs[1]  # two cameras do not retry in step
    b = Backoff(base_s=0.5, cap_s=4.0, rng=random.Random(3))
    for _ in range(5):
        b.next_delay()
    b.reset()
    assert b.next_delay() <= 0.5


# --------------------------------------------------------------------------- MJPEG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _jpeg(n: int) -> bytes:
    img = np.full((240, 320, 3), 40, dtype=np.uint8)
    cv2.putText(img, str(n), (20, 150), cv2.FONT_HERSHEY_SIMPLEX, 3, (255, 255, 255), 5)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


class MjpegCamera:
    """A synthetic IP camera: MJPEG over HTTP at ``fps``; stoppable and restartable."""

    def __init__(self, port: int, fps: float = 20.0) -> None:
        self.port = port
        self.fps = fps
        self.served = 0
        self._server: ThreadingHTTPServer | None = None
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def start(self) -> None:
        camera = self
        stop = self._stop = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                n = 0
                deadline = time.monotonic() + 60  # bounded even if a test forgets to stop
                try:
                    while not stop.is_set() and time.monotonic() < deadline:
                        body = _jpeg(n)
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\n"
                            + f"Content-Length: {len(body)}\r\n\r\n".encode()
                            + body
                            + b"\r\n"
                        )
                        self.wfile.flush()
                        camera.served += 1
                        n += 1
                        stop.wait(1 / camera.fps)
                except (BrokenPipeError, ConnectionResetError):
                    return

            def log_message(self, format: str, *args: object) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}).start()

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def camera() -> Iterator[MjpegCamera]:
    cam = MjpegCamera(_free_port())
    cam.start()
    yield cam
    cam.stop()


def _take(frames: Iterator[tuple[float, np.ndarray]], n: int) -> list[tuple[float, np.ndarray]]:
    return [next(frames) for _ in range(n)]


def test_mjpeg_stream_is_sampled(camera: MjpegCamera) -> None:
    source = open_source(camera.url, sample_fps=4.0, timeout_s=3.0)
    try:
        got = _take(source.frames(), 6)
    finally:
        source.close()
    assert got[0][1].shape == (240, 320, 3)
    stamps = [t for t, _ in got]
    # Sampled at ~4 fps from a 20 fps stream: the rest were grabbed but not decoded.
    assert np.median(np.diff(stamps)) == pytest.approx(0.25, abs=0.1)
    assert source.stats.frames_read > 2 * source.stats.frames_sampled


def test_mjpeg_reconnects_with_growing_jittered_capped_backoff(camera: MjpegCamera) -> None:
    backoff = Backoff(base_s=0.2, cap_s=0.8, rng=random.Random(5))
    source = open_source(camera.url, sample_fps=5.0, backoff=backoff, timeout_s=2.0)
    watchdog = threading.Timer(45, source.close)  # the test can never hang
    watchdog.start()
    try:
        frames = source.frames()
        _take(frames, 3)
        camera.stop()
        # The stream ends; every reconnect is refused until the camera is back.
        deadline = time.monotonic() + 20
        while len(source.reconnect_delays) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        delays = list(source.reconnect_delays)
        assert len(delays) >= 5, source.stats
        assert source.stats.open_failures >= 4
        for n, d in enumerate(delays[:5]):
            ceiling = min(0.8, 0.2 * 2**n)
            assert ceiling / 2 <= d <= ceiling
        assert len(set(delays)) == len(delays)  # jittered, not a fixed ladder
        camera.start()
        # Drain what was queued before the outage, then see frames from the new connection.
        resumed_at = time.time()
        while True:
            stamp, frame = next(frames)
            if stamp >= resumed_at:
                break
        assert frame.shape == (240, 320, 3)
        assert source.stats.opens == 2
        assert source.stats.reconnects >= 5
        assert backoff.attempt == 0  # reset once frames flowed again
    finally:
        watchdog.cancel()
        source.close()


def test_unreachable_stream_gives_up_after_max_failures() -> None:
    url = f"http://127.0.0.1:{_free_port()}/stream.mjpg"
    source = open_source(
        url, sample_fps=1.0, backoff=Backoff(base_s=0.05, cap_s=0.1), max_failures=3
    )
    assert list(source.frames()) == []
    assert source.stats.open_failures == 4
    assert source.stats.opens == 0
    assert len(source.reconnect_delays) == 3
