"""The stage SDK: the contract every curation and generation step implements, image decoding, and
read-only access to an earlier run.

``curation`` and ``generators`` import ``pipelines`` only through here.
"""

from pipelines.stage import storage
from pipelines.stage.contract import (
    COUNT,
    KEY,
    PINNED,
    Cutoff,
    GiB,
    GlobalStage,
    KeyedStage,
    LinkedStage,
    Rejections,
    Resources,
    Stage,
    SummedStage,
    default_resources,
)
from pipelines.stage.run_files import RunFiles
from pipelines.stage.storage import file_digest

__all__ = [
    "COUNT",
    "Cutoff",
    "GiB",
    "GlobalStage",
    "KEY",
    "KeyedStage",
    "LinkedStage",
    "PINNED",
    "Rejections",
    "Resources",
    "RunFiles",
    "Stage",
    "SummedStage",
    "default_resources",
    "file_digest",
    "storage",
]
