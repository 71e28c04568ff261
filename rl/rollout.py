"""Rollouts: the step's prompts, G sampled completions each, their rewards, as one typed batch.

    cursor = PromptCursor(train_records, seed)
    batch = collect_rollouts(policy, tokenizer, cursor, step, cfg, d)    # RolloutBatch of this rank's share

Every seed of a run comes from `seed_for(run seed, purpose, step, index)`. Rollouts are seeded per completion
from (seed, step, global prompt index, g), so they depend neither on how prompts are sharded over ranks nor on
how they are batched: 1 and N processes sample the same batch, and a resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from data.calls import PromptFormat, render_prompt
from model.sample import rank_seed, sample
from rl.grpo import zero_variance_groups
from rl.reward import reward


def seed_for(run_seed: int, purpose: str, step: int = 0, index: int = 0, round: int = 0) -> int:
    """The seed of one random choice of the run:
      "rollout"        one completion: index = global prompt index * G + g, round = dynamic-sampling refill round
      "minibatch"      the shuffle of a rollout batch into minibatches: index = PPO epoch
      "prompt_order"   the permutation of the training records: index = data epoch
      "warmup_order"   the order of the supervised warm-up records
      "torch"          torch's global generator, seeded once at the start of a run
    The values are those of earlier versions of this trainer (runs repeat exactly); rollout rounds from 16 on,
    which the old layout step * 16 + round could not tell from the next step's, get a stream of their own."""
    if purpose == "rollout":
        if round < 16:
            return rank_seed(run_seed, step * 16 + round, index)
        return int(np.random.SeedSequence([int(run_seed), int(step), int(index), int(round)])
                   .generate_state(1, np.uint64)[0] >> 1)
    if purpose == "minibatch":
        return run_seed + step * 131 + index
    if purpose == "prompt_order":
        return run_seed + index
    if purpose == "warmup_order":
        return run_seed + 1
    if purpose == "torch":
        return run_seed
    raise ValueError(f"unknown seed purpose {purpose!r}")


def prompt_ids(tokenizer, record: dict, prompt_format: PromptFormat) -> list[int]:
    """A canonical record's prompt as token ids (chat template + prefill)."""
    text = render_prompt(tokenizer, record["messages"], record["tools"], prompt_format)
    return tokenizer(text, add_special_tokens=False).input_ids


class PromptCursor:
    """The training prompts in a per-epoch permutation fixed by (seed, epoch); its state goes into checkpoints."""

    def __init__(self, records: list[dict], seed: int, state: dict | None = None):
        self.records, self.seed = records, seed
        self.state = dict(state) if state else {"epoch": 0, "pos": 0}

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            order = torch.randperm(len(self.records), generator=torch.Generator().manual_seed(
                seed_for(self.seed, "prompt_order", index=self.state["epoch"])))
            take = order[self.state["pos"]: self.state["pos"] + n - len(out)].tolist()
            out += [self.records[i] for i in take]
            self.state["pos"] += len(take)
            if self.state["pos"] >= len(self.records):
                self.state["epoch"], self.state["pos"] = self.state["epoch"] + 1, 0
        return out


