"""Instruction stages: LLaVA-style records for each image, and stage-1 brief-description records.

:class:`InstructGenerate` writes, per row, one record for each of ``response_types``
(``conversation``, ``detailed``, ``reasoning``, and ``presence``: short yes/no records always
built from the boxes), from the row's captions (``caption_columns``, e.g. CapFilt's
``selected_captions``) and, where the pool has them, object boxes (``boxes_column``).
``absent_objects`` (a list of object names, or a text file with one a line: the label set of the
boxes, e.g. COCO's 80) lets the grounded backend ask whether an object is there when it is not,
as well as when it is; ``absent_column`` takes each row's absent objects from a column instead
(:class:`~generators.instruct.absent.AbsentObjects` draws them as often as the pool holds each
object). ``backend``:

- ``grounded`` (default): no model; questions and answers derived from captions and boxes
  (:mod:`generators.instruct.grounded`), correct by construction;
- ``openai``: a chat model behind any OpenAI-compatible endpoint (:mod:`generators.instruct.chat`),
  with the request cache, retries and budget;
- ``openai-batch``: the same requests as OpenAI Batch API jobs (:mod:`generators.instruct.batch`,
  settings under ``batch``), submitted and polled, or written for the user to submit
  (``batch_pending`` until ``vlmcurate import-batch`` brings the replies into the cache);
- ``local``: a transformers causal LM in the worker's process (:mod:`generators.instruct.local`,
  settings under ``local``; by default the packaged SmolLM2-135M-Instruct), loaded once per actor.

Captions are cleaned as untrusted text (:func:`generators.instruct.context.clean_text`); a boxes
value that is not a list of boxes (malformed, nested too deeply, or over the size limits of
:func:`~generators.instruct.context.parse_boxes`) rejects its row as ``bad_boxes``. Every reply is
parsed and checked: ``finish_reason == "length"`` is ``truncated_output``; a reply that does not
parse gets one repair request and then is ``llm_unparseable``; one with chat role markers or
special-token shapes is ``llm_off_task``; the conversation then passes
:func:`schemas.llava.conversation_problem`. An endpoint reply that is not a valid chat completion is
retried and then ``llm_request_failed``, like any failed request: one odd row or reply costs that
row, never the stage.
A response type that fails is listed in ``instruction_failures``; a row with no record at all
is rejected with its first failure's reason (the detail lists them all). ``llm_request_failed``
``budget_exhausted`` and ``batch_pending`` are transient: ``vlmcurate retry-failed`` sends them again.

:class:`BriefDescriptions` writes ``brief_records``: one record per caption, the caption as the
answer to a brief-description instruction (projector pretraining, LLaVA's stage 1).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import pyarrow as pa

from generators.instruct import grounded
from generators.instruct.absent import object_vocabulary
from generators.instruct.batch import BATCH_PENDING, BatchClient, BatchSettings
from generators.instruct.card import records_section
from generators.instruct.chat import BUDGET_EXHAUSTED, REQUEST_FAILED, ChatSettings, Failure
from generators.instruct.context import BOX_FORMATS, Context, build_context
from generators.instruct.prompts import RESPONSE_TYPES, load_prompt, phrasings, phrasings_version, pick
from generators.instruct.responses import (
    MAX_REPLY_CHARS,
    TRUNCATED,
    ReplyError,
    parse_reply,
    record,
    repair_message,
)
from pipelines.stage import GiB, Rejections, Resources, Stage, default_resources
from schemas.columns import (
    BRIEF_RECORDS,
    CAPTION,
    INSTRUCTION_FAILURES,
    INSTRUCTIONS,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    UID,
)
from schemas.llava import FAILURE_TYPE, RECORD_TYPE, conversation_problem

BACKENDS = ("grounded", "openai", "openai-batch", "local")
#: What ``response_types`` may name: the types a backend writes, and the grounded presence records.
ALL_RESPONSE_TYPES = (*RESPONSE_TYPES, grounded.PRESENCE)
ENDPOINT_BACKENDS = ("openai", "openai-batch")
NO_CAPTION = "no_caption"
BAD_BOXES = "bad_boxes"
NO_OBJECTS = "no_objects"
LOCAL_BACKEND_MEMORY = int(2.5 * GiB)


@dataclass
class InstructGenerate(Stage):
    """Writes ``instructions`` (LLaVA records, one per response type) and ``instruction_failures``."""

    name: ClassVar[str] = "instruct"
    output_columns: ClassVar[tuple[str, ...]] = (INSTRUCTIONS, INSTRUCTION_FAILURES)

    backend: str = "grounded"
    response_types: list[str] = field(default_factory=lambda: list(RESPONSE_TYPES))
    caption_columns: list[str] = field(default_factory=lambda: [CAPTION])
    boxes_column: str | None = None
    absent_objects: list[str] | str | None = None
    absent_column: str | None = None
    box_format: str = "xyxy_normalized"
    max_caption_chars: int = 300
    max_turn_chars: int = 4000
    endpoint: dict[str, Any] = field(default_factory=dict)
    batch: dict[str, Any] = field(default_factory=dict)
    local: dict[str, Any] = field(default_factory=dict)
    cache: str = "runs/instruct-cache.sqlite"
    # Requests of a batch are sent together: a large batch keeps the endpoint's slots busy.
    resources: Resources = default_resources(batch_size=256)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        unknown = sorted(set(self.response_types) - set(ALL_RESPONSE_TYPES))
        if unknown or not self.response_types:
            raise ValueError(
                f"response_types must be a non-empty subset of {ALL_RESPONSE_TYPES}, got {self.response_types}"
            )
        if self.box_format not in BOX_FORMATS:
            raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {self.box_format!r}")
        if not self.caption_columns:
            raise ValueError("caption_columns must name at least one column")
        self._vocabulary = object_vocabulary(self.absent_objects, "absent_objects")
        if self.absent_column and (self.absent_objects is not None or not self.boxes_column):
            raise ValueError(
                "absent_column names the absent objects of each row (AbsentObjects writes it): "
                "it needs boxes_column and replaces absent_objects"
            )
        if grounded.PRESENCE in self.response_types and not (
            self.boxes_column and (self._vocabulary or self.absent_column)
        ):
            raise ValueError(
                "response type presence asks whether objects are there: it needs boxes_column and "
                "absent_objects or absent_column"
            )
        if self.backend in ENDPOINT_BACKENDS:
            _settings("endpoint", ChatSettings, self.endpoint)
        if self.backend == "openai-batch":
            _settings("batch", BatchSettings, self.batch)
        if self.backend == "local":
            from generators.instruct.local import LocalSettings

            _settings("local", LocalSettings, self.local)
            if self.resources.memory is None:  # SmolLM2-135M, 8 prompts of 256 new tokens: 2.0 GiB at its peak
                self.resources = replace(self.resources, memory=LOCAL_BACKEND_MEMORY)

    @property
    def input_columns(self) -> tuple[str, ...]:  # type: ignore[override]
        boxes = (self.boxes_column,) if self.boxes_column else ()
        size = (ORIGINAL_WIDTH, ORIGINAL_HEIGHT) if self.boxes_column and self.box_format == "xywh_pixels" else ()
        absent = (self.absent_column,) if self.absent_column else ()
        return tuple(dict.fromkeys((UID, *self.caption_columns, *boxes, *size, *absent)))

    def identity(self) -> dict[str, Any]:
        versions = {t: load_prompt(t).version for t in self.response_types if t != grounded.PRESENCE}
        identity = {"prompts": versions, "detailed_questions": phrasings_version("detailed_questions")}
        if self.backend == "grounded" or grounded.PRESENCE in self.response_types:
            identity |= {"grounded": grounded.GROUNDED_VERSION, "absent_objects": self._vocabulary}
            if self.absent_column:
                identity["absent_column"] = self.absent_column
        return identity

    def is_transient(self, reason: str) -> bool:
        return reason in (REQUEST_FAILED, BUDGET_EXHAUSTED, BATCH_PENDING)

    def worker_env(self) -> dict[str, str]:
        name = self.endpoint.get("api_key_env", ChatSettings.api_key_env)
        value = os.environ.get(name) if self.backend in ENDPOINT_BACKENDS else None
        return {name: value} if value is not None else {}  # else the workers' own environment must have it

    def setup(self) -> None:
        self._chat = None
        if self.backend == "grounded":
            return
        from generators.instruct.cache import ReplyCache

        cache = ReplyCache(self.cache)
        if self.backend == "local":
            from generators.instruct.local import LocalChat, LocalSettings

            self._chat = LocalChat(LocalSettings(**self.local), cache)
        elif self.backend == "openai":
            from generators.instruct.chat import ChatClient

            self._chat = ChatClient(ChatSettings(**self.endpoint), cache)
        else:
            self._chat = BatchClient(ChatSettings(**self.endpoint), BatchSettings(**self.batch), cache)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rejections = Rejections(batch.num_rows)
        uids = batch[UID].to_pylist()
        contexts = self._contexts(batch, rejections)
        jobs = [
            (row, kind) for row, context in enumerate(contexts) if context is not None for kind in self.response_types
        ]
        absent = batch[self.absent_column].to_pylist() if self.absent_column else None
        asked = [job for job in jobs if self._chat is not None and job[1] != grounded.PRESENCE]
        built = [job for job in jobs if self._chat is None or job[1] == grounded.PRESENCE]
        by_job = dict(zip(built, self._grounded(built, contexts, uids, absent)))
        if asked:
            by_job |= dict(zip(asked, self._ask(asked, contexts, uids)))
        outcomes = [by_job[job] for job in jobs]
        records: list[list[dict]] = [[] for _ in uids]
        failures: list[list[dict]] = [[] for _ in uids]
        for (row, kind), outcome in zip(jobs, outcomes):
            if isinstance(outcome, Failure):
                failures[row].append({"response_type": kind, "reason": outcome.reason, "detail": outcome.detail})
                continue
            problem = conversation_problem(outcome["conversations"], self.max_turn_chars)
            if problem:
                failures[row].append({"response_type": kind, "reason": problem[0], "detail": problem[1]})
            else:
                records[row].append(outcome)
        rejections.add_each(
            (row, failures[row][0]["reason"], json.dumps(failures[row]))
            for row, context in enumerate(contexts)
            if context is not None and not records[row]
        )
        return rejections.attach(
            pa.table(
                {
                    INSTRUCTIONS: pa.array(records, pa.list_(RECORD_TYPE)),
                    INSTRUCTION_FAILURES: pa.array(failures, pa.list_(FAILURE_TYPE)),
                }
            )
        )

    def card_notes(self, view: Any) -> str | None:
        return records_section(view, INSTRUCTIONS, f"Backend `{self.backend}`.")

    def _contexts(self, batch: pa.Table, rejections: Rejections) -> list[Context | None]:
        columns = {name: batch[name].to_pylist() for name in batch.column_names}
        contexts: list[Context | None] = []
        failed: list[tuple[int, str, str]] = []
        missing = [None] * batch.num_rows
        widths, heights = columns.get(ORIGINAL_WIDTH, missing), columns.get(ORIGINAL_HEIGHT, missing)
        for i in range(batch.num_rows):
            captions = [c for name in self.caption_columns for c in _as_list(columns[name][i])]
            size = (widths[i], heights[i])
            try:
                context = build_context(
                    captions,
                    columns[self.boxes_column][i] if self.boxes_column else None,
                    max_chars=self.max_caption_chars,
                    box_format=self.box_format,
                    size=size,
                )
            except (ValueError, TypeError, AttributeError) as e:
                failed.append((i, BAD_BOXES, f"{self.boxes_column}: {e}"))
                contexts.append(None)
                continue
            if not context.captions:
                failed.append((i, NO_CAPTION, f"no caption left in {self.caption_columns} after cleaning"))
                contexts.append(None)
                continue
            contexts.append(context)
        rejections.add_each(failed)
        return contexts

    def _grounded(
        self,
        jobs: list[tuple[int, str]],
        contexts: list[Context | None],
        uids: list[str],
        absent: list[list[str] | None] | None,
    ) -> list[Any]:
        outcomes: list[Any] = []
        for row, kind in jobs:
            context = contexts[row]
            vocabulary, drawn = (self._vocabulary, False) if absent is None else (absent[row] or [], True)
            if kind == grounded.PRESENCE:
                rng = random.Random(f"{uids[row]}-{kind}")
                pairs = grounded.presence_pairs(context.boxes, vocabulary, rng, drawn=drawn, short=True)
                if not pairs:
                    outcomes.append(Failure(NO_OBJECTS, "no object to ask about: no boxes, or none absent"))
                    continue
            elif kind == "conversation":
                pairs = grounded.conversation_pairs(context, vocabulary, seed=uids[row], drawn=drawn)
            elif kind == "detailed":
                pairs = grounded.detailed_pairs(context, pick(phrasings("detailed_questions"), uids[row]))
            else:
                pairs = grounded.reasoning_pairs(context)
            outcomes.append(
                record(
                    f"{uids[row]}-{kind}",
                    kind,
                    pairs,
                    model=grounded.GROUNDED_MODEL,
                    prompt_version=grounded.GROUNDED_VERSION,
                )
            )
        return outcomes

    def _ask(self, jobs: list[tuple[int, str]], contexts: list[Context | None], uids: list[str]) -> list[Any]:
        """Send every job, then one repair round for the replies that did not parse."""
        messages = [load_prompt(kind).messages(contexts[row].render()) for row, kind in jobs]
        outcomes: list[Any] = []
        repairs: list[tuple[int, list[dict[str, str]]]] = []
        for index, ((row, kind), reply) in enumerate(zip(jobs, self._chat.complete(messages))):
            result = self._read(uids[row], kind, reply)
            if isinstance(result, ReplyError):
                follow_up = [
                    *messages[index],
                    {"role": "assistant", "content": reply.text[:MAX_REPLY_CHARS]},
                    {"role": "user", "content": repair_message(kind, result)},
                ]
                repairs.append((index, follow_up))
            outcomes.append(result)
        for (index, _), reply in zip(repairs, self._chat.complete([m for _, m in repairs])):
            row, kind = jobs[index]
            result = self._read(uids[row], kind, reply)
            outcomes[index] = Failure(result.reason, str(result)) if isinstance(result, ReplyError) else result
        return outcomes

    def _read(self, uid: str, kind: str, reply: Any) -> Any:
        if isinstance(reply, Failure):
            return reply
        if reply.finish_reason == "length":
            return Failure(TRUNCATED, f"the reply hit max_tokens after {reply.completion_tokens} tokens")
        try:
            pairs = parse_reply(kind, reply.text, uid)
        except ReplyError as e:
            return e
        return record(
            f"{uid}-{kind}",
            kind,
            pairs,
            model=reply.model,
            prompt_version=load_prompt(kind).version,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
        )


@dataclass
class BriefDescriptions(Stage):
    """Writes ``brief_records``: per caption, a brief-description instruction answered by the caption."""

    name: ClassVar[str] = "brief_descriptions"
    output_columns: ClassVar[tuple[str, ...]] = (BRIEF_RECORDS,)

    caption_columns: list[str] = field(default_factory=lambda: [CAPTION])
    max_caption_chars: int = 300
    resources: Resources = default_resources(batch_size=4096)

    @property
    def input_columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys((UID, *self.caption_columns)))

    def identity(self) -> dict[str, Any]:
        return {"instructions": phrasings_version("brief")}

    def card_notes(self, view: Any) -> str | None:
        return records_section(view, BRIEF_RECORDS, "Brief descriptions, each answered by a caption of the row.")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rejections = Rejections(batch.num_rows)
        columns = [batch[name].to_pylist() for name in self.caption_columns]
        out, empty = [], []
        for i, uid in enumerate(batch[UID].to_pylist()):
            captions = build_context(
                [c for col in columns for c in _as_list(col[i])], None, max_chars=self.max_caption_chars
            ).captions
            out.append(
                [
                    record(
                        f"{uid}-brief-{n}",
                        "brief",
                        [(pick(phrasings("brief"), f"{uid}-{n}"), caption)],
                        model="caption",
                        prompt_version=phrasings_version("brief"),
                    )
                    for n, caption in enumerate(captions)
                ]
            )
            if not captions:
                empty.append((i, NO_CAPTION, f"no caption left in {self.caption_columns} after cleaning"))
        rejections.add_each(empty)
        return rejections.attach(pa.table({BRIEF_RECORDS: pa.array(out, pa.list_(RECORD_TYPE))}))


def _settings(name: str, kind: type, values: dict[str, Any]) -> None:
    """Check a settings mapping against its dataclass now, not in a worker."""
    try:
        kind(**values)
    except TypeError as e:
        raise ValueError(f"{name}: {e} (fields: {sorted(kind.__dataclass_fields__)})") from None


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [v for v in value if v] if isinstance(value, list) else [value]
