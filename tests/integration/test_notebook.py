"""docs/notebooks/reward_prototyping.ipynb runs top to bottom, headless, on the
built-in tiny model, in a kernel that uses this interpreter (this venv)."""

import json
import sys
from pathlib import Path

import pytest

from rlpost.models.loading import resolve_model_path

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).resolve().parents[2] / "docs" / "notebooks" / "reward_prototyping.ipynb"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec pointing at sys.executable, found through JUPYTER_PATH, so the
    kernel imports the rlpost under test whatever kernels the user has installed."""
    pytest.importorskip("ipykernel")
    spec_dir = tmp_path / "jupyter" / "kernels" / "rlpost-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rlpost test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "rlpost-test"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def test_notebook_runs_headless(kernel_name, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    resolve_model_path("builtin:tiny-math")  # build/cache the model outside the cell timeout
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "work"
    workdir.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=180,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError naming the cell on any error

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not any(o.get("output_type") == "error" for o in c.get("outputs", [])) for c in code)
    assert (workdir / "my_reward.py").is_file()  # %%writefile wrote into the notebook's folder
    everything = "\n".join(_text(c) for c in code)
    assert "24 samples" in everything  # 6 prompts x n=4
    assert "FLAG format_passes" in everything  # the boxed-only reward is caught
    assert "python -m rlpost.train +recipe=grpo_math reward.fn=my_reward.py:concise_math_reward" in everything
    # The score tables render as HTML in the notebook.
    assert any("text/html" in o.get("data", {}) for c in code for o in c.get("outputs", []))
