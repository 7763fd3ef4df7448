"""MetaCLIP metadata: a list of entries (concepts) read from JSON or text, validated.

Formats: MetaCLIP's ``metadata.json`` (a JSON list of strings), or a text file with one entry a
line. An entry is matched as ``" " + entry + " "`` in the normalised caption, so entries must be
non-empty and free of leading or trailing whitespace; duplicates would count a caption twice.
Every problem raises :class:`MetadataError` naming the file, the position and the fix.
"""

from __future__ import annotations

import json

from pipelines.stage import storage


class MetadataError(ValueError):
    """The metadata file cannot be used as it is."""


def load_metadata(path: str) -> list[str]:
    """The entries of a MetaCLIP metadata file, in file order (their position is their id)."""
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except storage.StorageError as error:
        raise MetadataError(f"metadata file {error}") from None
    except UnicodeDecodeError as error:
        raise MetadataError(f"metadata file {path!r} is not UTF-8 text: {error}") from None
    if path.endswith(".json"):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise MetadataError(f"metadata file {path!r} is not valid JSON: {e}") from None
        if not isinstance(entries, list):
            raise MetadataError(
                f"metadata file {path!r} holds a JSON {type(entries).__name__}; it must be a list "
                f"of strings (MetaCLIP's metadata.json format)"
            )
        where = "item"
    else:
        entries = text.split("\n")
        if entries and entries[-1] == "":  # the newline ending the last line
            entries.pop()
        entries = [e[:-1] if e.endswith("\r") else e for e in entries]
        where = "line"
    check_entries(entries, path, where)
    if not entries:
        raise MetadataError(f"metadata file {path!r} holds no entries")
    return entries


def check_entries(entries: list, path: str = "metadata", where: str = "item") -> None:
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        position = f"{where} {index + 1 if where == 'line' else index}"
        if not isinstance(entry, str):
            raise MetadataError(f"{path}: {position} is a {type(entry).__name__} ({entry!r}), not a string")
        if not entry.strip():
            raise MetadataError(f"{path}: {position} is empty; remove it")
        if entry != entry.strip():
            raise MetadataError(f"{path}: {position} {entry!r} has leading or trailing whitespace; strip it")
        if entry in seen:
            first = f"{where} {seen[entry] + 1 if where == 'line' else seen[entry]}"
            raise MetadataError(f"{path}: {position} {entry!r} repeats {first}; keep one")
        seen[entry] = index
