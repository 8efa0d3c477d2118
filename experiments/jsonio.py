"""JSON and text files of the experiments: read tolerantly, write atomically.

One place for the experiments' file helpers (run workdirs, status records, tables).
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["read_json", "read_jsonl", "write_json", "write_text"]


def read_json(path: str) -> Any:
    """The JSON value in ``path``, or None when the file is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (empty when the file is missing)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented, key-sorted JSON, atomically (temp file + rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path: str, text: str) -> str:
    """Writes ``text`` to ``path``; returns the path."""
    with open(path, "w") as f:
        f.write(text)
    return path
