"""Instruction replies from a causal LM in the worker's own process: ``backend: local``.

:class:`LocalChat` answers the same lists of chat messages as
:class:`~generators.instruct.chat.ChatClient`, with the same outcomes, from a transformers model
loaded by :func:`models.causal_lm.load_causal_lm` (by default ``packaged:smollm2-135m``, which
runs on a CPU with no network and no key):

- **Cache first**: the same :class:`~generators.instruct.cache.ReplyCache` and the same key (the
  model name, the messages and :meth:`LocalSettings.params`), so one cache file serves every
  backend; another model name is another key. A batch's replies are stored as soon as it is
  generated, with cost 0.
- **Contents stay text**: before the chat template is applied, every string the tokenizer would
  read as one of its special or added tokens (``<|im_start|>``, ``<file_sep>``, ``<|endoftext|>``
  for SmolLM2; whatever the loaded tokenizer has) is removed from each message's content, pass
  after pass until none is left (removing one may join the pieces of another), so no caption or
  reply text can become a control token. Whitespace-only added tokens are left alone.
- **Batches**: each conversation goes through the tokenizer's chat template (with the generation
  prompt); prompts are sorted by length and generated ``batch_size`` at a time, padded on the left,
  so prompts of similar length share a batch and little is spent on padding. Outcomes come back in
  the order of the conversations.
- **Sampling is seeded per request**: ``generate`` takes no random generator, so it decodes
  greedily over scores to which :class:`SeededSampler` has added Gumbel noise from one generator
  per request, seeded from the request's key (which holds ``seed``). The argmax of logits over
  temperature plus Gumbel noise, within the top-p nucleus, is a draw from the distribution that
  temperature and top-p sampling draw from, and a request's draws do not depend on the prompts that
  share its batch. (Its text can still change when padding moves the logits in their last bits and
  that flips a near tie.) ``temperature: 0`` is plain greedy decoding.
- **Limits**: a prompt that leaves fewer than ``max_new_tokens`` of the model's positions fails with
  ``prompt_too_long`` and is not generated. A reply that reached ``max_new_tokens`` without the eos
  has ``finish_reason == "length"``, else ``"stop"``; ``completion_tokens`` counts the eos.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from generators.instruct.cache import Reply, ReplyCache, request_key
from generators.instruct.chat import Failure

PROMPT_TOO_LONG = "prompt_too_long"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LocalSettings:
    """Which causal LM writes the replies, how it samples, and where it runs."""

    model: str = "packaged:smollm2-135m"
    max_new_tokens: int = 512
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    batch_size: int = 8  # prompts generated together
    seed: int = 0
    device: str = "auto"  # cuda where there is one, else cpu (or cuda:N)
    dtype: str = "auto"  # bfloat16 on cuda, float32 on cpu
    threads: int | None = None  # torch's CPU threads while generating (restored after)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                f"max_new_tokens and batch_size must be at least 1, got {self.max_new_tokens} and {self.batch_size}"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")

    def params(self) -> dict[str, Any]:
        """The sampling parameters, hashed into every request's key."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_new_tokens,
            "seed": self.seed,
        }

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def torch_dtype(self, device: str) -> Any:
        import torch

        name = self.dtype if self.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        return getattr(torch, name)


