"""Multi-turn rollouts on token ids: the tokens trained are exactly the tokens
sampled, each turn was sampled conditioned on exactly the ids the trainer sees, and
environment tokens are rendered by the chat template and never trained.

Runs the real HF rollout engine on the built-in tiny model, with its own ChatML
template and with a Qwen2.5-style template (default system prompt, tool turns
wrapped in <tool_response>)."""

import dataclasses

import pytest
import torch

from rlpost.step.batching import build_train_batch
from rlpost.config.load import load_config
from rlpost.engines.hf_rollout import HFRolloutEngine
from rlpost.envs.runner import LocalEnvPool
from rlpost.local import LocalRolloutGroup
from rlpost.models.loading import load_tokenizer, resolve_model_path
from rlpost.rollout.multiturn import EpisodeCollector
from rlpost.types import PromptSample, SamplingParams

# Qwen2.5-Instruct's template, shortened (no assistant tool_calls field), same layout.
QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class RecordingRollout(LocalRolloutGroup):
    """The real rollout group, remembering every (prompt ids, completion) it produced."""

    def __init__(self, engines):
        super().__init__(engines)
        self.calls = []

    def generate(self, prompts, params):
        out = super().generate(prompts, params)
        self.calls += [(tuple(p), c) for p, g in zip(prompts, out) for c in g]
        return out


@pytest.fixture(scope="module")
def model_path():
    return resolve_model_path("builtin:tiny-math")


def _samples():
    return [PromptSample(uid=f"t{i}", prompt_ids=(1,), question=q, answer=a)
            for i, (q, a) in enumerate([("Tom has 3 apples and buys 5 more. How many apples does Tom have now?", "8"),
                                        ("Mia has 9 pens and gives away 4. How many pens does Mia have now?", "5")])]


# What the template renders after an assistant turn's <|im_end|>, written by hand.
EXPECTED_OBSERVATION = {
    ("tiny", "user"): "\n<|im_start|>user\nturn {k}: say {a}<|im_end|>\n<|im_start|>assistant\n",
    ("tiny", "tool"): "\n<|im_start|>tool\nturn {k}: say {a}<|im_end|>\n<|im_start|>assistant\n",
    ("qwen", "user"): "\n<|im_start|>user\nturn {k}: say {a}<|im_end|>\n<|im_start|>assistant\n",
    ("qwen", "tool"): "\n<|im_start|>user\n<tool_response>\nturn {k}: say {a}\n</tool_response><|im_end|>\n"
                      "<|im_start|>assistant\n",
}


