"""Chat requests through the OpenAI Batch API: half the price, a 24-hour window, and the same cache.

:class:`BatchClient` answers the same ``complete(conversations)`` call as
:class:`~generators.instruct.chat.ChatClient`, but sends the requests the cache cannot answer
as Batch API jobs:

1. **Write** them as JSONL, one line ``{"custom_id", "method", "url", "body"}`` per distinct
   request, the custom id being the request's cache key; files are cut at
   ``max_requests_per_file`` lines and ``max_bytes_per_file`` bytes (the API's limits are 50,000
   and 200 MB) and named by a hash of their content, under ``folder``.
2. **Submit** (``submit: true``): upload each file (``files.create``, purpose ``batch``), create
   the job (``batches.create``) and record its id with its request keys in the cache file, so
   that a run killed while waiting, or rerun, polls the job it already paid for instead of
   sending the requests again. With ``submit: false`` the files are written and the requests
   end as ``batch_pending`` (transient): submit the files yourself, import the results with
   ``vlmcurate import-batch``, then ``vlmcurate retry-failed`` finds every reply in the cache.
3. **Poll** every ``poll_interval`` seconds until each job is completed, expired, cancelled or
   failed, for at most ``max_wait`` seconds; requests of a job still running then are
   ``llm_request_failed`` (transient) and a rerun resumes polling the same job.
4. **Import** the output and error files by ``custom_id`` (the API does not keep the input
   order): every reply of the job's own requests goes into the cache, checked as
   :func:`~generators.instruct.chat.reply_from_completion` checks a direct reply. A request that
   expired with its job, was never answered, failed with 408/409/429/5xx, or whose line is not a
   usable result (not JSON, no ``custom_id``, a body that is not a valid chat completion) is sent
   again in a new job, up to ``max_rounds`` jobs in all; one that failed with another status is
   ``llm_request_failed`` with the endpoint's message. A malformed line costs only its request.

The budget is checked before each submission against the spend recorded in the cache; a job
in flight cannot be stopped halfway, so the overshoot is at most one round of requests.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generators.instruct.cache import Reply, ReplyCache, request_key
from generators.instruct.chat import (
    BUDGET_EXHAUSTED,
    FATAL_STATUS,
    REQUEST_FAILED,
    RETRYABLE_STATUS,
    ChatSettings,
    EndpointError,
    Failure,
    InvalidReply,
    api_key,
    clip,
    decode_json,
    over_budget,
    reply_from_completion,
)

BATCH_PENDING = "batch_pending"
CHAT_URL = "/v1/chat/completions"
FINISHED = frozenset({"completed", "expired", "cancelled", "failed"})


@dataclass
class BatchSettings:
    """How requests become Batch API jobs and how long to wait for them."""

    folder: str = "runs/instruct-batches"
    submit: bool = True
    completion_window: str = "24h"
    poll_interval: float = 60.0
    max_wait: float = 26 * 3600.0
    max_rounds: int = 3
    max_requests_per_file: int = 50_000
    max_bytes_per_file: int = 190_000_000

    def __post_init__(self) -> None:
        if self.max_rounds < 1 or self.max_requests_per_file < 1 or self.poll_interval <= 0:
            raise ValueError("max_rounds and max_requests_per_file must be >= 1 and poll_interval > 0")


@dataclass(frozen=True)
class Outcome:
    """What a job's output and error files said: replies by key, keys to send again and keys that failed
    (each with why), and the lines that are no Batch API result at all."""

    replies: dict[str, Reply]
    retry: dict[str, str]
    failed: dict[str, str]
    unreadable: list[str]


def request_lines(bodies: dict[str, dict[str, Any]]) -> list[bytes]:
    """One Batch API JSONL line per request, its cache key as the ``custom_id``."""
    return [
        json.dumps(
            {"custom_id": key, "method": "POST", "url": CHAT_URL, "body": body}, ensure_ascii=False, sort_keys=True
        ).encode()
        + b"\n"
        for key, body in bodies.items()
    ]


def split_files(lines: list[bytes], max_requests: int, max_bytes: int) -> list[list[bytes]]:
    """Consecutive groups of ``lines`` within both limits of one input file."""
    files: list[list[bytes]] = []
    size = 0
    for line in lines:
        if len(line) > max_bytes:
            raise ValueError(f"one request is {len(line):,} bytes, over max_bytes_per_file {max_bytes:,}")
        if not files or len(files[-1]) >= max_requests or size + len(line) > max_bytes:
            files.append([])
            size = 0
        files[-1].append(line)
        size += len(line)
    return files


def read_results(lines: Iterable[str | bytes], settings: ChatSettings) -> Outcome:
    """The replies and failures in a job's output and error file lines, by ``custom_id``; a line that
    cannot be read costs only its own request."""
    replies: dict[str, Reply] = {}
    retry: dict[str, str] = {}
    failed: dict[str, str] = {}
    unreadable: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            key, response, error = _result_fields(line)
        except ValueError as e:
            unreadable.append(f"line {number}: {e}")
            continue
        status = response.get("status_code")
        if error is None and status == 200:
            try:
                replies[key] = reply_from_completion(response.get("body"), settings)
            except InvalidReply as e:
                retry[key] = f"unusable reply: {e}"
            continue
        message = _error_message(error, response)
        if error is not None or not isinstance(status, int) or status in RETRYABLE_STATUS or status >= 500:
            retry[key] = message
        else:
            failed[key] = message
    # A key answered on one line and failed on another (a duplicate line) keeps its reply.
    return Outcome(
        replies,
        {k: v for k, v in retry.items() if k not in replies},
        {k: v for k, v in failed.items() if k not in replies},
        unreadable,
    )


class BatchClient:
    """Answers chat requests from the cache, and the rest through Batch API jobs (see the module docstring)."""

    def __init__(self, settings: ChatSettings, batch: BatchSettings, cache: ReplyCache) -> None:
        import openai

        self.settings, self.batch, self.cache = settings, batch, cache
        self._openai = openai
        self._client = None
        if batch.submit:
            self._client = openai.OpenAI(
                api_key=api_key(settings),
                base_url=settings.base_url,
                timeout=settings.timeout,
                max_retries=settings.max_attempts,
            )
        self.submitted: list[str] = []

    def complete(self, conversations: list[list[dict[str, str]]]) -> list[Reply | Failure]:
        """One outcome per message list, in order."""
        params = self.settings.params()
        keys = [request_key(self.settings.model, messages, params) for messages in conversations]
        bodies = {
            key: {"model": self.settings.model, "messages": messages, **params}
            for key, messages in zip(keys, conversations)
            if self.cache.get(key) is None
        }
        failures = self._send(bodies) if bodies else {}
        return [
            failures.get(key) or self.cache.get(key) or Failure(REQUEST_FAILED, "no reply imported") for key in keys
        ]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _send(self, bodies: dict[str, dict[str, Any]]) -> dict[str, Failure]:
        failures: dict[str, Failure] = {}
        pending = dict(bodies)
        deadline = time.monotonic() + self.batch.max_wait
        for round_ in range(self.batch.max_rounds):
            jobs = self.cache.live_batches(list(pending))  # submitted earlier (a killed or rerun job): poll those
            waiting = {key for held in jobs.values() for key in held}
            new = {key: body for key, body in pending.items() if key not in waiting}
            over = over_budget(self.settings, *self.cache.spent()) if new else None
            if over:
                failures.update((key, Failure(BUDGET_EXHAUSTED, over)) for key in new)
            elif new and not self.batch.submit:
                hint = (
                    "submit them to the Batch API, then `vlmcurate import-batch RESULTS... --cache "
                    f"{self.cache.path}` and `vlmcurate retry-failed`"
                )
                failures.update(
                    (key, Failure(BATCH_PENDING, f"written to {path}: {hint}"))
                    for key, path in self._write(new).items()
                )
            elif new:
                jobs.update(self._submit(self._write(new), new))
            if not jobs:
                break
            retry = self._wait(jobs, deadline, failures)
            pending = {key: pending[key] for key in retry if key in pending}
            if not pending:
                break
            if round_ + 1 == self.batch.max_rounds:
                failures.update(
                    (key, Failure(REQUEST_FAILED, f"{self.batch.max_rounds} batch jobs; last: {why}"))
                    for key, why in retry.items()
                    if key in pending
                )
        return failures

    def _write(self, bodies: dict[str, dict[str, Any]]) -> dict[str, Path]:
        """Write the request files; return the file each key went to."""
        folder = Path(self.batch.folder)
        folder.mkdir(parents=True, exist_ok=True)
        where: dict[str, Path] = {}
        lines = request_lines(bodies)
        for group in split_files(lines, self.batch.max_requests_per_file, self.batch.max_bytes_per_file):
            data = b"".join(group)
            path = folder / f"requests-{hashlib.sha256(data).hexdigest()[:16]}.jsonl"
            if not path.exists():
                temporary = path.with_suffix(".tmp")
                temporary.write_bytes(data)
                temporary.replace(path)
            where.update((json.loads(line)["custom_id"], path) for line in group)
        return where

    def _submit(self, paths: dict[str, Path], bodies: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
        by_file: dict[Path, set[str]] = {}
        for key in bodies:
            by_file.setdefault(paths[key], set()).add(key)
        jobs = {}
        for path, keys in by_file.items():
            with self._fatal():
                uploaded = self._client.files.create(file=(path.name, path.read_bytes()), purpose="batch")
                job = self._client.batches.create(
                    input_file_id=uploaded.id,
                    endpoint=CHAT_URL,
                    completion_window=self.batch.completion_window,
                    metadata={"source": "vlmcurate", "file": path.name},
                )
            self.cache.add_batch(job.id, path.name, sorted(keys))
            self.submitted.append(job.id)
            jobs[job.id] = keys
        return jobs

    def _wait(self, jobs: dict[str, set[str]], deadline: float, failures: dict[str, Failure]) -> dict[str, str]:
        """Poll ``jobs`` until they finish, import their files; return the keys to send again, with why."""
        retry: dict[str, str] = {}
        running = dict(jobs)
        while running:
            for job_id in list(running):
                with self._fatal():
                    job = self._client.batches.retrieve(job_id)
                if job.status in FINISHED:
                    retry.update(self._import(job, running.pop(job_id), failures))
            if running and time.monotonic() >= deadline:
                for job_id, keys in running.items():
                    failures.update(
                        (
                            key,
                            Failure(
                                REQUEST_FAILED,
                                f"batch job {job_id} still running after "
                                f"max_wait {self.batch.max_wait:.0f} s; a rerun "
                                "polls it again",
                            ),
                        )
                        for key in keys
                    )
                break
            if running:
                time.sleep(self.batch.poll_interval)
        return retry

    def _import(self, job: Any, keys: set[str], failures: dict[str, Failure]) -> dict[str, str]:
        lines: list[bytes] = []
        for file_id in (job.output_file_id, job.error_file_id):
            if file_id:
                with self._fatal():
                    lines += self._client.files.content(file_id).content.splitlines()
        outcome = read_results(lines, self.settings)
        replies = {key: reply for key, reply in outcome.replies.items() if key in keys}  # none for other requests
        self.cache.put_many(replies)
        failures.update((key, Failure(REQUEST_FAILED, why)) for key, why in outcome.failed.items() if key in keys)
        retry = {key: why for key, why in outcome.retry.items() if key in keys}
        unanswered = keys - replies.keys() - outcome.failed.keys() - retry.keys()
        if job.status == "failed" and unanswered:
            failures.update(
                (key, Failure(REQUEST_FAILED, f"batch job {job.id} failed: {_job_errors(job)}")) for key in unanswered
            )
        else:
            unread = (
                f"; {len(outcome.unreadable)} unreadable result lines ({outcome.unreadable[0]})"
                if outcome.unreadable
                else ""
            )
            retry.update(
                (key, f"batch job {job.id} ended {job.status} without an answer{unread}") for key in unanswered
            )
        self.cache.batch_imported(job.id)
        return retry

    @contextmanager
    def _fatal(self) -> Iterator[None]:
        """401/403/404 from the files or batches API stop the stage, as for chat requests."""
        try:
            yield
        except self._openai.APIStatusError as e:
            if e.status_code in FATAL_STATUS:
                raise EndpointError(
                    f"{self.settings.base_url or 'the OpenAI API'} answered HTTP {e.status_code} "
                    f"to a Batch API call: {e.message}"
                ) from None
            raise


def import_result_files(paths: list[Path], settings: ChatSettings, cache: ReplyCache) -> Outcome:
    """Store the replies of Batch API output files in the cache (``vlmcurate import-batch``); a ValueError
    when not one line of them is a Batch API result (the wrong files)."""
    lines = [line for path in paths for line in Path(path).read_bytes().splitlines()]
    outcome = read_results(lines, settings)
    if outcome.unreadable and not (outcome.replies or outcome.retry or outcome.failed):
        raise ValueError(f"no line of {', '.join(map(str, paths))} is a Batch API result: {outcome.unreadable[0]}")
    cache.put_many(outcome.replies)
    return outcome


def _result_fields(line: str | bytes) -> tuple[str, dict[str, Any], Any]:
    """A result line's ``custom_id``, ``response`` (an object, empty where null) and ``error``; a
    ValueError for a line that is not a Batch API result (bytes that are not UTF-8 among them)."""
    item = decode_json(line)
    key = item.get("custom_id") if isinstance(item, dict) else None
    if not isinstance(key, str) or not key:
        raise ValueError("not a Batch API result (an object with a custom_id string)")
    response = item.get("response") or {}
    if not isinstance(response, dict):
        raise ValueError(f"the response of {clip(key, 80)!r} is not an object")
    return key, response, item.get("error")


def _error_message(error: Any, response: dict[str, Any]) -> str:
    """What an error line or a failed response says, shortened."""
    if isinstance(error, dict):
        return clip(f"{error.get('code', 'error')}: {error.get('message', '')}".strip())
    if error is not None:
        return clip(f"error: {error}")
    body = response.get("body")
    detail = body.get("error") if isinstance(body, dict) else body
    if isinstance(detail, dict):
        detail = detail.get("message", "")
    return clip(f"HTTP {response.get('status_code')}: {detail or ''}".strip())


def _job_errors(job: Any) -> str:
    """The reasons a failed job gives, or that it gave none."""
    data = getattr(getattr(job, "errors", None), "data", None) or []
    reasons = [str(getattr(e, "message", None) or getattr(e, "code", None) or "?") for e in data]
    return clip("; ".join(reasons)) or "no reason given"
