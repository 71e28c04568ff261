"""rl/update.py: token-budgeted micro-batches with gradient accumulation give the whole batch's optimizer step."""
import copy
import dataclasses
import math
import os
from types import SimpleNamespace

import pytest
import torch

from data.calls import PromptFormat
from model.score import PolicyScorer
from rl.dist import Dist
from rl.grpo import group_advantages, truncated_is_weights
from rl.rollout import RolloutBatch
from rl.update import micro_batches, score_rollouts, update_policy


LR = 1e-3  # small: with several minibatches the later ones see a barely changed model


def _cfg(**kw):
    base = dict(ppo_epochs=1, minibatches=1, seed=0, micro_batch_tokens=0, temperature=0.7, entropy_mode="seq",
                entropy_coef=0.4, entropy_kappa=2.0, eps_low=0.2, eps_high=0.2, kl_coef=0.05, loss_agg="token_mean",
                max_new_tokens=8, grad_clip=1e9, fsdp=False, prompt_format=PromptFormat("think", "python", "<think>"),
                tis_cap=2.0, chunk_backward=True)
    return SimpleNamespace(**{**base, **kw})


def _random_batch(vocab: int, n_groups: int = 3, G: int = 3) -> RolloutBatch:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"batch seed {seed}")
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(n_groups):
        prompt = torch.randint(3, vocab, (int(torch.randint(4, 10, (), generator=g)),), generator=g).tolist()
        for _ in range(G):
            prompts.append(prompt)
            n = int(torch.randint(1, 8, (), generator=g))
            completions.append(torch.randint(3, vocab, (n,), generator=g).tolist())
    rewards = torch.randint(0, 2, (n_groups * G,), generator=g).float().tolist()
    rewards[0], rewards[1] = 1.0, 0.0  # at least one group with a signal
    S = len(completions)
    return RolloutBatch(records=[{}] * S, prompts=prompts, completions=completions, texts=[""] * S,
                        truncated=[False] * S, sampler_logp=None, rewards=rewards, reasons=[""] * S, group_size=G)


def test_micro_batches_respect_the_budget_and_keep_order():
    batch = RolloutBatch(records=[{}] * 5, prompts=[[1] * 4] * 5, completions=[[2] * n for n in (1, 6, 2, 20, 3)],
                         texts=[""] * 5, truncated=[False] * 5, sampler_logp=None, rewards=[0.0] * 5,
                         reasons=[""] * 5, group_size=5)
    parts = micro_batches(batch, [0, 1, 2, 3, 4], 16, Dist())
    assert parts == [[0, 1], [2], [3], [4]]  # 5+10 | 6 (+24 > 16) | 24 alone (over budget) | 7
    assert micro_batches(batch, [0, 2, 4], 0, Dist()) == [[0, 2, 4]]  # 0 = no limit


