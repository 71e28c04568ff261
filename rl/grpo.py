"""GRPO with the FunRL/EGPO entropy-enhanced advantage: the math, separate from the loop in train.py.

    A_i  = (r_i - mean(r_group)) / (std(r_group) + eps)          group-normalised advantage
    A'_i = A_i + min(lambda * H_i, |A_i| / kappa)                  entropy bonus, H detached
    loss = -w * min(ratio * A', clip(ratio, 1 - eps_low, 1 + eps_high) * A') + beta * KL_k3(policy || ref)
    w    = min(pi_old / pi_sampler, cap)    per token, 1 when the sampler computes what the trainer does

H_i is the mean token entropy of completion i over its <think> span (`seq` mode) or each token's own
entropy (`token` mode). The bonus is >= 0 and at most |A|/kappa, so it never flips the sign of A, and a
group whose rewards are all equal has A = 0 and gets no bonus: no gradient at all.
"""
from __future__ import annotations

import math

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, std_norm: bool = True, eps: float = 1e-6):
    """rewards [B*G] (G consecutive completions per prompt) -> advantages [B*G]."""
    grouped = rewards.float().view(-1, group_size)  # [B, G]
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if std_norm:  # off = Dr.GRPO, which argues the std division biases towards easy/hard prompts
        centered = centered / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centered.reshape(-1)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] bool: groups whose rewards are all equal (no learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def entropy_bonus(advantages: torch.Tensor, entropy: torch.Tensor, coef: float, kappa: float) -> torch.Tensor:
    """min(coef * H, |A| / kappa), broadcast: advantages [S] with entropy [S] (seq mode) or
    advantages [S, 1] with entropy [S, T] (token mode). Detached: it shapes the advantage only."""
    if coef == 0:
        return torch.zeros_like(entropy if entropy.dim() >= advantages.dim() else advantages)
    return torch.minimum(coef * entropy.detach().float(), advantages.abs() / kappa)


def shaped_advantages(advantages, entropy, mask, mode: str, coef: float, kappa: float):
    """advantages [S], entropy [S, T] (per token, detached), mask [S, T] marks the tokens H is averaged over
    (the <think> span). Returns (per-token advantages [S, T], bonus [S] or [S, T])."""
    T = entropy.shape[1]
    if mode == "seq":
        cot_entropy = (entropy * mask).sum(1) / mask.sum(1).clamp(min=1)  # [S]
        bonus = entropy_bonus(advantages, cot_entropy, coef, kappa)
        return (advantages + bonus)[:, None].expand(-1, T), bonus
    if mode == "token":
        bonus = entropy_bonus(advantages[:, None], entropy, coef, kappa)  # [S, T]
        return advantages[:, None] + bonus, bonus
    raise ValueError(f"entropy mode must be 'seq' or 'token', got {mode!r}")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || ref): exp(ref - logp) - (ref - logp) - 1, >= 0, unbiased."""
    log_ratio = (ref_logp - logp).clamp(-20, 20)
    return torch.exp(log_ratio) - log_ratio - 1


def per_token_loss(logp, old_logp, advantages, eps_low: float, eps_high: float, ref_logp=None, kl_coef: float = 0.0,
                   sampler_weight=None):
    """All [S, T]. The PPO-clip surrogate (negated, to minimise) plus beta * k3 KL; and the clip indicator.
    sampler_weight: per-token weights of the surrogate (`truncated_is_weights`) for tokens drawn by a sampler whose
    distribution differs from old_logp's (bf16 rollouts); None = 1."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if sampler_weight is not None:
        loss = loss * sampler_weight
    if ref_logp is not None and kl_coef > 0:
        loss = loss + kl_coef * kl_k3(logp, ref_logp)
    is_clipped = (clipped < unclipped).float()  # the clip is active (and removes the gradient)
    return loss, is_clipped


def truncated_is_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """[S, T] min(pi_old / pi_sampler, cap), detached: truncated importance sampling for tokens sampled from a
    distribution slightly different from the trainer's (rollouts in bf16 scored in fp32). Without it the policy
    gradient follows the sampler's distribution (E_sampler[A grad log pi] != E_pi[...]), a bias that compounds over
    steps; the cap bounds the variance that rare tokens with pi >> pi_sampler would add."""
    return torch.exp((old_logp - sampler_logp).detach().clamp(max=math.log(cap)))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, num_seqs: float, num_tokens: float,
              max_len: int) -> torch.Tensor:
    """Reduce [S, T] to a scalar whose sum over the minibatches (and ranks) of one optimizer step is:
      token_mean: sum over all tokens / all tokens          (default; DAPO, TRL's "dapo"/"bnpo")
      seq_mean:   mean over sequences of each one's token mean   (the original GRPO)
      constant:   sum over all tokens / (num sequences * max_len)  (Dr.GRPO: no length bias)
    num_seqs / num_tokens are the counts of the whole optimizer step (all minibatches, all ranks)."""
    mask = mask.to(per_token.dtype)
    if mode == "token_mean":
        return (per_token * mask).sum() / max(num_tokens, 1.0)
    if mode == "seq_mean":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / max(num_seqs, 1.0)
    if mode == "constant":
        return (per_token * mask).sum() / (max(num_seqs, 1.0) * max_len)
    raise ValueError(f"loss aggregation must be token_mean, seq_mean or constant, got {mode!r}")


def think_token_mask(completion_ids: list[list[int]], tokenizer, starts_in_think: bool, T: int) -> torch.Tensor:
    """[S, T] mask of the completion tokens inside <think>...</think> (the chain of thought whose entropy
    shapes the advantage). If the prompt prefilled `<think>`, the completion starts inside it. A completion
    without any think span falls back to all its tokens, so H_i stays defined."""
    mask = torch.zeros(len(completion_ids), T)
    for i, ids in enumerate(completion_ids):
        n = len(ids)
        text = tokenizer.decode(ids, skip_special_tokens=False)
        start_char = 0
        if not starts_in_think:
            open_at = text.find("<think>")
            start_char = -1 if open_at < 0 else open_at + len("<think>")
        end_char = text.find("</think>", max(start_char, 0))
        if start_char < 0:
            mask[i, :n] = 1
            continue
        first = _token_at_char(ids, tokenizer, start_char) if start_char > 0 else 0
        last = n if end_char < 0 else _token_at_char(ids, tokenizer, end_char)  # exclusive: stops at '</think>'
        if last <= first:
            mask[i, :n] = 1
        else:
            mask[i, first:last] = 1
    return mask


def _token_at_char(ids: list[int], tokenizer, char: int) -> int:
    """Index of the first token whose decoded prefix extends past `char` (binary search on prefixes)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[: mid + 1], skip_special_tokens=False)) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo
