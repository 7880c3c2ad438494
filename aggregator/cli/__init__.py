"""The ``gateway`` command: one subcommand per operator task (broker, run, provision,
accounts, events, dead letters, handling, catalogue, grids, demo)."""

from aggregator.cli.main import main

__all__ = ["main"]
