"""A synthetic camera: an HTTP MJPEG stream (``multipart/x-mixed-replace``) on 127.0.0.1.

Frames come from a looping video file (default: OpenCV's ``vtest.avi``, pedestrians on a
walkway) or, without one, from a generated scene with a moving object. The edge agent reads
``http://127.0.0.1:<port>/stream`` with ``cv2.VideoCapture`` exactly as it reads an IP camera;
``/snapshot.jpg`` serves the current frame alone.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Self

import cv2
import numpy as np

from simulators.errors import SimulatorError

__all__ = ["DEFAULT_VIDEO", "FrameSource", "SyntheticCamera"]

log = logging.getLogger(__name__)

DEFAULT_VIDEO = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
BOUNDARY = "cwgframe"


class FrameSource:
    """Frames forever: a video file, looped, or generated frames of ``size``."""

    def __init__(self, video: Path | None = None, size: tuple[int, int] = (640, 360)) -> None:
        self.video = video
        self.size = size
        self._cap: cv2.VideoCapture | None = None
        self._n = 0
        if video is not None:
            self._cap = cv2.VideoCapture(str(video))
            if not self._cap.isOpened():
                raise SimulatorError(
                    f"cannot open video {video}; install opencv-doc (apt-get install -y "
                    "opencv-doc) for the default, or pass another file"
                )

    def next(self) -> np.ndarray:
        self._n += 1
        if self._cap is not None:
            ok, frame = self._cap.read()
            if not ok:  # end of file: loop
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, frame = self._cap.read()
            if ok:
                return frame
            raise SimulatorError(f"{self.video}: no frame could be read")
        return self._generated()

    def _generated(self) -> np.ndarray:
        w, h = self.size
        img = np.full((h, w, 3), (60, 90, 70), np.uint8)
        img[: h // 3] = (200, 160, 120)
        x = (self._n * 6) % (w + 80) - 40
        cv2.rectangle(img, (x, h // 2), (x + 80, h // 2 + 40), (40, 40, 200), -1)
        cv2.putText(
            img,
            f"cwg synthetic camera #{self._n}",
            (10, 24),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.6,
            (255, 255, 255),
            1,
        )
        return img

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()


class SyntheticCamera:
    """Serves the latest frame to every client at ``fps``; a context manager."""

    def __init__(
        self,
        video: Path | None = DEFAULT_VIDEO,
        *,
        fps: float = 10.0,
        host: str = "127.0.0.1",
        port: int = 0,
        quality: int = 80,
        generated_size: tuple[int, int] = (640, 360),
    ) -> None:
        if fps <= 0:
            raise SimulatorError("fps must be > 0")
        self.fps = fps
        self.quality = quality
        self._source = FrameSource(video, generated_size)
        self._frame = b""
        self._seq = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                log.debug("camera http: " + format, *args)

            def do_GET(self) -> None:
                if self.path in ("/stream", "/stream.mjpg", "/"):
                    camera._serve_stream(self)
                elif self.path == "/snapshot.jpg":
                    camera._serve_snapshot(self)
                else:
                    self.send_error(404, "try /stream or /snapshot.jpg")

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream"

    def start(self) -> None:
        self._produce_one()
        self._threads = [
            threading.Thread(target=self._produce, name="camera-frames", daemon=True),
            threading.Thread(target=self._server.serve_forever, name="camera-http", daemon=True),
        ]
        for t in self._threads:
            t.start()
        log.info("synthetic camera at %s (%.1f fps)", self.url, self.fps)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        for t in self._threads:
            t.join(5)
        self._source.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- frames ----------------------------------------------------------------------------
    def _produce_one(self) -> None:
        ok, buf = cv2.imencode(
            ".jpg", self._source.next(), [int(cv2.IMWRITE_JPEG_QUALITY), self.quality]
        )
        if ok:
            with self._cond:
                self._frame = bytes(buf)
                self._seq += 1
                self._cond.notify_all()

    def _produce(self) -> None:
        period = 1.0 / self.fps
        due = time.monotonic()
        while not self._stop.is_set():
            due += period
            self._produce_one()
            self._stop.wait(max(0.0, due - time.monotonic()))

    def _next_frame(self, after: int) -> tuple[int, bytes]:
        with self._cond:
            while self._seq == after and not self._stop.is_set():
                self._cond.wait(1.0)
            return self._seq, self._frame

    # -- HTTP ------------------------------------------------------------------------------
    def _serve_stream(self, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        h.send_header("Cache-Control", "no-cache, private")
        h.send_header("Connection", "close")
        h.end_headers()
        seq = 0
        try:
            while not self._stop.is_set():
                seq, frame = self._next_frame(seq)
                h.wfile.write(
                    f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                    f"Content-Length: {len(frame)}\r\n\r\n".encode()
                    + frame
                    + b"\r\n"
                )
                h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.debug("camera client went away")

    def _serve_snapshot(self, h: BaseHTTPRequestHandler) -> None:
        with self._cond:
            frame = self._frame
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(len(frame)))
        h.end_headers()
        h.wfile.write(frame)
