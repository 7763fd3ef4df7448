"""A LLaVA conversation as training tokens: ``input_ids`` with one image slot and labels on the assistant turns only.

:func:`prepare_tokenizer` gives a tokenizer the ``<image>`` token, a pad token and a chat template;
:func:`encode_conversation` turns one record's turns into an :class:`Encoded`; :func:`collate` pads a batch.

Labels come from character offsets, never from token counts:

1. the turns (``human`` -> ``user``, ``gpt`` -> ``assistant``) are rendered once with the chat template;
2. assistant turn ``i`` owns the characters ``[len(render(turns[:i], add_generation_prompt=True)),
   len(render(turns[:i + 1])))``: its answer and whatever the template closes the turn with
   (``<|im_end|>\\n`` in ChatML, eos in ``plain``), so the model learns to stop. Each such render must
   be a prefix of the full render, or the template cannot be labelled this way (``template_not_prefix``);
3. the full text is tokenized once with offsets; a token is supervised iff its characters lie inside
   an assistant span. A token with characters on both sides of a span boundary is refused
   (``label_boundary_inside_token``) rather than guessed at. In ChatML, special tokens close every
   turn, so this happens only where an answer begins with whitespace that the tokenizer merges with the
   header's newline (SmolLM2: ``"\\n\\n"``, ``"\\n "``); the project's generator strips answers. A zero-width
   token goes with the span holding its position.

Whatever the template adds outside assistant spans, such as a default system prompt (SmolLM2's
injects one when the conversation has none), is kept and masked: the model trains on the same
prompt that ``apply_chat_template`` builds at inference. The one ``<image>`` token becomes
``image_tokens`` copies, masked, which the model overwrites with projected visual features.

A conversation that cannot be encoded raises :class:`EncodeError` with a reason; nothing is truncated
or trained with all labels masked.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schemas.llava import GPT, HUMAN, IMAGE_TOKEN, conversation_problem

CHAT_TEMPLATE_DIR = Path(__file__).resolve().parent / "configs" / "chat_templates"
IGNORE_INDEX = -100
ROLE_NAMES = {HUMAN: "user", GPT: "assistant"}

#: Reasons :func:`encode_conversation` refuses a conversation (besides :func:`conversation_problem`'s).
TEMPLATE_ERROR = "template_error"
TEMPLATE_NOT_PREFIX = "template_not_prefix"
TEMPLATE_DROPS_ANSWER = "template_drops_answer"
BOUNDARY_INSIDE_TOKEN = "label_boundary_inside_token"
IMAGE_TOKEN_COUNT = "image_token_count"
SEQUENCE_TOO_LONG = "sequence_too_long"
NO_SUPERVISED_TOKENS = "no_supervised_tokens"

# The template a tokenizer was loaded with, kept on it so that a later ``prepare_tokenizer(tok, None)``
# restores it after an earlier call set a named one (the trainer prepares the same tokenizer twice).
_OWN_TEMPLATE = "_vlmcurate_own_chat_template"


class EncodeError(ValueError):
    """A conversation that cannot become a training sample; ``reason`` is a stable key, ``str(e)`` the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Encoded:
    """One training sequence: ``labels[i]`` is ``input_ids[i]`` where supervised, else -100;
    the visual tokens occupy ``input_ids[image_start:image_start + image_tokens]``."""

    input_ids: list[int]
    labels: list[int]
    image_start: int


def chat_templates() -> dict[str, Path]:
    """The named chat templates shipped with the project (``models/configs/chat_templates/*.jinja``)."""
    return {p.stem: p for p in sorted(CHAT_TEMPLATE_DIR.glob("*.jinja"))}


