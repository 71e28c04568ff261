"""One GRPO optimizer step on a rollout batch: the scoring passes before it and the PPO-clip update with its
skip logic, returning the step's statistics (the math itself is in rl/grpo.py).

    scored = score_rollouts(scorer, reference_scorer, batch, cfg)      # old / reference log-probs, no grad
    stats = update_policy(train_scorer, policy, optimizer, batch, scored, advantages, step, cfg, d, log)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.sample import logprob_gap
from model.score import pad_rows
from rl.dist import finite_on_all_ranks
from rl.grpo import aggregate, kl_k3, per_token_loss, shaped_advantages, think_token_mask
from rl.rollout import RolloutBatch, seed_for


@dataclass
class ScoredBatch:
    """[S, T] tensors (CPU) over a rollout batch, 0 outside the response mask."""
    mask: torch.Tensor  # the response mask
    think_mask: torch.Tensor  # tokens of the <think> span (whose entropy shapes the advantage)
    old_logp: torch.Tensor | None  # the policy before the update (None on-policy: the update's own forward is it)
    entropy: torch.Tensor | None  # per-token entropies of the same forward
    ref_logp: torch.Tensor | None  # the frozen reference (None without a KL term)


def on_policy(cfg) -> bool:
    """One update per batch: the old log-probs are the update's own (ratio = 1), no separate scoring pass."""
    return cfg.ppo_epochs == 1 and cfg.minibatches == 1


@torch.no_grad()
def score_rollouts(scorer, reference_scorer, batch: RolloutBatch, tokenizer, cfg) -> ScoredBatch:
    """Old and reference log-probs and the chain-of-thought mask of a batch, before any update."""
    mask = batch.response_mask()
    think_mask = think_token_mask(batch.completions, tokenizer, cfg.prompt_format.starts_in_think,
                                  mask.shape[1]) * mask
    old_logp = entropy = ref_logp = None
    if not on_policy(cfg):
        lp, ent, _ = scorer(batch.prompts, batch.completions, temperature=cfg.temperature, with_entropy=True,
                            grouped=True)
        old_logp, entropy = pad_rows(lp, mask), pad_rows(ent, mask)
    if reference_scorer is not None and len(batch):
        lp, _, _ = reference_scorer(batch.prompts, batch.completions, temperature=cfg.temperature, grouped=True)
        ref_logp = pad_rows(lp, mask)
    return ScoredBatch(mask, think_mask, old_logp, entropy, ref_logp)


def update_policy(train_scorer, policy, optimizer, batch: RolloutBatch, scored: ScoredBatch,
                  advantages: torch.Tensor, step: int, cfg, d, log=print) -> dict:
    """cfg.ppo_epochs passes of cfg.minibatches optimizer steps over the batch (on-policy by default: a single
    step). An update whose loss or gradient norm is not finite on some rank is skipped on every rank.
    Returns the statistics summed over the updates made, with "updates" and "skipped" counts."""
    device = next(policy.parameters()).device
    mask, think_mask = scored.mask, scored.think_mask
    S, T = mask.shape[0], mask.shape[1]
    fresh = on_policy(cfg)
    counts = d.all_reduce(torch.tensor([float(S), mask.sum().item()]))
    n_seqs, n_tokens = counts[0].item(), counts[1].item()  # the whole optimizer step's, over all ranks
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "bonus": 0.0, "cot_entropy": 0.0,
             "logp_gap_mean": 0.0, "logp_gap_max": 0.0, "updates": 0, "skipped": 0, "tokens": n_tokens}
    lengths = batch.lengths
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(S, generator=torch.Generator().manual_seed(seed_for(cfg.seed, "minibatch", step,
                                                                                    epoch)))
        for mb in range(cfg.minibatches):
            idx = sorted(order[mb::cfg.minibatches].tolist())  # sorted: a group stays contiguous
            if not idx:
                continue
            lp, ent, _ = train_scorer([batch.prompts[i] for i in idx], [batch.completions[i] for i in idx],
                                      temperature=cfg.temperature, with_entropy=True, grouped=True)
            mb_mask = mask[idx].to(device)
            logp = torch.zeros(len(idx), T, device=device, dtype=torch.float32)
            logp[mb_mask.bool()] = lp
            mb_entropy = pad_rows(ent, mb_mask) if fresh else scored.entropy[idx].to(device)
            mb_old = logp.detach() if fresh else scored.old_logp[idx].to(device)
            mb_think = think_mask[idx].to(device)
            adv, bonus = shaped_advantages(advantages[idx].to(device), mb_entropy, mb_think, cfg.entropy_mode,
                                           cfg.entropy_coef, cfg.entropy_kappa)
            mb_ref = scored.ref_logp[idx].to(device) if scored.ref_logp is not None else None
            loss_tok, clipped = per_token_loss(logp, mb_old, adv, cfg.eps_low, cfg.eps_high, mb_ref, cfg.kl_coef)
            # normalised over the whole optimizer step's tokens/sequences on all ranks; x world undoes the
            # averaging of gradients across ranks
            loss = aggregate(loss_tok, mb_mask, cfg.loss_agg, n_seqs / cfg.minibatches, n_tokens / cfg.minibatches,
                             cfg.max_new_tokens) * d.world
            grad_norm = skip = None
            if not finite_on_all_ranks(loss):
                skip = "non-finite loss"
            else:
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                if cfg.fsdp:  # a DTensor over the shards
                    grad_norm = grad_norm.full_tensor()
                if not finite_on_all_ranks(grad_norm):
                    skip = "non-finite gradient norm"
            if skip:
                stats["skipped"] += 1
                log(f"[train] step {step}: {skip}, update skipped")
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats["updates"] += 1
            with torch.no_grad():
                mtok = mb_mask.sum().clamp(min=1)
                stats["loss"] += loss.item() / d.world
                stats["grad_norm"] += grad_norm.item()
                stats["clip_frac"] += ((clipped * mb_mask).sum() / mtok).item()
                if mb_ref is not None:
                    stats["kl"] += ((kl_k3(logp, mb_ref) * mb_mask).sum() / mtok).item()
                stats["cot_entropy"] += ((mb_entropy * mb_think).sum() / mb_think.sum().clamp(min=1)).item()
                stats["bonus"] += bonus.float().mean().item() if bonus.numel() else 0.0
                if epoch == 0 and batch.sampler_logp is not None:
                    gap = logprob_gap([batch.sampler_logp[i] for i in idx],
                                      [logp[j][: lengths[i]].detach().cpu() for j, i in enumerate(idx)])
                    stats["logp_gap_mean"] += gap["mean"]
                    stats["logp_gap_max"] = max(stats["logp_gap_max"], gap["max"])
    return stats
