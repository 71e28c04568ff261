import math

import pytest
import torch

from rl.grpo import (aggregate, entropy_bonus, group_advantages, kl_k3, per_token_loss, shaped_advantages,
                     think_token_mask, zero_variance_groups)


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=4)
    # group 1: mean 0.25, population std sqrt(0.1875)
    std = math.sqrt(0.1875)
    expected = torch.tensor([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std, 0, 0, 0, 0])
    assert torch.allclose(adv, expected, atol=1e-5)
    dr = group_advantages(rewards, group_size=4, std_norm=False)
    assert torch.allclose(dr, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert zero_variance_groups(rewards, 4).tolist() == [False, True]


def test_entropy_bonus_hand_computed_and_never_flips_sign():
    adv = torch.tensor([1.5, -0.5, 0.0, 2.0])
    H = torch.tensor([1.0, 3.0, 5.0, 0.5])
    bonus = entropy_bonus(adv, H, coef=0.4, kappa=2.0)
    # min(0.4 H, |A|/2): [min(.4,.75), min(1.2,.25), min(2,0), min(.2,1)]
    assert torch.allclose(bonus, torch.tensor([0.4, 0.25, 0.0, 0.2]))
    for _ in range(50):
        a = torch.randn(64) * 3
        h = torch.rand(64) * 10
        for kappa in (1.0, 2.0, 4.0):
            shaped = a + entropy_bonus(a, h, 0.4, kappa)
            assert (entropy_bonus(a, h, 0.4, kappa) >= 0).all()
            # kappa >= 1 bounds the bonus by |A|: a negative advantage stays <= 0
            assert (torch.sign(shaped[a < 0]) <= 0).all()
            assert (shaped[a > 0] > 0).all()


def test_all_equal_group_gets_zero_advantage_and_zero_bonus():
    rewards = torch.tensor([1.0] * 8 + [0.0] * 8)
    adv = group_advantages(rewards, 8)
    assert torch.equal(adv, torch.zeros(16))
    entropy = torch.rand(16, 5) * 4
    mask = torch.ones(16, 5)
    for mode in ("seq", "token"):
        per_tok, bonus = shaped_advantages(adv, entropy, mask, mode, 0.4, 2.0)
        assert torch.equal(per_tok, torch.zeros(16, 5))
        assert torch.equal(bonus, torch.zeros_like(bonus))


def test_shaped_advantages_seq_uses_think_mean_entropy():
    adv = torch.tensor([2.0, -2.0])
    entropy = torch.tensor([[1.0, 3.0, 100.0], [0.5, 0.5, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # last token is outside <think>
    per_tok, bonus = shaped_advantages(adv, entropy, mask, "seq", 0.4, 2.0)
    assert torch.allclose(bonus, torch.tensor([0.8, 0.2]))  # min(0.4*2, 1), min(0.4*0.5, 1)
    assert torch.allclose(per_tok, torch.tensor([[2.8] * 3, [-1.8] * 3]))
    per_tok, bonus = shaped_advantages(adv, entropy, mask, "token", 0.4, 2.0)
    assert torch.allclose(per_tok[0], torch.tensor([2.4, 3.0, 3.0]))  # min(0.4 H_t, 1)


def test_entropy_bonus_is_detached():
    adv = torch.tensor([1.0, -1.0])
    H = torch.tensor([0.5, 0.5], requires_grad=True)
    assert not entropy_bonus(adv, H, 0.4, 2.0).requires_grad


def test_kl_k3_matches_definition_and_is_nonnegative():
    logp = torch.randn(100, dtype=torch.float64)
    ref = torch.randn(100, dtype=torch.float64)
    expected = torch.exp(ref - logp) - (ref - logp) - 1
    assert torch.allclose(kl_k3(logp, ref), expected)
    assert (kl_k3(logp, ref) >= 0).all()
    assert torch.allclose(kl_k3(logp, logp), torch.zeros(100, dtype=torch.float64))


def _reference_loss(logp, old, adv, mask, eps_lo, eps_hi, ref, beta, mode, max_len):
    """A plain loop, one sequence and token at a time."""
    S, T = len(logp), len(logp[0])
    seq_terms, tok_sum, n_tok = [], 0.0, 0
    for i in range(S):
        s_sum, s_n = 0.0, 0
        for t in range(T):
            if mask[i][t] == 0:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            a = adv[i][t]
            term = -min(r * a, min(max(r, 1 - eps_lo), 1 + eps_hi) * a)
            d = ref[i][t] - logp[i][t]
            term += beta * (math.exp(d) - d - 1)
            s_sum += term
            s_n += 1
        seq_terms.append(s_sum / max(s_n, 1))
        tok_sum += s_sum
        n_tok += s_n
    if mode == "token_mean":
        return tok_sum / n_tok
    if mode == "seq_mean":
        return sum(seq_terms) / S
    return tok_sum / (S * max_len)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "constant"])
def test_loss_matches_plain_reference(mode):
    S, T = 7, 13
    logp = torch.randn(S, T, dtype=torch.float64) * 0.3 - 2
    old = logp + torch.randn(S, T, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(S, T, dtype=torch.float64) * 0.3
    adv = torch.randn(S, T, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (S,))
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    # split the batch into two minibatches: their aggregated losses must sum to the whole-batch value
    total = 0.0
    for idx in (slice(0, 3), slice(3, S)):
        per_tok, _ = per_token_loss(logp[idx], old[idx], adv[idx], 0.2, 0.28, ref[idx], 0.05)
        total += aggregate(per_tok, mask[idx], mode, num_seqs=S, num_tokens=mask.sum().item(), max_len=T).item()
    expected = _reference_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, ref.tolist(),
                               0.05, mode, T)
    assert total == pytest.approx(expected, rel=1e-9)


def test_clip_indicator_and_gradient():
    logp = torch.tensor([[0.5, -0.5, 0.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    loss, clipped = per_token_loss(logp, old, adv, 0.2, 0.2)
    # ratio e^.5 > 1.2 with A>0: clipped; ratio e^-.5 < 0.8 with A<0: clipped; ratio 1: not
    assert clipped.tolist() == [[1.0, 1.0, 0.0]]
    loss.sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0 and logp.grad[0, 2] == pytest.approx(-1.0)


def test_think_token_mask(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "I should call f.</think><answer>[f(x=1)]</answer>"
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    mask = think_token_mask([ids], tok, starts_in_think=True, T=len(ids) + 3)
    n_think = len(tok("I should call f.", add_special_tokens=False).input_ids)
    assert mask[0, :n_think].sum() == n_think and mask[0].sum() == n_think
    text2 = "<think>ab</think><answer>[]</answer>"
    ids2 = tok(text2, add_special_tokens=False).input_ids
    mask2 = think_token_mask([ids2], tok, starts_in_think=False, T=len(ids2))
    assert mask2[0].sum() == 2 and mask2[0, 7:9].sum() == 2
    ids3 = tok("no tags at all", add_special_tokens=False).input_ids
    assert think_token_mask([ids3], tok, starts_in_think=False, T=20)[0].sum() == len(ids3)


def _finite_worker(rank, init_file, results):
    import torch.distributed as dist

    from rl.dist import finite_on_all_ranks
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        both_fine = finite_on_all_ranks(torch.tensor(1.0))
        one_bad = finite_on_all_ranks(torch.tensor(float("nan") if rank == 1 else 2.0))
        results[rank] = (both_fine, one_bad)
    finally:
        dist.destroy_process_group()


def test_finite_on_all_ranks_agrees_across_processes(tmp_path):
    """One rank's NaN makes every rank skip: a lone skip would hang the others in the gradient all-reduce."""
    import torch.multiprocessing as mp
    from rl.dist import finite_on_all_ranks
    assert finite_on_all_ranks(torch.tensor([1.0, 2.0])) and not finite_on_all_ranks(torch.tensor(float("inf")))
    results = mp.Manager().dict()
    mp.spawn(_finite_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    assert dict(results) == {0: (True, False), 1: (True, False)}
