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
  endpoint allows (BENCHMARKS.md). Authentication, headers, timeouts and errors are the client's.
- **Retries** are this module's, not the client's (``max_retries=0``): 408, 409, 429 and 5xx,
  timeouts and dropped connections are retried up to ``max_attempts`` times with exponential
  backoff and full jitter, or after the ``Retry-After`` (or ``retry-after-ms``) the endpoint
  asks for. The wait happens outside the concurrency slot, so a request told to wait is
  requeued while others go ahead (the client's own retry would give up past 120 s).
- **Budget**: before each send, the spend recorded in the cache file (cost from ``price_input``
  and ``price_output`` per million tokens, and tokens) is compared with ``max_cost_usd`` and
  ``max_total_tokens``; once reached, requests fail with ``budget_exhausted`` instead of being
  sent (in-flight ones still land, so the overshoot is at most ``concurrency`` replies).
- **Fatal**: a 401/403 (credentials) or 404 (no such model or route) stops the stage with the
  endpoint's message: every other request would fail the same way.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from typing import Any

from generators.instruct.cache import Reply, ReplyCache, request_key

REQUEST_FAILED = "llm_request_failed"
BUDGET_EXHAUSTED = "budget_exhausted"
RETRYABLE_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = frozenset({401, 403, 404})


@dataclass(frozen=True)
class Failure:
    """A request that got no reply: the reject reason and what happened."""

    reason: str
    detail: str


class EndpointError(RuntimeError):
    """The endpoint refuses every request (credentials, model name): stop and say so."""


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
    timeout: float = 60.0
    max_attempts: int = 8
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 600.0
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


class ChatClient:
    """Sends chat requests concurrently, with the cache, retries and budget described above."""

    def __init__(self, settings: ChatSettings, cache: ReplyCache) -> None:
        import openai

        key = api_key(settings)
        self.settings, self.cache = settings, cache
        self._openai = openai
        from openai.types.chat import ChatCompletion

        self._completion = ChatCompletion
        self._client = openai.AsyncOpenAI(api_key=key, base_url=settings.base_url, max_retries=0,
                                          timeout=settings.timeout)
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
        settings, openai = self.settings, self._openai
        params = settings.params()
        key = request_key(settings.model, messages, params)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        last = "no attempt"
        for attempt in range(settings.max_attempts):
            over = self._over_budget()
            if over:
                return Failure(BUDGET_EXHAUSTED, over)
            async with slots:
                try:
                    self.sent += 1
                    response = await self._client.post("/chat/completions", cast_to=self._completion,
                                                       body={"model": settings.model, "messages": messages, **params})
                except openai.APIStatusError as e:
                    status = e.status_code
                    if status in FATAL_STATUS:
                        raise EndpointError(f"{settings.base_url or 'the OpenAI API'} answered HTTP {status} for "
                                            f"model {settings.model!r}: {e.message}") from None
                    last = f"HTTP {status}: {e.message}"
                    if status not in RETRYABLE_STATUS and status < 500:
                        return Failure(REQUEST_FAILED, last)
                    delay = _retry_after(e.response)
                except (openai.APITimeoutError, openai.APIConnectionError) as e:
                    last, delay = f"{type(e).__name__}: {e}", None
                else:
                    return self._store(key, response)
            if delay is not None and delay > settings.max_retry_after:
                return Failure(REQUEST_FAILED, f"{last}; the endpoint asked to wait {delay:.0f} s "
                                               f"(more than max_retry_after {settings.max_retry_after:.0f} s)")
            if attempt + 1 < settings.max_attempts:
                await asyncio.sleep(delay if delay is not None else self._backoff(attempt))
        return Failure(REQUEST_FAILED, f"{settings.max_attempts} attempts; last: {last}")

    def _store(self, key: str, response: Any) -> Reply:
        reply = reply_from_completion(response, self.settings)
        self.cache.put(key, reply)
        self._spent = (self._spent[0] + reply.cost, self._spent[1] + reply.prompt_tokens + reply.completion_tokens)
        return reply

    def _over_budget(self) -> str | None:
        return over_budget(self.settings, *self._spent)

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.settings.backoff_max, self.settings.backoff_base * 2 ** attempt))


def api_key(settings: ChatSettings) -> str:
    """The key from the environment variable the settings name; an :class:`EndpointError` without it."""
    key = os.environ.get(settings.api_key_env)
    if key is None:
        raise EndpointError(f"set the environment variable {settings.api_key_env} to the endpoint's API key "
                            f"(any non-empty value for a server that does not check keys)")
    return key


def reply_from_completion(response: Any, settings: ChatSettings) -> Reply:
    """A ``ChatCompletion`` as the :class:`Reply` the cache stores, priced with ``settings``."""
    choice = response.choices[0] if response.choices else None
    usage = response.usage
    prompt_tokens = int(usage.prompt_tokens) if usage else 0
    completion_tokens = int(usage.completion_tokens) if usage else 0
    cost = (prompt_tokens * settings.price_input + completion_tokens * settings.price_output) / 1e6
    return Reply(text=(choice.message.content or "") if choice else "",
                 finish_reason=choice.finish_reason if choice else None, prompt_tokens=prompt_tokens,
                 completion_tokens=completion_tokens, model=response.model or settings.model, cost=cost)


def over_budget(settings: ChatSettings, cost: float, tokens: int) -> str | None:
    """Why no more requests may be sent after spending ``cost`` and ``tokens``, or None."""
    if settings.max_cost_usd is not None and cost >= settings.max_cost_usd:
        return f"spent ${cost:.4f} of max_cost_usd {settings.max_cost_usd}"
    if settings.max_total_tokens is not None and tokens >= settings.max_total_tokens:
        return f"used {tokens} tokens of max_total_tokens {settings.max_total_tokens}"
    return None


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
