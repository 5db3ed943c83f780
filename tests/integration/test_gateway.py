"""The OpenAI-compatible gateway (rlpost.gateway) driven by the real ``openai`` client
on loopback, over LocalRolloutGroup: real tiny HF models where text matters little
but the model must run, a scripted group where a test needs chosen reply tokens."""

from __future__ import annotations

import json
import threading
from collections import deque

import httpx
import openai
import pytest

from rlpost.engines.hf_rollout import HFRolloutEngine
from rlpost.envs.chat import ChatRenderer
from rlpost.errors import ConfigError
from rlpost.gateway import NOT_SAMPLED, GatewayConfig, GatewayServer
from rlpost.local import LocalRolloutGroup
from rlpost.models.loading import load_tokenizer, resolve_model_path
from rlpost.types import Completion

TOOLS = [{"type": "function", "function": {"name": "python", "description": "run python",
                                           "parameters": {"type": "object",
                                                          "properties": {"code": {"type": "string"}}}}}]


class RecordingGroup:
    """Forwards to ``inner`` and remembers (replica, prompt, completion) per call."""

    def __init__(self, inner):
        self.inner, self.calls, self._lock = inner, [], threading.Lock()

    @property
    def size(self) -> int:
        return self.inner.size

    def generate(self, prompts, params, replica=None):
        out = self.inner.generate(prompts, params, replica=replica)
        with self._lock:
            self.calls += [(replica, list(p), g[0]) for p, g in zip(prompts, out)]
        return out

    def policy_versions(self):
        return self.inner.policy_versions()

    def shutdown(self):
        pass


class ScriptedGroup:
    """Two replicas that reply with the next scripted token ids (EOS appended), version 3."""

    def __init__(self, tokenizer, replies, eos=True):
        self.tokenizer, self.replies, self.calls, self.eos = tokenizer, deque(replies), [], eos

    size = 2

    def generate(self, prompts, params, replica=None):
        ids = list(self.replies.popleft()) + ([self.tokenizer.eos_token_id] if self.eos else [])
        done = Completion(tuple(ids), tuple(-0.5 - i for i in range(len(ids))),
                          self.tokenizer.decode(ids, skip_special_tokens=True), "stop" if self.eos else "length", 3)
        self.calls.append((replica, list(prompts[0]), done))
        return [[done] for _ in prompts]

    def policy_versions(self):
        return [3, 3]

    def shutdown(self):
        pass


@pytest.fixture(scope="module")
def tool_tokenizer():
    return load_tokenizer(resolve_model_path("builtin:tiny-math-tool"))


@pytest.fixture(scope="module")
def hf_gateway():
    path = resolve_model_path("builtin:tiny-math-tool")
    group = RecordingGroup(LocalRolloutGroup([HFRolloutEngine(path, seed=0, num_threads=1),
                                              HFRolloutEngine(path, seed=1, num_threads=1)]))
    with GatewayServer(group, load_tokenizer(path), GatewayConfig(max_context_tokens=512)) as gw:
        yield gw, group


def _client(base_url, key="unused"):
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def _noncanonical(tokenizer, word):
    """Ids that decode to ``word`` but are not how the tokenizer encodes it."""
    canonical = tokenizer.encode(word, add_special_tokens=False)
    for cut in range(1, len(word)):
        ids = tokenizer.encode(word[:cut], add_special_tokens=False) + tokenizer.encode(word[cut:],
                                                                                         add_special_tokens=False)
        if ids != canonical and tokenizer.decode(ids) == word:
            return ids
    raise AssertionError(f"no split of {word!r} re-tokenises differently")


def test_models_and_chat_without_tools(hf_gateway):
    gw, group = hf_gateway
    client = _client(gw.url + "/v1")
    assert [m.id for m in client.models.list()] == ["rlpost-policy"]
    resp = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "What is 2+3?"}],
                                          max_tokens=8, temperature=1.0, logprobs=True)
    choice = resp.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.content) == resp.usage.completion_tokens >= 1
    assert all(t.logprob <= 0 for t in choice.logprobs.content)
    many = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "1+1?"}], n=3, max_tokens=4)
    assert len(many.choices) == 3
    text = client.completions.create(model="x", prompt="2+2=", max_tokens=4, logprobs=1)
    assert len(text.choices[0].logprobs.token_logprobs) == text.usage.completion_tokens


