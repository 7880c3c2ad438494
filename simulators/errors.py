"""The simulators' exceptions: one base, one per thing that can go wrong."""

from __future__ import annotations


class SimulatorError(Exception):
    """Base of every error the simulators raise on purpose."""


class StackError(SimulatorError):
    """The broker or aggregator could not be started, reached or provisioned."""


class DeviceError(SimulatorError):
    """A simulated device could not connect or publish in time."""


class ScenarioError(SimulatorError):
    """A scenario file is invalid or refers to something that does not exist."""


class LoadError(SimulatorError):
    """The load generator could not run as asked."""
