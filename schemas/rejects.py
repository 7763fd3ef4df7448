"""The reject record: why a row left the pipeline, and at which stage.

Stages never delete rows. They set a reason in the two reserved columns below, and the runner
moves those rows to the run's ``rejects/`` folder as records of :data:`REJECT_SCHEMA`, together
with the row's own light columns, so that every dropped row can be found and explained.
"""

from __future__ import annotations

import pyarrow as pa

#: Reserved columns a stage sets on the rows it rejects (null on kept rows).
REJECT_REASON = "_reject_reason"
REJECT_DETAIL = "_reject_detail"

# Columns of a reject record.
STAGE = "stage"
REASON = "reason"
DETAIL = "detail"
SHARD = "shard"

REJECT_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string()),
        pa.field(STAGE, pa.string()),
        pa.field(REASON, pa.string()),
        pa.field(DETAIL, pa.string()),
        pa.field(SHARD, pa.int32()),
    ]
)

# Reasons written by the spine itself; stages define their own next to their code.
MALFORMED_ROW = "malformed_row"
MISSING_URL = "missing_url"
MISSING_CAPTION = "missing_caption"
URL_NOT_TEXT = "url_not_text"
CAPTION_NOT_TEXT = "caption_not_text"
CAPTION_NOT_UTF8 = "caption_not_utf8"
MISSING_UID = "missing_uid"
URL_NOT_UTF8 = "url_not_utf8"
UID_NOT_UTF8 = "uid_not_utf8"
KEPT_COLUMN_NOT_UTF8 = "kept_column_not_utf8"
UNREADABLE_INPUT = "unreadable_input"
DUPLICATE_UID = "duplicate_uid"
#: A failure nothing anticipated (a bug, a library raising something new): one row, not the shard.
#: The run reports such rows on the terminal: they are not the data's fault.
INTERNAL_ERROR = "internal_error"
