"""GRPO + FunRL/EGPO (entropy-enhanced advantage) for LLM function calling, top to bottom:
config -> distributed init -> models -> data -> (optional supervised warm-up) -> the GRPO loop -> evaluation.

    torchrun --standalone --nproc_per_node=1 train.py            # the default CPU run (embedded model + data)
    torchrun --nproc_per_node=8 train.py --model Qwen/Qwen2.5-Coder-7B-Instruct --fsdp ...   # see README
    python train.py --help                                         # every knob

One GRPO step: rollouts (rl/rollout.py) -> advantages (rl/grpo.py) -> scoring and update (rl/update.py) ->
metrics (rl/metrics.py) -> evaluation (eval/bfcl.py) and checkpoint (model/checkpoint.py).
"""
from __future__ import annotations

import functools
import json
import math
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from data.calls import PromptFormat
from data.default import load_default, load_records
from eval.track import Tracker, open_tracker
from model.checkpoint import (checkpoint_problem, checkpoints_newest_first, drop_rows_after, fault_point,
                              is_old_format, latest_checkpoint, prune_checkpoints, resume_training,
                              save_training_checkpoint, save_warmed_up_policy)
from model.compat import enable_activation_checkpointing
from model.load import (ModelLoadError, autocast_to, load_model, load_tokenizer, pick_device, pick_dtype,
                        pick_rollout_dtype)
from model.sample import real_vocab_size
from model.score import PolicyScorer, describe_paths
from rl.config_cli import config_to_json, parse_config
from rl.dist import Dist, full_params, init_distributed, wrap_for_training
from rl.grpo import group_advantages
from rl.metrics import append_row, memory_gb, peak_memory_gb, step_metrics, write_samples
from rl.rollout import PromptCursor, collect_rollouts, seed_for
from rl.update import score_rollouts, update_policy
from rl.warmup import supervised_warmup


