"""Reading JSON-lines files that may hold broken lines (a crashed writer's last line,
a hand-edited dataset): one bad line costs that line, not the file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_jsonl(path: Path) -> Iterator[dict | None]:
    """Each non-blank line of ``path`` as a dict, or None where the line is not valid
    JSON or not an object (callers count or report those). Undecodable bytes are
    replaced rather than failing the file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield None
                continue
            yield row if isinstance(row, dict) else None
