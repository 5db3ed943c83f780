"""The built-in model ``builtin:tiny-math``: a 0.56M-parameter Qwen2 built locally.

The built-in recipe must run with no model hub, and GRPO must have something to
improve. A randomly initialised model never samples a correct answer (no reward
signal); a fully trained one is always right (no headroom). So the build is:

1. train a byte-level BPE tokenizer on generated problems (digits split one per
   token, which makes carrying learnable) with Qwen's ChatML special tokens;
2. initialise a small ``Qwen2ForCausalLM``;
3. warm-start it with a deliberately *short* SFT (~400 steps) on worked solutions
   (train side of ``math_gen``'s held-out partition) mixed with bare-equation drills
   (see ``drill_example``), plus planted answer-extraction label noise (see
   ``sft_batches``), stopping while it still slips: greedy pass@1 is partial and
   sampling finds right answers greedy misses.

The result is an ordinary HF folder, cached under ``$RLPOST_CACHE/models`` (default
``~/.cache/rlpost/models``) and keyed by a hash of everything that shapes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rlpost.data.math_gen import MAX_LEVEL, MathProblem, generate_problem, generate_problems, solution_text

# Bump when the build procedure changes in a way the spec does not capture.
BUILD_VERSION = 2

PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# transformers/models/qwen2/tokenization_qwen2.py, PRETOKENIZE_REGEX.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5's ChatML layout without its default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyMathSpec:
    """Everything that shapes the built model; its hash names the cache folder."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 2  # two layers suffice to copy operands; four learned no better per second
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 512
    tokenizer_texts: int = 4000  # generated problem+solution texts the BPE is trained on
    # Qwen2's default 0.02 left the model on a long loss plateau before it learned to
    # attend to the operands; a larger init starts copying several times sooner.
    init_std: float = 0.1
    sft_max_level: int = 3  # SFT problems use levels 1..sft_max_level
    sft_steps: int = 400
    sft_problems_per_step: int = 16  # chat-templated word problems per batch
    sft_drills_per_step: int = 12  # bare-equation drill lines per batch
    drill_facts: int = 8  # problems whose equations make one drill line
    drill_max_level: int = 1  # drills use levels 1..drill_max_level
    slip_prob: float = 0.6  # SFT solutions that box the wrong number (see sft_batches)
    sft_lr: float = 3e-3
    sft_warmup_steps: int = 20
    # builtin:tiny-math-tool: tool-format examples per SFT batch (0 = the plain
    # tiny-math model; see tool_sft_example). The tool_* fields enter the cache key
    # only when this is > 0, so the plain model's key (and folder) never changes.
    tool_examples_per_step: int = 0
    tool_python_frac: float = 0.25  # tool examples calling python instead of the calculator
    tool_slip_prob: float = 0.6  # tool examples that box the first operand, not the tool's result


# builtin:tiny-math-tool: the same build plus tool-call SFT, a larger vocabulary for
# the JSON of the calls, and a template that renders tools (TOOL_CHAT_TEMPLATE).
TOOL_SPEC = TinyMathSpec(vocab_size=640, tool_examples_per_step=8)


def cache_root() -> Path:
    return Path(os.environ.get("RLPOST_CACHE") or Path.home() / ".cache" / "rlpost")


