"""Simulators for integrators: a device fleet, a scenario runner for CI, a load generator and a
synthetic MJPEG camera. They speak only the wire contract (``contract``) to a real broker; the
stack launcher (``simulators.stack``) starts a real Mosquitto and aggregator for tests."""

from simulators.errors import ScenarioError, SimulatorError, StackError

__all__ = ["ScenarioError", "SimulatorError", "StackError"]
