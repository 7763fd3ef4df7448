"""The stage SDK: the contract every curation and generation step implements, and image decoding.

``curation`` and ``generators`` import ``pipelines`` only through here.
"""

from pipelines.stage.contract import (
    Cutoff,
    GiB,
    GlobalStage,
    Rejections,
    Resources,
    Stage,
    default_resources,
)
from schemas.files import file_digest

__all__ = ["Cutoff", "GiB", "GlobalStage", "Rejections", "Resources", "Stage", "default_resources", "file_digest"]