def prepare_tokenizer(tokenizer: Any, template: str | None = None) -> int:
    """Ready ``tokenizer`` for :func:`encode_conversation` and return the ``<image>`` token id.

    Adds ``<image>`` as a special token where it is not one (``len(tokenizer)`` is then the vocabulary
    size the LM's embeddings must be resized to), sets a pad token where there is none (the eos, else a
    new ``<pad>``) and sets ``tokenizer.chat_template``: the tokenizer's own (``template=None``; the one
    it was loaded with, even after an earlier call set another) or a named one from :func:`chat_templates`.
    Calling it again, with the same or another template, is safe.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: labels need its offset mapping")
    if not hasattr(tokenizer, _OWN_TEMPLATE):
        setattr(tokenizer, _OWN_TEMPLATE, tokenizer.chat_template)
    tokenizer.chat_template = _template_text(tokenizer, template)
    if IMAGE_TOKEN not in tokenizer.all_special_tokens:
        from tokenizers import AddedToken

        image = AddedToken(IMAGE_TOKEN, special=True, normalized=False)
        tokenizer.add_special_tokens({"extra_special_tokens": [image]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _template_text(tokenizer: Any, template: str | None) -> str:
    named = chat_templates()
    if template is None:
        own = getattr(tokenizer, _OWN_TEMPLATE)
        if not own:
            raise ValueError(f"{type(tokenizer).__name__} has no chat template of its own; name one of {sorted(named)}")
        return own
    if template not in named:
        raise ValueError(f"unknown chat template {template!r}; choices: None (the tokenizer's own) or {sorted(named)}")
    if template == "plain" and tokenizer.eos_token is None:
        raise ValueError("the plain template ends each caption with eos, and the tokenizer has none")
    return named[template].read_text(encoding="utf-8")


def encode_conversation(
    tokenizer: Any, turns: Sequence[dict[str, Any]], *, image_token_id: int, image_tokens: int, max_length: int
) -> Encoded:
    """The training tokens of LLaVA ``turns`` (see the module), or :class:`EncodeError` saying why there are none."""
    if image_tokens < 1 or max_length < 1:
        raise ValueError(f"image_tokens ({image_tokens}) and max_length ({max_length}) must be positive")
    problem = conversation_problem(list(turns), max_chars=sys.maxsize)
    if problem is not None:
        raise EncodeError(*problem)
    messages = [{"role": ROLE_NAMES[t["from"]], "content": t["value"]} for t in turns]
    text, spans = assistant_spans(tokenizer, messages)

    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids: list[int] = list(encoding["input_ids"])
    owners = span_of_tokens(encoding["offset_mapping"], spans)
    counts = [owners.count(k) for k in range(len(spans))]
    if 0 in counts:
        raise EncodeError(NO_SUPERVISED_TOKENS, f"supervised tokens per assistant turn: {counts}")

    slots = [i for i, token in enumerate(ids) if token == image_token_id]
    if len(slots) != 1:
        raise EncodeError(
            IMAGE_TOKEN_COUNT,
            f"the rendered conversation has {len(slots)} {IMAGE_TOKEN} tokens "
            f"(id {image_token_id}), expected 1; was prepare_tokenizer called?",
        )
    start = slots[0]
    length = len(ids) - 1 + image_tokens
    if length > max_length:
        raise EncodeError(SEQUENCE_TOO_LONG, f"{length} tokens with {image_tokens} image tokens (limit {max_length})")
    labels = [IGNORE_INDEX if owner is None else token for token, owner in zip(ids, owners, strict=True)]
    return Encoded(
        input_ids=ids[:start] + [image_token_id] * image_tokens + ids[start + 1 :],
        labels=labels[:start] + [IGNORE_INDEX] * image_tokens + labels[start + 1 :],
        image_start=start,
    )


def encode_prompt(
    tokenizer: Any, turns: Sequence[dict[str, Any]], *, image_token_id: int, image_tokens: int
) -> list[int]:
    """The ids of a generation prompt: ``turns`` (ending with a human turn) and the assistant header."""
    messages = [{"role": ROLE_NAMES[t["from"]], "content": t["value"]} for t in turns]
    text = _renderer(tokenizer)(messages, True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids.count(image_token_id) != 1:
        raise EncodeError(IMAGE_TOKEN_COUNT, f"the prompt has {ids.count(image_token_id)} {IMAGE_TOKEN} tokens")
    start = ids.index(image_token_id)
    return ids[:start] + [image_token_id] * image_tokens + ids[start + 1 :]


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each assistant turn in it."""
    render = _renderer(tokenizer)
    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        for prefix, what in ((before, f"turns[:{i}] with the generation prompt"), (through, f"turns[:{i + 1}]")):
            if not text.startswith(prefix):
                raise EncodeError(
                    TEMPLATE_NOT_PREFIX,
                    f"the render of {what} is not a prefix of the whole "
                    f"conversation's; first difference at character "
                    f"{_first_difference(prefix, text)}",
                )
        if len(before) > len(through):
            raise EncodeError(
                TEMPLATE_NOT_PREFIX,
                f"the generation prompt before turn {i} is longer than the "
                f"render through it ({len(before)} > {len(through)} characters)",
            )
        if message["content"].strip() not in text[len(before) : len(through)]:
            raise EncodeError(
                TEMPLATE_DROPS_ANSWER,
                f"turn {i}'s answer is not in the text the template "
                f"renders for it: {text[len(before) : len(through)]!r:.200}",
            )
        spans.append((len(before), len(through)))
    return text, spans


def span_of_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int | None]:
    """Per token, the index of the span holding its characters ``[s, e)`` (a zero-width token: the span
    holding position ``s``), or None; :class:`EncodeError` for a token across a span boundary."""
    owners: list[int | None] = []
    for index, (s, e) in enumerate(offsets):
        owner = None
        for k, (a, b) in enumerate(spans):
            if (a <= s and e <= b) if s < e else (a <= s < b):
                owner = k
                break
            if s < b and a < e:
                raise EncodeError(
                    BOUNDARY_INSIDE_TOKEN,
                    f"token {index} covers characters [{s}, {e}), across the assistant span [{a}, {b})",
                )
        owners.append(owner)
    return owners


def collate(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` of a batch, right-padded to its longest sequence."""
    if not encoded:
        raise ValueError("collate needs at least one sequence")
    if pad_id is None:
        raise ValueError("no pad token id: call prepare_tokenizer first")
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _renderer(tokenizer: Any):
    from jinja2 import TemplateError

    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if not messages:
            return ""
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as e:
            raise EncodeError(TEMPLATE_ERROR, f"the chat template refused the conversation: {e}") from None

    return render


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