@pytest.mark.parametrize("template", ["tiny", "qwen"])
@pytest.mark.parametrize("role", ["user", "tool"])
def test_tokens_trained_equal_tokens_sampled(template, role, model_path, tmp_path):
    tokenizer = load_tokenizer(model_path)
    if template == "qwen":
        tokenizer.chat_template = QWEN_STYLE_TEMPLATE
    cfg = load_config(["rollout.max_turns=3", "env.fn=rlpost.envs.fake:FakeEnv", f"output_dir={tmp_path}"])
    engine = HFRolloutEngine(model_path, seed=0)
    rollout = RecordingRollout([engine])
    envs = LocalEnvPool("rlpost.envs.fake:FakeEnv", {"turns": 3, "observation_role": role})
    collector = EpisodeCollector(cfg, rollout, envs, tokenizer)
    # Sampled turns are cut at 12 tokens; a cut turn ends its episode, so keep the cap
    # high enough that most turns end with <|im_end|> and episodes reach turn 3.
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=40, seed=123)
    trajectories, rewards, valid = collector.collect(_samples(), params, 0, lambda name: _null())
    assert rewards.shape == (2, 3) and bool(valid.all())
    batch = build_train_batch(trajectories, tokenizer.pad_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    multi_turn = 0
    for row, traj in enumerate(trajectories):
        p, c = len(traj.prompt.prompt_ids), len(traj.completion.token_ids)
        ids = batch.input_ids[row, : p + c].tolist()
        mask = batch.loss_mask[row, : p + c].tolist()
        assert all(m == 0 for m in mask[:p])
        # Walk the runs of the loss mask: every trained run is one sampled turn,
        # sampled from a prompt equal to everything before it in the row.
        t, turns = p, 0
        while t < p + c:
            end = t
            while end < p + c and mask[end] == mask[t]:
                end += 1
            if mask[t] == 1:
                matches = [comp for prompt, comp in rollout.calls
                           if prompt == tuple(ids[:t]) and comp.token_ids == tuple(ids[t:end])]
                assert matches, f"row {row}: trained tokens {t}:{end} were never sampled from this prefix"
                assert list(traj.completion.logprobs[t - p:end - p]) == list(matches[0].logprobs)
                turns += 1
            else:
                assert ids[t - 1] == im_end  # an observation follows a finished turn
                expected = EXPECTED_OBSERVATION[(template, role)].format(k=turns, a=traj.prompt.answer)
                assert tokenizer.decode(ids[t:end]) == expected
                assert all(lp == 0.0 for lp in traj.completion.logprobs[t - p:end - p])
            t = end
        multi_turn += turns > 1
    assert multi_turn >= 2, "too few episodes got past turn 1 to test anything"
    # The sampler's log-probs are those of the model on the full row: each turn was
    # conditioned on exactly these ids.
    with torch.no_grad():
        logits = engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    sampled = torch.zeros_like(batch.loss_mask)
    for row, traj in enumerate(trajectories):
        p = len(traj.prompt.prompt_ids)
        sampled[row, p:p + len(traj.completion.logprobs)] = torch.tensor(traj.completion.logprobs)
    on = batch.loss_mask[:, 1:].bool()
    assert torch.allclose(logprobs[on], sampled[:, 1:][on], atol=1e-4)
    envs.shutdown()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_tool_sft_examples_are_built_like_rollouts():
    import random

    from rlpost.data.math_gen import MathProblem
    from rlpost.envs.chat import ChatRenderer
    from rlpost.models.tiny import TOOL_SPEC, tool_sft_example

    tokenizer = load_tokenizer(resolve_model_path("builtin:tiny-math-tool"))
    problem = MathProblem("Tom has 3 apples and buys 4 more. Then Tom loses 2. How many?", 5, 3,
                          ("3 + 4 = 7", "7 - 2 = 5"))
    spec = dataclasses.replace(TOOL_SPEC, tool_python_frac=0.0, tool_slip_prob=0.0)
    ids, mask = tool_sft_example(ChatRenderer(tokenizer), problem, random.Random(0), spec)
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((mask[start], tokenizer.decode(ids[start:i])))
            start = i
    assert runs == [
        (0, "<|im_start|>system\nTools: calculator python<|im_end|>\n<|im_start|>user\n" + problem.question
            + "<|im_end|>\n<|im_start|>assistant\n"),
        (1, '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3 + 4 - 2"}}\n</tool_call><|im_end|>'),
        (0, "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
        (1, "The answer is \\boxed{5}.<|im_end|>"),
    ]


def test_tool_fields_do_not_change_the_plain_models_cache_key():
    from rlpost.models.tiny import TOOL_SPEC, TinyMathSpec, spec_hash

    plain = TinyMathSpec()
    assert spec_hash(dataclasses.replace(plain, tool_python_frac=0.9), 0) == spec_hash(plain, 0)
    assert spec_hash(dataclasses.replace(TOOL_SPEC, tool_python_frac=0.9), 0) != spec_hash(TOOL_SPEC, 0)


class UpdatedBetweenTurns(LocalRolloutGroup):
    """Each engine takes a new policy version after every generate call: what
    in-flight updates (trainer.inflight_updates) do to an episode between its turns."""

    def generate(self, prompts, params):
        out = super().generate(prompts, params)
        for engine in self.engines:
            engine.update_weights([], engine.policy_version + 1)
        return out


@pytest.mark.parametrize("inflight", [True, False])
def test_token_versions_are_carried_through_turns(inflight, model_path, tmp_path):
    from rlpost.engines.fake import FakeRolloutEngine
    from rlpost.errors import WorkerError

    tokenizer = load_tokenizer(model_path)
    mode = ["trainer.mode=async", "trainer.inflight_updates=true"] if inflight else []
    cfg = load_config(["rollout.max_turns=3", "env.fn=rlpost.envs.fake:FakeEnv", f"output_dir={tmp_path}", *mode])
    # length_fraction 0: every turn ends with EOS, so episodes reach turn 3.
    rollout = UpdatedBetweenTurns([FakeRolloutEngine(seed=0, length_fraction=0.0)])
    envs = LocalEnvPool("rlpost.envs.fake:FakeEnv", {"turns": 3})
    collector = EpisodeCollector(cfg, rollout, envs, tokenizer)
    params = SamplingParams(n=2, max_new_tokens=6, seed=5)
    try:
        if not inflight:  # turn 2 comes from version 1 where the collect expected 0: refused
            with pytest.raises(WorkerError, match="policy version 1, expected 0"):
                collector.collect(_samples(), params, 0, lambda name: _null())
            return
        trajectories, _, valid = collector.collect(_samples(), params, 0, lambda name: _null())
    finally:
        envs.shutdown()
    assert bool(valid.all())
    for traj in trajectories:
        c = traj.completion
        # Turn k (and the observation after it, mask 0) was sampled by version k - 1.
        turn, expected = 0, []
        for t, m in enumerate(c.loss_mask):
            if m == 1 and (t == 0 or c.loss_mask[t - 1] == 0):
                turn += 1
            expected.append(turn - 1)
        assert turn == 3 and c.versions() == tuple(expected) and c.policy_version == 0
