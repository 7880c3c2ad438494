"""Deployment tooling: the Mosquitto launcher, the device registry and the development CA.

The aggregator's runtime does not import this package; the gateway CLI and the test fixtures do."""
