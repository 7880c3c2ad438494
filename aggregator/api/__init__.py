"""The operator API (FastAPI), its live stream and the dashboard it serves."""

from aggregator.api.app import WEB_ROOT, create_app

__all__ = ["WEB_ROOT", "create_app"]
