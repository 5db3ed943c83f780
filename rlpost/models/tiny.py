"""The built-in model ``builtin:tiny-math``: a ~1M-parameter Qwen2 built locally.

The built-in recipe must run with no model hub, and GRPO must have something to
improve. A randomly initialised model never samples a correct answer (no reward
signal); a fully trained one is always right (no headroom). So the build is:

1. train a byte-level BPE tokenizer on generated problems (digits split one per
   token, which makes carrying learnable) with Qwen's ChatML special tokens;
2. initialise a small ``Qwen2ForCausalLM``;
3. warm-start it with a deliberately *short* SFT on worked solutions (train side of
   ``math_gen``'s held-out partition), stopping while it still makes arithmetic
   slips: greedy pass@1 is partial and sampling finds right answers greedy misses.

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

from rlpost.data.math_gen import MathProblem, generate_problems, solution_text

# Bump when the build procedure changes in a way the spec does not capture.
BUILD_VERSION = 1

PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

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
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 512
    tokenizer_texts: int = 4000  # generated problem+solution texts the BPE is trained on
    sft_max_level: int = 3  # SFT problems use levels 1..sft_max_level
    sft_steps: int = 200
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    sft_warmup_steps: int = 20


def cache_root() -> Path:
    return Path(os.environ.get("RLPOST_CACHE") or Path.home() / ".cache" / "rlpost")


def spec_hash(spec: TinyMathSpec, seed: int) -> str:
    payload = json.dumps({"version": BUILD_VERSION, "seed": seed, **dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_tiny_model(seed: int = 0, spec: TinyMathSpec = TinyMathSpec(), root: Path | None = None) -> Path:
    """Path of the built model folder, building it on first use.

    Safe under concurrency: builders serialise on a file lock, build into a temp
    folder and rename it into place, so readers only ever see a complete folder.
    """
    from filelock import FileLock

    models = Path(root or cache_root()) / "models"
    target = models / f"tiny-math-{spec_hash(spec, seed)}"
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
    try:
        texts = [f"{p.question}\n{solution_text(p)}"
                 for p in generate_problems(spec.tokenizer_texts, 5, seed, "tokenizer", heldout=False)]
        tokenizer = train_tokenizer(texts, spec.vocab_size)
        model = init_model(tokenizer, spec, seed)
        problems = generate_problems(spec.sft_steps * spec.sft_batch_size, spec.sft_max_level, seed, "sft", heldout=False)
        sft(model, tokenizer, problems, spec, seed)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        torch.set_num_threads(threads)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (any text encodes) with every digit its own token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits split first so BPE can never merge "12" into one token: per-digit
    # tokens let the model learn column-wise arithmetic.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
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


def sft_example(tokenizer, problem: MathProblem) -> tuple[list[int], int]:
    """(prompt + completion ids, prompt length). The completion ends with <|im_end|>,
    and is tokenised apart from the prompt, exactly as rollouts see it."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem.question}],
                                           add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    completion_ids = tokenizer.encode(solution_text(problem), add_special_tokens=False)
    return prompt_ids + completion_ids + [tokenizer.eos_token_id], len(prompt_ids)


def sft(model, tokenizer, problems: list[MathProblem], spec: TinyMathSpec, seed: int) -> None:
    """Warm-start SFT, loss on completion tokens only; one pass over ``problems``
    in batches of ``spec.sft_batch_size``, linear warmup then cosine decay."""
    import torch

    examples = [sft_example(tokenizer, p) for p in problems]
    random.Random(seed).shuffle(examples)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < spec.sft_warmup_steps:
            return spec.sft_lr * (step + 1) / spec.sft_warmup_steps
        progress = (step - spec.sft_warmup_steps) / max(1, spec.sft_steps - spec.sft_warmup_steps)
        return spec.sft_lr * 0.5 * (1 + math.cos(math.pi * progress))

    model.train()
    for step in range(spec.sft_steps):
        batch = examples[step * spec.sft_batch_size:(step + 1) * spec.sft_batch_size]
        input_ids, attention, labels = _pad_batch(batch, tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


def _pad_batch(batch: list[tuple[list[int], int]], pad_id: int):
    """Right-padded input_ids [B, T], attention_mask [B, T], labels [B, T] with -100
    on prompt and padding so the loss covers only completions."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, attention, labels
