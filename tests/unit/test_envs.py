"""Environment runtime: tool-call parsing, error observations, and crash/hang
isolation (one bad episode fails alone, is retried once, then dropped and counted,
never scored as a wrong answer)."""

import json
import time

import pytest

from rlpost.config.load import load_config
from rlpost.engines.fake import FakeRolloutEngine
from rlpost.envs import EnvFailure, LocalEnvPool, ParseError, StepResult, Task, ToolCall, parse_tool_calls, run_tool_calls
from rlpost.envs.chat import ChatRenderer
from rlpost.local import LocalRolloutGroup
from rlpost.rollout.multiturn import EpisodeCollector
from rlpost.types import PromptSample, SamplingParams


# ------------------------------------------------------------------ tool calls
def test_parses_well_formed_calls_in_order():
    text = ('Let me compute. <tool_call>\n{"name": "calculator", "arguments": {"expression": "3 + 5"}}\n</tool_call>'
            '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}</tool_call>')
    assert parse_tool_calls(text) == [ToolCall("calculator", {"expression": "3 + 5"}),
                                      ToolCall("python", {"code": "print(1)"})]


def test_no_call_means_an_answer():
    assert parse_tool_calls("The answer is \\boxed{8}.") == []
    assert run_tool_calls("The answer is \\boxed{8}.", []) is None


@pytest.mark.parametrize("body,needle", [
    ('{"name": "calculator", "arguments": {"expression": "3 + 5"}', "not valid JSON"),
    ('["calculator"]', "JSON object"),
    ('{"arguments": {}}', 'no "name"'),
    ('{"name": "calculator", "arguments": [1, 2]}', "must be a JSON object"),
])
def test_malformed_calls_become_parse_errors(body, needle):
    (result,) = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert isinstance(result, ParseError) and needle in result.message


def test_unclosed_call_is_an_error():
    (result,) = parse_tool_calls('<tool_call>{"name": "calculator"')
    assert isinstance(result, ParseError) and "not closed" in result.message


class Adder:
    name, description = "add", "adds a and b"
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}

    def __call__(self, arguments):
        return str(arguments["a"] + arguments["b"])


class Broken(Adder):
    name = "broken"

    def __call__(self, arguments):
        raise ValueError("boom")


def test_tool_results_and_errors_are_observations():
    text = ('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>'
            '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "broken", "arguments": {}}</tool_call>'
            '<tool_call>{bad json}</tool_call>')
    messages = run_tool_calls(text, [Adder(), Broken()])
    assert [m["role"] for m in messages] == ["tool"] * 4
    assert messages[0]["content"] == "42"
    assert "unknown tool 'nope'" in messages[1]["content"] and "['add', 'broken']" in messages[1]["content"]
    assert messages[2]["content"].startswith("Error: tool 'broken' failed: ValueError: boom")
    assert messages[3]["content"].startswith("Error: the tool call is not valid JSON")


def test_sandbox_outage_fails_the_episode_not_the_model():
    from rlpost.errors import SandboxError

    class Down(Adder):
        def __call__(self, arguments):
            raise SandboxError("service unreachable")

    with pytest.raises(SandboxError):
        run_tool_calls('<tool_call>{"name": "add", "arguments": {}}</tool_call>', [Down()])


def test_tools_without_template_support_go_into_a_system_turn():
    from rlpost.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("builtin:tiny-math"))  # its template ignores tools
    renderer = ChatRenderer(tokenizer)
    schema = {"type": "function", "function": {"name": "add", "description": "adds", "parameters": {}}}
    text = tokenizer.decode(renderer.opening_ids([{"role": "user", "content": "hi"}], [schema]))
    assert text.startswith("<|im_start|>system\n# Tools")
    assert json.dumps(schema, separators=(",", ":")) in text
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------------------ crash and hang
def _task(uid, fail=None):
    return Task(uid=uid, question="q", answer="7", metadata={"fake_fail": fail} if fail else {})


