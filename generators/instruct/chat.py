"""Chat completions through the ``openai`` client against any OpenAI-compatible endpoint.

OpenAI itself, ``vllm serve``, llama.cpp's server: ``base_url`` and an API key from the
environment variable named by ``api_key_env`` (never from the config, which is recorded in
the run's manifest). :class:`ChatClient` sends a list of requests with at most ``concurrency``
in flight and returns one :class:`~generators.instruct.cache.Reply` or :class:`Failure` each:

- **Cache first**: a request whose key is in the :class:`ReplyCache` is answered from it and not
  sent; a reply is stored as soon as it arrives.
- **Requests** go through the client's ``post`` with the body as built here: ``chat.completions
  .create`` would first walk every message through its typed-dict transform, about 2 ms of CPU a
  request with the few-shot prompts, which capped one worker at half the throughput a 32-slot
  endpoint allows (BENCHMARKS.md). Authentication, headers and HTTP errors are the client's.
- **Replies are checked, not trusted**: the body is read as bytes (at most ``max_reply_bytes``) and
  :func:`reply_from_completion` accepts only a JSON object whose ``choices`` is a non-empty list,
  whose first choice has a ``message`` object with string (or null) ``content`` and a string (or
  null) ``finish_reason``, and whose ``usage``, where present, holds non-negative integer token
  counts. Anything else (an HTML error page or a body cut short with status 200, a null message,
  a number as content, negative usage) is a transient failure, retried like a 5xx.
- **Deadline**: ``timeout`` bounds each attempt as a whole (connecting, waiting and reading the
  body), not only each read, so a server that drips its reply is cut off after ``timeout``
  seconds; that too is transient.
- **Retries** are this module's, not the client's (``max_retries=0``): 408, 409, 429 and 5xx,
  timeouts, dropped connections and unusable replies are retried up to ``max_attempts`` times with
  exponential backoff and full jitter, or after the ``Retry-After`` (or ``retry-after-ms``) the
  endpoint asks for; then the request fails with ``llm_request_failed`` and a detail saying what
  went wrong last. The wait happens outside the concurrency slot, so a request told to wait is
  requeued while others go ahead (the client's own retry would give up past 120 s).
- **Budget**: once a request holds its concurrency slot, immediately before it is sent, the spend
  recorded in the cache file (cost from ``price_input`` and ``price_output`` per million tokens,
  and tokens) is compared with ``max_cost_usd`` and ``max_total_tokens``; once reached, requests
  fail with ``budget_exhausted`` instead of being sent (in-flight ones still land, so the
  overshoot is at most ``concurrency`` replies).
- **Fatal**: a 401/403 (credentials) or 404 (no such model or route) stops the stage with the
  endpoint's message: every other request would fail the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import dataclass
from typing import Any

from generators.instruct.cache import Reply, ReplyCache, request_key
from generators.instruct.context import has_lone_surrogate

REQUEST_FAILED = "llm_request_failed"
BUDGET_EXHAUSTED = "budget_exhausted"
RETRYABLE_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = frozenset({401, 403, 404})
#: The largest token count a reply may report: the records' token columns are 32-bit integers.
MAX_TOKENS = 2**31 - 1


@dataclass(frozen=True)
class Failure:
    """A request that got no reply: the reject reason and what happened."""

    reason: str
    detail: str


class EndpointError(RuntimeError):
    """The endpoint refuses every request (credentials, model name): stop and say so."""


class InvalidReply(ValueError):
    """A reply that is not a chat completion this module can use; the message says what is wrong."""


@dataclass
class ChatSettings:
    """Where to send requests, how, and how much may be spent."""

    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.7
    max_tokens: int = 1024
    json_mode: bool = False
    concurrency: int = 16
    timeout: float = 60.0  # seconds for one attempt, start to end
    max_attempts: int = 8
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 600.0
    max_reply_bytes: int = 16_000_000
    max_cost_usd: float | None = None
    max_total_tokens: int | None = None
    price_input: float = 0.0
    price_output: float = 0.0

    def params(self) -> dict[str, Any]:
        """The sampling parameters sent with every request (and hashed into its key)."""
        params: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.json_mode:
            params["response_format"] = {"type": "json_object"}
        return params


class _Retry(Exception):
    """An attempt that failed in a way a later one may not: what happened, and the wait the endpoint asked for."""

    def __init__(self, detail: str, delay: float | None = None) -> None:
        super().__init__(detail)
        self.detail, self.delay = detail, delay


class ChatClient:
    """Sends chat requests concurrently, with the cache, checks, deadline, retries and budget described above."""

    def __init__(self, settings: ChatSettings, cache: ReplyCache) -> None:
        import httpx2
        import openai

        key = api_key(settings)
        self.settings, self.cache = settings, cache
        self._openai, self._http = openai, httpx2
        self._client = openai.AsyncOpenAI(
            api_key=key, base_url=settings.base_url, max_retries=0, timeout=settings.timeout
        )
        self._loop = asyncio.new_event_loop()
        self._spent = (0.0, 0)
        self.sent = 0

    def complete(self, conversations: list[list[dict[str, str]]]) -> list[Reply | Failure]:
        """One outcome per message list, in order."""
        self._spent = self.cache.spent()  # other workers' spend too, since the last batch
        return self._loop.run_until_complete(self._complete_all(conversations))

    def close(self) -> None:
        self._loop.run_until_complete(self._client.close())
        self._loop.close()

    async def _complete_all(self, conversations: list[list[dict[str, str]]]) -> list[Reply | Failure]:
        slots = asyncio.Semaphore(self.settings.concurrency)
        return list(await asyncio.gather(*(self._one(messages, slots) for messages in conversations)))

    async def _one(self, messages: list[dict[str, str]], slots: asyncio.Semaphore) -> Reply | Failure:
        settings = self.settings
        params = settings.params()
        key = request_key(settings.model, messages, params)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        body = {"model": settings.model, "messages": messages, **params}
        last = "no attempt"
        for attempt in range(settings.max_attempts):
            async with slots:
                over = self._over_budget()  # here, not before the wait: the requests ahead may have spent it
                if over:
                    return Failure(BUDGET_EXHAUSTED, over)
                self.sent += 1
                try:
                    outcome = await asyncio.wait_for(self._attempt(body), settings.timeout)
                except _Retry as e:
                    last, delay = e.detail, e.delay
                except TimeoutError:
                    last, delay = f"no complete reply within timeout {settings.timeout:g} s", None
                else:
                    return self._store(key, outcome) if isinstance(outcome, Reply) else outcome
            if delay is not None and delay > settings.max_retry_after:
                return Failure(
                    REQUEST_FAILED,
                    f"{last}; the endpoint asked to wait {delay:.0f} s "
                    f"(more than max_retry_after {settings.max_retry_after:.0f} s)",
                )
            if attempt + 1 < settings.max_attempts:
                await asyncio.sleep(delay if delay is not None else self._backoff(attempt))
        return Failure(REQUEST_FAILED, f"{settings.max_attempts} attempts; last: {last}")

    async def _attempt(self, body: dict[str, Any]) -> Reply | Failure:
        """Send ``body`` once and read its reply: a :class:`Reply`, a :class:`Failure` not worth retrying,
        or :class:`_Retry` raised."""
        openai = self._openai
        try:
            response = await self._client.post("/chat/completions", cast_to=self._http.Response, body=body, stream=True)
        except openai.APIStatusError as e:
            return self._refused(e)
        except openai.APIError as e:  # timeouts, dropped connections, anything else the client raises
            raise _Retry(f"{type(e).__name__}: {e}") from None
        try:
            data = await self._read(response)
            return reply_from_completion(decode_json(data, response.headers.get("content-type")), self.settings)
        except InvalidReply as e:
            raise _Retry(f"unusable reply with HTTP {response.status_code}: {e}") from None
        finally:
            await response.aclose()

    async def _read(self, response: Any) -> bytes:
        """The body of ``response``, at most ``max_reply_bytes``; an :class:`InvalidReply` past that or when
        the connection fails midway."""
        limit, chunks, size = self.settings.max_reply_bytes, [], 0
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise InvalidReply(f"the body is over max_reply_bytes {limit:,}")
                chunks.append(chunk)
        except self._http.HTTPError as e:
            raise InvalidReply(f"the body could not be read: {type(e).__name__}: {e}") from None
        return b"".join(chunks)

    def _refused(self, error: Any) -> Failure:
        """What an HTTP error status means: stop the stage, retry (raises :class:`_Retry`), or this failure."""
        status, settings = error.status_code, self.settings
        if status in FATAL_STATUS:
            raise EndpointError(
                f"{settings.base_url or 'the OpenAI API'} answered HTTP {status} for "
                f"model {settings.model!r}: {clip(error.message)}"
            ) from None
        detail = f"HTTP {status}: {clip(error.message)}"
        if status in RETRYABLE_STATUS or status >= 500:
            raise _Retry(detail, _retry_after(error.response))
        return Failure(REQUEST_FAILED, detail)

    def _store(self, key: str, reply: Reply) -> Reply:
        self.cache.put(key, reply)
        self._spent = (self._spent[0] + reply.cost, self._spent[1] + reply.prompt_tokens + reply.completion_tokens)
        return reply

    def _over_budget(self) -> str | None:
        return over_budget(self.settings, *self._spent)

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.settings.backoff_max, self.settings.backoff_base * 2**attempt))


def api_key(settings: ChatSettings) -> str:
    """The key from the environment variable the settings name; an :class:`EndpointError` without it."""
    key = os.environ.get(settings.api_key_env)
    if key is None:
        raise EndpointError(
            f"set the environment variable {settings.api_key_env} to the endpoint's API key "
            f"(any non-empty value for a server that does not check keys)"
        )
    return key


def decode_json(data: bytes | str, content_type: str | None = None) -> Any:
    """The JSON value in a reply body; an :class:`InvalidReply` quoting its start when it is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        kind = f" (Content-Type {clip(content_type, 60)})" if content_type else ""
        start = data[:80] if isinstance(data, str) else data[:80].decode("utf-8", "replace")
        raise InvalidReply(f"the body is not JSON{kind}: {type(e).__name__}; it starts {start!r}") from None