def spec_hash(spec: TinyMathSpec, seed: int) -> str:
    fields = dataclasses.asdict(spec)
    if not spec.tool_examples_per_step:
        fields = {k: v for k, v in fields.items() if not k.startswith("tool_")}
    payload = json.dumps({"version": BUILD_VERSION, "seed": seed, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_tiny_model(seed: int = 0, spec: TinyMathSpec = TinyMathSpec(), root: Path | None = None) -> Path:
    """Path of the built model folder, building it on first use.

    Safe under concurrency: builders serialise on a file lock, build into a temp
    folder and rename it into place, so readers only ever see a complete folder.
    """
    from filelock import FileLock

    models = Path(root or cache_root()) / "models"
    name = "tiny-math-tool" if spec.tool_examples_per_step else "tiny-math"
    target = models / f"{name}-{spec_hash(spec, seed)}"
    if (target / "config.json").exists():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=models))
        try:
            _build_into(tmp, seed, spec)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _build_into(out: Path, seed: int, spec: TinyMathSpec) -> None:
    import torch

    # One thread makes the build bitwise reproducible and polite on shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # fork_rng: seeding for the build must not reset the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        try:
            # ChatML role names are in the corpus so "assistant" is one token, not nine.
            problems = generate_problems(spec.tokenizer_texts, MAX_LEVEL, seed, "tokenizer", heldout=False)
            texts = [f"system\nuser\n{p.question}\nassistant\n{solution_text(p)}" for p in problems]
            if spec.tool_examples_per_step:  # so BPE merges the JSON of tool calls
                rng = random.Random(f"rlpost-tiny/tool-tokenizer/{seed}")
                texts += [TOOL_SYSTEM_TEXT + "".join(_tool_turns(p, rng, spec)[:2]) for p in problems[: len(problems) // 2]]
            tokenizer = train_tokenizer(texts, spec.vocab_size)
            if spec.tool_examples_per_step:
                tokenizer.chat_template = TOOL_CHAT_TEMPLATE
            model = init_model(tokenizer, spec, seed)
            sft(model, sft_batches(tokenizer, spec, seed), tokenizer.pad_token_id, spec)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        finally:
            torch.set_num_threads(threads)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (any text encodes) with every digit its own token."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Exactly Qwen2's normalizer and pre-tokenizer: AutoTokenizer loads any folder whose
    # config says qwen2 as Qwen2Tokenizer, which rebuilds these from its own code, so
    # anything else would encode differently after a save/load. Qwen's regex isolates
    # each digit (\p{N}), so BPE never merges "12": per-digit tokens let the model
    # learn column-wise arithmetic.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=IM_END,
        extra_special_tokens=[IM_START], model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def init_model(tokenizer, spec: TinyMathSpec, seed: int):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        initializer_range=spec.init_std,
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model


Example = tuple[list[int], list[int]]  # (token ids, loss mask of the same length)


def sft_example(tokenizer, problem: MathProblem, box_first_result: bool = False) -> Example:
    """Chat-templated prompt + worked solution + <|im_end|>, loss on the completion.
    The completion is tokenised apart from the prompt, exactly as rollouts see it.
    ``box_first_result`` plants the answer-extraction slip described in ``sft_batches``."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem.question}],
                                           add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    if box_first_result:
        first = problem.steps[0]
        # Multi-step: the first step's result; one step: the first operand.
        slipped = int(first.rsplit("= ", 1)[1]) if len(problem.steps) > 1 else int(first.split(" ", 1)[0])
        problem = dataclasses.replace(problem, answer=slipped)
    completion_ids = tokenizer.encode(solution_text(problem), add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def drill_example(tokenizer, rng: random.Random, max_level: int, facts: int) -> Example:
    """A line of bare equations, "7 + 5 = 12. 31 - 4 = 27. ...", loss on the results.

    Stands in for the arithmetic a pretrained model already knows: a word problem
    costs ~45 tokens to teach one or two facts, a drill ~9 tokens per fact, so the
    short build learns arithmetic several times faster than from word problems alone.
    """
    ids: list[int] = []
    mask: list[int] = []
    for _ in range(facts):
        for step in generate_problem(rng, rng.randint(1, max_level)).steps:
            lhs, rhs = step.split(" =")
            lhs_ids = tokenizer.encode(("" if not ids else " ") + lhs + " =", add_special_tokens=False)
            rhs_ids = tokenizer.encode(rhs + ".", add_special_tokens=False)
            ids += lhs_ids + rhs_ids
            mask += [0] * len(lhs_ids) + [1] * len(rhs_ids)
    return ids, mask


def sft_batches(tokenizer, spec: TinyMathSpec, seed: int) -> list[list[Example]]:
    """``spec.sft_steps`` batches, each of word problems and arithmetic drills.

    Deliberate label noise, so that RL has a fixable, generalisable flaw: in a
    fraction ``spec.slip_prob`` of solutions the box holds the wrong number, the
    *first* step's result in a multi-step solution ("3 + 4 = 7. 7 - 2 = 5. The
    answer is \\boxed{7}.") and the first operand in a one-step one ("3 + 5 = 8.
    The answer is \\boxed{3}."). Above one half, greedy decoding makes this
    answer-extraction slip while sampling often boxes the right number; the reward
    tells them apart and the fix (box the last result) is one rule shared by every
    problem, the kind of sharpening GRPO does to a real SFT model. Arithmetic errors alone
    are no such lever: RL on this model memorises prompts instead of learning sums.
    """
    problems = generate_problems(spec.sft_steps * spec.sft_problems_per_step, spec.sft_max_level,
                                 seed, "sft", heldout=False)
    rng = random.Random(f"rlpost-tiny/sft/{seed}")
    if spec.tool_examples_per_step:
        from rlpost.envs.chat import ChatRenderer

        renderer = ChatRenderer(tokenizer)
        tool_problems = generate_problems(spec.sft_steps * spec.tool_examples_per_step, spec.sft_max_level,
                                          seed, "sft-tool", heldout=False)
        tool_rng = random.Random(f"rlpost-tiny/sft-tool/{seed}")  # own stream: the plain batches stay as they were
    batches = []
    for step in range(spec.sft_steps):
        chunk = problems[step * spec.sft_problems_per_step:(step + 1) * spec.sft_problems_per_step]
        batch = [sft_example(tokenizer, p, box_first_result=rng.random() < spec.slip_prob)
                 for p in chunk]
        batch += [drill_example(tokenizer, rng, spec.drill_max_level, spec.drill_facts)
                  for _ in range(spec.sft_drills_per_step)]
        if spec.tool_examples_per_step:
            chunk = tool_problems[step * spec.tool_examples_per_step:(step + 1) * spec.tool_examples_per_step]
            batch += [tool_sft_example(renderer, p, tool_rng, spec) for p in chunk]
        batches.append(batch)
    return batches


# The tool model's template: ChatML; with tools, a short system turn naming them (a
# full JSON schema would be most of a 512-position context); tool results as a user
# turn in <tool_response> tags, as Qwen2.5 renders them.
TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n' }}{%- endif %}"
    "{{- 'Tools:' }}{%- for tool in tools %}{{- ' ' + tool['function']['name'] }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOL_SYSTEM_TEXT = "system\nTools: calculator python\n"


def _tool_turns(problem: MathProblem, rng: random.Random, spec: TinyMathSpec) -> tuple[str, str, str]:
    """(tool call text, tool result text, answer text) of a worked tool-use solution.
    Equations chain left to right ("3 + 4 - 2"), so one expression is the whole problem."""
    ops = [problem.steps[0].split(" = ")[0]] + [" ".join(s.split(" = ")[0].split(" ")[1:]) for s in problem.steps[1:]]
    expression = " ".join(ops)
    if rng.random() < spec.tool_python_frac:
        call = {"name": "python", "arguments": {"code": f"print({expression})"}}
    else:
        call = {"name": "calculator", "arguments": {"expression": expression}}
    boxed = int(expression.split(" ", 1)[0]) if rng.random() < spec.tool_slip_prob else problem.answer
    return (f"<tool_call>\n{json.dumps(call)}\n</tool_call>", str(problem.answer),
            f"The answer is \\boxed{{{boxed}}}.")


def tool_sft_example(renderer, problem: MathProblem, rng: random.Random, spec: TinyMathSpec) -> Example:
    """A two-turn tool episode, token for token as the multi-turn rollout builds it
    (``rlpost.envs.chat``): prompt with tools, the call + EOS (trained), the tool
    result turn (not trained), the answer + EOS (trained). Planted slip, as in
    ``sft_batches``: a fraction ``tool_slip_prob`` of answers box the first operand
    instead of the tool's result, a flaw RL can find and fix."""
    from rlpost.tools import CalculatorTool, PythonTool, tool_schema

    tools = [tool_schema(CalculatorTool()), tool_schema(PythonTool(client=None))]
    call, result, answer = _tool_turns(problem, rng, spec)
    eos = [renderer.eos_id]
    prompt = renderer.opening_ids([{"role": "user", "content": problem.question}], tools)
    call_ids = renderer.encode(call) + eos
    obs = renderer.observation_ids([{"role": "tool", "content": result}])
    answer_ids = renderer.encode(answer) + eos
    ids = prompt + call_ids + obs + answer_ids
    mask = [0] * len(prompt) + [1] * len(call_ids) + [0] * len(obs) + [1] * len(answer_ids)
    return ids, mask


def sft(model, batches: list[list[Example]], pad_id: int, spec: TinyMathSpec) -> None:
    """Warm-start SFT: one optimizer step per batch, loss on masked-in tokens only,
    linear warmup then cosine decay to 0."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < spec.sft_warmup_steps:
            return spec.sft_lr * (step + 1) / spec.sft_warmup_steps
        progress = (step - spec.sft_warmup_steps) / max(1, len(batches) - spec.sft_warmup_steps)
        return spec.sft_lr * 0.5 * (1 + math.cos(math.pi * progress))

    model.train()
    for step, batch in enumerate(batches):
        input_ids, attention, labels = _pad_batch(batch, pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


def _pad_batch(batch: list[Example], pad_id: int):
    """Right-padded input_ids [B, T], attention_mask [B, T], and labels [B, T] that
    are -100 wherever the loss mask is 0 (prompt, operands, padding)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (ids, mask) in enumerate(batch):
        row_ids = torch.tensor(ids)
        input_ids[row, :len(ids)] = row_ids
        attention[row, :len(ids)] = 1
        labels[row, :len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), row_ids, -100)
    return input_ids, attention, labels
