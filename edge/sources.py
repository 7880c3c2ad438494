"""Camera and video frame sources on OpenCV, sampled at a fixed rate.

A reader thread pulls frames from the capture, decodes only the ones due at ``sample_fps``
and hands them over through a small queue. For a live stream the queue drops its oldest
frame when full, so a slow detector never stalls reading and always sees a recent frame. A
lost stream is reopened after a jittered exponential backoff with a cap.

A file is read as fast as the consumer takes frames (none dropped, timestamps are video
time) unless ``realtime=True``, which plays it at its own speed like a camera.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

__all__ = [
    "Backoff",
    "CaptureSource",
    "FrameSource",
    "SourceError",
    "SourceStats",
    "open_source",
]

logger = logging.getLogger(__name__)


class SourceError(Exception):
    """A frame source cannot be opened or was misconfigured."""


class FrameSource(Protocol):
    """Yields (timestamp, BGR frame) pairs until closed or exhausted."""

    def frames(self) -> Iterator[tuple[float, np.ndarray]]: ...

    def close(self) -> None: ...


class Backoff:
    """Exponential delays with "equal jitter": half fixed, half random, capped.

    The n-th delay lies in [d/2, d] with d = min(cap, base * factor**n), so delays grow,
    never exceed the cap, and cameras that lost the same server do not retry in step.
    """

    def __init__(
        self,
        base_s: float = 0.5,
        cap_s: float = 30.0,
        factor: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if base_s <= 0 or cap_s < base_s or factor < 1:
            raise ValueError("need 0 < base_s <= cap_s and factor >= 1")
        self.base_s = base_s
        self.cap_s = cap_s
        self.factor = factor
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * self.factor**self.attempt)
        self.attempt += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class SourceStats:
    """Counters of one source; written by its reader thread only."""

    frames_read: int = 0  # grabbed from the capture, sampled or not
    frames_sampled: int = 0  # decoded and queued
    frames_dropped: int = 0  # queued but pushed out by newer frames before use
    opens: int = 0  # successful opens (1 + reconnects)
    open_failures: int = 0
    reconnects: int = 0
    last_error: str | None = None


def _is_camera_index(url: str) -> bool:
    return url.isdigit()


def _is_device(url: str) -> bool:
    # A local camera: "0", "1" … or a V4L2 node such as /dev/video0.
    return _is_camera_index(url) or url.startswith("/dev/video")


def _is_stream(url: str) -> bool:
    return _is_device(url) or url.split("://", 1)[0].lower() in {
        "http",
        "https",
        "rtsp",
        "rtsps",
        "rtmp",
        "udp",
        "tcp",
    }


class CaptureSource:
    """A :class:`FrameSource` over ``cv2.VideoCapture`` with a reader thread."""

    def __init__(
        self,
        url: str,
        sample_fps: float,
        *,
        loop: bool = False,
        realtime: bool | None = None,
        queue_size: int = 2,
        backoff: Backoff | None = None,
        timeout_s: float = 5.0,
        max_failures: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if sample_fps <= 0:
            raise SourceError("sample_fps must be > 0")
        if queue_size < 1:
            raise SourceError("queue_size must be >= 1")
        self.url = url
        self.live = _is_stream(url)
        if not self.live and not Path(url).is_file():
            raise SourceError(f"video file not found: {url}")
        self.sample_fps = sample_fps
        self.loop = loop
        # Live streams always drop; files only when played at their own speed.
        self.realtime = self.live if realtime is None else realtime or self.live
        self.backoff = backoff or Backoff()
        self.timeout_s = timeout_s
        self.max_failures = max_failures
        self.stats = SourceStats()
        self.reconnect_delays: list[float] = []
        self._clock = clock
        self._queue: queue.Queue[tuple[float, np.ndarray]] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._video_t = 0.0
        self._next_due: float | None = None

    # -- consumer side

    def frames(self) -> Iterator[tuple[float, np.ndarray]]:
        self._start()
        while not self._stop.is_set():
            try:
                yield self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._done.is_set() and self._queue.empty():
                    return

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.timeout_s + 2)

    def __enter__(self) -> CaptureSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    # -- reader thread

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"source:{self.url}", daemon=True
                )
                self._thread.start()

    def _open(self) -> cv2.VideoCapture:
        timeout_ms = int(self.timeout_s * 1000)
        if _is_device(self.url):
            cap = cv2.VideoCapture(int(self.url) if self.url.isdigit() else self.url)
        else:
            # Without these an unreachable or silent stream blocks read() indefinitely.
            cap = cv2.VideoCapture(
                self.url,
                cv2.CAP_FFMPEG,
                [
                    cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                    timeout_ms,
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                    timeout_ms,
                ],
            )
        return cap

    def _put(self, item: tuple[float, np.ndarray]) -> None:
        if not self.realtime:
            # A file read for analysis: wait for the consumer, lose nothing.
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            else:
                return
            self.stats.frames_sampled += 1
            return
        while True:
            try:
                self._queue.put_nowait(item)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.stats.frames_dropped += 1
                except queue.Empty:
                    pass
        self.stats.frames_sampled += 1

    def _run(self) -> None:
        try:
            self._read_loop()
        except Exception as exc:  # the thread must always mark itself done
            self.stats.last_error = repr(exc)
            logger.exception("source %s stopped on an error", self.url)
        finally:
            self._done.set()

    def _wait_reconnect(self) -> bool:
        """Sleep the next backoff delay; False if closed meanwhile or out of tries."""
        if self.max_failures is not None and self.backoff.attempt >= self.max_failures:
            logger.warning("source %s: giving up after %d failures", self.url, self.backoff.attempt)
            return False
        delay = self.backoff.next_delay()
        self.reconnect_delays.append(delay)
        logger.info("source %s: reconnecting in %.2f s", self.url, delay)
        return not self._stop.wait(delay)

    def _read_loop(self) -> None:
        period = 1.0 / self.sample_fps
        while not self._stop.is_set():
            cap = self._open()
            if not cap.isOpened():
                cap.release()
                self.stats.open_failures += 1
                self.stats.last_error = f"cannot open {self.url}"
                if not self.live:
                    raise SourceError(f"cannot open video file {self.url}")
                if not self._wait_reconnect():
                    return
                self.stats.reconnects += 1
                continue
            self.stats.opens += 1
            logger.info("source %s opened", self.url)
            try:
                ended = self._read_open(cap, period)
            finally:
                cap.release()
            if self._stop.is_set():
                return
            if not self.live:
                if ended and self.loop:
                    continue
                return
            self.stats.last_error = f"stream {self.url} ended"
            if not self._wait_reconnect():
                return
            self.stats.reconnects += 1

    def _read_open(self, cap: cv2.VideoCapture, period: float) -> bool:
        """Read one opened capture until it ends (True) or the source is closed (False)."""
        native_fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        file_step = 1.0 / native_fps if native_fps > 0 else period
        # A looped file keeps counting video time, so timestamps never go back.
        started = self._clock() - self._video_t
        first = True
        while not self._stop.is_set():
            if not cap.grab():
                return True
            if first:
                # The stream works again: the next loss starts from the shortest delay.
                self.backoff.reset()
                first = False
            self.stats.frames_read += 1
            if self.live:
                stamp = self._clock()
            else:
                # Video time from the frame count: CAP_PROP_POS_MSEC is unreliable per backend.
                stamp = round(self._video_t, 6)
                self._video_t += file_step
                if self.realtime:
                    lag = started + stamp - self._clock()
                    if lag > 0 and self._stop.wait(lag):
                        return False
            due = self._next_due
            if due is not None and stamp < due - 1e-6:
                continue  # grabbed but not decoded: skipping is cheap
            # Keep a steady cadence; after a stall, restart it from now instead of bursting.
            self._next_due = (
                due + period if due is not None and due + period > stamp else stamp + period
            )
            ok, frame = cap.retrieve()
            if not ok or frame is None:
                return True
            self._put((stamp, frame))
        return False


def open_source(
    url: str,
    sample_fps: float,
    *,
    loop: bool = False,
    realtime: bool | None = None,
    queue_size: int = 2,
    backoff: Backoff | None = None,
    timeout_s: float = 5.0,
    max_failures: int | None = None,
) -> CaptureSource:
    """Open a video file, an http(s) MJPEG or rtsp:// URL, or a local camera ("0", /dev/video0).

    ``sample_fps`` is how many frames a second reach the consumer. ``loop`` replays a file.
    ``max_failures`` ends a live source after that many failed reconnects in a row.
    """
    return CaptureSource(
        url,
        sample_fps,
        loop=loop,
        realtime=realtime,
        queue_size=queue_size,
        backoff=backoff,
        timeout_s=timeout_s,
        max_failures=max_failures,
    )
