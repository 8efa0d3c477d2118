"""Small JSON / JSONL file helpers shared by the training loop and the experiment scripts.

Writes are atomic (a temporary file in the same folder, then ``os.replace``): a
reader, or a run killed mid-write, sees the old file or the new one, never half
of one. Reads of a damaged file raise :class:`CorruptFileError` naming the file
and the line, so callers can report it in one line.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = [
    "CorruptFileError",
    "read_json",
    "read_json_lenient",
    "read_jsonl",
    "write_json",
    "write_jsonl",
    "write_text",
]


class CorruptFileError(ValueError):
    """A JSON or JSONL file exists but cannot be parsed."""


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON with sorted keys (non-JSON values as ``str``), atomically."""
    _write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: str, text: str) -> str:
    """Writes ``text`` to ``path`` atomically; returns the path."""
    _write_atomic(path, text)
    return path


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    """Writes one JSON object per line (sorted keys), replacing the file atomically."""
    _write_atomic(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_json(path: str, default: Any = None) -> Any:
    """The JSON value in ``path``, or ``default`` when the file does not exist.

    Raises:
      CorruptFileError: the file exists but is not valid JSON.
    """
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return default
    try:
        return json.loads(text)
    except ValueError as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e})") from None


def read_jsonl(path: str) -> list[Any]:
    """The JSON values of the non-empty lines of ``path`` (``[]`` when it does not exist).

    Raises:
      CorruptFileError: a line is not valid JSON (the message names the line).
    """
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise CorruptFileError(f"{path} line {number} is not valid JSON ({e})") from None
    return rows


def read_json_lenient(path: str, default: Any = None) -> Any:
    """The JSON value in ``path``, or ``default`` when it is missing, unreadable or damaged.

    For readers that survey many run folders (``experiments/``), where a half-written or
    damaged record means "not finished" rather than an error.
    """
    try:
        return read_json(path, default)
    except (CorruptFileError, OSError):
        return default
