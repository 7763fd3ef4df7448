"""Reading a model's reply into question-answer pairs, and turning pairs into LLaVA records.

Each response type's prompt asks for one JSON object (``{"conversation": [{"question",
"answer"}, …]}``, ``{"description"}``, ``{"question", "answer"}``). The parser accepts it inside a
code fence or with text around it, and nothing else: a reply that is not that object (or is longer
than ``MAX_REPLY_CHARS``, nests too deeply for the JSON parser, or holds text that is not valid
Unicode) is :class:`Unparseable`. A reply that carries role markers or anything shaped like a special
token (it followed an instruction smuggled into a caption, or leaked the chat format) is
:class:`OffTask`.
"""

from __future__ import annotations

import json
from typing import Any

from generators.instruct.context import has_lone_surrogate, has_markers
from generators.instruct.prompts import phrasings, pick
from schemas.llava import GPT, HUMAN, IMAGE_TOKEN

UNPARSEABLE = "llm_unparseable"
OFF_TASK = "llm_off_task"
TRUNCATED = "truncated_output"
#: The longest reply parsed, in characters: far more than any record needs (``max_turn_chars`` is
#: 4,000 by default), and small enough that parsing one costs milliseconds.
MAX_REPLY_CHARS = 100_000

_FORMS = {
    "conversation": '{"conversation": [{"question": "...", "answer": "..."}, ...]}',
    "detailed": '{"description": "..."}',
    "reasoning": '{"question": "...", "answer": "..."}',
}


class ReplyError(ValueError):
    """A reply that cannot become a record; ``reason`` is the reject reason."""

    reason = UNPARSEABLE


class Unparseable(ReplyError):
    reason = UNPARSEABLE


class OffTask(ReplyError):
    reason = OFF_TASK


def parse_reply(response_type: str, text: str, key: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a reply; ``key`` picks the detailed-description question."""
    if len(text) > MAX_REPLY_CHARS:
        raise Unparseable(f"the reply is {len(text):,} characters, over {MAX_REPLY_CHARS:,}")
    data = _json_object(text)
    if response_type == "conversation":
        turns = data.get("conversation")
        if not isinstance(turns, list) or not turns:
            raise Unparseable('"conversation" must be a non-empty list')
        pairs = [_pair(turn, "question", "answer") for turn in turns]
    elif response_type == "detailed":
        pairs = [(pick(phrasings("detailed_questions"), key), _text(data, "description"))]
    else:
        pairs = [_pair(data, "question", "answer")]
    for question, answer in pairs:
        if has_markers(question) or has_markers(answer):
            raise OffTask("the reply holds chat role markers or special-token delimiters")
    return pairs


def repair_message(response_type: str, error: ReplyError) -> str:
    """The follow-up that asks once more for the expected form."""
    return (
        f"Your reply could not be used ({error}). Reply again with JSON only, exactly in the form "
        f"{_FORMS[response_type]}, describing the photograph from the context above."
    )


def conversation(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    """LLaVA turns for ``pairs``: the image token opens the first question."""
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns.append({"from": HUMAN, "value": f"{IMAGE_TOKEN}\n{question}" if i == 0 else question})
        turns.append({"from": GPT, "value": answer})
    return turns


def record(
    record_id: str,
    response_type: str,
    pairs: list[tuple[str, str]],
    *,
    model: str,
    prompt_version: str,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
) -> dict[str, Any]:
    """A record as the ``instructions`` column holds it (:data:`schemas.llava.RECORD_TYPE`)."""
    return {
        "id": record_id,
        "response_type": response_type,
        "conversations": conversation(pairs),
        "model": model,
        "prompt_version": prompt_version,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }


def _json_object(text: str) -> dict[str, Any]:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise Unparseable("no JSON object in the reply")
    try:
        data = json.loads(text[start : end + 1])
    except json.JSONDecodeError as e:
        raise Unparseable(f"invalid JSON: {e.msg} at character {e.pos}") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise Unparseable(f"invalid JSON: {e}") from None
    except RecursionError:
        raise Unparseable("the JSON nests too deeply") from None
    if not isinstance(data, dict):
        raise Unparseable("the reply is not a JSON object")
    return data


def _pair(data: Any, question: str, answer: str) -> tuple[str, str]:
    if not isinstance(data, dict):
        raise Unparseable(f"expected an object with {question!r} and {answer!r}, got {type(data).__name__}")
    return _text(data, question), _text(data, answer)


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise Unparseable(f"{key!r} must be a non-empty string")
    if has_lone_surrogate(value):
        raise Unparseable(f"{key!r} holds a lone surrogate escape (not Unicode text)")
    return value.strip()
