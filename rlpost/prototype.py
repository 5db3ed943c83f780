"""Reward prototyping: sample completions from a model and score them with candidate
reward functions, in a notebook, with the same pieces training uses.

    prompts = load_math_prompts("val", limit=8)
    samples = sample_completions("builtin:tiny-math", prompts, n=4)
    table = score_table(samples, {"math": math_reward, "mine": my_reward})
    view(table)

Same as training: completions come from the rollout engine training would pick
(``rollout.engine=auto``: vLLM or the HF engine, by what is installed, the device and the
model's size; or the one named by ``engine=``) on the chat-templated prompt, and scores from
``rlpost.rewards.score_batch`` with the training per-sample timeout, so an exception,
timeout or bad return value shows up here exactly as it would count in a run (an
error, excluded from group statistics). A reward function that works here is used
in training by naming it: ``reward.fn=my_rewards.py:my_reward`` (see ``reward_spec``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from rlpost.config.schema import DataConfig, RewardConfig
from rlpost.rewards.api import load_reward_fn, score_batch
from rlpost.rewards.math import extract_answer
from rlpost.types import PromptSample, SamplingParams


@dataclass(frozen=True)
class Sample:
    """One sampled completion of one prompt, with what a reward function is given."""

    prompt: str  # the raw question: the reward function's ``prompt`` argument
    completion: str
    answer: str  # ground truth
    metadata: dict = field(default_factory=dict)
    uid: str = ""  # the prompt's dataset id
    sample_index: int = 0  # which of the n samples of this prompt
    finish_reason: str = ""  # "stop" | "length" (hit max_new_tokens)
    num_tokens: int = 0


# Most tokens of prompt + completion vLLM is sized for (its max_model_len), within the
# model's own limit; the HF engine has none.
_MAX_MODEL_TOKENS = 2048


@lru_cache(maxsize=2)
def _engine(model: str, dtype: str, seed: int, engine: str = "auto"):
    """The engine ``rollout.engine=<engine>`` gives training for this model, resolved
    the same way (``rlpost.engines.resolve_rollout_engine``), on this machine."""
    from transformers import AutoConfig

    from rlpost.config.load import load_config
    from rlpost.engines import make_rollout_engine, resolve_rollout_engine
    from rlpost.models.loading import resolve_model_path

    path = resolve_model_path(model, seed=seed)
    name = resolve_rollout_engine(engine, path)
    limit = min(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None) or _MAX_MODEL_TOKENS,
                _MAX_MODEL_TOKENS)
    cfg = load_config([f"model.dtype={dtype}", f"rollout.engine={name}", f"data.max_prompt_tokens={limit // 2}",
                       f"rollout.max_new_tokens={limit - limit // 2}"])
    return make_rollout_engine(cfg, path, seed)


def load_math_prompts(split: str = "val", limit: int | None = 8, model: str = "builtin:tiny-math",
                      data: DataConfig | None = None, seed: int = 0) -> list[PromptSample]:
    """Prompts as training sees them (``rlpost.data.load_prompts``): the built-in math
    problems by default, or ``data`` (e.g. ``DataConfig(source="files", ...)``),
    templated with ``model``'s tokenizer."""
    from rlpost.data.dataset import load_prompts
    from rlpost.train import cache_root

    samples, _ = load_prompts(data or DataConfig(), _engine(model, "float32", seed).tokenizer, split, seed,
                              cache_root() / "data")
    return samples[:limit] if limit is not None else samples


