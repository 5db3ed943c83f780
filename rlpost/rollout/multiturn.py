"""Multi-turn rollouts: generate -> parse -> step the environment -> append the
observation -> generate again, on token ids end to end.

Contract of ``EpisodeCollector.collect(prompts, params, policy_version, timer)``:
runs ``params.n`` episodes per prompt (one GRPO group per prompt) to the end and
returns ``(trajectories, rewards [G, n], valid [G, n])`` like the single-turn path.
Each loop iteration ("turn") batches the model turn of every live episode into ONE
``rollout.generate(prompt_ids, SamplingParams(n=1, seed=...))`` call, so the HF and
vLLM engines work unchanged, then steps all their environments at once in the env
pool. It waits for both; nothing else unblocks it. Every token of an episode is
sampled by ``policy_version`` (checked; a replica that missed a weight sync raises);
with ``trainer.inflight_updates`` by ``policy_version`` or a later version, and the
episode's ``Completion.token_versions`` records which (an observation's tokens carry
the version of the sampled token before them).

Token identity. An episode's completion is ``turn_1 + obs_1 + turn_2 + ...``:
``turn_k`` are the sampler's ids (loss mask 1, the sampler's logprobs) and ``obs_k``
the observation rendered and tokenised alone (``rlpost.envs.chat``; loss mask 0,
logprob 0). Nothing is re-tokenised, so the trained tokens are exactly the sampled
ones and each turn was sampled conditioned on exactly the ids the trainer sees.

Ending. An episode ends when the environment says done, after ``rollout.max_turns``
model turns, when a turn hits ``rollout.max_new_tokens`` without ending, or when the
tokens after the prompt would pass ``rollout.max_total_tokens`` (the turn is cut at
the cap; finish_reason "length"). The environment scores the last turn in every case.

Failures. An environment call that raises or times out (or whose actor dies) fails
the episode; it is restarted from its prompt up to ``env.max_retries`` times, then
dropped: counted in ``env/episodes_failed`` and marked invalid (``Reward.error``), so
it takes no part in group statistics and is never scored as a wrong answer.

Seeds derive from (step seed, loop iteration), so a resumed run samples the same.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import torch

from rlpost.config.schema import EvalConfig, RunConfig
from rlpost.envs.base import EnvFailure, StepResult, Task
from rlpost.envs.chat import ChatRenderer
from rlpost.errors import WorkerError
from rlpost.rollout.evaluation import score_of
from rlpost.rewards.api import to_reward
from rlpost.types import Completion, PromptSample, Reward, SamplingParams, Trajectory

_episode_ids = itertools.count()


@dataclass
class Episode:
    sample: PromptSample
    group: int
    attempt: int = 0
    eid: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # policy version of every token
    turns: int = 0
    rewards: list[Reward] = field(default_factory=list)
    reward_error: str | None = None
    finish_reason: str = "stop"
    failure: str | None = None  # last environment failure
    done: bool = False
    dropped: bool = False  # failed on its last attempt: invalid, not scored
    tool_calls: int = 0

    def restart(self) -> None:
        """A fresh attempt at the same task (after an environment failure)."""
        fresh = Episode(self.sample, self.group, self.attempt + 1)
        fresh.failure = self.failure
        self.__dict__.update(fresh.__dict__)

    def add_observation(self, ids: list[int]) -> None:
        self.tokens += ids
        self.logprobs += [0.0] * len(ids)
        self.mask += [0] * len(ids)
        self.versions += self.versions[-1:] * len(ids)  # never empty: a model turn came first


def task_of(sample: PromptSample, messages: list[dict]) -> Task:
    return Task(uid=sample.uid, question=sample.question, answer=sample.answer,
                metadata=dict(sample.metadata), messages=tuple(messages))


class EpisodeCollector:
    """Runs episodes for the ``Collector`` (and for eval) against ``envs`` (an
    ``EnvPool`` or ``LocalEnvPool``) with ``rollout`` (a rollout group)."""

    def __init__(self, cfg: RunConfig, rollout, envs, tokenizer):
        self.cfg, self.rollout, self.envs = cfg, rollout, envs
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer)
        self.inflight = cfg.trainer.inflight_updates  # later versions may land inside a turn
        self.metrics: dict[str, float] = {}

    # ------------------------------------------------------------ training
    def collect(self, prompts: list[PromptSample], params: SamplingParams, policy_version: int, timer):
        n = params.n
        episodes = [Episode(p, g) for g, p in enumerate(prompts) for _ in range(n)]
        self.run(episodes, params, policy_version, timer)
        trajectories = [self.trajectory(e, policy_version) for e in episodes]
        rewards = torch.tensor([t.reward.total for t in trajectories], dtype=torch.float32).view(len(prompts), n)
        valid = torch.tensor([t.reward.error is None for t in trajectories]).view(len(prompts), n)
        self.metrics = self.episode_metrics(episodes)
        return trajectories, rewards, valid

    def pop_metrics(self) -> dict[str, float]:
        metrics, self.metrics = self.metrics, {}
        return metrics

    # ------------------------------------------------------------ the loop
    def run(self, episodes: list[Episode], params: SamplingParams, policy_version: int, timer) -> None:
        r = self.cfg.rollout
        budget = r.max_total_tokens or None
        max_attempts = self.cfg.env.max_retries + 1
        with timer("env"):
            self._reset([e for e in episodes], max_attempts)
        for iteration in range(max_attempts * r.max_turns):
            live = [e for e in episodes if not e.done]
            if not live:
                break
            seed = None if params.seed is None else params.seed * 1_000_003 + iteration
            turn_params = dataclasses.replace(params, n=1, seed=seed)
            with timer("rollout"):
                outs = self.rollout.generate([e.prompt_ids + e.tokens for e in live], turn_params)
            actions = []
            for e, (c,) in zip(live, outs):
                if c.policy_version < policy_version or (c.policy_version != policy_version and not self.inflight):
                    raise WorkerError(f"a multi-turn rollout came from policy version {c.policy_version}, "
                                      f"expected {policy_version}: a replica missed a weight sync")
                ids, lps, vs = list(c.token_ids), list(c.logprobs), list(c.versions())
                e.finish_reason = c.finish_reason
                if budget is not None and len(e.tokens) + len(ids) > budget:
                    keep = max(0, budget - len(e.tokens))
                    ids, lps, vs, e.finish_reason = ids[:keep], lps[:keep], vs[:keep], "length"
                e.tokens += ids
                e.logprobs += lps
                e.versions += vs
                e.mask += [1] * len(ids)
                e.turns += 1
                actions.append(self.tokenizer.decode(ids, skip_special_tokens=True))
            with timer("env"):
                results = self.envs.step([(e.eid, a) for e, a in zip(live, actions)])
            ended = []
            for e, res in zip(live, results):
                if isinstance(res, EnvFailure):
                    self._fail(e, res.error, max_attempts)
                    continue
                self._record(e, res)
                last_turn = e.turns >= r.max_turns or e.finish_reason == "length"
                if res.done or last_turn:
                    e.done = True
                    ended.append(e.eid)
                    continue
                ids = self._closing_ids(e) + self.renderer.observation_ids(res.observation)
                if budget is not None and len(e.tokens) + len(ids) >= budget:
                    e.done, e.finish_reason = True, "length"
                    ended.append(e.eid)
                    continue
                e.add_observation(ids)
            if ended:
                self.envs.close(ended)
            retry = [e for e in live if not e.done and not e.eid]
            if retry:
                with timer("env"):
                    self._reset(retry, max_attempts)
        unfinished = [e for e in episodes if not e.done]
        for e in unfinished:  # a restarted episode that ran out of loop iterations
            e.done = e.dropped = True
            e.failure = f"{e.failure}; the retry did not finish within the turn limit"
        if unfinished:
            self.envs.close([e.eid for e in unfinished if e.eid])

    def _closing_ids(self, e: Episode) -> list[int]:
        # A turn cut by a stop string did not sample EOS; the template needs it to
        # close the turn. It is inserted, so not trained (mask 0).
        return [] if e.tokens and e.tokens[-1] == self.renderer.eos_id else [self.renderer.eos_id]

    def _record(self, e: Episode, res: StepResult) -> None:
        reward = to_reward(res.reward)
        if reward.error or res.info.get("reward_error"):
            e.reward_error = reward.error or str(res.info["reward_error"])
        e.rewards.append(reward)
        e.tool_calls += int(res.info.get("tool_calls", 0))

    def _reset(self, episodes: list[Episode], max_attempts: int) -> None:
        pending = list(episodes)
        while pending:
            for e in pending:
                e.eid = f"ep{next(_episode_ids)}"
            openings = self.envs.reset([(e.eid, task_of(e.sample, self._opening_messages(e))) for e in pending])
            again = []
            for e, opening in zip(pending, openings):
                if isinstance(opening, EnvFailure):
                    self._fail(e, opening.error, max_attempts)
                    if not e.done:
                        again.append(e)
                else:
                    e.prompt_ids = self.renderer.opening_ids(opening.messages, opening.tools)
            pending = again

    def _opening_messages(self, e: Episode) -> list[dict]:
        """The dataset's conversation (data.system_prompt + the user question), which
        an environment may open with as is."""
        system = self.cfg.data.system_prompt
        user = [{"role": "user", "content": e.sample.question}]
        return ([{"role": "system", "content": system}] + user) if system else user

    @staticmethod
    def _fail(e: Episode, error: str, max_attempts: int) -> None:
        # The runner has already discarded the failed environment.
        e.failure = error
        if e.attempt + 1 < max_attempts:
            e.restart()  # eid cleared: reset again before the next turn
        else:
            e.done = e.dropped = True

    # ------------------------------------------------------------ results
    def trajectory(self, e: Episode, policy_version: int) -> Trajectory:
        if e.dropped:
            reward = Reward(total=0.0, error=f"environment failed: {e.failure}")
        elif e.reward_error:
            reward = Reward(total=0.0, error=e.reward_error)
        else:
            components: dict[str, float] = {}
            for r in e.rewards:
                for k, v in r.components.items():
                    components[k] = components.get(k, 0.0) + v
            reward = Reward(total=sum(r.total for r in e.rewards), components=components)
        # The oldest version of any token; an episode with no tokens (dropped early) has policy_version's.
        oldest = min(e.versions, default=policy_version)
        mixed = bool(e.versions) and max(e.versions) != oldest
        completion = Completion(
            token_ids=tuple(e.tokens), logprobs=tuple(e.logprobs),
            text=self.tokenizer.decode(e.tokens, skip_special_tokens=True),
            finish_reason=e.finish_reason, policy_version=oldest, loss_mask=tuple(e.mask),
            token_versions=tuple(e.versions) if mixed else None)
        prompt = dataclasses.replace(e.sample, prompt_ids=tuple(e.prompt_ids) or e.sample.prompt_ids)
        return Trajectory(prompt=prompt, completion=completion, reward=reward, group_index=e.group)

    @staticmethod
    def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
        ok = [e for e in episodes if not e.dropped]
        count = max(len(ok), 1)
        return {
            "env/episodes": float(len(episodes)),
            "env/episodes_failed": float(len(episodes) - len(ok)),
            "env/episodes_retried": float(sum(e.attempt > 0 for e in episodes)),
            "env/turns_mean": sum(e.turns for e in ok) / count,
            "env/tool_calls_mean": sum(e.tool_calls for e in ok) / count,
            "env/observation_tokens_mean": sum(len(e.mask) - sum(e.mask) for e in ok) / count,
        }

    # ------------------------------------------------------------ eval
    def evaluate(self, samples: list[PromptSample], ev: EvalConfig, policy_version: int,
                 seed: int | None = None) -> dict[str, float]:
        """Greedy episodes on held-out tasks, plus ``ev.n`` sampled ones per task for
        mean@n / pass@k when ``ev.n > 1``. Failed episodes are left out of the accuracy
        (and counted), not scored as wrong."""
        from contextlib import nullcontext

        from rlpost.rollout.evaluation import sampled_metrics

        samples = samples[:ev.size]
        episodes = [Episode(s, g) for g, s in enumerate(samples)]
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=ev.max_new_tokens,
                                stop=tuple(self.cfg.rollout.stop))
        self.run(episodes, params, policy_version, lambda name: nullcontext())
        ok = [self.trajectory(e, policy_version) for e in episodes if not e.dropped]
        correct = [score_of(t.reward) for t in ok]
        extra: dict[str, float] = {}
        if ev.n > 1:
            sampled = [Episode(s, g) for g, s in enumerate(samples) for _ in range(ev.n)]
            hot = dataclasses.replace(params, temperature=ev.temperature, seed=seed)
            self.run(sampled, hot, policy_version, lambda name: nullcontext())
            per_prompt: list[list[float]] = [[] for _ in samples]
            for e in sampled:
                if not e.dropped:
                    per_prompt[e.group].append(score_of(self.trajectory(e, policy_version).reward))
            extra = sampled_metrics(per_prompt, ev.n, ev.pass_ks)
        return extra | {
            "eval/accuracy": sum(correct) / max(len(correct), 1),
            "eval/reward_mean": sum(t.reward.total for t in ok) / max(len(ok), 1),
            "eval/response_length": sum(len(t.completion.token_ids) for t in ok) / max(len(ok), 1),
            "eval/turns_mean": sum(e.turns for e in episodes) / max(len(episodes), 1),
            "eval/episodes_failed": float(len(episodes) - len(ok)),
            "eval/num_prompts": float(len(episodes)),
        }



def make_episode_collector(cfg: RunConfig, rollout, envs=None, tokenizer=None) -> EpisodeCollector:
    """The collector for ``cfg``: ``envs`` (an ``EnvPool``) when given, else an in-process
    ``LocalEnvPool``; the tokenizer of ``cfg.model.path`` unless one is passed."""
    if envs is None:
        from rlpost.envs.runner import LocalEnvPool

        spec, kwargs = env_factory(cfg)
        envs = LocalEnvPool(spec, kwargs, cfg.env.timeout_s)
    if tokenizer is None:
        from rlpost.models.loading import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(cfg.model.path), cfg.model.trust_remote_code)
    return EpisodeCollector(cfg, rollout, envs, tokenizer)


def env_factory(cfg: RunConfig) -> tuple[str, dict]:
    """(factory spec, kwargs) of ``cfg.env``; without ``env.fn`` the reward function
    wrapped as a single-turn environment."""
    if cfg.env.fn is not None:
        return cfg.env.fn, dict(cfg.env.kwargs)
    from rlpost.envs.runner import resolve_env_spec

    return "rlpost.envs.reward_env:RewardEnv", {"fn": resolve_env_spec(cfg.reward.fn), "kwargs": dict(cfg.reward.kwargs),
                                                "timeout_s": cfg.reward.timeout_s}
