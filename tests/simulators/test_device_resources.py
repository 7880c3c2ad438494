"""A simulated device that connects and closes, again and again (a fleet's devices going off
and on line), gives back its sockets at close(), not whenever the collector runs."""

from __future__ import annotations

import gc

from aggregator.broker.registry import DeviceKind
from simulators.device import SimDevice
from simulators.stack import DeviceSpec, GatewayStack
from tests.fdreport import kind_of, open_fds


def test_a_device_closed_and_connected_again_keeps_no_sockets(
    gateway_stack: GatewayStack,
) -> None:
    creds = gateway_stack.provision([DeviceSpec("res-cam-1", DeviceKind.CAMERA)])["res-cam-1"]
    gc.collect()
    before = open_fds()
    gc.disable()  # only what close() releases counts
    try:
        for graceful in (True, False, True):
            device = SimDevice(creds)
            device.connect()
            device.close(graceful=graceful)
            del device
        left = [t for fd, t in open_fds().items() if before.get(fd) != t]
    finally:
        gc.enable()
    assert left == [], f"left open: {sorted(map(kind_of, left))}"