def reply_from_completion(completion: Any, settings: ChatSettings) -> Reply:
    """The :class:`Reply` in a decoded chat completion, priced with ``settings``; an :class:`InvalidReply`
    naming the first field that is not what the chat completions API promises."""
    if not isinstance(completion, dict):
        raise InvalidReply(f"the body is {_describe(completion)}, not a JSON object")
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices:
        raise InvalidReply(f"choices is {_describe(choices)}, not a non-empty list")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise InvalidReply(f"choices[0] is {_describe(choice)}, not an object")
    message = choice.get("message")
    if not isinstance(message, dict):
        raise InvalidReply(f"choices[0].message is {_describe(message)}, not an object")
    text = _optional_text(message, "content", "choices[0].message") or ""
    finish_reason = _optional_text(choice, "finish_reason", "choices[0]")
    model = _optional_text(completion, "model", "the body") or settings.model
    prompt_tokens, completion_tokens = _usage(completion.get("usage"))
    cost = (prompt_tokens * settings.price_input + completion_tokens * settings.price_output) / 1e6
    return Reply(
        text=text,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        model=model,
        cost=cost,
    )


def over_budget(settings: ChatSettings, cost: float, tokens: int) -> str | None:
    """Why no more requests may be sent after spending ``cost`` and ``tokens``, or None."""
    if settings.max_cost_usd is not None and cost >= settings.max_cost_usd:
        return f"spent ${cost:.4f} of max_cost_usd {settings.max_cost_usd}"
    if settings.max_total_tokens is not None and tokens >= settings.max_total_tokens:
        return f"used {tokens} tokens of max_total_tokens {settings.max_total_tokens}"
    return None


