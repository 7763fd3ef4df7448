"""The request cache: every reply an endpoint returned, keyed by what was asked, in SQLite.

The key is a hash of the model, the messages and the sampling parameters, so a rerun or a
resumed run finds every request that already succeeded and never sends it again; a changed
prompt file or parameter is a new key. A reply is stored the moment it arrives (one small
transaction), so a run killed mid-batch loses only the requests still in flight. The file also
holds each reply's token usage and cost, which is what the budget counts. SQLite's WAL mode lets
the workers of one machine share the file; on a cluster give each node its own path or put it
on storage that supports file locks.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    created REAL NOT NULL
)"""


@dataclass(frozen=True)
class Reply:
    """What an endpoint answered to one request."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    model: str
    cost: float = 0.0
    cached: bool = False


def request_key(model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    payload = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class ReplyCache:
    """Replies by request key, and the spend recorded with them."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def get(self, key: str) -> Reply | None:
        row = self._db.execute("SELECT text, finish_reason, prompt_tokens, completion_tokens, model, cost "
                               "FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else Reply(*row, cached=True)

    def put(self, key: str, reply: Reply) -> None:
        self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (key, reply.model, reply.text, reply.finish_reason, reply.prompt_tokens,
                          reply.completion_tokens, reply.cost, time.time()))

    def spent(self) -> tuple[float, int]:
        """Total cost and total tokens of every reply in the file."""
        cost, tokens = self._db.execute(
            "SELECT COALESCE(SUM(cost), 0), COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM replies"
        ).fetchone()
        return float(cost), int(tokens)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self._db.close()
