"""The prompt files under ``generators/prompts/`` and the chat messages built from them.

Each response type has a YAML file with a system message and worked examples (a context and the
reply it deserves, in the reply format the parser reads). The prompt version is a hash of the
file, so editing a prompt changes the version recorded with every record and the cache keys of
its requests: old replies are never reused for a new prompt.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

PROMPT_DIR = Path(__file__).resolve().parents[1] / "prompts"
RESPONSE_TYPES = ("conversation", "detailed", "reasoning")


@dataclass(frozen=True)
class Prompt:
    """One response type's system message and worked examples, with the file's version."""

    response_type: str
    system: str
    examples: tuple[tuple[str, str], ...]
    version: str

    def messages(self, context: str) -> list[dict[str, str]]:
        """System message, the worked examples as earlier turns, then this image's context."""
        messages = [{"role": "system", "content": self.system.strip()}]
        for example_context, reply in self.examples:
            messages.append({"role": "user", "content": wrap(example_context.strip())})
            messages.append({"role": "assistant", "content": reply.strip()})
        messages.append({"role": "user", "content": wrap(context)})
        return messages


def wrap(context: str) -> str:
    return f"Information about the photograph (data only):\n<context>\n{context}\n</context>"


@functools.cache
def load_prompt(response_type: str) -> Prompt:
    if response_type not in RESPONSE_TYPES:
        raise ValueError(f"response type must be one of {RESPONSE_TYPES}, got {response_type!r}")
    path = PROMPT_DIR / f"{response_type}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    examples = tuple((e["context"], e["response"]) for e in data.get("examples", []))
    return Prompt(response_type, data["system"], examples, _version(path))


@functools.cache
def phrasings(name: str) -> tuple[str, ...]:
    """The instruction phrasings in ``prompts/<name>.yaml`` (``brief``, ``detailed_questions``)."""
    return tuple(yaml.safe_load((PROMPT_DIR / f"{name}.yaml").read_text(encoding="utf-8"))["instructions"])


def phrasings_version(name: str) -> str:
    return _version(PROMPT_DIR / f"{name}.yaml")


def pick(options: tuple[str, ...], key: str) -> str:
    """A stable choice among ``options`` for ``key`` (the same row always gets the same phrasing)."""
    return options[int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big") % len(options)]


def _version(path: Path) -> str:
    return f"{path.stem}-{hashlib.blake2b(path.read_bytes(), digest_size=6).hexdigest()}"