@pytest.mark.parametrize("env", ["FakeEnv", "SyncFakeEnv"])
def test_a_hung_or_crashing_env_fails_only_its_episode(env):
    pool = LocalEnvPool(f"rlpost.envs.fake:{env}", {"turns": 1}, timeout_s=0.5)
    tasks = [_task("ok-a"), _task("hang-b", "hang"), _task("step-c", "step"), _task("ok-d")]
    openings = pool.reset([(t.uid, t) for t in tasks] + [("reset-e", _task("reset-e", "reset"))])
    assert isinstance(openings[4], EnvFailure) and "reset raised RuntimeError" in openings[4].error
    t0 = time.monotonic()
    results = pool.step([("ok-a", "it is 7"), ("hang-b", "7"), ("step-c", "7"), ("ok-d", "no idea")])
    assert time.monotonic() - t0 < 5  # the hang was cut at its deadline, not waited out
    assert results[0] == StepResult([], 1.0, True)
    assert isinstance(results[1], EnvFailure) and "timed out after 0.5 s" in results[1].error
    assert isinstance(results[2], EnvFailure) and "step raised RuntimeError" in results[2].error
    assert results[3] == StepResult([], 0.0, True)
    pool.shutdown()


def _collector(tmp_path, retries, timeout_s=0.5):
    cfg = load_config(["rollout.max_turns=2", "env.fn=rlpost.envs.fake:FakeEnv", f"env.max_retries={retries}",
                       f"output_dir={tmp_path}"])
    from rlpost.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("builtin:tiny-math"))
    envs = LocalEnvPool("rlpost.envs.fake:FakeEnv", {"turns": 2}, timeout_s=timeout_s)
    rollout = LocalRolloutGroup([FakeRolloutEngine(eos_id=tokenizer.eos_token_id, length_fraction=0.0)])
    return EpisodeCollector(cfg, rollout, envs, tokenizer)


def _sample(uid, fail=None):
    return PromptSample(uid=uid, prompt_ids=(1,), question="q", answer="7",
                        metadata={"fake_fail": fail} if fail else {})


class _Timer:
    def __call__(self, name):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_failed_episodes_are_retried_then_dropped_and_counted(tmp_path):
    collector = _collector(tmp_path, retries=1)
    samples = [_sample("good"), _sample("flaky", "once"), _sample("bad", "step"), _sample("slow", "hang")]
    params = SamplingParams(n=2, max_new_tokens=6, seed=1)
    trajectories, rewards, valid = collector.collect(samples, params, 0, _Timer())
    metrics = collector.pop_metrics()
    # good: valid. flaky: fails on its first attempt in this process (one of the two
    # episodes), retried, both valid. bad and slow: fail twice, dropped, invalid.
    assert valid.tolist() == [[True, True], [True, True], [False, False], [False, False]]
    assert metrics["env/episodes_failed"] == 4.0
    assert metrics["env/episodes_retried"] == 1.0 + 2 + 2
    for t in trajectories[4:]:
        assert t.reward.error.startswith("environment failed:") and t.reward.total == 0.0
    assert "timed out" in trajectories[6].reward.error
    # Valid episodes ran both turns: an observation between two sampled turns.
    for t in trajectories[:4]:
        assert 0 in t.completion.loss_mask and t.completion.loss_mask[0] == 1


def test_without_retries_a_failure_is_dropped_at_once(tmp_path):
    collector = _collector(tmp_path, retries=0)
    _, _, valid = collector.collect([_sample("good2"), _sample("flaky2", "once")],
                                    SamplingParams(n=2, max_new_tokens=6, seed=1), 0, _Timer())
    assert valid.tolist() == [[True, True], [False, True]]
    assert collector.pop_metrics()["env/episodes_failed"] == 1.0


@pytest.mark.parametrize("override", ["algorithm.adv_estimator=remax", "algorithm.overlong_buffer_len=8"])
def test_single_turn_only_options_are_refused_with_environments(override):
    from rlpost.errors import ConfigError

    with pytest.raises(ConfigError, match="single-turn only"):
        load_config(["rollout.max_turns=2", override])
