"""The docs-command runner's extraction, on small documents written here (no processes)."""

from pathlib import Path

import pytest
from docs_commands import expected_lines_match, extract, split_commands, strip_comment


def _doc(tmp_path: Path, text: str):
    (tmp_path / "d.md").write_text(text)
    return extract(tmp_path / "d.md", tmp_path)


def test_strip_comment_only_cuts_a_bash_comment():
    assert strip_comment("python -m x a=1   # note") == "python -m x a=1"
    assert strip_comment("echo 'a # b' c") == "echo 'a # b' c"
    assert strip_comment('echo "#" x#y') == 'echo "#" x#y'


def test_continuations_join_and_comment_lines_drop():
    lines = list(enumerate(["# heading", "a \\", "  b=1 \\", "  c=2", "", "d  # why"], start=1))
    assert split_commands(lines) == [(2, "a b=1 c=2"), (6, "d")]


def test_markers_skip_save_and_transcripts(tmp_path):
    text = """Intro.

<!-- docs-run
skip "hub/model": needs the hub
-->
```bash
run a
run hub/model
```

<!-- docs-run: skip: needs a GPU -->
```bash
gpu one
gpu two
```

<!-- docs-run: save f.py -->
```python
x = 1
```

- item:

  ```console
  $ tool --bad   # shows the error
  error: bad ... here
  ```
"""
    commands, saved = _doc(tmp_path, text)
    got = [(c.line, c.text, c.skip, c.expect) for c in commands]
    assert got == [
        (7, "run a", None, ()),
        (8, "run hub/model", "needs the hub", ()),
        (13, "gpu one\ngpu two", "needs a GPU", ()),
        (25, "tool --bad", None, ("error: bad ... here",)),
    ]
    assert [(s.path, s.content) for s in saved] == [("f.py", "x = 1\n")]


@pytest.mark.parametrize("text, message", [
    ("```\nls\n```\n", "without a language"),
    ("```bash\nls\n", "never closed"),
    ('<!-- docs-run\nskip "nothing": why\n-->\n```bash\nls\n```\n', "matches no command"),
    ("<!-- docs-run: run it -->\n```bash\nls\n```\n", "unknown docs-run directive"),
])
def test_bad_documents_are_refused_with_the_place(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as err:
        _doc(tmp_path, text)
    assert "d.md:" in str(err.value)


def test_expected_lines_in_order_with_wildcards():
    out = "noise\nrlpost: error: Unknown key 'a.b'. Did you mean 'a.c'?\ntail\n"
    assert expected_lines_match(("rlpost: error: Unknown key 'a.b'. ...?",), out) is None
    assert expected_lines_match(("tail", "noise"), out) == "noise"  # order matters
    assert expected_lines_match(("Unknown key",), out) == "Unknown key"  # whole line, not a part