class LocalChat:
    """Generates replies to chat requests in-process, with the cache, batching and seeding described above."""

    def __init__(self, settings: LocalSettings, cache: ReplyCache | None = None) -> None:
        from models.causal_lm import context_length, load_causal_lm

        self.settings, self.cache = settings, cache
        self.device = settings.torch_device()
        self.model, self.tokenizer = load_causal_lm(
            settings.model, dtype=settings.torch_dtype(self.device), device=self.device
        )
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{settings.model}: its tokenizer has no chat template to build prompts with")
        self.context = context_length(self.model)
        self._special = special_token_pattern(self.tokenizer)
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
        self.generated = 0  # requests that went through the model (not the cache)
        self.batches = 0

    def complete(self, conversations: list[list[dict[str, str]]]) -> list[Reply | Failure]:
        """One outcome per message list, in order."""
        settings, params = self.settings, self.settings.params()
        outcomes: list[Reply | Failure | None] = [None] * len(conversations)
        pending: list[tuple[int, str, list[int]]] = []
        for index, messages in enumerate(conversations):
            key = request_key(settings.model, messages, params)
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None:
                outcomes[index] = cached
                continue
            ids = self.prompt_ids(messages)
            if self.context is not None and len(ids) + settings.max_new_tokens > self.context:
                outcomes[index] = Failure(
                    PROMPT_TOO_LONG,
                    f"{len(ids)} prompt tokens and max_new_tokens "
                    f"{settings.max_new_tokens} exceed the {self.context} "
                    f"positions of {settings.model}",
                )
                continue
            pending.append((index, key, ids))
        pending.sort(key=lambda job: len(job[2]))  # stable: equal lengths keep their order
        for start in range(0, len(pending), settings.batch_size):
            batch = pending[start : start + settings.batch_size]
            replies = self._generate([key for _, key, _ in batch], [ids for _, _, ids in batch])
            if self.cache is not None:
                self.cache.put_many({key: reply for (_, key, _), reply in zip(batch, replies)})
            for (index, _, _), reply in zip(batch, replies):
                outcomes[index] = reply
        return outcomes  # type: ignore[return-value]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of a conversation under the chat template, ending in the assistant's turn; only the
        template itself writes special tokens."""
        messages = [{**m, "content": without_special_tokens(m["content"], self._special)} for m in messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def close(self) -> None:
        self.model = None

    def _generate(self, keys: list[str], prompts: list[list[int]]) -> list[Reply]:
        import torch

        from models.inference import cpu_threads

        settings = self.settings
        inputs = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        processors = (
            []
            if settings.temperature == 0
            else [SeededSampler([request_seed(key) for key in keys], settings.temperature, settings.top_p, self.device)]
        )
        threads = (
            nullcontext() if settings.threads is None else cpu_threads(torch.device(self.device), settings.threads)
        )
        with threads, torch.inference_mode():
            output = self.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=settings.max_new_tokens,
                eos_token_id=sorted(self.eos_ids),
                pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=processors,
            )
        self.generated += len(prompts)
        self.batches += 1
        new = output[:, inputs["input_ids"].shape[1] :].tolist()
        return [self._reply(tokens, len(prompt)) for tokens, prompt in zip(new, prompts)]

    def _reply(self, tokens: list[int], prompt_tokens: int) -> Reply:
        stop = next((n for n, token in enumerate(tokens) if token in self.eos_ids), None)
        kept = tokens if stop is None else tokens[:stop]
        return Reply(
            text=self.tokenizer.decode(kept, skip_special_tokens=True),
            finish_reason="length" if stop is None else "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(tokens) if stop is None else stop + 1,
            model=self.settings.model,
        )


class SeededSampler:
    """A logits processor for greedy ``generate`` that makes its argmax a temperature and top-p sample,
    each batch row drawing from its own generator (the Gumbel-max trick)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: str) -> None:
        import torch

        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores / self.temperature
        if self.top_p < 1:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            outside = probs.cumsum(dim=-1) - probs >= self.top_p  # the nucleus is already full before them
            scores = scores.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
        noise = torch.stack(
            [torch.empty(scores.shape[-1], device=scores.device).exponential_(generator=g) for g in self.generators]
        )
        return scores - noise.log()  # -log(Exp(1)) is Gumbel(0, 1)


def special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """One pattern for every string ``tokenizer`` reads as a single special or added token (longest first;
    whitespace-only ones aside), or None where it has none."""
    tokens = {str(token) for token in tokenizer.all_special_tokens}
    tokens |= {added.content for added in tokenizer.added_tokens_decoder.values()}
    tokens = sorted((token for token in tokens if token.strip()), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def without_special_tokens(text: str, pattern: re.Pattern[str] | None) -> str:
    """``text`` without any match of ``pattern``, removed until none is left (``<fi<file_sep>le_sep>``
    leaves ``<file_sep>`` after one pass)."""
    while pattern is not None and (stripped := pattern.sub("", text)) != text:
        text = stripped
    return text


def request_seed(key: str) -> int:
    """A request's own sampling seed, from its cache key (which holds the model, messages and ``seed``)."""
    return int(key[:16], 16)
