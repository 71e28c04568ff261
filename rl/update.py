"""One GRPO optimizer step on a rollout batch: the scoring passes before it and the PPO-clip update with its
skip logic, returning the step's statistics (the math itself is in rl/grpo.py).

    scored = score_rollouts(scorer, reference_scorer, batch, tokenizer, cfg, d)   # old / reference log-probs
    stats = update_policy(train_scorer, policy, optimizer, batch, scored, advantages, step, cfg, d, log)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.sample import logprob_gap
from model.score import PolicyScorer, pad_rows
from rl.dist import finite_on_all_ranks, gradient_sync
from rl.grpo import aggregate, kl_k3, per_token_loss, shaped_advantages, think_token_mask, truncated_is_weights
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


def micro_batches(batch: RolloutBatch, rows: list[int], token_budget: int, d) -> list[list[int]]:
    """`rows` in order, cut into micro-batches of at most `token_budget` tokens (prompt + completion of each
    sequence; a longer sequence goes alone; 0 = no limit), then padded with empty micro-batches to the largest
    count on any rank: DDP's and FSDP's collectives in forward and backward must be issued the same number of
    times on every rank, and token budgets give ranks different counts."""
    out: list[list[int]] = []
    used = 0
    for i in rows:
        n = len(batch.prompts[i]) + len(batch.completions[i])
        if not out or (token_budget and used + n > token_budget):
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    count = int(d.all_reduce(torch.tensor(float(len(out))), "max").item())
    return out + [[] for _ in range(count - len(out))]


def can_backward_by_chunks(train_scorer, d) -> bool:
    """The update may run the backward of each chunk of completions right after its forward (no recomputation;
    model.score.shared_prompt_backward): one process, and a scorer that no DDP/FSDP wrapper reduces gradients for
    (their hooks expect one backward per forward)."""
    return not d.distributed and type(train_scorer) is PolicyScorer and train_scorer.can_backward_by_chunks()


def _placeholder_forward(scorer, **kwargs):
    """A one-token forward for a rank that has no sequence in a micro-batch: it joins the collectives of the
    others' forward (and, with its loss times 0, of their backward) without changing anything."""
    lp, _, _ = scorer([[0]], [[0]], **kwargs)
    return lp


@torch.no_grad()
def score_rollouts(scorer, reference_scorer, batch: RolloutBatch, tokenizer, cfg, d) -> ScoredBatch:
    """Old and reference log-probs and the chain-of-thought mask of a batch, before any update, in micro-batches
    of cfg.micro_batch_tokens."""
    mask = batch.response_mask()
    think_mask = think_token_mask(batch.completions, tokenizer, cfg.prompt_format.starts_in_think,
                                  mask.shape[1]) * mask
    old_logp = entropy = ref_logp = None
    parts = micro_batches(batch, list(range(len(batch))), cfg.micro_batch_tokens, d)

    def score(model, with_entropy):
        logp, ent = torch.zeros(mask.shape), torch.zeros(mask.shape)
        for rows in parts:
            if not rows:
                _placeholder_forward(model, temperature=cfg.temperature)
                continue
            lp, e, _ = model([batch.prompts[i] for i in rows], [batch.completions[i] for i in rows],
                             temperature=cfg.temperature, with_entropy=with_entropy, grouped=True)
            logp[rows] = pad_rows(lp, mask[rows])
            if with_entropy:
                ent[rows] = pad_rows(e, mask[rows])
        return logp, ent

    if not on_policy(cfg):
        old_logp, entropy = score(scorer, True)
    if reference_scorer is not None and len(batch):
        ref_logp, _ = score(reference_scorer, False)
    return ScoredBatch(mask, think_mask, old_logp, entropy, ref_logp)


