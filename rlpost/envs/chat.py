"""Chat-template rendering for multi-turn episodes, on token ids end to end.

The rollout loop never re-tokenises what came before: an episode's sequence is

    opening_ids(messages, tools)            the prompt, rendered and tokenised once
    + sampled ids of model turn 1           exactly as the sampler returned them
    + observation_ids(observation 1)        the template's end-of-turn, the tool/user
                                            turn and the next generation prompt,
                                            rendered and tokenised alone
    + sampled ids of model turn 2 ...

``observation_ids`` finds the template text that follows an assistant turn by
rendering a fixed dummy conversation with and without the observation and taking
the difference. That works for any template that closes an assistant turn with
``content + eos_token`` (ChatML/Qwen, the built-in tiny model) and needs no
per-template code. The ids of the observation may differ from what tokenising the
whole conversation in one go would give at the seam (BPE merges across turn
boundaries); that is deliberate: the model is trained on the ids it was conditioned on.
"""

from __future__ import annotations

import json

from rlpost.envs.base import Message
from rlpost.errors import ConfigError

_DUMMY_USER, _DUMMY_REPLY = "q", "a"


def tools_system_text(tools: list[dict]) -> str:
    """Tool declarations for templates that do not render ``tools=`` themselves:
    Qwen2.5's wording, one JSON schema a line, and the call format."""
    lines = "\n".join(json.dumps(t, separators=(",", ":")) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>")


class ChatRenderer:
    """Turns opening messages and observations into token ids with ``tokenizer``'s
    chat template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        template = tokenizer.chat_template or ""
        if not isinstance(template, str):
            raise ConfigError("multi-turn rollouts need a single chat template string on the tokenizer")
        # Templates that mention `tools` render the schemas themselves (Qwen2.5/3 do).
        self.template_renders_tools = "tools" in template
        eos = tokenizer.eos_token
        if not eos:
            raise ConfigError("multi-turn rollouts need a tokenizer with an EOS token (it ends each model turn)")
        self.eos_id = tokenizer.convert_tokens_to_ids(eos)
        reference = self._render([{"role": "user", "content": _DUMMY_USER},
                                  {"role": "assistant", "content": _DUMMY_REPLY}], False)
        marker = _DUMMY_REPLY + eos
        at = reference.rfind(marker)
        if at < 0:
            raise ConfigError(f"the chat template does not end an assistant turn with its content followed by "
                              f"the EOS token {eos!r}; multi-turn rollouts cannot tell where a turn ends")
        self._cut = at + len(marker)
        self._reference = reference

    def _render(self, messages: list[Message], generation_prompt: bool, tools: list[dict] | None = None) -> str:
        kwargs = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt,
                                                  tokenize=False, **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def opening_ids(self, messages: list[Message], tools: list[dict]) -> list[int]:
        """The first prompt: messages (and tool schemas) + the generation prompt."""
        messages = list(messages)
        if tools and not self.template_renders_tools:
            text = tools_system_text(tools)
            if messages and messages[0]["role"] == "system":
                messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + text}
            else:
                messages.insert(0, {"role": "system", "content": text})
            tools = []
        return self.encode(self._render(messages, True, tools))

    def observation_text(self, observation: list[Message]) -> str:
        """Template text after a model turn's EOS: the observation's turns and the next
        generation prompt."""
        full = self._render([{"role": "user", "content": _DUMMY_USER},
                             {"role": "assistant", "content": _DUMMY_REPLY}, *observation], True)
        if full[: self._cut] != self._reference[: self._cut]:
            raise ConfigError("the chat template renders earlier turns differently once later turns are added "
                              "(e.g. it strips reasoning from past turns); multi-turn rollouts need a template "
                              "whose past turns are stable")
        return full[self._cut:]

    def observation_ids(self, observation: list[Message]) -> list[int]:
        return self.encode(self.observation_text(observation))