@dataclass
class Config:
    """GRPO + FunRL for function calling. Defaults: the CPU run on the embedded SmolLM2-135M (see README for
    the paper's GPU settings)."""
    # --- run ---
    recipe: str = ""  # a preset of the settings below, overridden by explicit flags (egpo-v4: the paper's v4, GPU)
    model: str = "smollm2-135m"  # HF id (from the local cache), a model/checkpoint directory, or smollm2-135m
    out_dir: str = "runs/default"  # run directory: config.json, metrics.jsonl, samples.jsonl, checkpoints/, plots
    seed: int = 0  # seeds data order, sampling (per step and rank) and init
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda
    dtype: str = "auto"  # compute dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 (fp32 masters kept)
    rollout_dtype: str = "auto"  # sampling precision: auto (bf16 where the device has native bf16, else --dtype)
    reference_dtype: str = "auto"  # the frozen KL reference's precision: auto (= the rollout dtype), float32, bfloat16
    attn: str = "auto"  # auto (flash_attention_2 if importable on CUDA, else sdpa), sdpa, eager
    cache_dir: str = ""  # where smollm2-135m is converted on first use (default $FUNRL_CACHE or ~/.cache/funrl)
    # --- data and prompt ---
    train_data: str = ""  # canonical JSONL (python -m data.prepare); empty = the embedded default train split
    val_data: str = ""  # held-out canonical JSONL; empty = the embedded default val split
    difficulty: str = "easy"  # keep records of this difficulty (easy, medium, hard) or all
    answer_format: Literal["think", "plain"] = "think"  # <think>..</think><answer>[calls]</answer>, or the bare list
    tools_as: Literal["json", "python"] = "python"  # tools in the system prompt as BFCL JSON or Python signatures
    prefill: str = "<think>"  # text that opens the assistant turn (part of the prompt; never scored)
    # --- supervised warm-up (cold start for small models) ---
    sft_steps: int = 5  # steps of supervised training on reference answers before RL (0 = pure RL)
    sft_batch_size: int = 8  # records per warm-up step
    sft_lr: float = 1e-4  # warm-up learning rate
    # --- GRPO ---
    steps: int = 20  # RL steps (one rollout batch each)
    prompts_per_step: int = 2  # prompts per step over all ranks
    group_size: int = 8  # completions per prompt (G)
    max_new_tokens: int = 96  # completion length cap
    temperature: float = 0.7  # rollout temperature (the trainer scores at the same temperature)
    top_p: float = 1.0  # keep 1.0: the trainer scores the full distribution
    top_k: int = 0  # keep 0 for the same reason
    lr: float = 2e-5  # RL learning rate (the paper: 1e-6 on 3B-7B models)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    warmup_steps: int = 0  # linear learning-rate warmup (RL steps)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm
    ppo_epochs: int = 1  # passes over each rollout batch
    minibatches: int = 1  # optimizer steps per pass (1 = on-policy: old log-probs are the current ones)
    eps_low: float = 0.2  # PPO clip: ratio >= 1 - eps_low
    eps_high: float = 0.2  # PPO clip: ratio <= 1 + eps_high (raise for DAPO's clip-higher)
    tis_cap: float = 2.0  # weigh each token by min(pi_old / pi_sampler, cap) (rollout precision mismatch); 0 = off
    kl_coef: float = 0.001  # beta of the k3 KL to the frozen reference; 0 = no reference model at all
    entropy_coef: float = 0.4  # FunRL lambda: A' = A + min(lambda * H, |A| / kappa); 0 = plain GRPO
    entropy_kappa: float = 2.0  # FunRL kappa: caps the bonus at |A| / kappa so it never flips A's sign
    entropy_mode: Literal["seq", "token"] = "seq"  # seq: mean <think> entropy per completion; token: per token
    std_norm: bool = True  # divide advantages by the group std (false = Dr.GRPO)
    loss_agg: Literal["token_mean", "seq_mean", "constant"] = "token_mean"  # loss normalisation (see rl/grpo.py)
    reward_mode: Literal["binary", "graded"] = "binary"  # strict 1/0 (the paper) or partial credit (ablation)
    dynamic_sampling: bool = False  # drop groups whose binary rewards are all equal, refill from the next prompts
    max_refill_rounds: int = 4  # dynamic sampling: at most this many extra sampling rounds per step
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% slower)
    fsdp: bool = False  # shard the policy with FSDP2 (multi-GPU, models that do not fit one GPU)
    micro_batch_tokens: int = 0  # tokens per scoring/update micro-batch, gradients accumulated (0 = no limit)
    sampler_token_budget: int = 65536  # tokens (batch x (prompt + new)) per generate call; bounds memory
    share_prompt_kv: bool = True  # score a group's prompt once for its G completions (its KV cache; not under fsdp)
    # segment_tokens: with shared prompts, the update's forward runs each prompt and each chunk of at most N
    # completion tokens as a segment whose activations the backward recomputes, one segment at a time. Why 256: the
    # default step (2 x 8 completions of up to 128 tokens after ~300-token prompts, fp32) kept ~5.5 GB
    # of activations for one backward (peak RSS 8.1 GB over ~2.7 GB of weights, reference, gradients and AdamW
    # state); with 256 it stays under 4 GB, for one more forward of the body in the update.
    segment_tokens: int = 256  # update: recompute activations per prompt / N completion tokens (0 = keep them all)
    # chunk_backward: with segments on one process, each chunk of completions runs its loss's backward right after
    # its forward, so only the prompts are recomputed (the same gradients, one forward of the completions less).
    chunk_backward: bool = True  # one process: backward per chunk of completions instead of recomputing it
    # --- evaluation, logging, checkpoints ---
    eval_every: int = 0  # evaluate every N RL steps (0 = only before and after training)
    eval_before: bool = True  # also evaluate the starting model (false skips it when its score is known)
    eval_limit: int = 40  # held-out records per evaluation (greedy; 0 = no evaluation)
    eval_bfcl: str = ""  # comma-separated BFCL categories to evaluate as well (e.g. simple_python,multiple)
    eval_bfcl_limit: int = 20  # items per BFCL category (a fixed seeded subset)
    sample_every: int = 5  # write the step's completions to samples.jsonl every N steps
    save_every: int = 10  # checkpoint every N RL steps (the final step is always saved)
    keep_last: int = 2  # checkpoints to keep (0 = all)
    resume: str = ""  # "auto" = continue from the newest complete checkpoint in out_dir, or a checkpoint path
    report_to: Literal["none", "tensorboard", "wandb"] = "none"  # also log metrics, config, samples there (optional)

    def __post_init__(self):
        """Every constraint, checked when the config is built (from the command line or in Python)."""
        hints = typing.get_type_hints(type(self))
        for name, hint in hints.items():
            if typing.get_origin(hint) is Literal and getattr(self, name) not in typing.get_args(hint):
                choices = ", ".join(typing.get_args(hint))
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        checks = [
            (self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device must be auto, cpu or cuda"),
            (self.attn in ("auto", "sdpa", "eager", "flash_attention_2"),
             "attn must be auto, sdpa, eager or flash_attention_2"),
            (self.difficulty in ("easy", "medium", "hard", "all"), "difficulty must be easy, medium, hard or all"),
            (self.sft_steps >= 0 and self.sft_batch_size >= 1 and self.sft_lr > 0,
             "sft_steps must be >= 0, sft_batch_size >= 1 and sft_lr > 0"),
            (self.steps >= 0, "steps must be >= 0"),
            (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
            (self.group_size >= 2, "group_size must be >= 2 (GRPO compares completions within a group)"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature > 0, "temperature must be > 0 for rollouts"),
            (0 < self.top_p <= 1 and self.top_k >= 0, "top_p must be in (0, 1] and top_k >= 0"),
            (self.lr >= 0 and self.weight_decay >= 0 and self.grad_clip > 0,
             "lr and weight_decay must be >= 0 and grad_clip > 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.minibatches >= 1 and self.ppo_epochs >= 1, "minibatches and ppo_epochs must be >= 1"),
            (0 <= self.eps_low < 1 and self.eps_high >= 0, "eps_low must be in [0, 1) and eps_high >= 0"),
            (self.tis_cap == 0 or self.tis_cap >= 1, "tis_cap must be 0 (off) or >= 1"),
            (self.kl_coef >= 0 and self.entropy_coef >= 0, "kl_coef and entropy_coef must be >= 0"),
            (self.entropy_kappa >= 1,
             "entropy_kappa must be >= 1, or the bonus could flip the sign of a negative advantage"),
            (self.max_refill_rounds >= 0, "max_refill_rounds must be >= 0"),
            (self.sampler_token_budget >= 1, "sampler_token_budget must be >= 1"),
            (self.micro_batch_tokens >= 0, "micro_batch_tokens must be >= 0 (0 = no limit)"),
            (self.segment_tokens >= 0, "segment_tokens must be >= 0 (0 = no recomputed segments)"),
            (min(self.eval_every, self.eval_limit, self.sample_every, self.save_every) >= 0,
             "eval_every, eval_limit, sample_every and save_every must be >= 0"),
            (self.eval_bfcl_limit >= 1, "eval_bfcl_limit must be >= 1"),
            (self.keep_last >= 0, "keep_last must be >= 0"),
            (not self.recipe or self.recipe in RECIPES, f"recipe must be empty or one of {', '.join(RECIPES)}"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ValueError(problem)
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r} (float16 training would "
                             "need loss scaling; bfloat16 does not)")
        for name in ("rollout_dtype", "reference_dtype"):
            if getattr(self, name) not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
                raise ValueError(f"{name} must be auto, float32 or bfloat16, got {getattr(self, name)!r}")

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(self.answer_format, self.tools_as, self.prefill)


# --recipe NAME: values applied before the explicit flags (which win); config.json records the resolved values.
RECIPES = {
    # The paper's published v4 (EGPO) settings (arXiv 2508.05118 v4; see README for the ones without a field here):
    # Qwen3-4B-Instruct-2507, lr 1e-6, KL 0.001, 1,024 prompts x 8 rollouts, responses up to 8,192 tokens,
    # temperature 0.7, lambda 0.4 and alpha (kappa) 2 on the sequence-level <think> entropy, strict binary reward,
    # BFCL's prompt (tools as JSON) with the think/answer format, nothing prefilled (the model opens its own
    # <think>). RL starts from the instruct model (the paper describes no supervised stage) on the whole prepared
    # data (no difficulty filter).
    "egpo-v4": {"model": "Qwen/Qwen3-4B-Instruct-2507", "lr": 1e-6, "kl_coef": 0.001, "prompts_per_step": 1024,
                "group_size": 8, "max_new_tokens": 8192, "temperature": 0.7, "entropy_coef": 0.4,
                "entropy_kappa": 2.0, "entropy_mode": "seq", "reward_mode": "binary", "answer_format": "think",
                "tools_as": "json", "prefill": "", "sft_steps": 0, "difficulty": "all"},
}


def main(argv=None):
    cfg = parse_config(Config, argv, recipes=RECIPES)
    device = pick_device(cfg.device)
    d = init_distributed(device, cfg.fsdp)
    log = tqdm.write if d.master else (lambda msg: None)
    run_dir = Path(cfg.out_dir)
    if not cfg.resume and ((run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()):
        raise SystemExit(f"{run_dir} already holds a run: pass --resume auto to continue it, or choose another "
                         "--out-dir (nothing was overwritten)")
    run_files = {"run_config.json": config_to_json(cfg), "prompt_format.json": cfg.prompt_format.to_json()}
    if d.master:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(run_files["run_config.json"])
            (run_dir / "prompt_format.json").write_text(run_files["prompt_format.json"])
        except OSError as e:
            raise SystemExit(f"error: --out-dir {run_dir}: cannot write there ({e.strerror or e}); choose a "
                             "writable directory") from None
    tracker = open_tracker(cfg.report_to, run_dir, json.loads(run_files["run_config.json"])) if d.master else Tracker()

    def write_row(row: dict):
        if d.master:
            append_row(run_dir / "metrics.jsonl", row)
            tracker.log_row(row)

    torch.manual_seed(seed_for(cfg.seed, "torch"))
    train_records, val_records = load_data(cfg)

    # ---------------------------------------------------------------- models
    resume_from = find_resume_point(cfg, run_dir, log) if cfg.resume else None
    warm_dir = run_dir / "warmup"  # the policy after the supervised warm-up: RL's starting point and reference
    warm_ok = checkpoint_problem(warm_dir) is None
    from_warmup = cfg.resume and resume_from is None and warm_ok
    start_from = str(resume_from) if resume_from else (str(warm_dir) if warm_ok else cfg.model)
    # mixed precision: the policy's master weights and optimizer state in fp32, its matmuls in the compute dtype
    compute_dtype = pick_dtype(cfg.dtype, device)
    rollout_dtype = pick_rollout_dtype(cfg.rollout_dtype, compute_dtype, device)  # see README, Sampling
    # the reference only scores (no gradient, and only the small KL term): held in the rollouts' precision
    reference_dtype = rollout_dtype if cfg.reference_dtype == "auto" else pick_dtype(cfg.reference_dtype, device)
    try:
        tokenizer = load_tokenizer(cfg.model if start_from == cfg.model else start_from, cfg.cache_dir or None)
        policy = load_model(start_from, device, "float32", cfg.attn, cfg.cache_dir or None)
    except (ModelLoadError, OSError, ValueError, SafetensorError) as e:
        hint = "" if isinstance(e, ModelLoadError) else (" (--model takes smollm2-135m, a local model directory or "
                                                         "a Hugging Face id already in the local cache)")
        raise SystemExit(f"error: cannot load {start_from!r}: " + " ".join(str(e).split())[:500] + hint) from None
    if cfg.resume and resume_from is None:  # the logs go back to the state resumed from (for a checkpoint: below)
        if d.master:
            drop_rows_after(run_dir, 0 if from_warmup else None)
        log(f"[train] no checkpoint to resume from: continuing from {'warmup/' if from_warmup else 'the start'}")
    if cfg.grad_checkpointing:
        enable_activation_checkpointing(policy)
    vocab_size = real_vocab_size(tokenizer, policy)  # never score head rows the sampler cannot emit
    # Under FSDP every layer call is a collective, so a forward must call each layer equally often on every rank:
    # the shared-prompt path calls the body twice per group, and ranks hold different numbers of groups.
    scorer = PolicyScorer(policy, vocab_size, cfg.share_prompt_kv and not cfg.fsdp, compute_dtype, cfg.segment_tokens)
    train_scorer = wrap_for_training(scorer, policy, cfg.fsdp, d, device, compute_dtype)
    n_params = sum(p.numel() for p in policy.parameters())
    name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
    log(f"[train] {describe_paths(policy, compute_dtype, cfg.fsdp)}; rollouts sampled in {name(rollout_dtype)}"
        + (f"; reference held in {name(reference_dtype)}" if cfg.kl_coef > 0 else ""))
    log(f"[train] policy {start_from} on {device} x{d.world}, {n_params / 1e6:.1f}M params, {len(train_records)} "
        f"train / {len(val_records)} val records -> {run_dir}")

    held_out = functools.partial(evaluate, policy, scorer, tokenizer, val_records, cfg, d)  # held_out(tag) -> row

    # ---------------------------------------------------------------- supervised warm-up (cold start)
    evals = Evals(run_dir / "evals.json", d.master)  # written as they happen: summary.json survives any resume
    fresh_start = resume_from is None and start_from == cfg.model
    if fresh_start:
        evals.reset({})
        if cfg.eval_before:
            evals.update(held_out("before"))
    if fresh_start and cfg.sft_steps > 0:
        supervised_warmup(train_scorer, policy, tokenizer, train_records, cfg, d, write_row)
        save_warmed_up_policy(run_dir, policy, tokenizer, cfg.fsdp, run_files, d.rank, d.barrier)
        warm_ok = True
    evaluated_after_warmup = False
    if from_warmup:  # the warm-up is done and its "before" evaluation recorded; the one after it may be too
        recorded = {k: v for k, v in evals.read().items() if k.startswith(("eval/before/", "eval/after_warmup/"))}
        complete = d.master and after_warmup_recorded(recorded, run_dir, cfg)  # the master's files decide for all
        evaluated_after_warmup = d.all_reduce(torch.tensor([float(complete)], dtype=torch.float64)).item() > 0
        evals.reset(recorded if evaluated_after_warmup else
                    {k: v for k, v in recorded.items() if k.startswith("eval/before/")})
    if ((fresh_start and cfg.sft_steps > 0) or from_warmup) and not evaluated_after_warmup:
        evals.update(held_out("after_warmup"))

    reference_scorer = None
    if cfg.kl_coef > 0:  # the frozen reference is where RL starts: the warmed-up policy if there is one
        if resume_from is not None and cfg.sft_steps > 0 and not warm_ok:
            raise SystemExit(f"error: {warm_dir} (the KL reference) does not verify: {checkpoint_problem(warm_dir)}")
        ref_source = str(warm_dir) if warm_ok else cfg.model
        reference = load_model(ref_source, device, name(reference_dtype), cfg.attn, cfg.cache_dir or None).eval()
        reference.requires_grad_(False)  # frozen: no master copy
        reference_scorer = PolicyScorer(reference, vocab_size, cfg.share_prompt_kv, reference_dtype)
    # fused: one kernel over all parameters (on a 2-core CPU 0.08 s a step against 0.3-0.6 s for the per-parameter
    # loop torch picks on CPU by default)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99),
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    cursor = PromptCursor(train_records, cfg.seed)
    start_step, skipped_updates = 0, 0
    if resume_from is not None:
        try:
            state = resume_training(resume_from, scorer, optimizer, scheduler, cfg.fsdp, d.rank)
        except (ValueError, KeyError, TypeError) as e:  # files that verify but do not hold a trainer state
            raise SystemExit(f"error: {resume_from}: cannot restore the trainer state: {e}") from None
        cursor.state, start_step, skipped_updates = state["cursor"], state["step"], state["skipped_updates"]
        evals.reset(state["evals"])
        if d.master:
            drop_rows_after(run_dir, start_step)
        log(f"[train] resumed from {resume_from} at step {start_step}")

    # ---------------------------------------------------------------- the GRPO loop
    bar = tqdm(range(start_step, cfg.steps), desc="GRPO", disable=not d.master, initial=start_step, total=cfg.steps)
    for step in bar:
        # 1) rollouts: every rank samples and rewards its share of the step's prompts
        t0 = time.time()
        policy.eval()
        with full_params(scorer, cfg.fsdp), autocast_to(rollout_dtype, device):  # weights cast once per step
            batch = collect_rollouts(policy, tokenizer, cursor, step, cfg, d)
        t_sample = time.time() - t0

        # 2) advantages; 3) scoring: old / reference log-probs and the chain-of-thought mask
        t1 = time.time()
        rewards = torch.tensor(batch.rewards, dtype=torch.float32)  # [S]
        advantages = group_advantages(rewards, cfg.group_size, std_norm=cfg.std_norm) if len(batch) else rewards
        scored = score_rollouts(scorer, reference_scorer, batch, tokenizer, cfg, d)
        t_score = time.time() - t1

        # 4) PPO-clip updates (on-policy by default: one update, ratio = 1); a non-finite one is skipped
        t2 = time.time()
        policy.train()
        stats = update_policy(train_scorer, policy, optimizer, batch, scored, advantages, step, cfg, d, log)
        with warnings.catch_warnings():  # a skipped first update (logged above): the schedule follows the steps
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            scheduler.step()
        skipped_updates += stats["skipped"]
        t_update = time.time() - t2

        # 5) metrics (global over ranks) and, every few steps, the completions
        elapsed = time.time() - t0
        row = {"phase": "rl", "step": step + 1, **step_metrics(batch, advantages, stats, d),
               "lr": optimizer.param_groups[0]["lr"], "skipped_updates": skipped_updates,
               "time_sample": t_sample, "time_score": t_score, "time_update": t_update, "time_step": elapsed,
               "tokens_per_s": stats["tokens"] / elapsed, "peak_mem_gb": peak_memory_gb(device),
               "mem_gb": memory_gb(device)}
        write_row(row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{row['kl']:.4f}", H=f"{row['cot_entropy']:.2f}",
                        s=f"{elapsed:.1f}")
        if d.master and cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            tracker.log_samples(step + 1, write_samples(run_dir / "samples.jsonl", step + 1, batch, cfg.prefill))

        # 6) evaluation and checkpoint
        last = step + 1 == cfg.steps
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
            write_row({"phase": "eval", "step": step + 1, **held_out(f"step{step + 1}")})
        if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            fault_point("before_checkpoint")
            if last:
                evals.update(held_out("after_rl"))
            state = {"cursor": dict(cursor.state), "step": step + 1, "skipped_updates": skipped_updates,
                     "evals": evals.values}
            save_training_checkpoint(run_dir, step + 1, policy, scorer, optimizer, scheduler, tokenizer, state,
                                     run_files, cfg.fsdp, d.rank, d.world, d.barrier)
            if d.master:
                prune_checkpoints(run_dir, cfg.keep_last)

    if d.master:
        write_summary(run_dir, evals.values, write_row)
        tracker.close()
    d.close()


def find_resume_point(cfg: Config, run_dir: Path, log) -> Path | None:
    """The checkpoint to resume from: --resume PATH must verify; --resume auto takes the newest that verifies
    (None: continue from warmup/ or from the start). Pickled checkpoints of older versions are refused."""
    if cfg.resume != "auto":
        problem = checkpoint_problem(cfg.resume)
        if problem:
            raise SystemExit(f"error: --resume {cfg.resume}: not a usable checkpoint: {problem}")
        return Path(cfg.resume)
    for path in checkpoints_newest_first(run_dir):
        if is_old_format(path):
            raise SystemExit(f"error: checkpoint {path} {checkpoint_problem(path)}")
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log(f"[train] skipping checkpoint {path.name}: {problem}; falling back to an older one")
    return None


def after_warmup_recorded(recorded: dict, run_dir: Path, cfg: Config) -> bool:
    """Whether the evaluation after the warm-up is already on file, as this run would make it (its accuracy on the
    held-out records, every BFCL category asked for, and the per-record verdicts): a resume from warmup/ then
    skips it. eval.ablate starts its RL runs this way from the control's warm-up and evaluation."""
    from eval.bfcl import parse_categories

    keys = {k.removeprefix("eval/after_warmup/") for k in recorded if k.startswith("eval/after_warmup/")}
    wanted = ({"val_accuracy"} if cfg.eval_limit > 0 else set()) | {
        f"bfcl_{c}" for c in (parse_categories(cfg.eval_bfcl) if cfg.eval_bfcl else [])}
    return bool(keys) and wanted <= keys and (run_dir / "eval_records" / "after_warmup.jsonl").is_file()


class Evals:
    """The run's evaluations ({"eval/before/val_accuracy": ..., ...}), rewritten to a JSON file (by the master)
    whenever they change, so that a resumed run's summary holds the same keys as an uninterrupted one's."""

    def __init__(self, path: Path, master: bool):
        self.path, self.master, self.values = path, master, {}

    def read(self) -> dict:
        try:
            values = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return values if isinstance(values, dict) else {}

    def reset(self, values: dict) -> None:
        self.values = dict(values)
        if self.master:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.values, indent=1))
            tmp.replace(self.path)

    def update(self, values: dict) -> None:
        self.reset({**self.values, **values})


def load_data(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records) of the chosen difficulty. Unreadable or malformed files are a
    one-line error."""
    train_records = read_records("--train-data", cfg.train_data) if cfg.train_data else load_default("train")
    val_records = read_records("--val-data", cfg.val_data) if cfg.val_data else load_default("val")
    if cfg.difficulty != "all":
        train_records = [r for r in train_records if r.get("difficulty", cfg.difficulty) == cfg.difficulty]
        val_records = [r for r in val_records if r.get("difficulty", cfg.difficulty) == cfg.difficulty]
    if not train_records:
        raise SystemExit(f"no training records left after --difficulty {cfg.difficulty}; try --difficulty all")
    return train_records, val_records[: cfg.eval_limit]


def read_records(flag: str, path: str) -> list[dict]:
    try:
        return load_records(path)
    except (ValueError, OSError) as e:  # unreadable, not UTF-8 JSON lines, malformed records
        raise SystemExit(f"error: {flag}: " + " ".join(str(e).split())) from None


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up over cfg.warmup_steps RL steps, then constant or cosine to 0 at cfg.steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def evaluate(model, root, tokenizer, val_records: list[dict], cfg: Config, d: Dist, tag: str) -> dict:
    """Greedy accuracy on the held-out records (+ BFCL subsets if asked); the ranks share the work. `root` is
    the module whose FSDP shards are gathered around generation. The verdict on every record goes to
    <out_dir>/eval_records/<tag>.jsonl (what confidence intervals over records are computed from)."""
    from eval.bfcl import evaluate_bfcl_verdicts, evaluate_records, write_verdicts  # same sampler and checker

    if not val_records and not cfg.eval_bfcl:
        return {}
    model.eval()
    bfcl, bfcl_verdicts = {}, []
    with full_params(root, cfg.fsdp), autocast_to(root.compute_dtype, next(model.parameters()).device):
        result = evaluate_records(model, tokenizer, val_records[d.rank::d.world], cfg.prompt_format,
                                  max_new_tokens=cfg.max_new_tokens)
        if cfg.eval_bfcl:
            bfcl, bfcl_verdicts = evaluate_bfcl_verdicts(
                model, tokenizer, cfg.eval_bfcl.split(","), cfg.eval_bfcl_limit, rank=d.rank, world=d.world,
                all_reduce=d.all_reduce, prompt_format=cfg.prompt_format, max_new_tokens=cfg.max_new_tokens)
    counts = d.all_reduce(torch.tensor([result["correct"], result["total"]], dtype=torch.float64))
    out = {f"eval/{tag}/val_accuracy": (counts[0] / counts[1].clamp(min=1)).item()}
    out.update({f"eval/{tag}/bfcl_{category}": accuracy for category, accuracy in bfcl.items()})
    verdicts = [v for shard in d.gather_objects(result["verdicts"] + bfcl_verdicts) for v in shard]
    if d.master:
        write_verdicts(Path(cfg.out_dir) / "eval_records" / f"{tag}.jsonl", verdicts)
        tqdm.write(f"[eval] {tag}: " + ", ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in out.items()))
    return out


def write_summary(run_dir: Path, evals: dict, write_row) -> None:
    """The summary row and summary.json, the curves, and where everything is."""
    write_row({"phase": "summary", **evals})
    (run_dir / "summary.json").write_text(json.dumps(evals, indent=2))
    try:
        from eval.plot import plot_runs
        plots = plot_runs([run_dir], run_dir / "plots")
    except Exception as e:  # plotting is a convenience; never lose a finished run over it
        plots = f"(plotting failed: {e})"
    print("\n[done] " + " | ".join(f"{k.replace('eval/', '')}={v:.3f}" for k, v in evals.items()))
    print(f"[done] metrics: {run_dir / 'metrics.jsonl'}\n[done] samples: {run_dir / 'samples.jsonl'}\n"
          f"[done] curves:  {plots}\n[done] checkpoint: {latest_checkpoint(run_dir)}")


if __name__ == "__main__":
    main()
