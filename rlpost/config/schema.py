"""Typed configuration. Hydra composes YAML; ``rlpost.config.load`` converts the
result into these dataclasses once and validates it. Past that point code reads
attributes, never ``cfg.get(key, default)``.

Each section's ``check()`` raises ``ConfigError`` naming the key and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlpost.errors import ConfigError


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


_STRATEGIES = ("pack", "spread", "strict_pack", "strict_spread")


def _check_gpus(value: int | float | str, key: str) -> None:
    """``auto`` (GPUs when the Ray cluster has any; rlpost.workers.placement resolves it
    once the cluster is up) or a number of GPUs, fractional for sharing one."""
    if isinstance(value, str):
        _require(value == "auto", key, f"must be auto or a number of GPUs (0 = CPU), got {value!r}")
    else:
        _require(value >= 0, key, f"must be auto or a number >= 0, got {value}")


def _check_resources(value: dict | None, key: str) -> None:
    """Extra Ray custom resources per actor, e.g. ``{node_a: 1}`` to pin a group to the
    nodes started with ``ray start --resources='{"node_a": 8}'``."""
    if value is None:
        return
    for name, amount in value.items():
        _require(str(name) not in ("CPU", "GPU", "memory", "object_store_memory"), key,
                 f"names custom resources only; CPU and GPU come from the gpus_per_* keys, got {name!r}")
        _require(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0, key,
                 f"amounts must be numbers > 0, got {name}: {amount!r}")


@dataclass
class LoraConfig:
    rank: int = 0  # > 0 trains LoRA adapters (peft) of this rank instead of the full model
    alpha: float = 16.0  # adapter output scaled by alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def check(self) -> None:
        _require(self.rank >= 0, "model.lora.rank", f"must be >= 0 (0 = full fine-tuning), got {self.rank}")
        _require(self.alpha > 0, "model.lora.alpha", "must be > 0")
        _require(0 <= self.dropout < 1, "model.lora.dropout", "must be in [0, 1)")
        _require(self.rank == 0 or bool(self.target_modules), "model.lora.target_modules", "must name at least one module")


@dataclass
class ModelConfig:
    # "builtin:tiny-math" builds the tiny Qwen2 model locally; otherwise a local HF
    # folder or a hub id.
    path: str = "builtin:tiny-math"
    dtype: str = "float32"  # float32 | bfloat16: parameter dtype of trainer and rollout
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)

    def check(self) -> None:
        self.lora.check()
        _require(bool(self.path), "model.path", "must name a model (a local folder, a hub id, or builtin:tiny-math)")
        _require(self.dtype in ("float32", "bfloat16"), "model.dtype", f"must be float32 or bfloat16, got {self.dtype!r}")


@dataclass
class DataConfig:
    # "builtin" generates math word problems of graded difficulty; "files" reads
    # train_files / val_files (parquet or jsonl); "hf" reads hf_dataset (rlpost.data.sources).
    source: str = "builtin"
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    train_batch_size: int = 16  # prompts per step; each is sampled rollout.n times
    max_prompt_tokens: int = 256  # longer prompts are dropped and counted
    system_prompt: str | None = None
    shuffle: bool = True
    builtin_train_size: int = 4000
    builtin_val_size: int = 200
    builtin_max_level: int = 3  # highest difficulty level of generated problems
    # source=generator: "module:fn" or "path.py:fn", fn(split, size, seed) -> rows
    # ({prompt, answer, ...}); sizes are builtin_train_size / builtin_val_size.
    generator: str | None = None
    # source=hf: a hub id (openai/gsm8k) or a local dataset folder, loaded with
    # datasets.load_dataset (load_from_disk for a save_to_disk folder); its config
    # name, the split trained on, and the split evaluated on (null: no val split).
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_val_split: str | None = None
    # "module:fn" or "path.py:fn", fn(row) -> {prompt, answer, ...} or None (malformed);
    # with it, prompt_key/answer_key are not used. Any source but builtin/generator.
    row_fn: str | None = None

    def check(self) -> None:
        _require(self.source in ("builtin", "files", "generator", "hf"), "data.source",
                 f"must be builtin, files, generator or hf, got {self.source!r}")
        if self.source == "hf":
            _require(bool(self.hf_dataset), "data.hf_dataset",
                     "data.source=hf needs data.hf_dataset=ID (e.g. openai/gsm8k) or a local dataset folder")
            _require(bool(self.hf_split), "data.hf_split", "must name the split to train on, e.g. train")
        else:
            _require(self.hf_dataset is None, "data.hf_dataset",
                     f"is read only with data.source=hf (now {self.source}); add data.source=hf")
        _require(self.row_fn is None or ":" in self.row_fn, "data.row_fn",
                 f"must look like 'module:fn' or 'path.py:fn', got {self.row_fn!r}")
        _require(self.row_fn is None or self.source in ("files", "hf"), "data.row_fn",
                 f"maps rows of data.source=files or hf, not {self.source}")
        if self.source == "generator":
            _require(bool(self.generator) and ":" in self.generator, "data.generator",
                     "data.source=generator needs data.generator='module:fn' or 'path.py:fn'")
        if self.source == "files":
            _require(bool(self.train_files), "data.train_files", "data.source=files needs at least one file")
        _require(self.train_batch_size >= 1, "data.train_batch_size", f"must be >= 1, got {self.train_batch_size}")
        _require(self.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
        _require(self.builtin_train_size >= 1 and self.builtin_val_size >= 1, "data.builtin_*_size", "must be >= 1")


@dataclass
class RolloutConfig:
    engine: str = "auto"  # auto (vllm if installed, else hf) | hf | vllm | fake
    replicas: int = 1
    n: int = 4  # samples per prompt (the GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    batch_size: int = 256  # sequences one engine call generates at once (hf)
    threads: int = 0  # math threads per replica; 0 = auto (rlpost.threads: the free cores in sync mode)
    # vllm only:
    kv_cache_gb: float = 1.0  # KV cache size per replica; 0 = from gpu_memory_utilization (GPU)
    gpu_memory_utilization: float = 0.5  # fraction of GPU memory vLLM may take when kv_cache_gb is 0
    enforce_eager: bool = True  # no CUDA graphs / torch.compile: fast start, slower decode on GPU
    # GPU only: replica i shares GPU i with trainer rank i (vLLM sleeps while the
    # trainer computes; weights pass by CUDA IPC). rlpost.engines.colocate.
    colocate: bool = False
    # Multi-turn episodes (rlpost.rollout.multiturn): model turns per episode, and a cap on all
    # tokens after the prompt (model + environment tokens); 0 = no cap beyond the turns.
    max_turns: int = 1
    max_total_tokens: int = 0
    # Tokens of prompt + completion the engine is sized for (vLLM's max_model_len, the
    # gateway's context limit); 0 = derived, see RunConfig.context_tokens.
    max_model_len: int = 0
    max_restarts: int = 3  # dead replicas replaced over a run (weights re-synced, requests retried)
    # trainer.inflight_updates: the KV cache of requests in flight when new weights land.
    # keep: go on with it (free; its keys/values are the old policy's). recompute:
    # re-prefill prompt + tokens so far with the new weights (one prefill per update).
    inflight_kv: str = "keep"
    # Ray placement (rlpost.workers.placement): GPUs per replica (auto = 1 when the Ray
    # cluster has GPUs, else 0), the placement-group strategy over the replicas, and
    # custom Ray resources each replica also asks for (pins replicas to nodes).
    gpus_per_replica: int | float | str = "auto"
    placement_strategy: str = "spread"
    resources: dict | None = None

    def check(self) -> None:
        _check_gpus(self.gpus_per_replica, "rollout.gpus_per_replica")
        _require(self.placement_strategy in _STRATEGIES, "rollout.placement_strategy",
                 f"must be one of {', '.join(_STRATEGIES)}, got {self.placement_strategy!r}")
        _check_resources(self.resources, "rollout.resources")
        engines = ("hf", "vllm", "auto", "fake")
        _require(self.engine in engines, "rollout.engine", f"must be one of {', '.join(engines)}; got {self.engine!r}")
        _require(self.replicas >= 1, "rollout.replicas", f"must be >= 1, got {self.replicas}")
        _require(self.n >= 1, "rollout.n", f"must be >= 1 (samples per prompt), got {self.n}")
        _require(self.temperature >= 0, "rollout.temperature", "must be >= 0 (0 = greedy)")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", "must be -1 (off) or >= 1")
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _require(self.batch_size >= 1, "rollout.batch_size", "must be >= 1")
        _require(self.threads >= 0, "rollout.threads", f"must be >= 0 (0 = auto), got {self.threads}")
        _require(self.kv_cache_gb >= 0, "rollout.kv_cache_gb", f"must be >= 0 (0 = size from gpu_memory_utilization), got {self.kv_cache_gb}")
        _require(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
                 f"must be in (0, 1], got {self.gpu_memory_utilization}")
        _require(self.max_turns >= 1, "rollout.max_turns", f"must be >= 1, got {self.max_turns}")
        _require(self.max_total_tokens >= 0, "rollout.max_total_tokens", "must be >= 0 (0 = no cap)")
        _require(self.inflight_kv in ("keep", "recompute"), "rollout.inflight_kv",
                 f"must be keep or recompute, got {self.inflight_kv!r}")
        _require(self.max_model_len >= 0, "rollout.max_model_len", "must be >= 0 (0 = derived from the token budgets)")
        _require(self.max_restarts >= 0, "rollout.max_restarts", "must be >= 0 (0 = a dead replica stops the run)")


@dataclass
class TrainerConfig:
    backend: str = "fsdp2"
    world_size: int = 1
    total_steps: int = 30
    save_every: int = 10  # 0 disables periodic checkpoints (the final one is always written)
    keep_last: int = 2  # checkpoints kept on disk
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    grad_clip: float = 1.0
    mini_batches: int = 1  # optimizer steps per training step (PPO mini-batches)
    epochs: int = 1  # passes over the step's data
    micro_batch_size: int = 16  # rows per forward/backward on one rank
    max_bad_steps: int = 3  # consecutive updates skipped for a non-finite loss/gradient before the run stops
    max_restarts: int = 1  # trainer group rebuilds from the latest checkpoint after a rank dies
    # > 0: micro-batches filled by token count (rows x longest row, or summed lengths
    # when packing) up to this budget instead of micro_batch_size rows.
    max_tokens_per_microbatch: int = 0
    packing: bool = False  # concatenate a micro-batch's rows into one row (no padding compute)
    logprob_chunk_tokens: int = 0  # > 0: float32 log-softmax this many tokens at a time
    # Rows with a common prefix (a prompt's completions) run it once per micro-batch
    # (rlpost.engines.prefix); same result as the padded forward. null = auto: on for
    # CPU engines where it applies (rlpost.engines.prefix.enabled).
    share_prompt: bool | None = None
    zero_stage: int = 2  # deepspeed only: ZeRO stage 1 | 2 | 3
    offload_optimizer: bool = False  # deepspeed only: optimizer state in CPU memory
    offload_params: bool = False  # deepspeed only (zero_stage 3): parameters in CPU memory
    # sync: sample, then train, then sync weights. one_step_off: step t+1's rollouts are
    # sampled with step t's starting weights while step t trains. async: replicas sample
    # continuously into a buffer (rlpost.rollout.overlap).
    mode: str = "sync"
    max_staleness: int = 1  # async: batches sampled more than this many versions ago are dropped
    async_buffer: int = 0  # async: batches sampled ahead of the trainer; 0 = max_staleness (none dropped)
    # async: push new weights into requests in flight (between decoding steps) instead of
    # waiting for the batch being sampled; tokens then record their version.
    inflight_updates: bool = False
    threads: int = 0  # math threads per trainer (and critic) rank; 0 = auto (rlpost.threads)
    # Ray placement (rlpost.workers.placement): GPUs per rank (auto = 1 when the Ray
    # cluster has GPUs, else 0), the placement-group strategy over the ranks (pack: as
    # few nodes as possible), and custom Ray resources each rank also asks for.
    gpus_per_rank: int | float | str = "auto"
    placement_strategy: str = "pack"
    resources: dict | None = None

    def check(self) -> None:
        _check_gpus(self.gpus_per_rank, "trainer.gpus_per_rank")
        _require(self.placement_strategy in _STRATEGIES, "trainer.placement_strategy",
                 f"must be one of {', '.join(_STRATEGIES)}, got {self.placement_strategy!r}")
        _check_resources(self.resources, "trainer.resources")
        _require(self.backend in ("fsdp2", "deepspeed"), "trainer.backend", f"must be fsdp2 or deepspeed, got {self.backend!r}")
        _require(self.max_tokens_per_microbatch >= 0, "trainer.max_tokens_per_microbatch", "must be >= 0 (0 = micro_batch_size rows)")
        _require(self.logprob_chunk_tokens >= 0, "trainer.logprob_chunk_tokens", "must be >= 0 (0 = no chunking)")
        _require(not (self.share_prompt and self.packing), "trainer.share_prompt",
                 "cannot be combined with trainer.packing (a packed row has no per-row key/value cache to share); "
                 "set one of them to false")
        _require(self.zero_stage in (1, 2, 3), "trainer.zero_stage", f"must be 1, 2 or 3, got {self.zero_stage}")
        _require(not self.offload_params or self.zero_stage == 3, "trainer.offload_params",
                 "parameter offload needs trainer.zero_stage=3")
        _require(self.world_size >= 1, "trainer.world_size", f"must be >= 1, got {self.world_size}")
        _require(self.total_steps >= 1, "trainer.total_steps", f"must be >= 1, got {self.total_steps}")
        _require(self.save_every >= 0, "trainer.save_every", "must be >= 0 (0 = only at the end)")
        _require(self.keep_last >= 1, "trainer.keep_last", "must be >= 1")
        _require(self.lr > 0, "trainer.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "trainer.weight_decay", "must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "trainer.betas", "must be two numbers in [0, 1)")
        _require(self.warmup_steps >= 0, "trainer.warmup_steps", "must be >= 0")
        _require(self.lr_schedule in ("constant", "cosine"), "trainer.lr_schedule", "must be constant or cosine")
        _require(self.grad_clip > 0, "trainer.grad_clip", "must be > 0")
        _require(self.mini_batches >= 1 and self.epochs >= 1, "trainer.mini_batches/epochs", "must be >= 1")
        _require(self.micro_batch_size >= 1, "trainer.micro_batch_size", "must be >= 1")
        _require(self.max_bad_steps >= 0, "trainer.max_bad_steps", "must be >= 0")
        _require(self.max_restarts >= 0, "trainer.max_restarts", "must be >= 0 (0 = a dead rank stops the run)")
        _require(self.mode in ("sync", "one_step_off", "async"), "trainer.mode",
                 f"must be sync, one_step_off or async, got {self.mode!r}")
        _require(self.max_staleness >= 1, "trainer.max_staleness",
                 f"must be >= 1 (a batch sampled while the trainer updates is 1 version old), got {self.max_staleness}")
        _require(self.async_buffer >= 0, "trainer.async_buffer", "must be >= 0 (0 = trainer.max_staleness)")
        _require(not self.inflight_updates or self.mode == "async", "trainer.inflight_updates",
                 f"needs trainer.mode=async (this run: {self.mode}); set trainer.mode=async or "
                 "trainer.inflight_updates=false")
        _require(self.threads >= 0, "trainer.threads", f"must be >= 0 (0 = auto), got {self.threads}")


@dataclass
class OffPolicyConfig:
    """Off-policy correction against the sampler's log-probs (rlpost.algorithms.off_policy,
    docs/algorithms.md#off-policy-corrections): each token's policy loss is weighed by
    the behaviour ratio rho = pi_old / pi_rollout, per token or per sequence (geometric
    mean), truncated at ``cap`` (*_tis) or zeroed outside [low, high] (*_mask)."""

    correction: str = "none"  # none | token_tis | token_mask | seq_tis | seq_mask
    cap: float = 2.0  # token_tis, seq_tis: w = min(rho, cap)
    low: float = 0.5  # token_mask, seq_mask: w = rho inside [low, high], 0 outside
    high: float = 2.0

    def check(self) -> None:
        from rlpost.algorithms.off_policy import OFF_POLICY_CORRECTIONS

        _require(self.correction in OFF_POLICY_CORRECTIONS, "algorithm.off_policy.correction",
                 f"must be one of {', '.join(OFF_POLICY_CORRECTIONS)}, got {self.correction!r}")
        _require(self.cap >= 1, "algorithm.off_policy.cap",
                 f"must be >= 1 (the weight of an on-policy token is 1; e.g. 2), got {self.cap}")
        _require(0 <= self.low <= 1 <= self.high, "algorithm.off_policy.low/high",
                 f"must hold the on-policy ratio 1: 0 <= low <= 1 <= high (IcePop: 0.5 and 5), "
                 f"got low={self.low}, high={self.high}")


@dataclass
class AlgorithmConfig:
    # The algorithm (rlpost.algorithms.registry.ALGORITHMS): what a step needs and how it
    # computes advantages. adv_estimator / policy_loss null = the algorithm's own; set,
    # they replace that part.
    name: str = "grpo"
    adv_estimator: str | None = None
    norm_adv_by_std: bool = True  # False gives Dr.GRPO-style mean-only centring
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    policy_loss: str | None = None  # ppo_clip | gspo | cispo | ...; null = the algorithm's own
    dual_clip_c: float | None = None  # dual-clip bound for negative advantages (ppo_clip), > 1
    loss_agg: str = "token-mean"
    loss_norm_len: int = 0  # constant of seq-mean-token-sum-norm; 0 = rollout.max_new_tokens
    kl_coef: float = 0.0  # > 0 loads the reference: a KL loss term, or the reward penalty below
    kl_estimator: str = "k3"
    kl_in_reward: bool = False  # KL as a reward penalty (per sample; per token for gae and reinforce_pp) instead of a loss term
    kl_target: float | None = None  # adaptive KL coefficient (nats per sequence); null = fixed
    kl_horizon: int = 10000
    entropy_coef: float = 0.0
    # DAPO (Yu et al. 2025): resample groups whose rewards are all equal, up to
    # max_sampling_rounds draws of data.train_batch_size prompts per step.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    overlong_buffer_len: int = 0  # soft overlong penalty over the last N tokens before the cap; 0 = off
    overlong_penalty_factor: float = 1.0
    overlong_filter: bool = False  # do not train on samples cut by the length cap
    # PPO with a critic (name: ppo, or adv_estimator: gae; the critic itself is configured under critic:).
    gae_gamma: float = 1.0  # discount per token (gae; reinforce_pp with kl_in_reward)
    gae_lambda: float = 0.95  # GAE lambda: 1 = Monte-Carlo returns, 0 = one-step TD
    value_clip: float | None = 0.2  # clip of the value update around the old values; null = none
    whiten_advantages: bool = True  # whiten GAE advantages over the step's tokens
    # Truncated importance sampling (Yao et al. 2025): weight each token's policy loss
    # by min(pi_old / pi_rollout, tis_cap) to correct for the rollout engine's
    # numerical mismatch with the trainer (and for stale samples); null = off.
    # The same as off_policy.correction=token_tis with off_policy.cap=tis_cap (kept for
    # the recipes and runs that set it).
    tis_cap: float | None = None
    off_policy: OffPolicyConfig = field(default_factory=OffPolicyConfig)

    def check(self) -> None:
        from rlpost.algorithms import KL_ESTIMATORS, LOSS_AGGREGATIONS, make_algorithm

        algorithm = make_algorithm(self)  # checks name, adv_estimator and policy_loss
        _require(self.dual_clip_c is None or (self.dual_clip_c > 1 and algorithm.policy_loss == "ppo_clip"),
                 "algorithm.dual_clip_c", "must be null, or > 1 with policy_loss=ppo_clip")
        _require(self.loss_norm_len >= 0, "algorithm.loss_norm_len", "must be >= 0 (0 = rollout.max_new_tokens)")
        _require(self.kl_estimator in KL_ESTIMATORS, "algorithm.kl_estimator",
                 f"must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        _require(self.loss_agg in LOSS_AGGREGATIONS, "algorithm.loss_agg",
                 f"must be one of {sorted(LOSS_AGGREGATIONS)}, got {self.loss_agg!r}")
        _require(self.clip_eps_low >= 0 and self.clip_eps_high >= 0, "algorithm.clip_eps_low/high", "must be >= 0")
        _require(self.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0")
        _require(self.kl_target is None or (self.kl_target > 0 and self.kl_in_reward and self.kl_coef > 0),
                 "algorithm.kl_target", "must be null, or > 0 with kl_in_reward=true and kl_coef > 0")
        _require(self.kl_horizon >= 1, "algorithm.kl_horizon", "must be >= 1")
        _require(self.max_sampling_rounds >= 1, "algorithm.max_sampling_rounds", "must be >= 1")
        _require(self.overlong_buffer_len >= 0, "algorithm.overlong_buffer_len", "must be >= 0 (0 = off)")
        _require(self.overlong_penalty_factor >= 0, "algorithm.overlong_penalty_factor", "must be >= 0")
        _require(0 <= self.gae_gamma <= 1 and 0 <= self.gae_lambda <= 1, "algorithm.gae_gamma/gae_lambda",
                 f"must be in [0, 1], got {self.gae_gamma}, {self.gae_lambda}")
        _require(self.value_clip is None or self.value_clip > 0, "algorithm.value_clip", "must be null (off) or > 0")
        _require(self.tis_cap is None or self.tis_cap >= 1, "algorithm.tis_cap",
                 f"must be null (off) or >= 1 (e.g. 2), got {self.tis_cap}")
        self.off_policy.check()
        _require(self.tis_cap is None or self.off_policy.correction == "none", "algorithm.tis_cap",
                 f"is the older spelling of algorithm.off_policy.correction=token_tis with off_policy.cap; "
                 f"set one of them, not both (got tis_cap={self.tis_cap} and "
                 f"off_policy.correction={self.off_policy.correction})")


@dataclass
class CriticConfig:
    """The PPO value model, built only for an algorithm that needs a critic (``ppo``): the
    policy's base model with a fresh scalar head, FSDP2-sharded over
    ``trainer.world_size`` ranks, with its own AdamW. Betas, weight decay, lr warm-up
    and schedule, mini-batches, epochs and micro-batch size follow ``trainer``."""

    lr: float = 1.0e-4
    grad_clip: float = 1.0
    # The first warmup_steps training steps update only the critic (the policy is
    # frozen) so that GAE starts from values that mean something.
    warmup_steps: int = 0
    # Ray placement of the critic ranks, as trainer.gpus_per_rank / trainer.resources;
    # they follow trainer.placement_strategy.
    gpus_per_rank: int | float | str = "auto"
    resources: dict | None = None

    def check(self) -> None:
        _check_gpus(self.gpus_per_rank, "critic.gpus_per_rank")
        _check_resources(self.resources, "critic.resources")
        _require(self.lr > 0, "critic.lr", f"must be > 0, got {self.lr}")
        _require(self.grad_clip > 0, "critic.grad_clip", "must be > 0")
        _require(self.warmup_steps >= 0, "critic.warmup_steps", "must be >= 0 (0 = train the policy from step 1)")


@dataclass
class RewardConfig:
    # "module:function" or "path/to/file.py:function"; signature in rlpost.rewards.
    fn: str = "rlpost.rewards.math:math_reward"
    kwargs: dict = field(default_factory=dict)  # passed to fn as keyword arguments
    workers: int = 2  # reward actors scoring in parallel
    timeout_s: float = 10.0  # per sample; a timeout scores nothing and is counted
    max_restarts: int = 3  # dead reward workers replaced over a run (their items scored again)

    def check(self) -> None:
        _require(":" in self.fn, "reward.fn", f"must look like 'module:function', got {self.fn!r}")
        _require(self.workers >= 1, "reward.workers", "must be >= 1")
        _require(self.timeout_s > 0, "reward.timeout_s", "must be > 0")
        _require(self.max_restarts >= 0, "reward.max_restarts", "must be >= 0 (0 = a dead worker stops the run)")


@dataclass
class EnvConfig:
    # Environment factory, "module:factory" or "path/to/file.py:factory", called with
    # kwargs once per episode (rlpost.envs). null: the single-turn reward path, or with
    # rollout.max_turns > 1 the reward function wrapped as an environment (RewardEnv).
    fn: str | None = None
    kwargs: dict = field(default_factory=dict)
    workers: int = 2  # env actors; each runs many episodes concurrently
    timeout_s: float = 30.0  # per reset/step call; past it the episode fails
    max_retries: int = 1  # a failed episode is restarted this many times, then dropped and counted
    # An agent instead of an environment: "module:fn" or "path/to/file.py:fn" naming
    # ``async def fn(client, row, **kwargs)`` that talks to the policy through an
    # openai.AsyncOpenAI client on a gateway session (rlpost.rollout.agents, docs/agents.md).
    agent: str | None = None

    def check(self) -> None:
        _require(self.fn is None or ":" in self.fn, "env.fn", f"must look like 'module:factory', got {self.fn!r}")
        _require(self.agent is None or ":" in self.agent, "env.agent",
                 f"must look like 'package.module:fn' or 'path/to/file.py:fn', got {self.agent!r}")
        _require(self.agent is None or self.fn is None, "env.agent",
                 f"an episode runs either an environment (env.fn={self.fn!r}) or an agent "
                 f"(env.agent={self.agent!r}); set the other to null")
        _require(self.workers >= 1, "env.workers", "must be >= 1")
        _require(self.timeout_s > 0, "env.timeout_s", "must be > 0")
        _require(self.max_retries >= 0, "env.max_retries", "must be >= 0")

    def enabled(self, rollout: "RolloutConfig") -> bool:
        """Whether episodes run through environments (rlpost.rollout.multiturn) or
        agents (rlpost.rollout.agents): multi-turn, with the rollout cadence they bring."""
        return self.fn is not None or self.agent is not None or rollout.max_turns > 1


@dataclass
class EvalConfig:
    every: int = 5  # steps between held-out evals; 0 disables (step 0 and the end still run unless 0)
    size: int = 200  # held-out prompts used (at most the val set size)
    n: int = 1  # samples per prompt; > 1 also reports mean@n and pass@k at eval.temperature
    k: list[int] = field(default_factory=list)  # pass@k reported for these k (each <= n); [] = [n]
    temperature: float = 1.0  # for the n > 1 samples; accuracy (pass@1) is always greedy
    max_new_tokens: int = 64

    def check(self) -> None:
        _require(self.every >= 0, "eval.every", "must be >= 0")
        _require(self.size >= 1, "eval.size", "must be >= 1")
        _require(self.n >= 1, "eval.n", "must be >= 1")
        _require(not self.k or self.n > 1, "eval.k", "needs eval.n > 1 (pass@k is estimated from n samples)")
        _require(all(1 <= k <= self.n for k in self.k), "eval.k",
                 f"every k must be between 1 and eval.n={self.n} (unbiased pass@k needs k <= n), got {self.k}")

    @property
    def pass_ks(self) -> tuple[int, ...]:
        """The k values of pass@k for n > 1 samples (sorted, unique)."""
        return tuple(sorted(set(self.k or [self.n]))) if self.n > 1 else ()


def parse_band(text: str, key: str = "filter.keep") -> tuple[float, float]:
    """``"lo:hi"`` -> (lo, hi) with 0 <= lo <= hi <= 1; ConfigError otherwise."""
    lo, sep, hi = str(text).partition(":")
    try:
        band = (float(lo), float(hi)) if sep else None
    except ValueError:
        band = None
    _require(band is not None and 0 <= band[0] <= band[1] <= 1, key,
             f"must be 'lo:hi' with 0 <= lo <= hi <= 1 (pass rates kept, both ends included), got {text!r}")
    return band


@dataclass
class FilterConfig:
    """``python -m rlpost.data filter`` (rlpost.data.filter): pass rates of the
    ``data`` split under the current model; sampling follows ``rollout`` (engine,
    temperature, top_p, top_k, max_new_tokens, stop), scoring follows ``reward``."""

    output: str | None = None  # folder: shards/, kept.parquet, report.json; required
    split: str = "train"  # the data split filtered (train | val)
    k: int = 8  # completions sampled per prompt
    keep: str = "0.1:0.9"  # pass-rate band written to kept.parquet, both ends included
    actors: int = 1  # rollout actors in the Ray Data pool, each with one engine
    batch_size: int = 16  # prompts per engine call
    shard_size: int = 256  # prompts per output shard, the unit of resume
    limit: int = 0  # filter only the first N prompts (after dropping duplicates); 0 = all

    def check(self) -> None:
        _require(self.split in ("train", "val"), "filter.split", f"must be train or val, got {self.split!r}")
        _require(self.k >= 1, "filter.k", f"must be >= 1 (completions per prompt), got {self.k}")
        parse_band(self.keep)
        _require(self.actors >= 1, "filter.actors", f"must be >= 1, got {self.actors}")
        _require(self.batch_size >= 1, "filter.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.shard_size >= 1, "filter.shard_size", f"must be >= 1, got {self.shard_size}")
        _require(self.limit >= 0, "filter.limit", f"must be >= 0 (0 = all), got {self.limit}")


@dataclass
class ConsoleLogConfig:
    progress_bar: bool = True


@dataclass
class JsonlLogConfig:
    filename: str = "metrics.jsonl"
    samples_filename: str = "samples.jsonl"  # Tracker.log_samples rows, one JSON object each


@dataclass
class TensorboardLogConfig:
    dir: str = "tensorboard"  # event files, relative to output_dir

    def check(self) -> None:
        _require(bool(self.dir), "logger.tensorboard.dir", "must name a folder (relative to output_dir)")


@dataclass
class MlflowLogConfig:
    # null = a local store in the run directory: sqlite:///<output_dir>/mlflow.db, artifacts
    # in <output_dir>/mlartifacts. Or any MLflow tracking URI (http://host:5000, sqlite:///...).
    tracking_uri: str | None = None
    experiment: str = "rlpost"
    run_name: str | None = None

    def check(self) -> None:
        _require(bool(self.experiment), "logger.mlflow.experiment", "must be a non-empty experiment name")


@dataclass
class WandbConfig:
    project: str = "rlpost"
    name: str | None = None
    mode: str = "auto"  # auto (offline without an API key) | online | offline | disabled

    def check(self) -> None:
        _require(self.mode in ("auto", "online", "offline", "disabled"), "wandb.mode", "must be auto, online, offline or disabled")


@dataclass
class RayConfig:
    # None always starts a local cluster of its own (even when another runs on this
    # machine); "auto" joins the one on this machine; host:port joins that one.
    address: str | None = None
    num_cpus: int | None = None  # logical CPUs of a local cluster (may exceed cores)
    # How long the trainer/rollout/critic placement groups may wait for the cluster to
    # have room (an autoscaling cluster adds nodes meanwhile) before the run stops.
    placement_timeout_s: float = 600.0

    def check(self) -> None:
        _require(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus", "must be null or >= 1")
        _require(self.placement_timeout_s > 0, "ray.placement_timeout_s", "must be > 0")


@dataclass
class WeightSyncConfig:
    bucket_mb: int = 64  # most bytes packed into one broadcast; tensors >= 1 MiB travel alone
    timeout_s: float = 300.0

    def check(self) -> None:
        _require(self.bucket_mb >= 1, "weight_sync.bucket_mb", "must be >= 1")


@dataclass
class LoggerConfig:
    """Each backend is on when its section is present (Hydra multi-select group
    ``logger=[console,jsonl,wandb,tensorboard,mlflow]``)."""

    console: ConsoleLogConfig | None = None
    jsonl: JsonlLogConfig | None = None
    wandb: WandbConfig | None = None
    tensorboard: TensorboardLogConfig | None = None
    mlflow: MlflowLogConfig | None = None

    def check(self) -> None:
        for section in (self.wandb, self.tensorboard, self.mlflow):
            if section is not None:
                section.check()


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    resume: str = "auto"  # auto | never | path to a checkpoint directory
    seed: int = 0
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)  # read by rlpost.data filter only

    def context_tokens(self) -> int | None:
        """Prompt + completion tokens one sequence may reach: what the vLLM engine is sized
        for (``max_model_len``) and the gateway's context limit. ``rollout.max_model_len``
        when set; single-turn runs ``max_prompt_tokens + max_new_tokens``; multi-turn runs
        (environments, agents) ``max_prompt_tokens + max_total_tokens``, since the turns
        and observations all sit in one context; None (the model's own context length)
        for multi-turn without a ``max_total_tokens`` budget, which observations of
        unknown length could otherwise overrun."""
        r = self.rollout
        if r.max_model_len:
            return r.max_model_len
        if not self.env.enabled(r):
            return self.data.max_prompt_tokens + r.max_new_tokens
        return self.data.max_prompt_tokens + r.max_total_tokens if r.max_total_tokens else None

    def check(self) -> None:
        from rlpost.algorithms import make_algorithm

        for section in (self.model, self.data, self.rollout, self.trainer, self.algorithm, self.critic,
                        self.reward, self.env, self.eval, self.logger, self.weight_sync, self.ray, self.filter):
            section.check()
        algorithm = make_algorithm(self.algorithm)
        if self.env.enabled(self.rollout):
            _require(algorithm.single_turn_only is None, "algorithm.name/adv_estimator",
                     f"{algorithm.single_turn_only} is single-turn only ({algorithm.describe()}); "
                     "use grpo, rloo or reinforce_pp with environments")
            _require(self.algorithm.overlong_buffer_len == 0, "algorithm.overlong_buffer_len",
                     "the overlong penalty is single-turn only (it measures against rollout.max_new_tokens); "
                     "cap episodes with rollout.max_total_tokens instead")
        _require(bool(self.output_dir), "output_dir", "must be a directory path")
        if self.rollout.max_model_len:
            need = self.data.max_prompt_tokens + self.rollout.max_new_tokens
            _require(self.rollout.max_model_len >= need, "rollout.max_model_len",
                     f"must hold a longest prompt and one turn: >= data.max_prompt_tokens + rollout.max_new_tokens "
                     f"= {need}, got {self.rollout.max_model_len} (0 = derived)")
        if self.rollout.colocate:
            _require(self.rollout.engine in ("vllm", "auto"), "rollout.colocate",
                     f"needs the vllm engine (sleep mode, CUDA IPC), got rollout.engine={self.rollout.engine}")
            _require(self.rollout.replicas == self.trainer.world_size, "rollout.colocate",
                     f"puts one replica on each trainer GPU: set rollout.replicas={self.trainer.world_size} "
                     f"(= trainer.world_size), got {self.rollout.replicas}")
            _require(not algorithm.needs_critic, "rollout.colocate",
                     f"does not place a PPO critic on the shared GPUs yet ({algorithm.describe()}); "
                     "use rollout.colocate=false with a critic")
        if self.trainer.share_prompt:
            _require(not algorithm.needs_critic, "trainer.share_prompt",
                     f"does not run the critic's value head yet ({algorithm.describe()}); "
                     "use trainer.share_prompt=false with a critic")
            _require(not self.model.gradient_checkpointing, "trainer.share_prompt",
                     "needs the key/value cache that model.gradient_checkpointing turns off; set one of them to false")
        _require(self.algorithm.overlong_buffer_len <= self.rollout.max_new_tokens, "algorithm.overlong_buffer_len",
                 f"must be at most rollout.max_new_tokens={self.rollout.max_new_tokens}")
        rows = self.data.train_batch_size * self.rollout.n
        per_rank, rem = divmod(rows, self.trainer.world_size * self.trainer.mini_batches)
        _require(rem == 0 and per_rank >= 1, "data.train_batch_size",
                 f"train_batch_size * rollout.n = {rows} samples must split evenly over "
                 f"trainer.world_size * trainer.mini_batches = {self.trainer.world_size * self.trainer.mini_batches}")
