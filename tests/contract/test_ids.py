"""Alert ids: unique, valid for the contract, and in time order for one device."""

from __future__ import annotations

import re
import threading
import time
import uuid

from contract import new_alert_id
from contract.ids import Uuid7
from contract.messages import ALERT_ID_PATTERN


def test_ids_are_valid_uuid7s_carrying_the_time_they_were_made() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_alert_id("cam-fire-lane-01") for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    for alert_id in ids:
        assert re.match(ALERT_ID_PATTERN, alert_id), alert_id
        device, _, tail = alert_id.rpartition("-")
        assert device == "cam-fire-lane-01"
        u = uuid.UUID(hex=tail)
        assert (u.version, u.variant) == (7, uuid.RFC_4122)
        # a burst may run ahead of the clock by a millisecond when its random bits run out
        assert before <= u.int >> 80 <= after + 1
    # the longest device id the contract allows still gives a valid alert id
    longest = new_alert_id("d" * 64)
    assert re.match(ALERT_ID_PATTERN, longest)


def test_a_burst_of_ids_is_strictly_increasing_and_unique() -> None:
    ids = [new_alert_id("cam-1") for _ in range(20_000)]  # many within one millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_from_several_threads_are_unique_and_each_threads_in_order() -> None:
    per_thread: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        out.extend(new_alert_id("cam-1") for _ in range(5000))

    threads = [threading.Thread(target=make, args=(out,)) for out in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for out in per_thread for i in out]
    assert len(set(every)) == 20_000
    assert all(out == sorted(out) for out in per_thread)


def test_a_clock_that_steps_back_does_not_make_ids_go_back() -> None:
    now = [1_800_000_000_000 * 1_000_000]
    make = Uuid7(lambda: now[0])
    first = make()
    now[0] -= 5_000 * 1_000_000  # five seconds back (an NTP step)
    second = make()
    assert second > first
    assert int(second[:12], 16) == int(first[:12], 16)  # it keeps the later time
    now[0] += 10_000 * 1_000_000
    third = make()
    assert third > second
    assert int(third[:12], 16) == 1_800_000_005_000


def test_when_one_milliseconds_random_bits_run_out_the_time_moves_on() -> None:
    now = 1_800_000_000_000 * 1_000_000
    make = Uuid7(lambda: now)
    make._last_ms, make._last_rand = now // 1_000_000, (1 << 74) - 2
    nxt = make()
    assert int(nxt[:12], 16) == now // 1_000_000 + 1
    assert make() > nxt
