"""Agent episodes (``env.agent``): user agent code drives the policy through the
OpenAI-compatible gateway, and each finished gateway session becomes a training sample.

Contract of ``AgentEpisodeCollector.collect(prompts, params, policy_version, timer)``,
the same as ``rlpost.rollout.multiturn.EpisodeCollector``'s: runs ``params.n``
episodes per prompt (one GRPO group per prompt) and returns ``(trajectories,
rewards [G, n], valid [G, n])``. It starts a ``GatewayServer`` in front of the
rollout group (loopback, a free port) for the call and stops it after, opens one
session per episode, and hands the agents (``agents.run``: the Ray ``AgentPool`` or
an in-process ``LocalAgentPool``) the session URLs; it waits for every agent to
finish or fail, nothing else. Weights do not change during the call, so every
sampled token is from ``policy_version`` (checked per token; anything else raises).

Sampling. The gateway samples at ``rollout.temperature``/``top_p`` whatever the
agent asks (the trainer scores tokens at that temperature); ``max_tokens`` is the
agent's, ``rollout.max_new_tokens`` when it sets none; a request past
``RunConfig.context_tokens()`` gets the gateway's 400. ``rollout.n`` is the group
size; ``rollout.max_turns`` does not apply (the agent decides its turns).

What is trained. A session's sample is exactly the gateway's record
(``rlpost.gateway.session``): the sampled reply ids with loss mask 1 and the
sampler's log-probs, everything else (the opening, tool results, closing EOS) mask 0.
The prompt is the record's tokens before the first sampled one. A session whose
agent rewrote its history has several branches: only the LAST one is trained (the
conversation the agent finished on, whose final answer the reward judges; one sample
per episode keeps the GRPO group at ``n``); earlier ones are counted in
``env/branches_untrained``.

Rewards. The agent's return value (a float or a dict of components, validated like
a reward function's); None sends the final reply's text to ``reward.fn``.

Failures. An agent that raises, returns something else, times out
(``env.timeout_s``), or never calls the model fails its episode; it is rerun on a
fresh session up to ``env.max_retries`` times, then dropped: counted in
``env/episodes_failed`` and marked invalid (``Reward.error``), never scored as wrong.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import torch

from rlpost.config.schema import EvalConfig, RunConfig
from rlpost.envs.agent import AgentResult, task_row
from rlpost.envs.base import EnvFailure
from rlpost.errors import WorkerError
from rlpost.gateway import GatewayConfig, GatewayServer, SessionSample
from rlpost.rewards.api import to_reward
from rlpost.rollout.evaluation import score_of
from rlpost.types import Completion, PromptSample, Reward, SamplingParams, Trajectory

_episode_ids = itertools.count()


@dataclass
class AgentEpisode:
    sample: PromptSample
    group: int
    attempt: int = 0
    branch: SessionSample | None = None  # the trained (last) branch of the finished session
    untrained_branches: int = 0
    reward: Reward | None = None
    failure: str | None = None
    dropped: bool = False


def final_reply(branch: SessionSample) -> tuple[int, ...]:
    """The ids of the last sampled reply: the trailing run of loss-mask-1 tokens."""
    end = len(branch.loss_mask)
    while end and not branch.loss_mask[end - 1]:
        end -= 1
    start = end
    while start and branch.loss_mask[start - 1]:
        start -= 1
    return branch.token_ids[start:end]


def session_trajectory(branch: SessionSample, sample: PromptSample, reward: Reward, group: int,
                       policy_version: int, tokenizer: Any) -> Trajectory:
    """A gateway session's branch as a ``Trajectory``: prompt = the tokens before the
    first sampled one, completion = the rest with the session's mask and log-probs."""
    first = branch.loss_mask.index(1)
    ids = branch.token_ids[first:]
    completion = Completion(token_ids=ids, logprobs=branch.logprobs[first:],
                            text=tokenizer.decode(list(ids), skip_special_tokens=True), finish_reason="stop",
                            policy_version=policy_version, loss_mask=branch.loss_mask[first:])
    prompt = dataclasses.replace(sample, prompt_ids=branch.token_ids[:first])
    return Trajectory(prompt=prompt, completion=completion, reward=reward, group_index=group)