def sample_completions(model: str = "builtin:tiny-math", prompts: Sequence[PromptSample | str | Mapping] = (),
                       n: int = 4, temperature: float = 1.0, max_new_tokens: int = 48, top_p: float = 1.0,
                       top_k: int = -1, stop: Sequence[str] = (), seed: int = 0,
                       dtype: str = "float32", engine: str = "auto") -> list[Sample]:
    """``n`` completions per prompt from ``model`` (anything ``model.path`` accepts).

    ``prompts`` are ``PromptSample``s (``load_math_prompts``), plain question strings
    (no ground truth), or dicts with ``prompt`` and ``answer`` keys; strings and dicts
    are chat-templated as the data loader does. The engine is loaded once per
    (model, dtype, seed, engine) and reused by later calls; ``seed`` also fixes the draw.
    ``engine`` is ``rollout.engine``: ``auto`` (what training picks), ``vllm`` or ``hf``."""
    from rlpost.data.dataset import template_prompt

    rollout = _engine(model, dtype, seed, engine)
    rows = [_as_prompt_sample(p, i, rollout.tokenizer, template_prompt) for i, p in enumerate(prompts)]
    if not rows:
        raise ValueError("sample_completions needs at least one prompt (see load_math_prompts)")
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                            max_new_tokens=max_new_tokens, stop=tuple(stop), seed=seed)
    groups = rollout.generate([list(p.prompt_ids) for p in rows], params)
    return [Sample(prompt=p.question, completion=c.text, answer=p.answer, metadata=dict(p.metadata), uid=p.uid,
                   sample_index=k, finish_reason=c.finish_reason, num_tokens=len(c.token_ids))
            for p, group in zip(rows, groups) for k, c in enumerate(group)]


def _as_prompt_sample(prompt, index: int, tokenizer, template) -> PromptSample:
    if isinstance(prompt, PromptSample):
        return prompt
    if isinstance(prompt, str):
        question, answer, metadata = prompt, "", {}
    elif isinstance(prompt, Mapping) and "prompt" in prompt:
        question, answer = str(prompt["prompt"]), str(prompt.get("answer", ""))
        metadata = {k: v for k, v in prompt.items() if k not in ("prompt", "answer")}
    else:
        raise TypeError(f"prompt {index} must be a PromptSample, a string, or a dict with 'prompt' "
                        f"(and 'answer'); got {type(prompt).__name__}")
    ids = template(tokenizer, [{"role": "user", "content": question}])
    return PromptSample(uid=f"prompt-{index}", prompt_ids=tuple(ids), question=question, answer=answer,
                        metadata=metadata)


def score_table(samples: Sequence[Sample | Mapping], reward_fns: Mapping[str, Callable | str] | Callable | str,
                timeout_s: float = RewardConfig.timeout_s, kwargs: Mapping[str, Mapping] | None = None):
    """A ``pandas.DataFrame`` with one row per sample: ``prompt``, ``completion``,
    ``answer``, ``parsed`` (``extract_answer`` of the completion, None when it states
    no answer), then per reward function ``<name>`` (total), ``<name>/<component>``
    and ``<name>/error``.

    ``reward_fns`` is one function, a ``"module:function"`` spec, or a dict of them by
    name; ``kwargs`` maps a name to that function's ``reward.kwargs``. Each is scored
    with ``score_batch`` under ``timeout_s`` per sample, as in training."""
    import pandas as pd

    fns = _named_fns(reward_fns)
    kwargs = dict(kwargs or {})
    unknown = set(kwargs) - set(fns)
    if unknown:
        raise ValueError(f"kwargs given for {sorted(unknown)}, which are not among the reward functions {list(fns)}")
    items = [_reward_input(s) for s in samples]
    frame = pd.DataFrame({
        "prompt": [i[0] for i in items], "completion": [i[1] for i in items], "answer": [i[2] for i in items],
        "parsed": [extract_answer(i[1]) for i in items],
    })
    for name, fn in fns.items():
        fn = load_reward_fn(fn, kwargs.get(name, {})) if isinstance(fn, str) else fn
        rewards = score_batch(fn, items, timeout_s, kwargs.get(name))
        frame[name] = [r.total for r in rewards]
        for component in sorted({c for r in rewards for c in r.components}):
            frame[f"{name}/{component}"] = [r.components.get(component, math.nan) for r in rewards]
        frame[f"{name}/error"] = [r.error for r in rewards]
    frame.attrs["reward_fns"] = list(fns)
    return frame


