"""GRPO + FunRL/EGPO (entropy-enhanced advantage) for LLM function calling, top to bottom:
config -> distributed init -> models -> data -> (optional supervised warm-up) -> the GRPO loop -> evaluation.

    torchrun --standalone --nproc_per_node=1 train.py            # the default CPU run (embedded model + data)
    torchrun --nproc_per_node=8 train.py --model Qwen/Qwen2.5-Coder-7B-Instruct --fsdp ...   # see README
    python train.py --help                                         # every knob
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.calls import format_calls, render_prompt
from data.default import load_default, load_records
from eval.track import Tracker, open_tracker
from model.compat import enable_activation_checkpointing
from model.load import (latest_checkpoint, load_model, load_tokenizer, pick_device, prune_checkpoints, save_checkpoint,
                        save_policy, set_rng_state)
from model.score import completion_logprobs, shared_prompt_logprobs
from rl.cli import config_to_json, parse_config
from rl.grpo import (aggregate, finite_on_all_ranks, group_advantages, kl_k3, per_token_loss, shaped_advantages,
                     think_token_mask, zero_variance_groups)
from rl.reward import reward as compute_reward
from rl.sampler import logprob_gap, rank_seed, real_vocab_size, sample


@dataclass
class Config:
    """GRPO + FunRL for function calling. Defaults: the CPU run on the embedded SmolLM2-135M (see README for
    the paper's GPU settings)."""
    # --- run ---
    model: str = "smollm2-135m"  # HF id (from the local cache), a model/checkpoint directory, or smollm2-135m
    out_dir: str = "runs/default"  # run directory: config.json, metrics.jsonl, samples.jsonl, checkpoints/, plots
    seed: int = 0  # seeds data order, sampling (per step and rank) and init
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16
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
    sampler_token_budget: int = 65536  # tokens (batch x (prompt + new)) per generate call; bounds memory
    share_prompt_kv: bool = True  # score a group's prompt once and reuse its KV cache for the G completions
    # --- evaluation, logging, checkpoints ---
    eval_every: int = 0  # evaluate every N RL steps (0 = only before and after training)
    eval_limit: int = 40  # held-out records per evaluation (greedy; 0 = no evaluation)
    eval_bfcl: str = ""  # comma-separated BFCL categories to evaluate as well (e.g. simple_python,multi_turn_base)
    eval_bfcl_limit: int = 20  # items per BFCL category (a fixed seeded subset)
    sample_every: int = 5  # write the step's completions to samples.jsonl every N steps
    save_every: int = 10  # checkpoint every N RL steps (the final step is always saved)
    keep_last: int = 2  # checkpoints to keep
    resume: str = ""  # "auto" = continue from the newest complete checkpoint in out_dir, or a checkpoint path
    report_to: Literal["none", "tensorboard", "wandb"] = "none"  # also log metrics, config, samples there (optional)

    def validate(self) -> str:
        if self.group_size < 2:
            return "group_size must be >= 2 (GRPO compares completions within a group)"
        if self.prompts_per_step <= 0:
            return "prompts_per_step must be >= 1"
        if self.entropy_kappa < 1:
            return "entropy_kappa must be >= 1, or the bonus could flip the sign of a negative advantage"
        if self.temperature <= 0:
            return "temperature must be > 0 for rollouts"
        if self.minibatches < 1 or self.ppo_epochs < 1:
            return "minibatches and ppo_epochs must be >= 1"
        return ""


def main(argv=None):
    cfg = parse_config(Config, argv)

    # ---------------------------------------------------------------- distributed (torchrun or single process)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    distributed = world > 1
    device = pick_device(cfg.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    if device.type == "cpu" and distributed:  # torchrun sets OMP_NUM_THREADS=1; share the cores instead
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    master = rank == 0

    def all_reduce(t, op=dist.ReduceOp.SUM):
        if distributed:
            dist.all_reduce(t, op=op)
        return t

    def barrier():
        if distributed:
            dist.barrier()

    def log(msg):
        if master:
            tqdm.write(msg)

    run_dir = Path(cfg.out_dir)
    if not cfg.resume and ((run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()):
        raise SystemExit(f"{run_dir} already holds a run: pass --resume auto to continue it, or choose another "
                         "--out-dir (nothing was overwritten)")
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config_to_json(cfg))
    tracker = open_tracker(cfg.report_to, run_dir, json.loads(config_to_json(cfg))) if master else Tracker()
    torch.manual_seed(cfg.seed)

    # ---------------------------------------------------------------- data
    train_records = load_records(cfg.train_data) if cfg.train_data else load_default("train")
    val_records = load_records(cfg.val_data) if cfg.val_data else load_default("val")
    if cfg.difficulty != "all":
        train_records = [r for r in train_records if r.get("difficulty", cfg.difficulty) == cfg.difficulty]
        val_records = [r for r in val_records if r.get("difficulty", cfg.difficulty) == cfg.difficulty]
    if not train_records:
        raise SystemExit(f"no training records left after --difficulty {cfg.difficulty}; try --difficulty all")
    val_records = val_records[: cfg.eval_limit]

    # ---------------------------------------------------------------- models
    resume_from = None
    if cfg.resume:
        resume_from = latest_checkpoint(run_dir) if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume != "auto" and not (resume_from / "trainer_state.pt").is_file():
            raise SystemExit(f"--resume {cfg.resume}: not a complete checkpoint (no trainer_state.pt)")
    warm_dir = run_dir / "warmup"  # the policy after the supervised warm-up: RL's starting point and reference
    start_from = str(resume_from) if resume_from else (str(warm_dir) if (warm_dir / "config.json").is_file()
                                                        else cfg.model)
    tokenizer = load_tokenizer(cfg.model if start_from == cfg.model else start_from, cfg.cache_dir or None)
    policy = load_model(start_from, device, cfg.dtype, cfg.attn, cfg.cache_dir or None)
    if cfg.grad_checkpointing:
        enable_activation_checkpointing(policy)
    vocab_size = real_vocab_size(tokenizer, policy)  # never score head rows the sampler cannot emit
    scorer = PolicyScorer(policy, vocab_size, cfg.share_prompt_kv)  # one module whose forward is the scoring pass, so DDP/FSDP can wrap it
    if cfg.fsdp:  # FSDP2: shard every decoder layer, then the rest (embeddings, norm, head) at the root
        from torch.distributed.fsdp import fully_shard
        for layer in policy.model.layers:
            fully_shard(layer)
        fully_shard(scorer)
        with torch.no_grad():  # FSDP must initialise through the root; generate() would reach the layers first
            scorer([[0]], [[0]], 1.0, False, False)
        scorer.reshard()  # the root stays unsharded after a forward; the optimizer must see the sharded params
        train_scorer = scorer
    elif distributed:
        from torch.nn.parallel import DistributedDataParallel
        train_scorer = DistributedDataParallel(scorer, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_scorer = scorer

    @contextlib.contextmanager
    def full_params():
        """generate() calls the policy directly: under FSDP gather the root's shards around it."""
        if cfg.fsdp:
            scorer.unshard()
        yield
        if cfg.fsdp:
            scorer.reshard()

    def full_model_state():
        """Under FSDP the full state dict gathered on rank 0 (every rank must call this); else None (the model's)."""
        if not cfg.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    log(f"[train] policy {start_from} on {device} x{world}, {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M "
        f"params, {len(train_records)} train / {len(val_records)} val records -> {run_dir}")

    def prompt_ids(record) -> list[int]:
        text = render_prompt(tokenizer, record["messages"], record["tools"], answer_format=cfg.answer_format,
                             tools_as=cfg.tools_as, prefill=cfg.prefill)
        return tokenizer(text, add_special_tokens=False).input_ids

    def target_text(record) -> str:
        """What the warm-up teaches: a short reasoning, then the reference calls (prefill excluded)."""
        calls = format_calls(record["answers"])
        if cfg.answer_format == "plain":
            return calls
        think = record.get("reasoning") or "I will pick the matching function and fill in its arguments."
        body = f"<think>{think}</think><answer>{calls}</answer>"
        return body[len(cfg.prefill):] if body.startswith(cfg.prefill) else body

    def evaluate(model, tag: str) -> dict:
        """Greedy accuracy on the held-out records (+ BFCL subsets if asked), all ranks share the work."""
        from eval.bfcl import evaluate_records  # eval uses the same sampler, template and checker

        if not val_records and not cfg.eval_bfcl:
            return {}
        model.eval()
        shard = val_records[rank::world]
        with full_params():
            result = evaluate_records(model, tokenizer, shard, answer_format=cfg.answer_format,
                                      tools_as=cfg.tools_as, prefill=cfg.prefill, max_new_tokens=cfg.max_new_tokens)
        counts = torch.tensor([result["correct"], result["total"]], dtype=torch.float64)
        all_reduce(counts)
        out = {f"eval/{tag}/val_accuracy": (counts[0] / counts[1].clamp(min=1)).item()}
        if cfg.eval_bfcl:
            from eval.bfcl import evaluate_bfcl
            for cat, acc in evaluate_bfcl(model, tokenizer, cfg.eval_bfcl.split(","), cfg.eval_bfcl_limit,
                                          rank=rank, world=world, all_reduce=all_reduce,
                                          answer_format=cfg.answer_format, tools_as=cfg.tools_as,
                                          prefill=cfg.prefill, max_new_tokens=cfg.max_new_tokens).items():
                out[f"eval/{tag}/bfcl_{cat}"] = acc
        log(f"[eval] {tag}: " + ", ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in out.items()))
        return out

    evals = {}
    metrics_path = run_dir / "metrics.jsonl"

    def write_metrics(row: dict):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            tracker.log_row(row)

    # ---------------------------------------------------------------- supervised warm-up (cold start)
    if cfg.sft_steps > 0 and resume_from is None and start_from == cfg.model:
        evals.update(evaluate(policy, "before"))
        policy.train()
        sft_opt = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
        order = torch.randperm(len(train_records), generator=torch.Generator().manual_seed(cfg.seed + 1))
        bar = tqdm(range(cfg.sft_steps), desc="warm-up", disable=not master)
        for step in bar:
            idx = [order[(step * cfg.sft_batch_size + j) % len(order)].item() for j in range(cfg.sft_batch_size)]
            batch = [train_records[i] for i in idx][rank::world]
            prompts = [prompt_ids(r) for r in batch]
            targets = [tokenizer(target_text(r), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                       for r in batch]
            logp, _, _ = train_scorer(prompts, targets, 1.0, False, False)
            n_tokens = all_reduce(torch.tensor(float(logp.numel()))).item()
            loss = -logp.sum() / n_tokens * world  # token mean over the global batch (DDP averages over ranks)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            sft_opt.step()
            sft_opt.zero_grad(set_to_none=True)
            bar.set_postfix(nll=f"{loss.item() / world:.3f}")
            write_metrics({"phase": "warmup", "step": step, "sft_nll": loss.item() / world})
        del sft_opt
        model_state = full_model_state()
        if master:
            tmp = warm_dir.with_name("warmup.tmp")
            save_policy(tmp, policy, tokenizer, model_state)
            os.replace(tmp, warm_dir)
        barrier()
        evals.update(evaluate(policy, "after_warmup"))
    elif resume_from is None and start_from == cfg.model:
        evals.update(evaluate(policy, "before"))

    reference = None
    if cfg.kl_coef > 0:  # the frozen reference is where RL starts: the warmed-up policy if there is one
        ref_source = str(warm_dir) if (warm_dir / "config.json").is_file() else cfg.model
        reference = load_model(ref_source, device, cfg.dtype, cfg.attn, cfg.cache_dir or None).eval()
        reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))

    def lr_factor(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    # The data cursor: prompts are taken in a per-epoch permutation fixed by (seed, epoch).
    cursor = {"epoch": 0, "pos": 0}
    start_step, skipped_updates = 0, 0
    if resume_from is not None:
        state = torch.load(resume_from / "trainer_state.pt", weights_only=False)
        if cfg.fsdp:  # the checkpoint holds the full optimizer state; each rank keeps its shards of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(scorer, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        cursor, start_step, skipped_updates = state["cursor"], state["step"], state["skipped_updates"]
        evals = state.get("evals", {})
        set_rng_state(torch.load(resume_from / f"rng-rank{rank}.pt", weights_only=False))
        if master:  # drop what the interrupted run logged after this checkpoint, so no step appears twice
            for name in ("metrics.jsonl", "samples.jsonl"):
                path = run_dir / name
                if path.is_file():
                    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                    path.write_text("".join(json.dumps(r) + "\n" for r in rows
                                            if r.get("phase") == "warmup" or r.get("step", 0) <= start_step))
        log(f"[train] resumed from {resume_from} at step {start_step}")

    def next_prompts(n: int) -> list[dict]:
        out = []
        while len(out) < n:
            perm = torch.randperm(len(train_records), generator=torch.Generator().manual_seed(cfg.seed + cursor["epoch"]))
            take = perm[cursor["pos"]: cursor["pos"] + n - len(out)].tolist()
            out += [train_records[i] for i in take]
            cursor["pos"] += len(take)
            if cursor["pos"] >= len(train_records):
                cursor["epoch"], cursor["pos"] = cursor["epoch"] + 1, 0
        return out

    def rollout(records, global_index, round_idx, step):
        """Sample G completions per record and score them. Returns a dict of per-completion lists."""
        prompts = [prompt_ids(r) for r in records]
        # one seed per completion from (seed, step, round, global prompt index, g): the rollouts do not depend
        # on how prompts are sharded over ranks or batched, so 1 and N processes sample the same batch
        row_seeds = [rank_seed(cfg.seed, step * 16 + round_idx, k * cfg.group_size + g)
                     for k in global_index for g in range(cfg.group_size)]
        with full_params():
            out = sample(policy, tokenizer, prompts, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                         row_seeds=row_seeds, token_budget=cfg.sampler_token_budget, return_logprobs=True)
        rewards, reasons = [], []
        for text, p in zip(out.texts, out.prompt_index):
            r, why = compute_reward(cfg.prefill + text, records[p], answer_format=cfg.answer_format,
                                    mode=cfg.reward_mode)
            rewards.append(r)
            reasons.append(why)
        return {"records": [records[p] for p in out.prompt_index], "prompts": [prompts[p] for p in out.prompt_index],
                "completions": out.completion_ids, "texts": out.texts, "truncated": out.truncated,
                "sampler_logp": out.sampler_logp, "rewards": rewards, "reasons": reasons}

    # ---------------------------------------------------------------- the GRPO loop
    per_rank_prompts = cfg.prompts_per_step // world + (rank < cfg.prompts_per_step % world)
    G = cfg.group_size
    bar = tqdm(range(start_step, cfg.steps), desc="GRPO", disable=not master, initial=start_step, total=cfg.steps)
    for step in bar:
        t0 = time.time()
        policy.eval()
        # 1) rollouts: every rank samples its shard of the step's prompts
        batch = None
        for round_idx in range(1 + (cfg.max_refill_rounds if cfg.dynamic_sampling else 0)):
            global_index = list(range(rank, cfg.prompts_per_step, world))
            step_records = next_prompts(cfg.prompts_per_step)[rank::world]
            new = rollout(step_records, global_index, round_idx, step)
            if cfg.dynamic_sampling:  # keep only groups with signal, on the binary success
                success = torch.tensor([float(r >= 1.0) for r in new["rewards"]])
                keep = ~zero_variance_groups(success, G)
                new = {k: ([v[i] for g in keep.nonzero().flatten().tolist() for i in range(g * G, (g + 1) * G)]
                           if isinstance(v, list) else v) for k, v in new.items()}
            batch = new if batch is None else {k: batch[k] + new[k] for k in batch}
            have = torch.tensor(float(len(batch["rewards"]) // G))
            if not cfg.dynamic_sampling or all_reduce(have, dist.ReduceOp.MIN).item() >= per_rank_prompts:
                break
        if cfg.dynamic_sampling:  # trim to the step's size on every rank
            batch = {k: v[: per_rank_prompts * G] for k, v in batch.items()}
        t_sample = time.time() - t0

        # 2) advantages, old / reference log-probs, chain-of-thought entropies
        t1 = time.time()
        S = len(batch["rewards"])
        rewards = torch.tensor(batch["rewards"], dtype=torch.float32)  # [S]
        advantages = group_advantages(rewards, G, std_norm=cfg.std_norm) if S else rewards
        lengths = [len(c) for c in batch["completions"]]
        T = max(lengths, default=1)
        mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()  # [S, T] response mask
        think_mask = think_token_mask(batch["completions"], tokenizer, cfg.prefill.endswith("<think>"), T) * mask

        on_policy = cfg.ppo_epochs == 1 and cfg.minibatches == 1
        with torch.no_grad():
            old_logp = entropy = ref_logp = None
            if not on_policy:
                lp, ent, _ = scorer(batch["prompts"], batch["completions"], cfg.temperature, True, True)
                old_logp, entropy = pad_rows(lp, mask), pad_rows(ent, mask)  # [S, T] on CPU
            if reference is not None and S:
                lp, _, _ = PolicyScorer(reference, vocab_size, cfg.share_prompt_kv)(
                    batch["prompts"], batch["completions"], cfg.temperature, False, True)
                ref_logp = pad_rows(lp, mask)
        t_score = time.time() - t1

        # 3) PPO-clip updates over minibatches (on-policy by default: a single update, ratio = 1)
        t2 = time.time()
        policy.train()
        counts = all_reduce(torch.tensor([float(S), mask.sum().item()]))
        n_seqs_global, n_tokens_global = counts[0].item(), counts[1].item()
        stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "bonus": 0.0, "cot_entropy": 0.0,
                 "logp_gap_mean": 0.0, "logp_gap_max": 0.0}
        n_updates = 0
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(S, generator=torch.Generator().manual_seed(cfg.seed + step * 131 + epoch))
            for mb in range(cfg.minibatches):
                idx = sorted(perm[mb::cfg.minibatches].tolist())  # sorted: a group stays contiguous
                if not idx:
                    continue
                lp, ent, _ = train_scorer([batch["prompts"][i] for i in idx],
                                          [batch["completions"][i] for i in idx], cfg.temperature, True, True)
                mb_mask = mask[idx].to(device)
                logp = torch.zeros(len(idx), T, device=device, dtype=torch.float32)
                logp[mb_mask.bool()] = lp
                mb_entropy = pad_rows(ent, mb_mask) if on_policy else entropy[idx].to(device)
                mb_old = logp.detach() if on_policy else old_logp[idx].to(device)
                adv, bonus = shaped_advantages(advantages[idx].to(device), mb_entropy, think_mask[idx].to(device),
                                               cfg.entropy_mode, cfg.entropy_coef, cfg.entropy_kappa)
                mb_ref = ref_logp[idx].to(device) if ref_logp is not None else None
                loss_tok, clipped = per_token_loss(logp, mb_old, adv, cfg.eps_low, cfg.eps_high, mb_ref, cfg.kl_coef)
                # normalised over the whole optimizer step's tokens/sequences on all ranks; x world undoes the
                # averaging of gradients across ranks
                loss = aggregate(loss_tok, mb_mask, cfg.loss_agg, n_seqs_global / cfg.minibatches,
                                 n_tokens_global / cfg.minibatches, cfg.max_new_tokens) * world
                if not finite_on_all_ranks(loss):
                    skipped_updates += 1
                    log(f"[train] step {step}: non-finite loss, update skipped")
                    optimizer.zero_grad(set_to_none=True)
                    continue
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                if cfg.fsdp:  # a DTensor over the shards
                    grad_norm = grad_norm.full_tensor()
                if not finite_on_all_ranks(grad_norm):
                    skipped_updates += 1
                    log(f"[train] step {step}: non-finite gradient norm, update skipped")
                    optimizer.zero_grad(set_to_none=True)
                    continue
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                n_updates += 1
                with torch.no_grad():
                    mtok = mb_mask.sum().clamp(min=1)
                    stats["loss"] += loss.item() / world
                    stats["grad_norm"] += grad_norm.item()
                    stats["clip_frac"] += ((clipped * mb_mask).sum() / mtok).item()
                    if mb_ref is not None:
                        stats["kl"] += ((kl_k3(logp, mb_ref) * mb_mask).sum() / mtok).item()
                    tm = think_mask[idx].to(device)
                    stats["cot_entropy"] += ((mb_entropy * tm).sum() / tm.sum().clamp(min=1)).item()
                    stats["bonus"] += bonus.float().mean().item() if bonus.numel() else 0.0
                    if epoch == 0 and batch["sampler_logp"] is not None:
                        gap = logprob_gap([batch["sampler_logp"][i] for i in idx], [logp[j][: lengths[i]].detach().cpu()
                                          for j, i in enumerate(idx)])
                        stats["logp_gap_mean"] += gap["mean"]
                        stats["logp_gap_max"] = max(stats["logp_gap_max"], gap["max"])
        scheduler.step()
        t_update = time.time() - t2

        # 4) metrics (global over ranks: the loss is a sum of per-rank shares, the rest are averaged)
        n = max(n_updates, 1)
        keys = [k for k in stats if k != "logp_gap_max"]
        summed = all_reduce(torch.tensor([stats[k] for k in keys], dtype=torch.float64))
        stats.update({k: v.item() / (1 if k == "loss" else world) for k, v in zip(keys, summed)})
        stats["logp_gap_max"] = all_reduce(torch.tensor(stats["logp_gap_max"]), dist.ReduceOp.MAX).item()
        # per-completion facts from every rank (small: a few numbers and strings per completion)
        local = [(rec.get("category", "unknown"), r, why.split(":")[0] if why else "correct", length, cut)
                 for rec, r, why, length, cut in zip(batch["records"], batch["rewards"], batch["reasons"], lengths,
                                                     batch["truncated"])]
        shards = [local]
        if distributed:
            shards = [None] * world
            dist.all_gather_object(shards, local)
        facts = [f for shard in shards for f in shard]
        total = max(len(facts), 1)
        reasons, by_cat = {}, {}
        for cat, r, code, _, _ in facts:
            reasons[code] = reasons.get(code, 0) + 1
            c = by_cat.setdefault(cat, [0, 0])
            c[0] += r >= 1.0
            c[1] += 1
        success = torch.tensor([float(r >= 1.0) for r in batch["rewards"]])
        zero_var = all_reduce(torch.tensor([zero_variance_groups(success, G).float().sum().item(), S / G]))
        elapsed = time.time() - t0
        row = {"phase": "rl", "step": step + 1, "reward": sum(f[1] for f in facts) / total,
               "accuracy": sum(f[1] >= 1.0 for f in facts) / total,
               **{f"acc/{k}": v[0] / v[1] for k, v in by_cat.items()},
               **{f"reason/{k}": v / total for k, v in reasons.items()},
               "format_error_rate": sum(v for k, v in reasons.items() if k.startswith("format")) / total,
               **{k: v / n if k != "logp_gap_max" else v for k, v in stats.items()},
               "adv_mean": advantages.mean().item() if S else 0.0, "adv_std": advantages.std().item() if S > 1 else 0.0,
               "zero_var_frac": (zero_var[0] / zero_var[1].clamp(min=1)).item(),
               "resp_len_mean": sum(f[3] for f in facts) / total, "resp_len_max": max(f[3] for f in facts),
               "truncated_frac": sum(f[4] for f in facts) / total, "lr": optimizer.param_groups[0]["lr"],
               "skipped_updates": skipped_updates, "time_sample": t_sample, "time_score": t_score,
               "time_update": t_update, "time_step": elapsed, "tokens_per_s": n_tokens_global / elapsed,
               "peak_mem_gb": peak_memory_gb(device)}
        write_metrics(row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{row['kl']:.4f}", H=f"{row['cot_entropy']:.2f}",
                        s=f"{elapsed:.1f}")
        if master and cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            samples = [{"step": step + 1, "id": rec["id"], "prompt": rec["messages"][-1]["content"],
                        "completion": cfg.prefill + text, "reward": r, "reason": why}
                       for rec, text, r, why in zip(batch["records"], batch["texts"], batch["rewards"],
                                                    batch["reasons"])]
            with open(run_dir / "samples.jsonl", "a") as f:
                f.writelines(json.dumps(sample) + "\n" for sample in samples)
            tracker.log_samples(step + 1, samples)

        # 5) evaluation and checkpoint
        last = step + 1 == cfg.steps
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
            row_eval = evaluate(policy, f"step{step + 1}")
            write_metrics({"phase": "eval", "step": step + 1, **row_eval})
        if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            if last:
                evals.update(evaluate(policy, "after_rl"))
            model_state, optim_state = full_model_state(), optimizer.state_dict()
            if cfg.fsdp:  # the full optimizer state, gathered on rank 0
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
                optim_state = get_optimizer_state_dict(scorer, optimizer, options=StateDictOptions(
                    full_state_dict=True, cpu_offload=True))
            state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(), "cursor": dict(cursor),
                     "step": step + 1, "skipped_updates": skipped_updates, "evals": evals}
            save_checkpoint(run_dir, step + 1, model_state, policy, tokenizer, state, config_to_json(cfg), rank, world,
                            barrier)
            if master:
                prune_checkpoints(run_dir, cfg.keep_last)

    # ---------------------------------------------------------------- summary
    if master:
        write_metrics({"phase": "summary", **evals})
        tracker.close()
        (run_dir / "summary.json").write_text(json.dumps(evals, indent=2))
        try:
            from eval.plot import plot_runs
            plots = plot_runs([run_dir], run_dir / "plots")
        except Exception as e:  # plotting is a convenience; never lose a finished run over it
            plots = f"(plotting failed: {e})"
        final = latest_checkpoint(run_dir)
        print("\n[done] " + " | ".join(f"{k.replace('eval/', '')}={v:.3f}" for k, v in evals.items()))
        print(f"[done] metrics: {metrics_path}\n[done] samples: {run_dir / 'samples.jsonl'}\n"
              f"[done] curves:  {plots}\n[done] checkpoint: {final}")
    if distributed:
        dist.destroy_process_group()


def pad_rows(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter a flat [N] tensor of completion tokens into [S, T] at mask's 1s (detached)."""
    out = torch.zeros(mask.shape, device=mask.device, dtype=torch.float32)
    out[mask.bool()] = flat.detach().float().to(mask.device)
    return out


class PolicyScorer(torch.nn.Module):
    """Per-token log-probs (and detached entropies) of completions under the policy, as a module: DDP's gradient
    all-reduce and FSDP's unshard/reshard hooks need the training forward to go through a module's forward."""

    def __init__(self, policy, vocab_size: int, share_prompt_kv: bool):
        super().__init__()
        self.policy, self.vocab_size, self.share_prompt_kv = policy, vocab_size, share_prompt_kv

    def forward(self, prompts, completions, temperature: float, with_entropy: bool, grouped: bool):
        # grouped: G consecutive completions share a prompt (rollouts), so its forward can be shared
        if grouped and self.share_prompt_kv:
            return shared_prompt_logprobs(self.policy, prompts, completions, temperature, with_entropy,
                                          self.vocab_size)
        return completion_logprobs(self.policy, prompts, completions, temperature, with_entropy,
                                   vocab_size=self.vocab_size)


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


if __name__ == "__main__":
    main()
