"""Extract the shell commands that README.md and docs/*.md show, for the docs-command runner.

A fenced block tagged ``bash`` holds commands a reader would type; ``console`` holds a
transcript (``$ command`` lines, then the output the doc promises, ``...`` standing for
any text). Every other fence (python, yaml, text) is content, not a command, except a
block marked ``save`` (written to a file the next commands use).

A marker is an HTML comment on the lines just above a fence, invisible on GitHub:

    <!-- docs-run: skip: needs a GPU host -->                 every command of the block
    <!-- docs-run
    skip "Qwen/Qwen2.5": needs the model hub                  commands containing the text
    save my_env.py                                            write the block to this file
    -->

Every skip carries its reason, shown by pytest as the skip reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^\s*```(\S*)\s*$")
MARKER = re.compile(r"<!--\s*docs-run\b(.*?)-->", re.S)
SKIP_SOME = re.compile(r'^skip\s+"([^"]+)"\s*:\s*(.+)$')
SKIP_ALL = re.compile(r"^skip\s*:\s*(.+)$")
SAVE = re.compile(r"^save\s+(\S+)$")
RUNNABLE = {"bash", "console"}


@dataclass(frozen=True)
class Command:
    doc: str  # path relative to the repository root
    line: int  # the command's first line in the doc
    text: str  # one shell command, continuation lines joined, trailing comment removed
    skip: str | None = None  # reason, when the doc marks it as not runnable here
    expect: tuple[str, ...] = ()  # console blocks: output lines the doc promises

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


@dataclass(frozen=True)
class SavedFile:
    doc: str
    path: str
    content: str


def strip_comment(command: str) -> str:
    """Cut a trailing `# ...` that bash would treat as a comment (outside quotes)."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command.rstrip()


def split_commands(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(line number, command) per command: `\\` continuations joined, comment lines dropped."""
    out: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    for number, raw in lines:
        if not parts:
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            start = number
        if raw.rstrip().endswith("\\"):
            parts.append(raw.rstrip()[:-1].strip())
            continue
        parts.append(strip_comment(raw).strip())
        out.append((start, " ".join(p for p in parts if p)))
        parts = []
    if parts:
        out.append((start, " ".join(parts)))
    return out


def parse_marker(body: str, where: str) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """(skip-all reason, [(substring, reason)], save path) from a marker's body."""
    skip_all, skip_some, save = None, [], None
    for raw in body.lstrip(":").strip().splitlines():
        directive = raw.strip()
        if not directive:
            continue
        if m := SKIP_SOME.match(directive):
            skip_some.append((m.group(1), m.group(2).strip()))
        elif m := SKIP_ALL.match(directive):
            skip_all = m.group(1).strip()
        elif m := SAVE.match(directive):
            save = m.group(1)
        else:
            raise ValueError(f"{where}: unknown docs-run directive {directive!r} "
                             '(valid: skip: REASON | skip "TEXT": REASON | save PATH)')
    return skip_all, skip_some, save


def parse_console(lines: list[tuple[int, str]]) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, command, expected output lines) per `$ ` prompt of a transcript."""
    out: list[tuple[int, str, list[str]]] = []
    for number, raw in lines:
        if raw.startswith("$ "):
            out.append((number, strip_comment(raw[2:]).strip(), []))
        elif out and raw.strip():
            out[-1][2].append(raw.rstrip())
    return [(n, c, tuple(e)) for n, c, e in out]


def extract(path: Path, root: Path) -> tuple[list[Command], list[SavedFile]]:
    doc = str(path.relative_to(root))
    text = path.read_text()
    lines = text.splitlines()
    commands: list[Command] = []
    saved: list[SavedFile] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, open_line = m.group(1), i + 1
        end = i + 1
        while end < len(lines) and not FENCE.match(lines[end]):
            end += 1
        if end == len(lines):
            raise ValueError(f"{doc}:{open_line}: fence never closed")
        if not lang:
            raise ValueError(f"{doc}:{open_line}: fenced block without a language; tag it "
                             "bash (commands to run), console ($ transcript) or text")
        indent = len(lines[i]) - len(lines[i].lstrip())  # a fence inside a list item
        body = [(n + 1, lines[n][indent:] if not lines[n][:indent].strip() else lines[n])
                for n in range(i + 1, end)]
        skip_all, skip_some, save = None, [], None
        above = "\n".join(lines[max(0, i - 8):i])
        if (mk := list(MARKER.finditer(above))) and not above[mk[-1].end():].strip():
            skip_all, skip_some, save = parse_marker(mk[-1].group(1), f"{doc}:{open_line}")
        if save:
            saved.append(SavedFile(doc, save, "\n".join(t for _, t in body) + "\n"))
        elif lang in RUNNABLE:
            found = (parse_console(body) if lang == "console"
                     else [(n, c, ()) for n, c in split_commands(body)])
            if skip_all and lang == "bash":  # one entry: the block may be a whole script
                found = [(open_line + 1, "\n".join(t for _, t in body), ())]
            for number, command, expect in found:
                reason = skip_all or next((r for s, r in skip_some if s in command), None)
                commands.append(Command(doc, number, command, reason, expect))
            unused = [s for s, _ in skip_some if not any(s in c for _, c, _ in found)]
            if unused:
                raise ValueError(f"{doc}:{open_line}: skip marker text {unused} matches no command")
        i = end + 1
    return commands, saved


def documents(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def expected_lines_match(expect: tuple[str, ...], output: str) -> str | None:
    """None when every promised line appears in order (`...` matches any text), else the first missing."""
    got = output.splitlines()
    pos = 0
    for want in expect:
        pattern = re.compile(".*".join(re.escape(p) for p in want.strip().split("...")))
        while pos < len(got) and not pattern.fullmatch(got[pos].strip()):
            pos += 1
        if pos == len(got):
            return want
        pos += 1
    return None