def _named_fns(reward_fns) -> dict[str, Callable | str]:
    if isinstance(reward_fns, Mapping):
        if not reward_fns:
            raise ValueError("reward_fns is empty: pass a reward function or a dict of them by name")
        return dict(reward_fns)
    if isinstance(reward_fns, str):
        return {reward_fns.rpartition(":")[2]: reward_fns}
    if callable(reward_fns):
        return {getattr(reward_fns, "__name__", "reward"): reward_fns}
    raise TypeError(f"reward_fns must be a function, a 'module:function' string or a dict of them; "
                    f"got {type(reward_fns).__name__}")


def _reward_input(sample) -> tuple[str, str, str, dict]:
    if isinstance(sample, Sample):
        return sample.prompt, sample.completion, sample.answer, dict(sample.metadata)
    if isinstance(sample, Mapping):
        return (str(sample.get("prompt", "")), str(sample["completion"]), str(sample.get("answer", "")),
                dict(sample.get("metadata") or {}))
    raise TypeError(f"samples must be Sample objects or dicts with 'completion'; got {type(sample).__name__}")


def summarize(table) -> Any:
    """One row per reward column of a ``score_table`` (each function's total and its
    components): mean, std, share of samples where it is non-zero, and the share of
    samples on which that function errored."""
    import pandas as pd

    rows = {}
    for name in table.attrs.get("reward_fns", []):
        errors = table[f"{name}/error"].notna().mean()
        for col in [c for c in table.columns if c == name or (c.startswith(f"{name}/") and c != f"{name}/error")]:
            rows[col] = {"mean": table[col].mean(), "std": table[col].std(), "nonzero": (table[col] != 0).mean(),
                         "error_rate": errors}
    return pd.DataFrame.from_dict(rows, orient="index")


class TableView:
    """HTML view of a ``score_table`` for notebooks: long text wraps instead of being
    cut, reward cells are shaded by value, and errors are shown in red."""

    def __init__(self, table, max_rows: int = 40, max_chars: int = 400):
        self.table, self.max_rows, self.max_chars = table, max_rows, max_chars

    def _cell(self, column: str, value) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "<td></td>"
            shade = max(0.0, min(1.0, value))
            style = f' style="background:rgba(46,160,67,{0.45 * shade:.2f})"' if column not in ("answer",) else ""
            return f"<td{style}>{value:.3g}</td>"
        if column.endswith("/error"):
            return f'<td style="color:#b42318">{html.escape(str(value))}</td>' if value else "<td></td>"
        text = "" if value is None else str(value)
        text = text if len(text) <= self.max_chars else text[:self.max_chars] + "…"
        return f'<td style="white-space:pre-wrap;text-align:left;font-family:monospace">{html.escape(text)}</td>'

    def _repr_html_(self) -> str:
        columns = list(self.table.columns)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(self._cell(c, row[c]) for c in columns) + "</tr>"
                       for _, row in self.table.head(self.max_rows).iterrows())
        more = (f"<p>{len(self.table) - self.max_rows} more rows not shown</p>"
                if len(self.table) > self.max_rows else "")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def view(table, max_rows: int = 40, max_chars: int = 400) -> TableView:
    return TableView(table, max_rows, max_chars)


def reward_spec(fn: Callable, path: str | None = None) -> str:
    """The ``reward.fn`` value that loads ``fn`` in training, checked by loading it:
    ``"module:function"`` for an importable module, or ``"<path>:function"`` when
    ``path`` (the .py file that defines it) is given. A function defined in a notebook
    cell lives in ``__main__`` and cannot be loaded by a training process: put it in a
    file (e.g. with ``%%writefile my_rewards.py``) and import it from there."""
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", None))
    if path is not None:
        spec = f"{path}:{name}"
    elif module in (None, "__main__") or (module or "").startswith("rlpost_reward_"):
        raise ValueError(f"{name!r} is defined in {module or 'no module'}, which a training run cannot import; "
                         f"move it into a .py file and pass path= (or import it from a module)")
    else:
        spec = f"{module}:{name}"
    loaded = load_reward_fn(spec)
    if getattr(loaded, "__code__", None) is not getattr(fn, "__code__", None) and loaded is not fn:
        raise ValueError(f"{spec!r} loads a different function than the one given; check the path")
    return spec
