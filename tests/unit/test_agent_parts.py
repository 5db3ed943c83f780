"""The pure parts of agent episodes: what an agent may return, and a gateway session
record cut into prompt and completion (rlpost.envs.agent, rlpost.rollout.agents)."""

from __future__ import annotations

import math

import pytest

from rlpost.envs.agent import check_agent_reward
from rlpost.gateway import SessionSample
from rlpost.rollout.agents import final_reply, session_trajectory
from rlpost.types import PromptSample, Reward

# opening (3 tokens) | reply 1 (2, sampled) | tool result (2) | reply 2 (3, sampled)
SAMPLE = SessionSample(session_id="s", branch=0, replica=0,
                       token_ids=(10, 11, 12, 20, 21, 30, 31, 40, 41, 42),
                       loss_mask=(0, 0, 0, 1, 1, 0, 0, 1, 1, 1),
                       logprobs=(0.0, 0.0, 0.0, -0.1, -0.2, 0.0, 0.0, -0.3, -0.4, -0.5),
                       policy_versions=(-1, -1, -1, 7, 7, -1, -1, 7, 7, 7), turns=2)


class Decoder:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def test_the_final_reply_is_the_trailing_sampled_run():
    assert final_reply(SAMPLE) == (40, 41, 42)


def test_a_session_splits_at_its_first_sampled_token():
    prompt = PromptSample("u", (1, 2), "q", "a")
    t = session_trajectory(SAMPLE, prompt, Reward(total=1.0), group=3, policy_version=7, tokenizer=Decoder())
    assert t.prompt.prompt_ids == (10, 11, 12) and t.prompt.uid == "u" and t.group_index == 3
    assert t.completion.token_ids == (20, 21, 30, 31, 40, 41, 42)
    assert t.completion.loss_mask == (1, 1, 0, 0, 1, 1, 1)
    assert t.completion.logprobs == (-0.1, -0.2, 0.0, 0.0, -0.3, -0.4, -0.5)
    assert t.completion.text == "20 21 30 31 40 41 42" and t.completion.policy_version == 7


@pytest.mark.parametrize("value, expected", [(1, 1.0), (0.25, 0.25), (None, None),
                                             ({"accuracy": 1, "format": 0.5}, {"accuracy": 1.0, "format": 0.5})])
def test_accepted_returns(value, expected):
    assert check_agent_reward(value) == expected


@pytest.mark.parametrize("value", [True, math.nan, math.inf, "1.0", {}, {"a": math.nan}, {1: 1.0}, [1.0]])
def test_refused_returns(value):
    with pytest.raises(TypeError, match="return a finite float, a dict of finite floats, or None"):
        check_agent_reward(value)