@dataclass
class RolloutBatch:
    """Per completion, G consecutive completions per prompt (one group)."""
    records: list[dict]  # the record each completion answers
    prompts: list[list[int]]  # its prompt ids (repeated within a group)
    completions: list[list[int]]  # sampled ids up to and including the first EOS
    texts: list[str]  # decoded completions (without EOS; the prefill is not part of them)
    truncated: list[bool]  # no EOS within max_new_tokens
    sampler_logp: list[torch.Tensor] | None  # the sampler's log-probs of the sampled ids
    rewards: list[float]
    reasons: list[str]  # why the reward is what it is ("" when right)
    group_size: int

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completions]

    def response_mask(self) -> torch.Tensor:
        """[S, T] float, 1 on each completion's sampled tokens (T = the longest completion)."""
        lengths = self.lengths
        T = max(lengths, default=1)
        return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()

    def successes(self) -> torch.Tensor:
        """[S] 1.0 where the binary verdict is right (graded rewards reach 1 only then)."""
        return torch.tensor([float(r >= 1.0) for r in self.rewards])

    def select(self, rows: list[int]) -> RolloutBatch:
        """The completions at `rows`, in that order."""
        picked = {f.name: [getattr(self, f.name)[i] for i in rows]
                  for f in fields(self) if isinstance(getattr(self, f.name), list)}
        return RolloutBatch(**{"sampler_logp": None, **picked, "group_size": self.group_size})

    def select_groups(self, groups: list[int]) -> RolloutBatch:
        G = self.group_size
        return self.select([i for g in groups for i in range(g * G, (g + 1) * G)])

    def __add__(self, other: RolloutBatch) -> RolloutBatch:
        joined = {f.name: getattr(self, f.name) + getattr(other, f.name)
                  for f in fields(self) if isinstance(getattr(self, f.name), list)}
        return RolloutBatch(**{"sampler_logp": None, **joined, "group_size": self.group_size})

    def trim(self, n: int) -> RolloutBatch:
        return self.select(list(range(min(n, len(self)))))


def sample_groups(policy, tokenizer, records: list[dict], global_index: list[int], step: int, round: int,
                  cfg) -> RolloutBatch:
    """G completions for each record, sampled and rewarded. global_index[k] is record k's place among the
    step's prompts on all ranks (its completions' seeds depend on it, not on the rank)."""
    fmt = cfg.prompt_format
    prompts = [prompt_ids(tokenizer, r, fmt) for r in records]
    G = cfg.group_size
    row_seeds = [seed_for(cfg.seed, "rollout", step, k * G + g, round=round) for k in global_index for g in range(G)]
    out = sample(policy, tokenizer, prompts, group_size=G, max_new_tokens=cfg.max_new_tokens,
                 temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, row_seeds=row_seeds,
                 token_budget=cfg.sampler_token_budget, return_logprobs=True)
    verdicts = [reward(fmt.prefill + text, records[p], answer_format=fmt.answer_format, mode=cfg.reward_mode)
                for text, p in zip(out.texts, out.prompt_index)]
    return RolloutBatch(records=[records[p] for p in out.prompt_index], prompts=[prompts[p] for p in out.prompt_index],
                        completions=out.completion_ids, texts=out.texts, truncated=out.truncated,
                        sampler_logp=out.sampler_logp, rewards=[r for r, _ in verdicts],
                        reasons=[why for _, why in verdicts], group_size=G)


def collect_rollouts(policy, tokenizer, cursor: PromptCursor, step: int, cfg, d) -> RolloutBatch:
    """This rank's share of the step's rollouts. With cfg.dynamic_sampling, groups whose binary verdicts are all
    equal (no learning signal) are dropped and more prompts are sampled, up to cfg.max_refill_rounds more rounds,
    until every rank has its share; the batch is then trimmed to that share."""
    per_rank = cfg.prompts_per_step // d.world + (d.rank < cfg.prompts_per_step % d.world)
    G = cfg.group_size
    batch = None
    for round in range(1 + (cfg.max_refill_rounds if cfg.dynamic_sampling else 0)):
        global_index = list(range(d.rank, cfg.prompts_per_step, d.world))
        records = cursor.take(cfg.prompts_per_step)[d.rank::d.world]
        new = sample_groups(policy, tokenizer, records, global_index, step, round, cfg)
        if cfg.dynamic_sampling:  # keep only groups with signal, on the binary success
            keep = ~zero_variance_groups(new.successes(), G)
            new = new.select_groups(keep.nonzero().flatten().tolist())
        batch = new if batch is None else batch + new
        if not cfg.dynamic_sampling:
            break
        have = torch.tensor(float(len(batch) // G))
        if d.all_reduce(have, "min").item() >= per_rank:
            break
    return batch.trim(per_rank * G) if cfg.dynamic_sampling else batch
