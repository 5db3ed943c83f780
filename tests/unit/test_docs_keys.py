"""Docs cannot name config keys that do not exist: every `section.key` (or
`section.key=value`) in backticks in README.md and docs/*.md must resolve in the typed
schema (rlpost.config.schema.RunConfig)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

from rlpost.config.schema import RunConfig

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = {f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.type) or f.name != "seed"}
# `section.key` or `section.key=value`, alone in backticks or as one override of a command.
KEY = re.compile(r"(?<![\w./-])(%s)((?:\.[A-Za-z_][A-Za-z_0-9]*)+)(?==|`|\s|$)" % "|".join(sorted(SECTIONS)))
# Backticked names that look like keys and are not, each with what it is.
NOT_KEYS = {
    "trainer.totl_steps": "README's example of a misspelt key and its error",
    "ray.init": "Ray's function",
    "rollout.generate": "the rollout group's method",
    "model.pt": "a checkpoint's file name",
}


def _dataclass_of(hint):
    """The dataclass inside ``X``, ``X | None`` or ``Optional[X]``; None for a leaf."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return inner[0] if inner else None
    return None


def resolves(path: list[str]) -> bool:
    cls = RunConfig
    for i, part in enumerate(path):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        hint = hints[part]
        if hint is dict or typing.get_origin(hint) is dict:  # free-form (reward.kwargs.*): anything below
            return True
        inner = _dataclass_of(hint)
        if inner is None:
            return i == len(path) - 1
        cls = inner
    return True


def doc_keys() -> dict[str, list[str]]:
    """``{key: [where it appears]}`` over backticked text and fenced code in the docs."""
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        text = doc.read_text()
        spans = re.findall(r"```.*?```", text, flags=re.S) + re.findall(r"`[^`\n]+`", text)
        for span in spans:
            for match in KEY.finditer(span):
                key = match.group(1) + match.group(2)
                found.setdefault(key, []).append(doc.name)
    return found


def test_the_resolver_accepts_real_keys_and_rejects_made_up_ones():
    assert resolves(["trainer", "total_steps"]) and resolves(["model", "lora", "rank"])
    assert resolves(["logger", "wandb", "project"]) and resolves(["reward", "kwargs", "anything"])
    assert not resolves(["trainer", "totl_steps"]) and not resolves(["trainer", "total_steps", "x"])


def test_docs_find_keys_in_prose_and_commands():
    keys = doc_keys()
    assert "trainer.total_steps" in keys and "rollout.engine" in keys  # README's first commands
    assert len(keys) > 50


def test_every_config_key_the_docs_name_exists():
    unknown = {key: where for key, where in doc_keys().items()
               if key not in NOT_KEYS and not resolves(key.split("."))}
    assert not unknown, f"docs name config keys the schema does not have: {unknown}"
