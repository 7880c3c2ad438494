"""Fixtures for the browser tests: the operator-side suites' pool backends."""

from tests.aggregator.conftest import pool_backend  # noqa: F401  (each pool backend in turn)
