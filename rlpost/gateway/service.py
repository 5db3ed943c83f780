"""The gateway's logic without HTTP: sessions, replica routing, sampling, counters.

Contract. ``chat(session_id, request)`` blocks until the reply is sampled. Requests
of one session run one at a time (the session's lock) on the session's replica;
requests of different sessions run concurrently, at most one ``generate`` at a time per
replica (the in-process engines are not thread-safe, and a Ray replica serves one call
at a time anyway): requests that wait for a busy replica are sampled together in its
next call (``rlpost.gateway.batching``). Sessions are spread round-robin over
replicas at creation. Each reply is sampled by one policy version, recorded per
token in the session (``SessionSample.policy_versions``).
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
import uuid
from collections import Counter
from typing import Any

from rlpost.envs.chat import ChatRenderer
from rlpost.gateway.batching import ReplicaBatcher
from rlpost.gateway.config import GatewayConfig
from rlpost.gateway.protocol import ChatRequest, CompletionRequest, GatewayError, reply_message
from rlpost.gateway.session import Session, SessionSample, message_key
from rlpost.groups import RolloutGroupLike
from rlpost.types import Completion, SamplingParams


class GatewayService:
    def __init__(self, rollout: RolloutGroupLike, tokenizer: Any, cfg: GatewayConfig):
        self.rollout, self.tokenizer, self.cfg = rollout, tokenizer, cfg
        self.renderer = ChatRenderer(tokenizer)
        self.sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()
        self._batchers = [ReplicaBatcher(functools.partial(self._generate_on, r)) for r in range(rollout.size)]
        self._next_replica = itertools.count()
        self.counters: Counter[str] = Counter()  # gateway/* metrics, see docs/gateway.md

    # --- sessions ---
    def create_session(self) -> Session:
        with self._sessions_lock:
            session = Session(uuid.uuid4().hex, next(self._next_replica) % self.rollout.size, self.renderer)
            self.sessions[session.id] = session
            self.counters["sessions_created"] += 1
        return session

    def session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise GatewayError(404, f"no session {session_id!r}: create one with POST /sessions", "session_not_found")
        return session

    def export(self, session_id: str) -> list[SessionSample]:
        session = self.session(session_id)
        with session.lock:
            return session.export()

    def close_session(self, session_id: str) -> list[SessionSample]:
        samples = self.export(session_id)
        with self._sessions_lock:
            self.sessions.pop(session_id, None)
        return samples

    # --- sampling ---
    def _sample(self, prompts: list[list[int]], params: SamplingParams, replica: int) -> list[list[Completion]]:
        limit = self.cfg.max_context_tokens
        for ids in prompts:
            if len(ids) + params.max_new_tokens > limit:
                self.counters["context_too_long"] += 1
                raise GatewayError(400, f"this request needs {len(ids)} prompt tokens + {params.max_new_tokens} "
                                   f"max_tokens = {len(ids) + params.max_new_tokens} tokens, more than the "
                                   f"model's context of {limit}; shorten the conversation or lower max_tokens",
                                   "context_length_exceeded", "messages")
        return self._batchers[replica].generate(prompts, params)

    def _generate_on(self, replica: int, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        return self.rollout.generate(prompts, params, replica=replica)

    def batching(self) -> dict[str, float]:
        """Generate calls made and requests served so far, over every replica."""
        calls = sum(b.calls for b in self._batchers)
        return {"generate_calls": float(calls), "requests_per_call": sum(b.requests for b in self._batchers) / max(calls, 1)}

    def _params(self, req: ChatRequest | CompletionRequest, max_new_tokens: int) -> SamplingParams:
        cfg = self.cfg  # a configured temperature/top_p overrides the request's (see GatewayConfig)
        return SamplingParams(n=req.n, temperature=req.temperature if cfg.temperature is None else cfg.temperature,
                              top_p=req.top_p if cfg.top_p is None else cfg.top_p, max_new_tokens=max_new_tokens,
                              stop=req.stop_strings(), seed=req.seed)

    def chat(self, session_id: str | None, req: ChatRequest) -> dict:
        parse_tools = bool(req.tools) and req.tool_choice != "none"
        tools = req.tools if parse_tools else None
        params = self._params(req, req.max_new_tokens(self.cfg.default_max_tokens))
        if session_id is None:
            # Stateless: nothing is recorded; replicas take turns.
            prompt = self.renderer.opening_ids(list(req.messages), tools or [])
            replies = self._sample([prompt], params, next(self._next_replica) % self.rollout.size)[0]
            return self._chat_response(req, replies, parse_tools, len(prompt))[0]
        session = self.session(session_id)
        if req.n != 1:
            raise GatewayError(400, "n > 1 inside a session is not supported yet (a session records one "
                               "conversation); sample n from the stateless /v1/chat/completions", param="n")
        with session.lock:
            plan = session.plan(list(req.messages), tools)
            replies = self._sample([plan.prompt_ids], params, session.replica)[0]
            body, keys = self._chat_response(req, replies, parse_tools, len(plan.prompt_ids))
            before = session.branches
            session.commit(plan, replies[0], keys[0], tools)
            self.counters["branches"] += session.branches - before
        return body

    def _chat_response(self, req: ChatRequest, replies: list[Completion], parse_tools: bool,
                       prompt_len: int) -> tuple[dict, list[str]]:
        choices, keys = [], []
        for i, c in enumerate(replies):
            message, finish, malformed = reply_message(c.text, parse_tools)
            self.counters["malformed_tool_calls"] += int(malformed)
            self.counters["tool_calls"] += len(message.get("tool_calls", []))
            keys.append(message_key(message))
            choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish or c.finish_reason,
                                      "logprobs": None}
            if req.logprobs:
                choice["logprobs"] = {"content": [
                    {"token": self.tokenizer.decode([t]), "logprob": lp, "bytes": None, "top_logprobs": []}
                    for t, lp in zip(c.token_ids, c.logprobs)]}
            choices.append(choice)
        completion_tokens = sum(len(c.token_ids) for c in replies)
        self.counters["requests"] += 1
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model or self.cfg.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_len + completion_tokens}}, keys

    def complete(self, session_id: str | None, req: CompletionRequest) -> dict:
        """Plain completions: stateless (nothing recorded); inside a session path it
        runs on the session's replica."""
        replica = (self.session(session_id).replica if session_id is not None
                   else next(self._next_replica) % self.rollout.size)
        prompts = self._prompt_ids(req.prompt)
        groups = self._sample(prompts, self._params(req, req.max_tokens), replica)
        choices: list[dict[str, Any]] = []
        for group in groups:
            for c in group:
                lp = None
                if req.logprobs is not None:
                    lp = {"tokens": [self.tokenizer.decode([t]) for t in c.token_ids],
                          "token_logprobs": list(c.logprobs), "top_logprobs": None, "text_offset": None}
                choices.append({"index": len(choices), "text": c.text, "finish_reason": c.finish_reason,
                                "logprobs": lp})
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(c.token_ids) for g in groups for c in g)
        self.counters["requests"] += 1
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model or self.cfg.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def _prompt_ids(self, prompt: str | list) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.renderer.encode(prompt)]
        if not prompt:
            raise GatewayError(400, "prompt must not be empty", param="prompt")
        prompts = ([list(prompt)] if all(isinstance(p, int) for p in prompt) else
                   [self.renderer.encode(p) if isinstance(p, str) else list(p) for p in prompt])
        vocab = len(self.tokenizer)
        if any(not p for p in prompts) or any(not 0 <= t < vocab for p in prompts for t in p):
            raise GatewayError(400, f"every prompt must be non-empty, and token ids in 0..{vocab - 1}", param="prompt")
        return prompts