def test_tokens_a_sampler_drew_with_other_odds_are_weighed_by_the_truncated_ratio(tiny_tokenizer):
    """Rollouts sampled in another precision (bf16) carry the sampler's log-probs. The surrogate of each token is
    weighed by min(pi_old / pi_sampler, tis_cap): the sampler's own log-probs give weight 1 (the step without them),
    log-probs 4x lower give 4, capped at 2: exactly twice that step (plain SGD, no KL, so the change is linear
    in the weights)."""
    from model.score import pad_rows
    from model.tiny import tiny_model
    policy = tiny_model(tiny_tokenizer, seed=int(torch.randint(0, 2**31, ())))
    vocab = len(tiny_tokenizer)
    batch = _random_batch(vocab)
    advantages = group_advantages(torch.tensor(batch.rewards), batch.group_size)
    cfg = _cfg(kl_coef=0.0, entropy_coef=0.0)
    with torch.no_grad():  # the trainer's own log-probs of the batch, per completion
        lp, _, _ = PolicyScorer(policy, vocab)(batch.prompts, batch.completions, temperature=cfg.temperature)
    own = pad_rows(lp, batch.response_mask())
    own = [own[i, :len(c)] for i, c in enumerate(batch.completions)]
    moved = {}
    for name, sampler_logp in (("none", None), ("own", own), ("4x lower", [t - math.log(4.0) for t in own])):
        model = copy.deepcopy(policy)
        scorer = PolicyScorer(model, vocab)
        step_batch = dataclasses.replace(batch, sampler_logp=sampler_logp)
        scored = score_rollouts(scorer, None, step_batch, tiny_tokenizer, cfg, Dist())
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the change is the gradient, far above rounding
        model.train()
        update_policy(scorer, model, optimizer, step_batch, scored, advantages, 0, cfg, Dist(), log=lambda m: None)
        moved[name] = torch.cat([(p - q).detach().flatten() for p, q in zip(model.parameters(),
                                                                             policy.parameters())])
    assert moved["none"].abs().max() > 1e-3  # the step moved something: the comparisons are not vacuous
    # atol: a few fp32 spacings of weights near 1 (norm scales), which quantise the differences taken here
    torch.testing.assert_close(moved["own"], moved["none"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(moved["4x lower"], 2 * moved["none"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(truncated_is_weights(torch.tensor([0.0, -1.0, 0.0]), torch.tensor([0.0, 0.0, -5.0]),
                                                    2.0), torch.tensor([1.0, math.exp(-1.0), 2.0]))


@pytest.mark.parametrize("loss_agg,minibatches", [("token_mean", 1), ("seq_mean", 2), ("constant", 1)])
def test_micro_batched_step_equals_the_whole_batch_step(tiny_tokenizer, loss_agg, minibatches):
    """Plain SGD makes the parameter change (divided by lr) the accumulated gradient: micro-batches of ~2 sequences
    (groups split across them) must give the whole minibatch's gradient, loss and statistics."""
    from model.tiny import tiny_model
    policy = tiny_model(tiny_tokenizer, seed=int(torch.randint(0, 2**31, ())))
    reference = tiny_model(tiny_tokenizer, seed=1).eval().requires_grad_(False)
    vocab = len(tiny_tokenizer)
    batch = _random_batch(vocab)
    advantages = group_advantages(torch.tensor(batch.rewards), batch.group_size)
    results = {}
    for budget in (0, 16):
        model = copy.deepcopy(policy)
        cfg = _cfg(micro_batch_tokens=budget, loss_agg=loss_agg, minibatches=minibatches)
        scorer = PolicyScorer(model, vocab)
        scored = score_rollouts(scorer, PolicyScorer(reference, vocab), batch, tiny_tokenizer, cfg, Dist())
        if budget:
            assert len(micro_batches(batch, list(range(len(batch))), budget, Dist())) >= 4
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        model.train()
        stats = update_policy(scorer, model, optimizer, batch, scored, advantages, 0, cfg, Dist(), log=lambda m: None)
        results[budget] = (dict(model.named_parameters()), stats, scored)
    (p0, s0, sc0), (p1, s1, sc1) = results[0], results[16]
    torch.testing.assert_close(sc1.ref_logp, sc0.ref_logp, rtol=0, atol=1e-5)  # ~20 float32 ulps at |logp| ~6
    moved = 0
    for name, before in policy.named_parameters():
        grad0, grad1 = (p0[name] - before) / LR, (p1[name] - before) / LR
        torch.testing.assert_close(grad1, grad0, rtol=1e-3, atol=1e-4)
        moved += int(grad0.abs().max() > 1e-3)
    assert moved > 0, "the step changed nothing: the comparison would be vacuous"
    assert s0["updates"] == s1["updates"] == minibatches
    for key in ("loss", "kl", "clip_frac", "cot_entropy", "bonus", "grad_norm"):
        assert s1[key] == pytest.approx(s0[key], rel=1e-4, abs=1e-7), key  # float summation order


@pytest.mark.parametrize("micro_batch_tokens,ppo_epochs", [(0, 1), (24, 1), (0, 2)])
def test_backward_by_chunks_gives_the_same_step(tiny_tokenizer, micro_batch_tokens, ppo_epochs):
    """One process with recomputed segments runs each chunk's backward after its forward (chunk_backward): the
    same parameters and statistics as the segmented forward with one backward per micro-batch, on-policy and off
    (two epochs: old log-probs from the scoring pass), in micro-batches too."""
    from model.tiny import tiny_model
    from rl.update import can_backward_by_chunks
    policy = tiny_model(tiny_tokenizer, seed=int(torch.randint(0, 2**31, ())))
    reference = tiny_model(tiny_tokenizer, seed=1).eval().requires_grad_(False)
    vocab = len(tiny_tokenizer)
    batch = _random_batch(vocab, n_groups=3, G=4)
    advantages = group_advantages(torch.tensor(batch.rewards), batch.group_size)
    results = {}
    for chunked in (False, True):
        model = copy.deepcopy(policy)
        cfg = _cfg(micro_batch_tokens=micro_batch_tokens, ppo_epochs=ppo_epochs, chunk_backward=chunked)
        scorer = PolicyScorer(model, vocab, segment_tokens=8)  # chunks of a few rows
        assert can_backward_by_chunks(scorer, Dist())
        scored = score_rollouts(scorer, PolicyScorer(reference, vocab), batch, tiny_tokenizer, cfg, Dist())
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        model.train()
        stats = update_policy(scorer, model, optimizer, batch, scored, advantages, 0, cfg, Dist(), log=lambda m: None)
        results[chunked] = (dict(model.named_parameters()), stats)
    (p0, s0), (p1, s1) = results[False], results[True]
    moved = 0
    for name, before in policy.named_parameters():
        grad0, grad1 = (p0[name] - before) / LR, (p1[name] - before) / LR
        torch.testing.assert_close(grad1, grad0, rtol=1e-3, atol=1e-4)
        moved += int(grad0.abs().max() > 1e-3)
    assert moved > len(p0) // 2, "the step changed little: the comparison would be nearly vacuous"
    assert s0["updates"] == s1["updates"] == ppo_epochs
    for key in ("loss", "kl", "clip_frac", "cot_entropy", "bonus", "grad_norm", "tis_weight_mean"):
        assert s1[key] == pytest.approx(s0[key], rel=1e-4, abs=1e-7), key
