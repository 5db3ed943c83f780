"""rlpost against TRL's ``GRPOTrainer`` on the same work, one command, one result line.

    .venv/bin/python scripts/bench_vs_trl.py --model qwen2-24m --steps 5
    .venv/bin/python scripts/bench_vs_trl.py --model tiny-math --steps 8 -- trainer.mode=one_step_off

TRL is never a dependency of rlpost: it is installed on first use into its own virtual
environment (``--venv``, default ``.cache/trl-venv``): the same torch and transformers
versions as the interpreter running this script, then ``trl==--trl-version``. The TRL
run is a child process of that environment executing this same file (``--trl-worker``).

The same work on both sides, per step: 16 prompts x 8 completions x at most 32 new
tokens (``--prompts/--n/--max-new-tokens``), temperature 1, no top-k/top-p, fp32, GRPO
with group-std-normalised advantages, PPO clip 0.2, token-mean loss over the step's
tokens, no KL (beta 0, no reference model), AdamW (lr 1e-4, betas 0.9/0.999, no weight
decay, constant schedule, grad-norm clip 1.0), one optimizer step per step over
micro-batches of 16 sequences. Same model folder (``tiny-math``: the built-in 0.6M model;
``qwen2-24m``: a random-init 24.6M Qwen2 with tiny-math's tokenizer, see
``bench_rollout.py``), same prompts in the same order (rlpost's built-in math problems
written to a JSONL file both read unshuffled; the TRL child checks that its chat-templated
prompt ids equal rlpost's), same reward (``partial_credit_reward`` below, imported by
both). rlpost runs ``python -m rlpost.train +recipe=grpo_math`` with its defaults
otherwise (``trainer.mode=sync``, ``rollout.engine=auto``; eval off, no checkpoints);
anything after ``--`` is passed to it. TRL runs at each of ``--trl-threads`` torch
threads and the best median counts.

Differences that remain (documented, not removable without changing either framework):
rlpost runs as separate Ray actors (rollout engine, trainer, reward workers) and pushes
weights to its rollout engine each step; TRL is one process that generates with HF
``generate`` on the model it trains. TRL's step includes its reward call in-process;
rlpost scores in reward workers. Sampling streams differ (same distribution, different
random draws), so completion lengths differ a little; the line reports both mean lengths.

Step time: rlpost's ``timing/step_s`` from ``metrics.jsonl``; TRL's optimizer step from
``on_step_begin`` to ``on_step_end`` (generation, scoring, 8 micro-batch forward/backward
passes, the optimizer step). Medians skip the first ``--warmup`` steps. Start-up is not
counted on either side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def partial_credit_reward(prompt: str, completion: str, ground_truth: str, metadata: dict | None = None) -> float:
    """1.0 when the last number in the completion equals the answer, 0.1 when the
    completion states some number (partial credit for the answer format), else 0.
    Pure Python so both frameworks' processes import it without extra packages."""
    numbers = _NUMBER.findall(completion)
    if not numbers:
        return 0.0
    try:
        return 1.0 if float(numbers[-1]) == float(ground_truth) else 0.1
    except ValueError:
        return 0.1


# ---------------------------------------------------------------- TRL child


def trl_worker(args) -> None:
    """Runs inside the TRL environment: ``GRPOTrainer`` on the prompts file, step
    times to ``--result``."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    for row in rows[:4]:  # TRL templates the messages itself: it must see rlpost's prompt ids
        ids = tokenizer.apply_chat_template([row["messages"]], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"][0]
        if list(ids) != row["prompt_ids"]:
            raise SystemExit(f"TRL's prompt ids differ from rlpost's:\n{list(ids)}\n{row['prompt_ids']}")
    dataset = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])

    def reward(prompts, completions, answer, **kwargs):
        return [partial_credit_reward("", c[0]["content"], a) for c, a in zip(completions, answer)]

    micro = 16
    config = GRPOConfig(
        output_dir=args.out, max_steps=args.steps, seed=0, use_cpu=True, bf16=False, fp16=False,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, optim="adamw_torch",
        per_device_train_batch_size=micro, gradient_accumulation_steps=args.prompts * args.n // micro,
        num_generations=args.n, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=False, shuffle_dataset=False, log_completions=False,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    times: list[float] = []
    lengths: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimes()])
    trainer.train()
    Path(args.result).write_text(json.dumps({"step_s": times, "mean_len": lengths, "threads": args.threads}))


# ---------------------------------------------------------------- driver


def ensure_trl(venv: Path, trl_version: str) -> Path:
    """The TRL environment's python, created on first use with this interpreter's
    torch and transformers versions."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", f"import trl, sys; sys.exit(trl.__version__ != {trl_version!r})"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    import torch
    import transformers

    torch_pin = torch.__version__.split("+")[0]  # "2.13.0": the local CPU wheel (docs/performance.md)
    print(f"installing trl=={trl_version} (torch=={torch_pin}, transformers=={transformers.__version__}) "
          f"into {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch_pin}"], check=True)
    subprocess.run([*pip, f"transformers=={transformers.__version__}", f"trl=={trl_version}"], check=True)
    return python


