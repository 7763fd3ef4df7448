"""The request cache: every reply an endpoint returned, keyed by what was asked, in SQLite.

The key is a hash of the model, the messages and the sampling parameters, so a rerun or a
resumed run finds every request that already succeeded and never sends it again; a changed
prompt file or parameter is a new key. A reply is stored the moment it arrives (one small
transaction), so a run killed mid-batch loses only the requests still in flight. The file also
holds each reply's token usage and cost, which is what the budget counts, and the Batch API jobs
submitted and not yet imported, with the request keys each one holds. SQLite's WAL mode lets
the workers of one machine share the file; on a cluster give each node its own path or put it
on storage that supports file locks.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    input_file TEXT NOT NULL,
    created REAL NOT NULL,
    imported INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batch_requests (
    key TEXT NOT NULL,
    batch_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batch_requests_key ON batch_requests (key);
"""


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
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def get(self, key: str) -> Reply | None:
        row = self._db.execute(
            "SELECT text, finish_reason, prompt_tokens, completion_tokens, model, cost FROM replies WHERE key = ?",
            (key,),
        ).fetchone()
        return None if row is None else Reply(*row, cached=True)

    def put(self, key: str, reply: Reply) -> None:
        self.put_many({key: reply})

    def put_many(self, replies: dict[str, Reply]) -> None:
        """Store many replies in one transaction (a Batch API output file)."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (key, r.model, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.cost, now)
                    for key, r in replies.items()
                ],
            )

    def spent(self) -> tuple[float, int]:
        """Total cost and total tokens of every reply in the file; a negative count (possible in a file written
        before replies were checked) adds nothing, so it cannot switch the budget off."""
        cost, tokens = self._db.execute(
            "SELECT COALESCE(SUM(MAX(cost, 0)), 0), "
            "COALESCE(SUM(MAX(prompt_tokens, 0) + MAX(completion_tokens, 0)), 0) FROM replies"
        ).fetchone()
        return float(cost), int(tokens)

    def add_batch(self, batch_id: str, input_file: str, keys: list[str]) -> None:
        """Remember that Batch API job ``batch_id`` was submitted for ``keys`` (so a rerun polls it, not resends)."""
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, 0)", (batch_id, input_file, time.time()))
            self._db.executemany("INSERT INTO batch_requests VALUES (?, ?)", [(k, batch_id) for k in keys])

    def live_batches(self, keys: list[str]) -> dict[str, set[str]]:
        """Submitted, not yet imported batches holding any of ``keys``: batch id to the keys among them."""
        found: dict[str, set[str]] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            rows = self._db.execute(
                "SELECT r.batch_id, r.key FROM batch_requests r JOIN batches b ON b.id = r.batch_id "
                f"WHERE b.imported = 0 AND r.key IN ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
            for batch_id, key in rows:
                found.setdefault(batch_id, set()).add(key)
        return found

    def batch_imported(self, batch_id: str) -> None:
        self._db.execute("UPDATE batches SET imported = 1 WHERE id = ?", (batch_id,))

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self._db.close()
