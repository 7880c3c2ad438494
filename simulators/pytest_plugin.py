"""pytest plugin (entry point ``cwg``): a real gateway stack for integration tests.

Fixtures:

* ``gateway_stack`` (module scope): Mosquitto + aggregator on free loopback ports under a
  temporary directory, shared by the tests of one module.
* ``gateway`` (function scope): a ``simulators.gateway.Gateway`` on that stack, with device names
  scoped to the test::

      def test_fire_lane(gateway):
          cam = gateway.device("cam-1", grid="33038300100101000001")
          fb = gateway.raise_alert(cam, "fire_lane_occupied")
          assert fb.outcome == "accepted"
          assert gateway.events(type="fire_lane_occupied")[0].department == "police"

* ``gateway_options`` (module scope): override it to change aggregator settings
  (``simulators.stack.StackOptions``); ``StackOptions(api=True)`` also runs the operator API,
  for operator and department steps (``gateway.operator(...)``, scenario ``accounts``) on the
  case clock a test moves (``gateway.advance_clock(seconds)``).

Tests that share the module's stack stay apart: each ``gateway`` has its own clock origin
(``Gateway.origin_shift_s``), a slot further back than every merge window of the others, so one
test's alerts never merge into another's events; ``Gateway(stack, isolate=False)`` shares the
present instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators.gateway import Gateway
from simulators.stack import GatewayStack, StackOptions


@pytest.fixture(scope="module")
def gateway_options() -> StackOptions:
    """Aggregator settings for the module's stack; override in a test module or conftest."""
    return StackOptions()


@pytest.fixture(scope="module")
def gateway_stack(
    tmp_path_factory: pytest.TempPathFactory, gateway_options: StackOptions
) -> Iterator[GatewayStack]:
    root: Path = tmp_path_factory.mktemp("cwg-stack")
    with GatewayStack(root, gateway_options) as stack:
        yield stack


@pytest.fixture
def gateway(gateway_stack: GatewayStack) -> Iterator[Gateway]:
    gw = Gateway(gateway_stack)
    try:
        yield gw
    finally:
        gw.close()