class AgentEpisodeCollector:
    """Runs agent episodes for the ``Collector`` (and for eval). ``agents``: an
    ``AgentPoolLike``; ``rewards``: the ``RewardPoolLike`` scoring agents that return None."""

    def __init__(self, cfg: RunConfig, rollout, agents, rewards, tokenizer, context_tokens: int):
        self.cfg, self.rollout, self.agents, self.rewards = cfg, rollout, agents, rewards
        self.tokenizer = tokenizer
        r = cfg.rollout
        self.gateway_cfg = GatewayConfig(max_context_tokens=context_tokens, default_max_tokens=r.max_new_tokens,
                                         temperature=r.temperature, top_p=r.top_p)
        self.metrics: dict[str, float] = {}

    # ------------------------------------------------------------ training
    def collect(self, prompts: list[PromptSample], params: SamplingParams, policy_version: int, timer):
        n = params.n
        episodes = [AgentEpisode(p, g) for g, p in enumerate(prompts) for _ in range(n)]
        with timer("rollout"):  # the agents' model calls and their tools, interleaved
            counters = self.run(episodes, self.gateway_cfg, policy_version)
        with timer("reward"):
            self.score(episodes)
        trajectories = [self.trajectory(e, policy_version) for e in episodes]
        rewards = torch.tensor([t.reward.total for t in trajectories], dtype=torch.float32).view(len(prompts), n)
        valid = torch.tensor([t.reward.error is None for t in trajectories]).view(len(prompts), n)
        self.metrics = self.episode_metrics(episodes) | {f"gateway/{k}": float(v) for k, v in counters.items()}
        return trajectories, rewards, valid

    def pop_metrics(self) -> dict[str, float]:
        metrics, self.metrics = self.metrics, {}
        return metrics

    # ------------------------------------------------------------ the episodes
    def run(self, episodes: list[AgentEpisode], gateway_cfg: GatewayConfig, policy_version: int) -> dict[str, float]:
        """Every episode to a finished session or dropped; returns the gateway's counters
        and its batching (``generate_calls``, ``requests_per_call``)."""
        max_attempts = self.cfg.env.max_retries + 1
        pending = list(episodes)
        with GatewayServer(self.rollout, self.tokenizer, gateway_cfg) as gw:
            while pending:
                sessions = [gw.new_session() for _ in pending]
                results = self.agents.run([(f"ag{next(_episode_ids)}", url, self._row(e.sample))
                                           for e, (_, url) in zip(pending, sessions)])
                again = []
                for e, (sid, _), res in zip(pending, sessions, results):
                    branches = gw.service.close_session(sid)
                    failure = self._finish(e, res, branches, policy_version)
                    if failure is None:
                        continue
                    e.failure = failure
                    e.attempt += 1
                    if e.attempt < max_attempts:
                        again.append(e)
                    else:
                        e.dropped = True
                pending = again
            return {**gw.service.counters, **gw.service.batching()}

    def _finish(self, e: AgentEpisode, res: AgentResult | EnvFailure, branches: list[SessionSample],
                policy_version: int) -> str | None:
        """Record a finished episode; the failure message instead when it failed."""
        if isinstance(res, EnvFailure):
            return res.error
        if not branches:
            return "the agent returned without a chat completion through its client (nothing to train)"
        branch = branches[-1]
        stale = set(branch.versions_used) - {policy_version}
        if stale:
            raise WorkerError(f"an agent episode was sampled by policy versions {sorted(stale)}, expected "
                              f"{policy_version}: a replica missed a weight sync")
        e.branch, e.untrained_branches = branch, len(branches) - 1
        e.reward = None if res.reward is None else to_reward(res.reward)
        return None

    def _row(self, sample: PromptSample) -> dict:
        system = self.cfg.data.system_prompt
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": sample.question}]
        return task_row(sample.uid, sample.question, sample.answer, sample.metadata, messages)

    def score(self, episodes: list[AgentEpisode]) -> None:
        """``reward.fn`` on the final reply of each finished episode whose agent returned None."""
        todo = [e for e in episodes if e.branch is not None and e.reward is None]
        if not todo:
            return
        items = [(e.sample.question, self.tokenizer.decode(list(final_reply(e.branch)), skip_special_tokens=True),
                  e.sample.answer, e.sample.metadata) for e in todo if e.branch is not None]  # (typing)
        for e, reward in zip(todo, self.rewards.score(items)):
            e.reward = reward

    def trajectory(self, e: AgentEpisode, policy_version: int) -> Trajectory:
        if e.dropped or e.branch is None or e.reward is None:
            empty = Completion(token_ids=(), logprobs=(), text="", finish_reason="stop",
                               policy_version=policy_version, loss_mask=())
            return Trajectory(prompt=e.sample, completion=empty, group_index=e.group,
                              reward=Reward(total=0.0, error=f"agent failed: {e.failure}"))
        return session_trajectory(e.branch, e.sample, e.reward, e.group, policy_version, self.tokenizer)

    @staticmethod
    def episode_metrics(episodes: list[AgentEpisode]) -> dict[str, float]:
        ok = [e.branch for e in episodes if e.branch is not None and not e.dropped]
        count = max(len(ok), 1)
        return {
            "env/episodes": float(len(episodes)),
            "env/episodes_failed": float(len(episodes) - len(ok)),
            "env/episodes_retried": float(sum(e.attempt > 0 for e in episodes)),
            "env/turns_mean": sum(b.turns for b in ok) / count,
            "env/observation_tokens_mean": sum(len(b.loss_mask) - b.loss_mask.index(1) - sum(b.loss_mask)
                                               for b in ok) / count,
            "env/branches_untrained": float(sum(e.untrained_branches for e in episodes)),
        }

    # ------------------------------------------------------------ eval
    def evaluate(self, samples: list[PromptSample], ev: EvalConfig, policy_version: int,
                 seed: int | None = None) -> dict[str, float]:
        """One greedy episode per held-out task (the gateway forces temperature 0),
        plus ``ev.n`` at ``ev.temperature`` for mean@n / pass@k when ``ev.n > 1``.
        Failed episodes are left out of the accuracy (and counted), not scored as wrong.
        ``seed`` is unused: agents' requests carry their own seeds, or none."""
        from rlpost.rollout.evaluation import sampled_metrics

        samples = samples[:ev.size]
        greedy_cfg = dataclasses.replace(self.gateway_cfg, temperature=0.0, top_p=1.0,
                                         default_max_tokens=ev.max_new_tokens)
        episodes = [AgentEpisode(s, g) for g, s in enumerate(samples)]
        self.run(episodes, greedy_cfg, policy_version)
        self.score(episodes)
        ok = [self.trajectory(e, policy_version) for e in episodes if e.branch is not None and not e.dropped]
        extra: dict[str, float] = {}
        if ev.n > 1:
            sampled = [AgentEpisode(s, g) for g, s in enumerate(samples) for _ in range(ev.n)]
            self.run(sampled, dataclasses.replace(greedy_cfg, temperature=ev.temperature), policy_version)
            self.score(sampled)
            per_prompt: list[list[float]] = [[] for _ in samples]
            for e in sampled:
                if e.branch is not None and not e.dropped and e.reward is not None:
                    per_prompt[e.group].append(score_of(e.reward))
            extra = sampled_metrics(per_prompt, ev.n, ev.pass_ks)
        return extra | {
            "eval/accuracy": sum(score_of(t.reward) for t in ok) / max(len(ok), 1),
            "eval/reward_mean": sum(t.reward.total for t in ok) / max(len(ok), 1),
            "eval/response_length": sum(len(t.completion.token_ids) for t in ok) / max(len(ok), 1),
            "eval/turns_mean": sum(e.branch.turns for e in episodes if e.branch is not None) / max(len(ok), 1),
            "eval/episodes_failed": float(len(episodes) - len(ok)),
            "eval/num_prompts": float(len(episodes)),
        }


def make_agent_collector(cfg: RunConfig, rollout, rewards, agents=None, tokenizer=None) -> AgentEpisodeCollector:
    """The collector for ``cfg.env.agent``: ``agents`` (an ``AgentPool``) when given, else
    an in-process ``LocalAgentPool``; the tokenizer of ``cfg.model.path`` unless passed.
    The gateway's context limit is ``cfg.context_tokens()``, or the model's own
    (``max_position_embeddings``) when that is unbounded."""
    from rlpost.models.loading import load_tokenizer, resolve_model_path

    assert cfg.env.agent is not None, "make_agent_collector needs env.agent"
    model_path = resolve_model_path(cfg.model.path)
    if agents is None:
        from rlpost.envs.agent import LocalAgentPool

        agents = LocalAgentPool(cfg.env.agent, dict(cfg.env.kwargs), cfg.env.timeout_s)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    context = cfg.context_tokens()
    if context is None:
        from transformers import AutoConfig

        context = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code
                                             ).max_position_embeddings
    return AgentEpisodeCollector(cfg, rollout, agents, rewards, tokenizer, context)
