"""The supervised warm-up (cold start): a few steps of next-token training on the reference answers, so that a
small model writes well-formed calls often enough for GRPO groups to have a reward signal at all."""
from __future__ import annotations

import torch
from tqdm import tqdm

from data.calls import PromptFormat, format_calls
from rl.rollout import prompt_ids, seed_for


def target_text(record: dict, prompt_format: PromptFormat) -> str:
    """What the warm-up teaches: a short reasoning, then the reference calls (prefill excluded)."""
    calls = format_calls(record["answers"])
    if prompt_format.answer_format == "plain":
        return calls
    think = record.get("reasoning") or "I will pick the matching function and fill in its arguments."
    body = f"<think>{think}</think><answer>{calls}</answer>"
    return body[len(prompt_format.prefill):] if body.startswith(prompt_format.prefill) else body


def supervised_warmup(train_scorer, policy, tokenizer, records: list[dict], cfg, d, write_row) -> None:
    """cfg.sft_steps steps of cfg.sft_batch_size records (shared over ranks), token-mean NLL of the targets,
    AdamW at cfg.sft_lr. write_row(row) gets one metrics row per step."""
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr, weight_decay=0.0, fused=True)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed_for(cfg.seed, "warmup_order")))
    bar = tqdm(range(cfg.sft_steps), desc="warm-up", disable=not d.master)
    for step in bar:
        idx = [order[(step * cfg.sft_batch_size + j) % len(order)].item() for j in range(cfg.sft_batch_size)]
        batch = [records[i] for i in idx][d.rank::d.world]
        prompts = [prompt_ids(tokenizer, r, cfg.prompt_format) for r in batch]
        targets = [tokenizer(target_text(r, cfg.prompt_format), add_special_tokens=False).input_ids
                   + [tokenizer.eos_token_id] for r in batch]
        # grouped: the prefix the prompts share (the system prompt) runs through the model once for the batch
        logp, _, _ = train_scorer(prompts, targets, grouped=True)
        n_tokens = d.all_reduce(torch.tensor(float(logp.numel()))).item()
        loss = -logp.sum() / n_tokens * d.world  # token mean over the global batch (DDP averages over ranks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(nll=f"{loss.item() / d.world:.3f}")
        write_row({"phase": "warmup", "step": step, "sft_nll": loss.item() / d.world})
