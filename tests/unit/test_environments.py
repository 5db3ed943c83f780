"""Reward logic of the environments in environments/ (loaded by file path, as a
recipe does)."""

import pytest

from rlpost.envs import StepResult, Task
from rlpost.envs.runner import load_env_factory, resolve_env_spec
from rlpost.sandbox import FakeSandboxClient, RunResult


def _load(spec):
    return load_env_factory(resolve_env_spec(spec))


def _task(question="q", answer="", **metadata):
    return Task(uid="u", question=question, answer=answer, metadata=metadata)


# ------------------------------------------------------------------ countdown
def test_countdown_checks_value_and_numbers():
    env = _load("environments/countdown.py:CountdownEnv")()
    env.reset(_task(answer="22", numbers="3 5 7 9"))
    assert env.step("\\boxed{3 * 5 + 7}") == StepResult([], {"accuracy": 1.0}, True)
    wrong = env.step("\\boxed{3 + 5}")
    assert not wrong.done and wrong.reward == {"accuracy": 0.0}
    assert wrong.observation[0]["content"] == "3 + 5 = 8, not 22. Try again."
    twice = env.step("\\boxed{7 * 3 + 1}")  # 1 is not given
    assert not twice.done and "1 is not among the numbers" in twice.observation[0]["content"]
    reused = env.step("\\boxed{(9 + 9) + 3 + 1}")
    assert not reused.done and "9" in reused.observation[0]["content"]
    assert env.step("no box").observation[0]["content"].startswith("Put your expression")


def test_countdown_division_and_invalid_expressions():
    check = _load("environments/countdown.py:check")
    assert check("(9 - 3) / 2", [9, 3, 2], 3) == (True, "Correct.")
    assert check("9 / 0", [9, 0], 1)[0] is False
    assert check("__import__('os')", [1], 1)[0] is False


def test_countdown_rows_are_solvable_and_splits_disjoint():
    make_rows = _load("environments/countdown.py:make_rows")
    evaluate = _load("environments/countdown.py:evaluate")
    train, val = make_rows("train", 200, 0), make_rows("val", 50, 0)
    assert len(train) == 200 and len(val) == 50
    key = lambda r: (r["numbers"], r["answer"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in val}
    for row in train[:20]:
        nums = [int(n) for n in row["numbers"].split()]
        assert all(1 <= n <= 9 for n in nums) and int(row["answer"]) >= 1
    assert evaluate("2 * (3 + 4)") == 14


# ------------------------------------------------------------------ guess
def test_guess_gives_feedback_and_rewards_a_find():
    env = _load("environments/guess.py:GuessEnv")(max_guesses=5, bonus=0.5)
    env.reset(_task(answer="13"))
    assert env.step("\\boxed{10}").observation == [{"role": "user", "content": "Higher."}]
    assert env.step("I say \\boxed{15}").observation == [{"role": "user", "content": "Lower."}]
    found = env.step("\\boxed{13}")
    # Third guess of at most five: 2 of 4 spare guesses wasted -> bonus 0.5 * (1 - 2/4).
    assert found.done and found.reward == {"accuracy": 1.0, "efficiency": 0.25}


def test_guess_ends_after_max_guesses_without_a_find():
    env = _load("environments/guess.py:GuessEnv")(max_guesses=2)
    env.reset(_task(answer="3"))
    assert not env.step("\\boxed{1}").done
    last = env.step("\\boxed{2}")
    assert last.done and last.reward == {"accuracy": 0.0} and last.observation == []


# ------------------------------------------------------------------ code
def test_code_runs_solution_with_tests_in_the_sandbox():
    def respond(code, stdin):
        ok = "return a + b" in code
        return RunResult("ok" if ok else "error", "", "" if ok else "AssertionError", 0 if ok else 1)

    client = FakeSandboxClient(respond)
    env = _load("environments/code.py:CodeEnv")(client=client)
    env.reset(_task(tests="assert add(2, 3) == 5"))
    bad = env.step("```python\ndef add(a, b):\n    return a - b\n```")
    assert not bad.done and "AssertionError" in bad.observation[0]["content"]
    good = env.step("Here:\n```python\ndef add(a, b):\n    return a + b\n```")
    assert good == StepResult([], {"accuracy": 1.0}, True)
    code, _, timeout_s, _ = client.calls[-1]
    assert code == "def add(a, b):\n    return a + b\n\n\nassert add(2, 3) == 5\n" and timeout_s == 5.0


def test_code_env_needs_a_sandbox():
    from rlpost.errors import ConfigError

    with pytest.raises(ConfigError, match="sandbox_url"):
        _load("environments/code.py:CodeEnv")()


# ------------------------------------------------------------------ math with tools
def test_math_tool_runs_the_calculator_then_scores_the_answer():
    env = _load("environments/math_tool.py:MathToolEnv")()
    assert [t.name for t in env.tools] == ["calculator"]  # python only with a sandbox_url
    env.reset(_task("Tom has 3 apples and buys 5 more. How many?", "8"))
    call = env.step('<tool_call>\n{"name": "calculator", "arguments": {"expression": "3 + 5"}}\n</tool_call>')
    assert call == StepResult([{"role": "tool", "content": "8"}], {"accuracy": 0.0}, False, {"tool_calls": 1})
    bad = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": 3}}</tool_call>')
    assert not bad.done and bad.observation[0]["content"].startswith("Error:")
    assert env.step("The answer is \\boxed{8}.") == StepResult([], {"accuracy": 1.0}, True)
    assert env.step("The answer is \\boxed{3}.").reward == {"accuracy": 0.0}


def test_single_turn_adapter_scores_like_the_reward_function(tmp_path):
    from rlpost.envs import RewardEnv

    env = RewardEnv("rlpost.rewards.math:math_reward", {"format_weight": 0.1})
    assert env.reset(_task("q", "8")) == [{"role": "user", "content": "q"}]
    assert env.step("\\boxed{8}") == StepResult([], {"accuracy": 1.0, "format": 0.1}, True)
    (tmp_path / "broken.py").write_text("def reward(p, c, g, m):\n    raise KeyError('oops')\n")
    env = RewardEnv(f"{tmp_path / 'broken.py'}:reward")
    env.reset(_task("q", "8"))
    failed = env.step("\\boxed{8}")
    assert failed.done and "KeyError" in failed.info["reward_error"]


def test_generator_rows_become_prompts_with_metadata(tmp_path):
    from rlpost.config.schema import DataConfig
    from rlpost.data.dataset import load_prompts
    from rlpost.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("builtin:tiny-math"))
    cfg = DataConfig(source="generator", generator="environments/countdown.py:make_rows",
                     builtin_train_size=12, builtin_val_size=5)
    train, report = load_prompts(cfg, tokenizer, "train", seed=0, data_dir=tmp_path)
    assert report.kept == 12 and train[0].question.startswith("Use the numbers")
    assert set(train[0].metadata) == {"numbers"}
    val, _ = load_prompts(cfg, tokenizer, "val", seed=0, data_dir=tmp_path)
    assert len(val) == 5
