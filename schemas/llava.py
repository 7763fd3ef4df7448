"""LLaVA's instruction record: its Arrow type in a run, its JSON form, and the checks every record passes.

A record is ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n…"},
{"from": "gpt", "value": "…"}, …]}`` (LLaVA's JSON). Inside a run, a row's records are the
``instructions`` column (:data:`RECORD_TYPE`, one per response type), which also keeps what made
each one: the response type, the model, the prompt version and the token usage.

:func:`conversation_problem` is the one check used by the generator (on what a model returned)
and by the trainer (on what it reads): turns alternate human, gpt, human, …; none is empty or
longer than ``max_chars``; ``<image>`` appears exactly once, in the first human turn.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

IMAGE_TOKEN = "<image>"
HUMAN, GPT = "human", "gpt"

TURN_TYPE = pa.struct([("from", pa.string()), ("value", pa.string())])
RECORD_TYPE = pa.struct(
    [
        ("id", pa.string()),
        ("response_type", pa.string()),
        ("conversations", pa.list_(TURN_TYPE)),
        ("model", pa.string()),
        ("prompt_version", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
    ]
)
FAILURE_TYPE = pa.struct([("response_type", pa.string()), ("reason", pa.string()), ("detail", pa.string())])

#: Reasons a conversation is refused.
EMPTY = "empty_conversation"
ROLES = "roles_out_of_order"
EMPTY_TURN = "empty_turn"
TOO_LONG = "turn_too_long"
IMAGE_PLACEMENT = "image_token_misplaced"


def conversation_problem(turns: list[dict[str, Any]], max_chars: int = 4000) -> tuple[str, str] | None:
    """``(reason, detail)`` for the first thing wrong with ``turns``, or None when they are valid."""
    if not turns:
        return EMPTY, "no turns"
    for i, turn in enumerate(turns):
        expected = HUMAN if i % 2 == 0 else GPT
        if turn.get("from") != expected:
            return ROLES, f"turn {i} is from {turn.get('from')!r}, expected {expected!r}"
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            return EMPTY_TURN, f"turn {i} ({expected}) is empty"
        if len(value) > max_chars:
            return TOO_LONG, f"turn {i} has {len(value)} characters (limit {max_chars})"
    if len(turns) % 2:
        return ROLES, f"{len(turns)} turns: the last human turn has no answer"
    counts = [t["value"].count(IMAGE_TOKEN) for t in turns]
    if counts[0] != 1 or sum(counts) != 1:
        return IMAGE_PLACEMENT, f"{IMAGE_TOKEN} must appear once, in the first human turn; counts per turn: {counts}"
    return None


def llava_json(record: dict[str, Any], image: str) -> dict[str, Any]:
    """The record as LLaVA's JSON (id, image, conversations), with its provenance under ``meta``."""
    meta = {
        k: record[k]
        for k in ("response_type", "model", "prompt_version", "prompt_tokens", "completion_tokens")
        if record.get(k) is not None
    }
    turns = [{"from": t["from"], "value": t["value"]} for t in record["conversations"]]
    return {"id": record["id"], "image": image, "conversations": turns, "meta": meta}


def caption_turns(caption: str) -> list[dict[str, Any]]:
    """A caption as a stage-1 conversation: the image, then the caption as the answer."""
    return [{"from": HUMAN, "value": IMAGE_TOKEN}, {"from": GPT, "value": caption.strip()}]
