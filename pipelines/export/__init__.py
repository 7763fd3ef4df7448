"""Exporting a finished run: webdataset tars, parquet and LLaVA's layout, keyed alike."""

from pipelines.export.keys import image_extension, sample_key
from pipelines.export.shards import EXPORT_FORMATS, write_webdataset

__all__ = ["EXPORT_FORMATS", "image_extension", "sample_key", "write_webdataset"]