def update_policy(train_scorer, policy, optimizer, batch: RolloutBatch, scored: ScoredBatch,
                  advantages: torch.Tensor, step: int, cfg, d, log=print) -> dict:
    """cfg.ppo_epochs passes of cfg.minibatches optimizer steps over the batch (on-policy by default: a single
    step), each accumulating the gradients of micro-batches of at most cfg.micro_batch_tokens tokens: the loss is
    normalised by the whole optimizer step's counts, so the accumulated gradient is the whole minibatch's.
    An optimizer step whose loss or gradient norm is not finite on some rank is skipped on every rank.
    Returns the statistics summed over the updates made, with "updates" and "skipped" counts."""
    device = next(policy.parameters()).device
    mask, think_mask = scored.mask, scored.think_mask
    S, T = mask.shape[0], mask.shape[1]
    fresh = on_policy(cfg)
    counts = d.all_reduce(torch.tensor([float(S), mask.sum().item()]))
    n_seqs, n_tokens = counts[0].item(), counts[1].item()  # the whole optimizer step's, over all ranks
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "bonus": 0.0, "cot_entropy": 0.0,
             "logp_gap_mean": 0.0, "logp_gap_max": 0.0, "tis_weight_mean": 0.0, "tis_capped_frac": 0.0,
             "updates": 0, "skipped": 0, "tokens": n_tokens}
    lengths = batch.lengths
    chunked = cfg.chunk_backward and can_backward_by_chunks(train_scorer, d)
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(S, generator=torch.Generator().manual_seed(seed_for(cfg.seed, "minibatch", step,
                                                                                    epoch)))
        for mb in range(cfg.minibatches):
            idx = sorted(order[mb::cfg.minibatches].tolist())  # sorted: a group stays contiguous
            parts = micro_batches(batch, idx, cfg.micro_batch_tokens, d)
            loss_sum = torch.zeros((), device=device)
            done = []  # (rows, logp, entropy, clipped, bonus, weight) of each part, detached, for the statistics

            def rows_loss(rows: list[int], lp: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
                """The loss of sequences `rows` (a part of this optimizer step's) from their tokens' log-probs and
                entropies under the policy being trained ([n], concatenated in the order of rows)."""
                nonlocal loss_sum
                mb_mask = mask[rows].to(device)
                logp = torch.zeros(len(rows), T, device=device, dtype=torch.float32)
                logp[mb_mask.bool()] = lp
                mb_entropy = pad_rows(ent, mb_mask) if fresh else scored.entropy[rows].to(device)
                mb_old = logp.detach() if fresh else scored.old_logp[rows].to(device)
                adv, bonus = shaped_advantages(advantages[rows].to(device), mb_entropy, think_mask[rows].to(device),
                                               cfg.entropy_mode, cfg.entropy_coef, cfg.entropy_kappa)
                mb_ref = scored.ref_logp[rows].to(device) if scored.ref_logp is not None else None
                weight = None
                if cfg.tis_cap > 0 and batch.sampler_logp is not None:  # the sampler's own log-probs
                    sampler_lp = pad_rows(torch.cat([batch.sampler_logp[i] for i in rows]), mb_mask)
                    weight = truncated_is_weights(mb_old, sampler_lp, cfg.tis_cap)
                loss_tok, clipped = per_token_loss(logp, mb_old, adv, cfg.eps_low, cfg.eps_high, mb_ref, cfg.kl_coef,
                                                   weight)
                # normalised over the whole optimizer step's tokens/sequences on all ranks; x world undoes the
                # averaging of gradients across ranks
                loss = aggregate(loss_tok, mb_mask, cfg.loss_agg, n_seqs / cfg.minibatches,
                                 n_tokens / cfg.minibatches, cfg.max_new_tokens) * d.world
                loss_sum += loss.detach()
                done.append((rows, logp.detach(), mb_entropy, clipped, bonus,
                             torch.ones_like(logp) if weight is None else weight))
                return loss

            for k, rows in enumerate(parts):
                prompts, completions = [batch.prompts[i] for i in rows], [batch.completions[i] for i in rows]
                if chunked and rows:  # each chunk's backward right after its forward (see can_backward_by_chunks)
                    train_scorer.backward_by_chunks(prompts, completions, lambda part, lp, ent: rows_loss(
                        [rows[j] for j in part], lp, ent), temperature=cfg.temperature)
                    continue
                with gradient_sync(train_scorer, k == len(parts) - 1):  # all-reduce once, on the last
                    if not rows:
                        (_placeholder_forward(train_scorer, temperature=cfg.temperature).sum() * 0).backward()
                        continue
                    lp, ent, _ = train_scorer(prompts, completions, temperature=cfg.temperature, with_entropy=True,
                                              grouped=True)
                    rows_loss(rows, lp, ent).backward()
            grad_norm, skip = None, None
            if not finite_on_all_ranks(loss_sum):
                skip = "non-finite loss"
            else:
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
            stats["loss"] += loss_sum.item() / d.world
            stats["grad_norm"] += grad_norm.item()
            if done:
                _add_statistics(stats, done, scored, think_mask, batch, lengths, epoch, device, cfg.tis_cap)
    return stats


@torch.no_grad()
def _add_statistics(stats: dict, done: list, scored: ScoredBatch, think_mask, batch: RolloutBatch, lengths,
                    epoch: int, device, tis_cap: float) -> None:
    """Token means over one optimizer step's sequences on this rank (its micro-batches joined)."""
    rows = [i for part in done for i in part[0]]
    logp, mb_entropy, clipped, weight = (torch.cat([part[j] for part in done]) for j in (1, 2, 3, 5))
    bonus = torch.cat([part[4] for part in done])
    mb_mask, mb_think = scored.mask[rows].to(device), think_mask[rows].to(device)
    mtok = mb_mask.sum().clamp(min=1)
    stats["clip_frac"] += ((clipped * mb_mask).sum() / mtok).item()
    stats["tis_weight_mean"] += ((weight * mb_mask).sum() / mtok).item()  # 1 without the importance weights
    if tis_cap > 0:  # tokens the sampler found over cap times less likely than the trainer does
        stats["tis_capped_frac"] += (((weight >= tis_cap * (1 - 1e-6)) * mb_mask).sum() / mtok).item()
    if scored.ref_logp is not None:
        stats["kl"] += ((kl_k3(logp, scored.ref_logp[rows].to(device)) * mb_mask).sum() / mtok).item()
    stats["cot_entropy"] += ((mb_entropy * mb_think).sum() / mb_think.sum().clamp(min=1)).item()
    stats["bonus"] += bonus.float().mean().item() if bonus.numel() else 0.0
    if epoch == 0 and batch.sampler_logp is not None:
        gap = logprob_gap([batch.sampler_logp[i] for i in rows],
                          [logp[j][: lengths[i]].cpu() for j, i in enumerate(rows)])
        stats["logp_gap_mean"] += gap["mean"]
        stats["logp_gap_max"] = max(stats["logp_gap_max"], gap["max"])
