"""The download stage: a guarded fetch, an address policy and image decoding in a child process."""

from pipelines.download.stage import Download

__all__ = ["Download"]
