"""rl/rollout.py: the seeds of a run (the same values as earlier versions, refill rounds without a cap), the
typed rollout batch, and the prompt cursor."""
import torch

from model.sample import rank_seed
from rl.rollout import PromptCursor, RolloutBatch, seed_for


def test_seed_for_gives_the_seeds_of_earlier_versions():
    for seed in (0, 7):
        for step in (0, 1, 19):
            for index in (0, 5, 63):
                for round in range(16):
                    assert seed_for(seed, "rollout", step, index, round=round) == rank_seed(seed, step * 16 + round,
                                                                                           index)
            for epoch in (0, 1, 3):
                assert seed_for(seed, "minibatch", step, epoch) == seed + step * 131 + epoch
        assert seed_for(seed, "warmup_order") == seed + 1
        assert seed_for(seed, "prompt_order", index=4) == seed + 4
        assert seed_for(seed, "torch") == seed


def test_refill_rounds_past_16_get_their_own_seeds():
    """The old layout step * 16 + round made round 16 of step s reuse round 0 of step s + 1."""
    late = {seed_for(0, "rollout", 2, i, round=r) for r in range(16, 40) for i in range(8)}
    early = {seed_for(0, "rollout", s, i, round=r) for s in range(5) for r in range(16) for i in range(8)}
    assert len(late) == 24 * 8 and not late & early
    assert all(0 <= s < 2**63 for s in late)


def test_seed_for_refuses_an_unknown_purpose():
    import pytest
    with pytest.raises(ValueError, match="unknown seed purpose"):
        seed_for(0, "dropout")


def _batch(n_groups: int, G: int, offset: int = 0) -> RolloutBatch:
    rows = range(offset, offset + n_groups * G)
    return RolloutBatch(records=[{"id": f"r{i // G}"} for i in rows], prompts=[[1, i // G] for i in rows],
                        completions=[[7] * (1 + i % 3) for i in rows], texts=[f"t{i}" for i in rows],
                        truncated=[i % 2 == 0 for i in rows], sampler_logp=[torch.full((1 + i % 3,), -float(i))
                                                                            for i in rows],
                        rewards=[float(i % 2) for i in rows], reasons=["" if i % 2 else "wrong_value: x" for i in rows],
                        group_size=G)


def test_rollout_batch_select_join_trim_and_mask():
    a, b = _batch(2, 3), _batch(1, 3, offset=6)
    joined = a + b
    assert len(joined) == 9 and joined.texts == [f"t{i}" for i in range(9)]
    assert torch.equal(joined.sampler_logp[7], b.sampler_logp[1])
    second = joined.select_groups([1])
    assert second.texts == ["t3", "t4", "t5"] and second.records == a.records[3:] and second.group_size == 3
    assert joined.trim(4).texts == ["t0", "t1", "t2", "t3"] and len(joined.trim(99)) == 9
    mask = joined.response_mask()
    assert mask.shape == (9, 3) and mask.sum(1).tolist() == [float(n) for n in joined.lengths]
    assert joined.successes().tolist() == [float(i % 2) for i in range(9)]
    empty = joined.select([])
    assert len(empty) == 0 and empty.response_mask().shape == (0, 1)


def test_prompt_cursor_walks_seeded_epochs_and_resumes():
    records = [{"id": i} for i in range(5)]
    cursor = PromptCursor(records, seed=3)
    taken = [r["id"] for r in cursor.take(7)]
    first_epoch = torch.randperm(5, generator=torch.Generator().manual_seed(3)).tolist()
    second_epoch = torch.randperm(5, generator=torch.Generator().manual_seed(4)).tolist()
    assert taken == first_epoch + second_epoch[:2] and cursor.state == {"epoch": 1, "pos": 2}
    resumed = PromptCursor(records, seed=3, state=dict(cursor.state))
    assert [r["id"] for r in resumed.take(3)] == [r["id"] for r in cursor.take(3)] == second_epoch[2:]
