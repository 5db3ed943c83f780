"""Agent episodes (env.agent, rlpost.rollout.agents): user agents run in process
(LocalAgentPool) against a real gateway on loopback with the real openai client, over
a scripted rollout group whose replies are chosen token ids; the sessions become
trajectories with exactly the sampled ids, the agents' rewards or reward.fn's, and
failing agents fail only their episodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlpost.config.load import load_config
from rlpost.envs.chat import ChatRenderer
from rlpost.errors import ConfigError
from rlpost.local import LocalRewardPool
from rlpost.models.loading import load_tokenizer, resolve_model_path
from rlpost.rollout.agents import make_agent_collector
from rlpost.types import Completion, PromptSample

pytestmark = pytest.mark.integration
AGENTS = Path(__file__).parent / "agent_examples.py"
REPLY = "The answer is \\boxed{7}."
LOGPROB = -0.5


class ScriptedGroup:
    """One replica replying REPLY + EOS to every prompt, policy version 4; records params."""

    size = 1

    def __init__(self, tokenizer):
        self.ids = tuple(tokenizer.encode(REPLY, add_special_tokens=False)) + (tokenizer.eos_token_id,)
        self.params = []

    def generate(self, prompts, params, replica=None):
        self.params.append(params)
        done = Completion(self.ids, (LOGPROB,) * len(self.ids), REPLY, "stop", 4)
        return [[done] for _ in prompts]

    def policy_versions(self):
        return [4]

    def shutdown(self):
        pass


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("builtin:tiny-math-tool"))


def collector(tokenizer, agent, *overrides):
    cfg = load_config([f"env.agent={AGENTS}:{agent}", "model.path=builtin:tiny-math-tool", "rollout.n=2",
                       "rollout.temperature=0.7", "rollout.max_new_tokens=16", "rollout.max_total_tokens=100",
                       "data.system_prompt=null", *overrides])
    group = ScriptedGroup(tokenizer)
    return make_agent_collector(cfg, group, LocalRewardPool(cfg.reward), tokenizer=tokenizer), group


PROMPTS = [PromptSample("a", (), "What is 3 + 4?", "7"), PromptSample("b", (), "What is 4 + 4?", "8")]


def no_timer(name):
    from contextlib import nullcontext

    return nullcontext()


def collect(c, version=4):
    from rlpost.types import SamplingParams

    return c.collect(PROMPTS, SamplingParams(n=2, seed=1), version, no_timer)


def test_a_two_turn_session_trains_exactly_the_sampled_tokens(tokenizer):
    c, group = collector(tokenizer, "two_turns")
    trajectories, rewards, valid = collect(c)
    renderer = ChatRenderer(tokenizer)
    reply = list(group.ids)
    follow_up = renderer.observation_ids([{"role": "user", "content": "sure?"}])  # templated alone, not trained
    assert len(trajectories) == 4 and rewards.tolist() == [[0.25, 0.25], [0.25, 0.25]] and valid.all()
    for t, sample in zip(trajectories, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2):
        assert list(t.prompt.prompt_ids) == renderer.opening_ids([{"role": "user", "content": sample.question}], [])
        assert list(t.completion.token_ids) == reply + follow_up + reply
        assert list(t.completion.loss_mask) == [1] * len(reply) + [0] * len(follow_up) + [1] * len(reply)
        assert list(t.completion.logprobs) == [LOGPROB] * len(reply) + [0.0] * len(follow_up) + [LOGPROB] * len(reply)
        assert t.completion.policy_version == 4 and t.prompt.uid == sample.uid
    assert [t.group_index for t in trajectories] == [0, 0, 1, 1]
    # The run's temperature wins over the request's; max_tokens is the agent's (8).
    assert {(p.temperature, p.max_new_tokens) for p in group.params} == {(0.7, 8)}
    metrics = c.pop_metrics()
    assert metrics["env/episodes"] == 4 and metrics["env/episodes_failed"] == 0 and metrics["env/turns_mean"] == 2
    assert metrics["env/observation_tokens_mean"] == len(follow_up) and metrics["gateway/requests"] == 8


def test_a_rewritten_history_trains_the_last_branch_scored_by_reward_fn(tokenizer):
    c, group = collector(tokenizer, "rewrites")
    trajectories, rewards, valid = collect(c)
    renderer = ChatRenderer(tokenizer)
    for t in trajectories:  # the second branch: a fresh templating of the rewritten conversation
        assert list(t.prompt.prompt_ids) == renderer.opening_ids([{"role": "user", "content": "another question"}], [])
        assert t.completion.token_ids == group.ids and set(t.completion.loss_mask) == {1}
    # reward.fn (math: \boxed{7}) on the final reply: right for answer 7, wrong for 8.
    assert rewards.tolist() == [[1.0, 1.0], [0.0, 0.0]] and valid.all()
    metrics = c.pop_metrics()
    assert metrics["env/branches_untrained"] == 4 and metrics["gateway/branches"] == 4


def test_reward_components_and_the_default_max_tokens(tokenizer):
    c, group = collector(tokenizer, "components")
    trajectories, rewards, _ = collect(c)
    assert rewards.tolist() == [[1.5, 1.5], [1.5, 1.5]]
    assert trajectories[0].reward.components == {"accuracy": 1.0, "format": 0.5}
    assert {(p.temperature, p.max_new_tokens) for p in group.params} == {(0.7, 16)}  # asked 0.3; rollout's 16


def test_a_failing_agent_is_retried_on_a_fresh_session(tokenizer):
    c, group = collector(tokenizer, "flaky", "env.max_retries=1")
    trajectories, rewards, valid = collect(c)
    assert valid.all() and rewards.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    metrics = c.pop_metrics()
    assert metrics["env/episodes_retried"] == 2 and metrics["env/episodes_failed"] == 0  # one per task uid
    assert metrics["gateway/sessions_created"] == 6


# Only the hanging agent gets a short deadline: on a loaded machine a real model call
# can take longer than half a second.
@pytest.mark.parametrize("agent, timeout_s, error", [("hangs", 0.5, "timed out after 0.5 s"),
                                                     ("never_asks", 30, "without a chat completion"),
                                                     ("says_yes", 30, "returned 'yes'")])
def test_an_agent_that_fails_is_dropped_and_counted(tokenizer, agent, timeout_s, error):
    c, _ = collector(tokenizer, agent, "env.max_retries=0", f"env.timeout_s={timeout_s}")
    trajectories, rewards, valid = collect(c)
    assert not valid.any() and rewards.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert all(error in t.reward.error and t.completion.token_ids == () for t in trajectories)
    assert c.pop_metrics()["env/episodes_failed"] == 4


def test_a_wrong_policy_version_is_refused(tokenizer):
    from rlpost.errors import WorkerError

    c, _ = collector(tokenizer, "two_turns")
    with pytest.raises(WorkerError, match=r"policy versions \[4\], expected 5"):
        collect(c, version=5)


def test_eval_is_greedy_and_scores_with_reward_fn(tokenizer):
    from rlpost.config.schema import EvalConfig

    c, group = collector(tokenizer, "rewrites")
    metrics = c.evaluate(PROMPTS, EvalConfig(size=2, max_new_tokens=12), 4)
    assert metrics["eval/accuracy"] == 0.5 and metrics["eval/episodes_failed"] == 0
    assert metrics["eval/turns_mean"] == 1  # the trained branch's replies
    assert {(p.temperature, p.max_new_tokens) for p in group.params} == {(0.0, 12)}


@pytest.mark.parametrize("spec, message", [
    ("no_such_pkg.agents:run", "no_such_pkg"),
    (f"{AGENTS}:no_such_agent", "no attribute 'no_such_agent'"),
    (f"{AGENTS}:not_async", "not an async function"),
])
def test_a_bad_agent_spec_says_what_it_could_not_load(tokenizer, spec, message):
    cfg = load_config([f"env.agent={spec}", "model.path=builtin:tiny-math-tool"])
    with pytest.raises(ConfigError, match="env.agent") as err:
        make_agent_collector(cfg, ScriptedGroup(tokenizer), LocalRewardPool(cfg.reward), tokenizer=tokenizer)
    assert message in str(err.value)


def test_agent_config_is_checked_at_load():
    with pytest.raises(ConfigError, match="env.agent: must look like"):
        load_config(["env.agent=just_a_module"])
    with pytest.raises(ConfigError, match="either an environment"):
        load_config(["env.agent=a:b", "env.fn=c:d"])


def test_context_tokens_follow_the_token_budgets():
    # single-turn: 256 + 64; multi-turn with a budget: 256 + 160; without: the model's own (None)
    assert load_config([]).context_tokens() == 320
    assert load_config(["env.agent=a:b", "rollout.max_total_tokens=160"]).context_tokens() == 416
    assert load_config(["rollout.max_turns=3"]).context_tokens() is None
    assert load_config(["env.agent=a:b", "rollout.max_model_len=1000"]).context_tokens() == 1000
    with pytest.raises(ConfigError, match=r"rollout.max_model_len: must hold .* = 320, got 300"):
        load_config(["rollout.max_model_len=300"])


class QueueGroup(ScriptedGroup):
    """Replies with the given texts in turn (EOS appended), one prompt per call."""

    def __init__(self, tokenizer, texts):
        super().__init__(tokenizer)
        self.tokenizer, self.texts = tokenizer, list(texts)

    def generate(self, prompts, params, replica=None):
        text = self.texts.pop(0)
        ids = tuple(self.tokenizer.encode(text, add_special_tokens=False)) + (self.tokenizer.eos_token_id,)
        return [[Completion(ids, (LOGPROB,) * len(ids), text, "stop", 4)]]


def test_the_example_agent_runs_a_tool_call_and_is_scored_by_reward_fn(tokenizer):
    """environments/math_agent.py through the gateway: the model's <tool_call> comes back as
    OpenAI tool_calls, the agent runs the calculator and sends a tool message, the model
    answers; reward.fn scores the answer. The tool result is in the trained sample, masked."""
    root = Path(__file__).resolve().parents[2]
    cfg = load_config([f"env.agent={root / 'environments' / 'math_agent.py'}:math_agent",
                       "model.path=builtin:tiny-math-tool", "rollout.n=1", "rollout.max_total_tokens=160",
                       "data.system_prompt=null"])
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3 + 4"}}\n</tool_call>'
    group = QueueGroup(tokenizer, [call, REPLY])
    c = make_agent_collector(cfg, group, LocalRewardPool(cfg.reward), tokenizer=tokenizer)
    from rlpost.types import SamplingParams

    (t,), rewards, valid = c.collect(PROMPTS[:1], SamplingParams(n=1), 4, no_timer)
    assert rewards.tolist() == [[1.0]] and valid.all()
    metrics = c.pop_metrics()
    assert metrics["env/turns_mean"] == 2 and metrics["gateway/tool_calls"] == 1
    masked_out = [tok for tok, m in zip(t.completion.token_ids, t.completion.loss_mask) if not m]
    assert "<tool_response>\n7\n</tool_response>" in tokenizer.decode(masked_out)
    assert "Tools: calculator<|im_end|>" in tokenizer.decode(list(t.prompt.prompt_ids))  # no sandbox: no python


def test_more_concurrent_requests_than_threads_by_default_reach_one_batch(tokenizer):
    """60 sessions ask at once while the replica is busy with a first request: all 59
    others are sampled in its next call. anyio's default thread limit (40) would have
    held 20 of them back from the batcher (GatewayConfig.max_concurrent_requests)."""
    import threading
    import time

    import openai

    from rlpost.gateway import GatewayServer

    class Busy(ScriptedGroup):
        def __init__(self, tokenizer):
            super().__init__(tokenizer)
            self.sizes, self.release = [], threading.Event()

        def generate(self, prompts, params, replica=None):
            if not self.sizes:
                self.release.wait(30)
            self.sizes.append(len(prompts))
            return super().generate(prompts, params, replica)

    group = Busy(tokenizer)
    with GatewayServer(group, tokenizer) as gw:
        def ask():
            with openai.OpenAI(base_url=gw.new_session()[1], api_key="x", max_retries=0) as client:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)

        threads = [threading.Thread(target=ask) for _ in range(60)]
        for t in threads:
            t.start()
        batcher = gw.service._batchers[0]
        deadline = time.monotonic() + 30
        while len(batcher._queue) < 59 and time.monotonic() < deadline:
            time.sleep(0.01)
        group.release.set()
        for t in threads:
            t.join(30)
    assert group.sizes == [1, 59]