def clip(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (what an endpoint says goes into a reject's detail)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "…"


def _optional_text(obj: dict[str, Any], name: str, where: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidReply(f"{where}.{name} is {_describe(value)}, not a string")
    if has_lone_surrogate(value):
        raise InvalidReply(f"{where}.{name} holds a lone surrogate escape (not Unicode text)")
    return value


def _usage(usage: Any) -> tuple[int, int]:
    """Prompt and completion tokens of a reply's ``usage`` (0 and 0 where there is none)."""
    if usage is None:
        return 0, 0
    if not isinstance(usage, dict):
        raise InvalidReply(f"usage is {_describe(usage)}, not an object")
    counts = []
    for name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
            raise InvalidReply(
                f"usage.{name} is {_describe(value)}, not a token count (an integer from 0 to {MAX_TOKENS:,})"
            )
        counts.append(value)
    return counts[0], counts[1]


def _describe(value: Any) -> str:
    """A short description of a JSON value for an error detail."""
    if value is None:
        return "null"
    if isinstance(value, bool | int | float):
        return clip(json.dumps(value), 40)
    if isinstance(value, str):
        return f"the string {clip(value, 40)!r}"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def _retry_after(response: Any) -> float | None:
    """Seconds the endpoint asked to wait (``retry-after-ms`` or ``retry-after`` in seconds), or None."""
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue  # an HTTP date: fall back to our backoff
    return None
