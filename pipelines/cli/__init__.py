"""The ``vlmcurate`` command line: run, inspect, card, retry-failed, demo, train and eval."""

from pipelines.cli.main import app, main

__all__ = ["app", "main"]
