"""Per-session token bookkeeping: exact token-in/token-out for agent conversations.

A session is one agent episode. Its token sequence is built like
``rlpost.rollout.multiturn``'s episodes and with the same renderer (``rlpost.envs.chat``):

    opening_ids(first request's messages, tools)      loss mask 0
    + the ids the sampler returned for the reply       loss mask 1, sampler log-probs
    + [EOS if the reply did not end with it]           loss mask 0 (closes the turn)
    + observation_ids(the messages the agent added)    loss mask 0
    + the ids sampled for the next reply ...

When the agent sends the conversation back, the messages it already sent and the
replies the gateway gave are compared (by role, text and tool calls, see
``message_key``) with the stored ones: a match reuses the stored ids verbatim and
only the new messages are templated and encoded; nothing earlier is re-tokenised.
A conversation that does not extend the stored one (history rewritten, a reply
edited, tools changed) closes the current branch and opens a new one from a fresh
templating of the whole conversation (all loss mask 0 until the next reply); every
branch is kept and exported, and ``branches`` counts the rewrites.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from rlpost.envs.chat import ChatRenderer
from rlpost.types import Completion

NOT_SAMPLED = -1  # policy version of a token the sampler did not produce


@dataclass(frozen=True)
class SessionSample:
    """One branch of a session, ready to train on (``rlpost.types.Trajectory``-shaped).

    All four sequences have length T. ``loss_mask`` is 1 exactly on sampled tokens;
    ``logprobs`` are the sampler's (0 elsewhere); ``policy_versions`` the version of
    the weights that sampled each token (``NOT_SAMPLED`` = -1 elsewhere)."""

    session_id: str
    branch: int  # 0 for the first, +1 per rewrite
    replica: int
    token_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    logprobs: tuple[float, ...]
    policy_versions: tuple[int, ...]
    turns: int  # replies sampled in this branch

    @property
    def versions_used(self) -> tuple[int, ...]:
        """Distinct policy versions that sampled this branch (more than one: the
        weights changed mid-episode, which an off-policy check must see)."""
        return tuple(sorted({v for v in self.policy_versions if v != NOT_SAMPLED}))


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # OpenAI content parts: [{"type": "text", "text": ...}, ...]; validated upstream.
    return "".join(part["text"] for part in content)


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def message_key(message: dict) -> str:
    """What identifies a message for prefix matching: role, text and tool calls (name
    and parsed arguments). Fields clients add or drop when echoing a reply back
    (``refusal``, ``annotations``, call ids, ``content: null`` versus "") do not count."""
    calls = [(c["function"]["name"], _arguments(c["function"].get("arguments", "{}")))
             for c in message.get("tool_calls") or []]
    return json.dumps([message["role"], _text(message.get("content")), calls], sort_keys=True)


def template_message(message: dict) -> dict:
    """The message as the chat template sees it. An assistant message's tool calls are
    written back into its text in the ``<tool_call>`` format the model produced, since
    the templates of the models rlpost ships render ``content`` only."""
    text = _text(message.get("content"))
    for call in message.get("tool_calls") or []:
        body = {"name": call["function"]["name"], "arguments": _arguments(call["function"].get("arguments", "{}"))}
        text += ("\n" if text else "") + "<tool_call>\n" + json.dumps(body) + "\n</tool_call>"
    return {"role": message["role"], "content": text}


@dataclass
class Branch:
    keys: list[str] = field(default_factory=list)  # message_key of every message so far
    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    turns: int = 0

    def add_context(self, ids: list[int]) -> None:
        self.tokens += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [NOT_SAMPLED] * len(ids)


@dataclass(frozen=True)
class Plan:
    """What a request adds before sampling, computed without changing the session (a
    request rejected after planning, e.g. too long, leaves it as it was)."""

    prompt_ids: list[int]  # the whole prompt to sample from
    new_ids: list[int]  # appended to the branch (loss mask 0)
    new_keys: list[str]
    new_branch: bool


class Session:
    """One agent episode's tokens on one replica. Not thread-safe: the gateway holds
    ``lock`` around plan + sample + commit."""

    def __init__(self, session_id: str, replica: int, renderer: ChatRenderer):
        self.id, self.replica, self.renderer = session_id, replica, renderer
        self.lock = threading.Lock()
        self.done: list[Branch] = []
        self.current: Branch | None = None
        self.tools_key = ""
        self.branches = 0  # rewrites seen (branches opened after the first)

    def plan(self, messages: list[dict], tools: list[dict] | None) -> Plan:
        keys = [message_key(m) for m in messages]
        tools_key = json.dumps(tools or [], sort_keys=True)
        cur = self.current
        n = len(cur.keys) if cur is not None else 0
        extends = (cur is not None and tools_key == self.tools_key and len(keys) > n
                   and keys[:n] == cur.keys and cur.turns > 0)
        if cur is not None and extends:
            added = [template_message(m) for m in messages[n:]]
            eos = self.renderer.eos_id
            closing = [] if cur.tokens and cur.tokens[-1] == eos else [eos]
            new_ids = closing + self.renderer.observation_ids(added)
            return Plan(cur.tokens + new_ids, new_ids, keys[n:], new_branch=False)
        opening = self.renderer.opening_ids([template_message(m) for m in messages], tools or [])
        return Plan(opening, opening, keys, new_branch=True)

    def commit(self, plan: Plan, reply: Completion, reply_key: str, tools: list[dict] | None) -> None:
        """Record the plan's context and the sampled ``reply`` (its exact ids)."""
        if plan.new_branch:
            if self.current is not None:
                self.done.append(self.current)
                self.branches += 1
            self.current = Branch()
            self.tools_key = json.dumps(tools or [], sort_keys=True)
        branch = self.current
        assert branch is not None
        branch.add_context(plan.new_ids)
        branch.keys += plan.new_keys + [reply_key]
        ids = list(reply.token_ids)
        branch.tokens += ids
        branch.mask += [1] * len(ids)
        branch.logprobs += list(reply.logprobs)
        branch.versions += [reply.policy_version] * len(ids)
        branch.turns += 1

    def export(self) -> list[SessionSample]:
        """Every branch with at least one reply, oldest first."""
        branches = self.done + ([self.current] if self.current is not None else [])
        return [SessionSample(self.id, i, self.replica, tuple(b.tokens), tuple(b.mask), tuple(b.logprobs),
                              tuple(b.versions), b.turns) for i, b in enumerate(branches) if b.turns]
