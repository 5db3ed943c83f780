"""Agent pool: Ray actors running user agents (``env.agent``) against gateway
sessions, so many episodes are in flight and an agent that crashes or hangs fails
only its own episode.

Each ``AgentActor`` is an async actor wrapping an ``rlpost.envs.agent.AgentRunner``:
its share of a batch runs concurrently on its event loop, each agent under
``env.timeout_s``. The agents reach the gateway over loopback HTTP (the gateway
serves in the driver process), so the actors must run on the driver's node.

Failure contract (what ``run`` returns instead of raising): an agent that raises or
passes its deadline -> ``EnvFailure`` for that episode (``AgentRunner``); an actor
that dies -> ``EnvFailure`` for each of its episodes, and Ray restarts it
(``max_restarts=-1``); an actor that does not answer within ``timeout_s`` + a grace
period -> its episodes fail and it is killed and restarted. The caller
(``rlpost.rollout.agents``) retries or drops failed episodes.
"""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlpost.config.schema import EnvConfig
from rlpost.envs.agent import AgentResult, AgentRunner, load_agent_fn, resolve_agent_spec
from rlpost.envs.base import EnvFailure
from rlpost.faults import FaultCounts
from rlpost.workers.env_pool import GRACE_S, gather_by_actor



@ray.remote
class AgentActor:
    def __init__(self, spec: str, kwargs: dict, timeout_s: float):
        self.runner = AgentRunner(spec, kwargs, timeout_s)

    async def run(self, items: list[tuple[str, str, dict]]) -> list[AgentResult | EnvFailure]:
        return await self.runner.run(items)


class AgentPool:
    """Driver-side handle: ``run`` spreads a batch of episodes over the actors
    (round-robin) and gathers their results in order."""

    def __init__(self, cfg: EnvConfig, faults: FaultCounts | None = None):
        assert cfg.agent is not None, "AgentPool needs env.agent"
        spec = resolve_agent_spec(cfg.agent)
        load_agent_fn(spec)  # a bad path fails here, in the driver, with a clear error
        self.timeout_s = cfg.timeout_s
        self.faults = faults or FaultCounts()
        # Pinned to this node: the gateway listens on the driver's loopback.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # @ray.remote adds .options/.remote, which Ray's type stubs do not declare.
        options = dict(num_cpus=0, max_restarts=-1, max_concurrency=1000, scheduling_strategy=here)
        self.actors = [AgentActor.options(**options).remote(spec, dict(cfg.kwargs), cfg.timeout_s)  # type: ignore[attr-defined]
                       for _ in range(cfg.workers)]

    def run(self, items: list[tuple[str, str, dict]]) -> list[AgentResult | EnvFailure]:
        shares: dict[int, list[int]] = {}
        for i in range(len(items)):
            shares.setdefault(i % len(self.actors), []).append(i)
        refs = {a: self.actors[a].run.remote([items[i] for i in idx]) for a, idx in shares.items()}
        deadline = self.timeout_s + GRACE_S
        return gather_by_actor(
            self.actors, shares, refs, len(items), deadline, self.faults,
            late=lambda a: f"agent actor {a} did not answer within {deadline:g} s; restarted",
            lost=lambda a, err: f"lost agent actor {a}: {type(err).__name__}")

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
