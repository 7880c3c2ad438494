"""Alert ids that sort by time: ``<device_id>-<UUIDv7 as 32 hex digits>``.

The pool keeps exact dedup on a unique index over ``alert_id``. A random id (uuid4) lands on a
random leaf of that index, so as the pool grows every insert dirties a page of its own and the
pool's write cost grows with its size. A UUIDv7 (RFC 9562 §5.7) starts with the Unix time in
milliseconds: one device's ids arrive in order and are appended at that device's end of the
index. Ids stay globally unique (74 random bits beside the time) and match the contract's
``alert_id`` pattern; the aggregator accepts any id of that pattern.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

__all__ = ["Uuid7", "new_alert_id", "uuid7_hex"]

_RAND_BITS = 74  # 12 bits rand_a + 62 bits rand_b
_RAND_MASK = (1 << _RAND_BITS) - 1
_B_MASK = (1 << 62) - 1


def _random74() -> int:
    return int.from_bytes(os.urandom(10)) & _RAND_MASK


class Uuid7:
    """UUIDv7s as 32 lowercase hex digits, strictly increasing for one instance.

    Within one millisecond the 74 random bits are not drawn afresh but advanced by a random
    step below 2**32 (RFC 9562 §6.2, method 2, "monotonic random"), so ids made in a burst keep
    their order; should the bits run out, the time field moves on by a millisecond. A clock that
    steps back does not make ids go back: the last time used is kept until the clock passes it.
    """

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._last_ms = 0
        self._last_rand = 0

    def __call__(self) -> str:
        with self._lock:
            ms = self._clock_ns() // 1_000_000
            if ms > self._last_ms:
                rand = _random74()
            else:
                ms = self._last_ms
                rand = self._last_rand + 1 + int.from_bytes(os.urandom(4))
                if rand > _RAND_MASK:
                    ms += 1
                    rand = _random74()
            self._last_ms, self._last_rand = ms, rand
        value = (
            (ms & 0xFFFF_FFFF_FFFF) << 80  # unix_ts_ms
            | 0x7 << 76  # version
            | (rand >> 62) << 64  # rand_a, 12 bits
            | 0b10 << 62  # variant
            | rand & _B_MASK  # rand_b, 62 bits
        )
        return f"{value:032x}"


uuid7_hex = Uuid7()


def new_alert_id(device_id: str) -> str:
    """A new globally unique alert id for ``device_id``, in time order for that device."""
    return f"{device_id}-{uuid7_hex()}"
