"""A curation job as a config describes it: its pool, stages, export and card put together into a plan."""

from pipelines.job.build import build_plan

__all__ = ["build_plan"]