def write_prompts(model_dir: str, path: Path, count: int) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_rollout import math_prompts

    rows = math_prompts(model_dir, count)
    path.write_text("".join(json.dumps({"prompt": r["question"], **r}) + "\n" for r in rows))


def median_after(values: list[float], warmup: int) -> float:
    kept = values[warmup:] or values
    return statistics.median(kept)


def run_trl(python: Path, model_dir: str, data: Path, threads: int, args) -> dict:
    result = args.out / f"trl-{threads}t.json"
    cmd = [str(python), str(Path(__file__).resolve()), "--trl-worker", "--model-dir", model_dir, "--data", str(data),
           "--threads", str(threads), "--steps", str(args.steps), "--prompts", str(args.prompts), "--n", str(args.n),
           "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr), "--result", str(result),
           "--out", str(args.out / f"trl-{threads}t")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": "", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"TRL ({threads} threads) failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def run_rlpost(model_dir: str, data: Path, args) -> list[dict]:
    out = args.out / "rlpost"
    shutil.rmtree(out, ignore_errors=True)  # a previous run's metrics.jsonl must not be read back
    cmd = [sys.executable, "-m", "rlpost.train", "+recipe=grpo_math", f"model.path={model_dir}",
           "data.source=files", f"data.train_files=[{data}]", "data.val_files=[]", "data.shuffle=false",
           f"data.train_batch_size={args.prompts}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}",
           "algorithm.kl_coef=0", f"trainer.lr={args.lr}", "trainer.lr_schedule=constant", "trainer.micro_batch_size=16",
           f"trainer.total_steps={args.steps}", "trainer.save_every=0", "eval.every=0", "resume=never",
           f"output_dir={out}", "logger=[jsonl]", f"reward.fn={Path(__file__).resolve()}:partial_credit_reward",
           *args.overrides]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"rlpost failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    engine = re.search(r"rollout engine (\w+)", proc.stdout)
    args.rlpost_engine = engine[1] if engine else "?"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("step", 0) > 0 and "timing/step_s" in r]


def breakdown(steps: list[dict], warmup: int) -> str:
    keys = sorted({k for r in steps for k in r if k.startswith("timing/") and k.endswith("_s") and k != "timing/step_s"})
    parts = [f"{k[7:-2]} {median_after([r.get(k, 0.0) for r in steps], warmup):.2f}" for k in keys]
    return ", ".join(p for p in parts if not p.endswith(" 0.00"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2-24m", help="tiny-math | qwen2-24m | qwen2-HxL (bench_rollout.py)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--trl-threads", default="1,2", help="TRL torch thread counts to try; the best counts")
    parser.add_argument("--trl-version", default="1.16.0")
    parser.add_argument("--venv", type=Path, default=REPO / ".cache" / "trl-venv")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_vs_trl")
    parser.add_argument("--skip-trl", action="store_true", help="rlpost only (TRL's column shows -)")
    # --trl-worker and its inputs: the child process in the TRL environment
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the rlpost run (after --)")
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args)

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_rollout import model_folder, param_count

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = model_folder(args.model, args.out / "models")
    data = args.out / "prompts.jsonl"
    write_prompts(model_dir, data, args.prompts * args.steps)
    load = os.getloadavg()[0]
    trl = {}
    if not args.skip_trl:
        python = ensure_trl(args.venv.resolve(), args.trl_version)
        for threads in [int(t) for t in args.trl_threads.split(",")]:
            r = run_trl(python, model_dir, data, threads, args)
            trl[threads] = median_after(r["step_s"], args.warmup)
            print(f"TRL {threads} thread(s): median step {trl[threads]:.2f} s, steps "
                  f"{' '.join(f'{s:.2f}' for s in r['step_s'])}, mean length {statistics.mean(r['mean_len'] or [0]):.1f}",
                  flush=True)
    steps = run_rlpost(model_dir, data, args)
    rl = median_after([r["timing/step_s"] for r in steps], args.warmup)
    rl_len = statistics.mean(r.get("response/length_mean", 0.0) for r in steps)
    rl_steps = " ".join(f"{r['timing/step_s']:.2f}" for r in steps)
    print(f"rlpost steps {rl_steps}, mean length {rl_len:.1f}", flush=True)
    best = min(trl, key=trl.get) if trl else None
    ratio = f"{rl / trl[best]:.2f}" if trl else "-"
    trl_text = f"TRL {trl[best]:.2f} s ({best} thread{'s' * (best > 1)})" if trl else "TRL -"
    print(f"{args.model} ({param_count(model_dir) / 1e6:.1f}M), {args.prompts}x{args.n}x{args.max_new_tokens} tok, "
          f"median of steps {args.warmup + 1}..{args.steps}: rlpost {rl:.2f} s ({args.rlpost_engine} engine) | "
          f"{trl_text} | rlpost/TRL {ratio} | rlpost breakdown: {breakdown(steps, args.warmup)} "
          f"| load {load:.1f}->{os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
