"""Run report on hand-written run directories: tolerant reading, panel contents,
the embedded data, and the command line."""

import json
import math
import re

import pytest

from rlpost.report import ReportError, build_panels, load_run, render_report, write_report
from rlpost.report.__main__ import main
from rlpost.report.html import pick_samples


def _write_run(path, records, tail="", samples=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    (path / "config.yaml").write_text("model:\n  path: builtin:tiny-math\ntrainer:\n  total_steps: 10\n")
    if samples is not None:
        (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return path


def _embedded(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


RECORDS = [
    {"step": 0, "eval/accuracy": 0.1, "timing/eval_s": 1.0},
    {"step": 1, "reward/mean": 0.2, "reward/accuracy_mean": 0.2, "policy/kl": 0.0, "policy/entropy": 0.9,
     "response/length_mean": 20.0, "policy/clip_frac": 0.0, "timing/rollout_s": 0.5, "timing/train_s": 1.0,
     "timing/step_s": 2.0},
    {"step": 2, "reward/mean": "nan", "policy/kl": 0.01, "timing/rollout_s": 0.25, "timing/train_s": 0.5,
     "timing/step_s": 1.0, "eval/accuracy": 0.3, "timing/eval_s": 2.0},
]


def test_partial_last_line_and_nan_are_tolerated(tmp_path):
    run = load_run(_write_run(tmp_path, RECORDS, tail='{"step": 3, "reward/me'))
    assert [r["step"] for r in run.records] == [0, 1, 2] and run.skipped_lines == 1
    reward = run.series("reward/mean")
    assert reward.steps == (1, 2) and reward.values[0] == 0.2 and math.isnan(reward.values[1])
    data = _embedded(render_report(run))
    assert data["series"]["reward/mean"] == {"steps": [1, 2], "values": [0.2, None]}
    assert data["series"]["eval/accuracy"] == {"steps": [0, 2], "values": [0.1, 0.3]}


def test_a_step_logged_twice_keeps_its_last_record(tmp_path):
    run = load_run(_write_run(tmp_path, [{"step": 1, "reward/mean": 0.1}, {"step": 1, "reward/mean": 0.5}]))
    assert run.series("reward/mean").values == (0.5,)


def test_timing_panel_stacks_stages_with_other_and_eval(tmp_path):
    run = load_run(_write_run(tmp_path, RECORDS))
    timing = next(p for p in build_panels(run) if p.stacked)
    layers = {s.key: s.values for s in timing.series}
    assert timing.series[0].steps == (0, 1, 2)
    # other = step_s - (rollout + train): 2 - 1.5 and 1 - 0.75; eval sits outside the step.
    assert layers == {"timing/rollout_s": (0.0, 0.5, 0.25), "timing/train_s": (0.0, 1.0, 0.5),
                      "timing/eval_s": (1.0, 0.0, 2.0), "timing/other_s": (0.0, 0.5, 0.25)}
    titles = [p.title for p in build_panels(run)]
    assert titles == ["Reward (train samples)", "Held-out accuracy", "KL", "Entropy", "Response length",
                      "Clip fraction", "Step time breakdown"]


def test_samples_from_first_middle_and_last_steps_are_escaped(tmp_path):
    samples = [{"step": s, "prompt": "<b>q</b>", "completion": f"c{s}-{k}", "answer": "1", "reward": 1.0,
                "components": {"accuracy": 1.0}} for s in range(1, 8) for k in range(3)]
    assert sorted({r["step"] for r in pick_samples(samples, 3, 2)}) == [1, 4, 7]
    assert len(pick_samples(samples, 3, 2)) == 6
    page = render_report(load_run(_write_run(tmp_path, RECORDS, samples=samples)))
    assert "&lt;b&gt;q&lt;/b&gt;" in page and "<b>q</b>" not in page.split('id="report-data"')[0]
    assert "\\u003cb>q\\u003c/b>" in page  # no "</" inside the JSON script element
    assert [r["completion"] for r in _embedded(page)["samples"]][:2] == ["c1-0", "c1-1"]


def test_cli_writes_a_self_contained_page(tmp_path, capsys):
    run_dir = _write_run(tmp_path / "run", RECORDS)
    assert main([str(run_dir), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 7
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere
    assert write_report(run_dir) == run_dir / "report.html"
    assert main([str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(ReportError):
        load_run(tmp_path / "missing")
