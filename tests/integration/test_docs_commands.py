"""Every shell command README.md and docs/*.md show runs here, so a wrong doc fails CI.

Commands run in document order, each document in its own scratch directory that links the
checkout's `.venv`, `scripts`, `recipes`, `configs` and `environments`, so relative paths
resolve as in a checkout and what the commands write stays out of it. What the runner
changes, and why:
- training commands (`python -m rlpost.train`, `rlpost local`; not `--cfg`) get
  `trainer.total_steps=1 eval.every=0` appended (Hydra takes the last value of a key), so
  a documented 40-step run checks its command in one step;
- `/tmp/` in a command becomes the scratch directory's `tmp/`;
- a command identical to one already run is not run twice.
A command marked skip (needs a GPU, a cluster, the hub, ...) reports its reason; a skipped
training command still has its overrides validated with `--cfg`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from docs_commands import Command, documents, expected_lines_match, extract

ROOT = Path(__file__).resolve().parents[2]
LINKED = (".venv", "scripts", "recipes", "configs", "environments")
TRAIN = re.compile(r"(-m rlpost\.train\b|(^|\s)rlpost local\b)")
SHORT_RUN = " trainer.total_steps=1 eval.every=0"
TIMEOUT_S = 900


def _all() -> tuple[list[Command], dict[str, list]]:
    commands, saved = [], {}
    for path in documents(ROOT):
        found, files = extract(path, ROOT)
        commands += found
        saved[str(path.relative_to(ROOT))] = files
    return commands, saved


COMMANDS, SAVED = _all()
_ran: dict[str, str] = {}  # normalised command -> where it ran first
_dirs: dict[str, Path] = {}


def _workdir(doc: str, base: Path) -> Path:
    if doc not in _dirs:
        work = base / re.sub(r"\W", "_", doc)
        (work / "tmp").mkdir(parents=True)
        for name in LINKED:
            if (ROOT / name).exists():
                (work / name).symlink_to(ROOT / name)
        for f in SAVED[doc]:
            (work / f.path).parent.mkdir(parents=True, exist_ok=True)
            (work / f.path).write_text(f.content)
        _dirs[doc] = work
    return _dirs[doc]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RLPOST_CACHE", str(ROOT / ".cache" / "rlpost"))
    return env


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -eo pipefail\n{command}"], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _report(cmd: Command, shown: str, proc: subprocess.CompletedProcess) -> str:
    tail = (proc.stdout + proc.stderr)[-4000:]
    return f"{cmd.id}: `{shown}` exited {proc.returncode}\n{tail}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs_run")


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command(cmd: Command, scratch: Path):
    work = _workdir(cmd.doc, scratch)
    is_train = bool(TRAIN.search(cmd.text)) and "--cfg" not in cmd.text
    if cmd.skip:
        if is_train and "-m rlpost.train" in cmd.text and "\n" not in cmd.text:  # not a whole script
            proc = _run(cmd.text + " --cfg", work)  # the overrides still have to be valid
            assert proc.returncode == 0, _report(cmd, cmd.text + " --cfg", proc)
        pytest.skip(f"{cmd.id}: {cmd.skip}")
    key = " ".join(cmd.text.split())
    if key in _ran:
        pytest.skip(f"{cmd.id}: the same command ran at {_ran[key]}")
    _ran[key] = cmd.id
    shown = cmd.text.replace("/tmp/", f"{work}/tmp/")
    if is_train and not cmd.expect:
        shown += SHORT_RUN
    proc = _run(shown, work)
    if cmd.expect:  # a transcript: the doc shows what the command prints (errors included)
        missing = expected_lines_match(cmd.expect, proc.stdout + proc.stderr)
        assert missing is None, f"{cmd.id}: output lacks the documented line {missing!r}\n" \
                                f"{(proc.stdout + proc.stderr)[-4000:]}"
    else:
        assert proc.returncode == 0, _report(cmd, shown, proc)