def test_three_turn_session_trains_exactly_the_sampled_tokens(tool_tokenizer):
    tok = tool_tokenizer
    # Turn 2's reply is a non-canonical tokenisation: re-encoding the conversation's
    # text would give other ids, the export must keep the sampled ones.
    odd = _noncanonical(tok, "apples")
    call = tok.encode('<tool_call>\n{"name": "python", "arguments": {"code": "print(2+3)"}}\n</tool_call>',
                      add_special_tokens=False)
    replies = [call, odd, tok.encode("5", add_special_tokens=False)]
    group = ScriptedGroup(tok, replies)
    with GatewayServer(group, tok) as gw:
        sid, base_url = gw.new_session()
        client = _client(base_url)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
        r1 = client.chat.completions.create(model="x", messages=messages, tools=TOOLS)
        assert r1.choices[0].finish_reason == "tool_calls"
        tc = r1.choices[0].message.tool_calls[0]
        assert (tc.function.name, json.loads(tc.function.arguments)) == ("python", {"code": "print(2+3)"})
        messages += [r1.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": tc.id, "content": "5"}]
        r2 = client.chat.completions.create(model="x", messages=messages, tools=TOOLS)
        assert r2.choices[0].message.content == "apples"
        messages += [{"role": "assistant", "content": "apples"}, {"role": "user", "content": "Numbers only."}]
        r3 = client.chat.completions.create(model="x", messages=messages, tools=TOOLS)
        assert r3.choices[0].message.content == "5"
        [sample] = gw.export(sid)
    renderer = ChatRenderer(tok)
    eos = tok.eos_token_id
    want = (renderer.opening_ids(messages[:2], TOOLS) + call + [eos]
            + renderer.observation_ids([{"role": "tool", "content": "5"}]) + odd + [eos]
            + renderer.observation_ids([{"role": "user", "content": "Numbers only."}])
            + tok.encode("5", add_special_tokens=False) + [eos])
    assert list(sample.token_ids) == want
    assert tok.encode(tok.decode(odd), add_special_tokens=False) != odd
    sampled = [t for t, m in zip(sample.token_ids, sample.loss_mask) if m]
    assert sampled == call + [eos] + odd + [eos] + tok.encode("5", add_special_tokens=False) + [eos]
    # Every prompt the engine saw is a prefix of the exported sequence.
    assert all(list(sample.token_ids[:len(p)]) == p for _, p, _ in group.calls)
    assert [lp for lp, m in zip(sample.logprobs, sample.loss_mask) if m][:2] == [-0.5, -1.5]
    assert {v for v, m in zip(sample.policy_versions, sample.loss_mask) if not m} == {NOT_SAMPLED}
    assert sample.versions_used == (3,) and sample.turns == 3 and sample.branch == 0


def test_malformed_tool_call_is_plain_content_and_counted(tool_tokenizer):
    tok = tool_tokenizer
    bad = '<tool_call>{"name": python}</tool_call>'
    group = ScriptedGroup(tok, [tok.encode(bad, add_special_tokens=False)])
    with GatewayServer(group, tok) as gw:
        r = _client(gw.url + "/v1").chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
        assert r.choices[0].message.content == bad and not r.choices[0].message.tool_calls
        assert httpx.get(gw.url + "/metrics").json()["gateway/malformed_tool_calls"] == 1


def test_reply_without_eos_is_closed_unsampled_and_tool_choice_none_parses_nothing(tool_tokenizer):
    tok = tool_tokenizer
    call = '<tool_call>{"name": "python", "arguments": {}}</tool_call>'
    first, second = tok.encode(call, add_special_tokens=False), tok.encode("9", add_special_tokens=False)
    group = ScriptedGroup(tok, [first, second], eos=False)
    with GatewayServer(group, tok) as gw:
        sid, base_url = gw.new_session()
        client = _client(base_url)
        messages = [{"role": "user", "content": "go"}]
        r = client.chat.completions.create(model="x", messages=messages, tools=TOOLS, tool_choice="none")
        assert r.choices[0].message.content == call and r.choices[0].finish_reason == "length"
        messages += [{"role": "assistant", "content": call}, {"role": "user", "content": "again"}]
        client.chat.completions.create(model="x", messages=messages, tools=TOOLS, tool_choice="none")
        [sample] = gw.export(sid)
    renderer = ChatRenderer(tok)
    obs = renderer.observation_ids([{"role": "user", "content": "again"}])
    # tool_choice="none": the tools are not rendered either, so the opening is the plain one.
    opening = renderer.opening_ids(messages[:1], [])
    assert list(sample.token_ids) == opening + first + [tok.eos_token_id] + obs + second
    assert list(sample.loss_mask) == [0] * len(opening) + [1] * len(first) + [0] * (1 + len(obs)) + [1] * len(second)


def test_rewritten_history_is_a_counted_branch(tool_tokenizer):
    tok = tool_tokenizer
    one, two = tok.encode("7", add_special_tokens=False), tok.encode("8", add_special_tokens=False)
    group = ScriptedGroup(tok, [one, two])
    with GatewayServer(group, tok) as gw:
        sid, base_url = gw.new_session()
        client = _client(base_url)
        messages = [{"role": "user", "content": "3+4?"}]
        client.chat.completions.create(model="x", messages=messages)
        # The agent edits the reply it got before sending the conversation back.
        edited = messages + [{"role": "assistant", "content": "seven"}, {"role": "user", "content": "sure?"}]
        client.chat.completions.create(model="x", messages=edited)
        first, second = gw.export(sid)
        assert httpx.get(gw.url + "/metrics").json()["gateway/branches"] == 1
    renderer = ChatRenderer(tok)
    assert list(first.token_ids) == renderer.opening_ids(messages, []) + one + [tok.eos_token_id]
    prefix = renderer.opening_ids(edited, [])
    assert list(second.token_ids) == prefix + two + [tok.eos_token_id]
    assert second.branch == 1 and list(second.loss_mask) == [0] * len(prefix) + [1] * (len(two) + 1)


def test_concurrent_sessions_stick_to_two_replicas(hf_gateway):
    gw, group = hf_gateway
    sessions = [gw.new_session() for _ in range(2)]
    group.calls.clear()
    errors = []

    def agent(base_url, question):
        try:
            client = _client(base_url)
            messages = [{"role": "user", "content": question}]
            for _ in range(2):
                r = client.chat.completions.create(model="x", messages=messages, max_tokens=6, tools=TOOLS)
                messages += [r.choices[0].message.model_dump(exclude_none=True),
                             {"role": "user", "content": "Go on."}]
        except Exception as exc:  # surfaced below, with the thread's error
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(url, q))
               for (_, url), q in zip(sessions, ["What is 4+4?", "What is 9+1?"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    replicas = set()
    for sid, _ in sessions:
        samples = gw.export(sid)
        # A tool-call reply may or may not parse; either way one branch of 2 turns.
        assert [s.turns for s in samples] == [2]
        s = samples[0]
        replicas.add(s.replica)
        mine = [(r, c) for r, p, c in group.calls if list(s.token_ids[:len(p)]) == p]
        assert {r for r, _ in mine} == {s.replica}
        assert [t for t, m in zip(s.token_ids, s.loss_mask) if m] == [t for _, c in mine for t in c.token_ids]
    assert replicas == {0, 1}


def test_bad_input_gets_openai_errors_and_the_gateway_keeps_serving(tool_tokenizer):
    tok = tool_tokenizer
    group = ScriptedGroup(tok, [tok.encode("1", add_special_tokens=False)] * 2)
    with GatewayServer(group, tok, GatewayConfig(max_context_tokens=64)) as gw:
        sid, base_url = gw.new_session()
        client = _client(base_url)
        raw = httpx.post(gw.url + "/v1/chat/completions", content=b"{not json",
                         headers={"content-type": "application/json"})
        assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "a"}], temperature=9)
        with pytest.raises(openai.BadRequestError, match="role"):
            client.chat.completions.create(model="x", messages=[{"role": "wizard", "content": "a"}])
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "a"}], tools=TOOLS,
                                           tool_choice="required")
        with pytest.raises(openai.NotFoundError, match="no session"):
            _client(gw.url + "/sessions/nope/v1").chat.completions.create(
                model="x", messages=[{"role": "user", "content": "a"}])
        with pytest.raises(openai.BadRequestError, match="context of 64") as err:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "a"}], max_tokens=64)
        assert err.value.code == "context_length_exceeded"
        # The session is untouched by the refused requests and still works.
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "a"}], max_tokens=4)
        assert r.choices[0].message.content == "1"
        assert [s.turns for s in gw.export(sid)] == [1]


def test_bearer_token(tool_tokenizer):
    tok = tool_tokenizer
    with pytest.raises(ConfigError, match="api_key"):
        GatewayConfig(host="0.0.0.0")
    group = ScriptedGroup(tok, [tok.encode("1", add_special_tokens=False)])
    with GatewayServer(group, tok, GatewayConfig(api_key="s3cret")) as gw:
        with pytest.raises(openai.AuthenticationError):
            _client(gw.url + "/v1", key="wrong").models.list()
        assert _client(gw.url + "/v1", key="s3cret").models.list().data[0].id == "rlpost-policy"
