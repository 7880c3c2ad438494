"""Exceptions of the aggregator. Domain errors become HTTP errors only in the API layer."""


class AggregatorError(Exception):
    """Base class of every error the aggregator raises on purpose."""


class ConfigError(AggregatorError):
    """A configuration or data file is invalid; the message names the key path."""


class PoolError(AggregatorError):
    """The event pool could not do what was asked (schema, constraint, I/O)."""
