import contextlib
import functools
import math
import importlib.util

import pytest
import torch

from model.sample import (_processors, build_generation_config, eos_token_ids, logprob_gap,
                          pad_id_of, rank_seed, real_vocab_size, sample, shard_indices)

PROMPTS = ["call get_weather for Paris", "hi", "a somewhat longer prompt, with a tool list: [f(x), g(y)]"]


def encode(tok, texts=PROMPTS):
    return [tok.encode(t) for t in texts]


def eos_likely(model, token_id, strength=4.0):
    """Point `token_id`'s lm_head row along the mean final hidden state, so the random model emits it often
    (its logit is about `strength` for a typical state); by default it would almost never end a completion."""
    with torch.no_grad():
        h = model.model(torch.arange(3, 200)[None]).last_hidden_state[0].mean(0)
        model.lm_head.weight[token_id] = strength * h / h.norm() ** 2
    return model


def reference_logp(model, prompt, completion, temperature, vocab):
    """float64 full-forward log-probs of `completion` given `prompt`, softmax over the first `vocab` ids."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1, :vocab].double()  # [T, V]
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def test_rollout_masks_eos_and_truncation(tiny_model, tiny_tokenizer):
    model = eos_likely(tiny_model, tiny_tokenizer.eos_token_id)
    G, max_new = 4, 12
    r = sample(model, tiny_tokenizer, encode(tiny_tokenizer), group_size=G, max_new_tokens=max_new, temperature=1.0,
               seed=0, return_logprobs=True)
    eos = set(eos_token_ids(model, tiny_tokenizer))
    assert r.prompt_index == [i for i in range(3) for _ in range(G)]
    assert len(r) == len(r.texts) == len(r.truncated) == len(r.sampler_logp) == 3 * G
    assert 0 < sum(r.truncated) < len(r), "test needs both finished and truncated completions"
    assert r.response_mask.shape == (3 * G, max(len(c) for c in r.completion_ids))
    for ids, mask_row, cut, lp, text in zip(r.completion_ids, r.response_mask, r.truncated, r.sampler_logp,
                                            r.texts):
        assert mask_row.sum().item() == len(ids) and mask_row[:len(ids)].all()
        assert not any(t in eos for t in ids[:-1]), "nothing may follow the first EOS"
        assert cut == (ids[-1] not in eos)
        if cut:
            assert len(ids) == max_new
        assert lp.shape == (len(ids),) and torch.isfinite(lp).all() and (lp <= 0).all()
        assert "<|im_end|>" not in text
    # pad == eos here: generate() fills finished rows with pad, which must not be mistaken for more EOS tokens
    assert pad_id_of(tiny_tokenizer) == tiny_tokenizer.eos_token_id


def test_model_generation_defaults_do_not_leak(tiny_model, tiny_tokenizer):
    # the tiny model's generation_config has repetition_penalty=1.3, top_k=5, temperature=0.3: if any of them
    # leaked in, the sampled tokens' log-probs would not be those of the plain temperature-1.0 softmax
    before = tiny_model.generation_config.to_dict()
    prompts = encode(tiny_tokenizer)
    r = sample(tiny_model, tiny_tokenizer, prompts, group_size=3, max_new_tokens=16, temperature=1.0, seed=3,
               return_logprobs=True)
    V = real_vocab_size(tiny_tokenizer, tiny_model)
    for i, ids, lp in zip(r.prompt_index, r.completion_ids, r.sampler_logp):
        ref = reference_logp(tiny_model, prompts[i], ids, 1.0, V)
        assert torch.allclose(lp.double(), ref, atol=1e-4), (lp, ref)
    # the random model is near uniform: over 259 ids a token has log-prob about -5.6; over top_k=5 about -1.6
    assert torch.cat(r.sampler_logp).mean().item() < -4.0
    assert tiny_model.generation_config.to_dict() == before


def test_never_samples_padded_vocab_ids(tiny_model, tiny_tokenizer):
    V = real_vocab_size(tiny_tokenizer, tiny_model)
    assert V == len(tiny_tokenizer) < tiny_model.lm_head.weight.shape[0]
    for pad_row in range(V, tiny_model.lm_head.weight.shape[0]):  # make padded ids by far the most likely
        eos_likely(tiny_model, pad_row, strength=20.0)
    prompts = encode(tiny_tokenizer)
    r = sample(tiny_model, tiny_tokenizer, prompts, group_size=3, max_new_tokens=10, temperature=0.7, seed=0,
               return_logprobs=True)
    assert max(max(ids) for ids in r.completion_ids) < V
    for i, ids, lp in zip(r.prompt_index, r.completion_ids, r.sampler_logp):
        assert torch.allclose(lp.double(), reference_logp(tiny_model, prompts[i], ids, 0.7, V), atol=1e-4)


def test_every_eos_id_ends_a_completion(tiny_model, tiny_tokenizer):
    other_eos = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tiny_model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, other_eos]
    assert set(eos_token_ids(tiny_model, tiny_tokenizer)) == {tiny_tokenizer.eos_token_id, other_eos}
    eos_likely(tiny_model, other_eos, strength=6.0)
    r = sample(tiny_model, tiny_tokenizer, encode(tiny_tokenizer), group_size=4, max_new_tokens=12, seed=0)
    ended = [ids for ids, cut in zip(r.completion_ids, r.truncated) if not cut]
    assert any(ids[-1] == other_eos for ids in ended)
    assert all(other_eos not in ids[:-1] for ids in r.completion_ids)


def test_greedy_matches_per_prompt_generate(tiny_model, tiny_tokenizer):
    # float64 so that batching/padding rounding cannot flip an argmax
    model, tok = tiny_model.double(), tiny_tokenizer
    prefix = tok.encode("a shared system prompt, long enough to be encoded once per batch: ")
    prompts, max_new = [prefix + p for p in encode(tok)], 10
    config = build_generation_config(model, tok, max_new)
    procs = _processors(real_vocab_size(tok, model), 1.0, 0, 1.0, chooser=None)
    for kw in (dict(prefill_once=False, share_prefix=False), dict(prefill_once=True, share_prefix=False),
               dict(prefill_once=True, share_prefix=True, decode_chunk=3)):
        via_sample = sample(model, tok, prompts, greedy=True, max_new_tokens=max_new, **kw)
        assert via_sample.group_size == 1
        for i, p in enumerate(prompts):
            alone = model.generate(torch.tensor([p]), generation_config=config, logits_processor=procs)[0, len(p):]
            assert via_sample.completion_ids[i] == alone.tolist()[:len(via_sample.completion_ids[i])], kw


def test_prefill_once_samples_the_same_as_expand_then_prefill(tiny_model, tiny_tokenizer):
    model, prompts = tiny_model.double(), encode(tiny_tokenizer)
    kw = dict(group_size=4, max_new_tokens=12, temperature=0.9, seed=11, return_logprobs=True)
    once = sample(model, tiny_tokenizer, prompts, prefill_once=True, **kw)
    expanded = sample(model, tiny_tokenizer, prompts, prefill_once=False, **kw)
    assert once.completion_ids == expanded.completion_ids
    assert torch.allclose(torch.cat(once.sampler_logp), torch.cat(expanded.sampler_logp), atol=1e-6)


def test_deterministic_for_a_seed_and_caller_rng_untouched(tiny_model, tiny_tokenizer):
    prompts = encode(tiny_tokenizer)
    kw = dict(group_size=3, max_new_tokens=8, temperature=1.0)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = sample(tiny_model, tiny_tokenizer, prompts, seed=5, **kw)
    assert torch.equal(torch.rand(3), expected_next), "sample() must not advance the caller's RNG"
    b = sample(tiny_model, tiny_tokenizer, prompts, seed=5, **kw)
    c = sample(tiny_model, tiny_tokenizer, prompts, seed=6, **kw)
    assert a.completion_ids == b.completion_ids
    assert a.completion_ids != c.completion_ids
    # within a group the G samples differ (they are not copies of one stream)
    assert len({tuple(ids) for ids in a.completion_ids[:3]}) > 1


def test_rank_seed_and_shards():
    seeds = {rank_seed(0, step, rank) for step in range(50) for rank in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2 ** 63 for s in seeds)
    assert rank_seed(1, 2, 3) == rank_seed(1, 2, 3) != rank_seed(2, 2, 3)
    shards = [shard_indices(10, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]
    with pytest.raises(ValueError):
        shard_indices(10, 3, 3)


def test_token_budget_and_max_rows_change_no_result(tiny_model, tiny_tokenizer):
    model, prompts = tiny_model.double(), encode(tiny_tokenizer)
    kw = dict(group_size=2, max_new_tokens=6, temperature=1.0, return_logprobs=True)
    one_call = sample(model, tiny_tokenizer, prompts, greedy=True, **kw)
    per_prompt = sample(model, tiny_tokenizer, prompts, greedy=True, token_budget=1, **kw)
    assert one_call.completion_ids == per_prompt.completion_ids and one_call.prompt_index == [0, 1, 2]


def test_static_cache_path_matches_dynamic(tiny_model, tiny_tokenizer):
    # the static cache without compilation (the compiled path is tested on CUDA); the padding to a multiple of 64
    # must not matter
    model, prompts = tiny_model.double(), encode(tiny_tokenizer)
    dynamic = sample(model, tiny_tokenizer, prompts, greedy=True, max_new_tokens=8)
    static = sample(model, tiny_tokenizer, prompts, greedy=True, max_new_tokens=8, static_cache=True,
                    compile_decode=False)
    assert static.completion_ids == dynamic.completion_ids


def test_top_p_logprobs_are_of_the_truncated_distribution(tiny_model, tiny_tokenizer):
    prompts = encode(tiny_tokenizer)
    r = sample(tiny_model, tiny_tokenizer, prompts, group_size=3, max_new_tokens=10, temperature=1.0, top_p=0.5,
               seed=0, return_logprobs=True)
    V = real_vocab_size(tiny_tokenizer, tiny_model)
    full = torch.cat([reference_logp(tiny_model, prompts[i], ids, 1.0, V)
                      for i, ids in zip(r.prompt_index, r.completion_ids)])
    truncated = torch.cat(r.sampler_logp).double()
    assert (truncated >= full - 1e-5).all() and (truncated > full + 0.1).all()


def trainer_logprobs(model, tokenizer, prompts, rollouts, temperature):
    """The trainer's log-probs of the sampled ids: model/score.py + model/kernels.py when present (head sliced to
    the real vocabulary, as the sampler samples), else a plain full-forward log_softmax."""
    V = real_vocab_size(tokenizer, model)
    prompt_ids = [prompts[i] for i in rollouts.prompt_index]
    if importlib.util.find_spec("model.score") and importlib.util.find_spec("model.kernels"):
        from model.kernels import logprob_entropy
        from model.score import completion_hidden
        with torch.no_grad():
            hidden, targets = completion_hidden(model, prompt_ids, rollouts.completion_ids)
            logp, _ = logprob_entropy(hidden, model.lm_head.weight[:V], targets, temperature=temperature,
                                      with_entropy=False)
        return logp.float()
    return torch.cat([reference_logp(model, p, ids, temperature, V).float()
                      for p, ids in zip(prompt_ids, rollouts.completion_ids)])


def test_trainer_logprobs_match_sampler(tiny_model, tiny_tokenizer):
    model = eos_likely(tiny_model, tiny_tokenizer.eos_token_id, strength=3.0)
    prompts = encode(tiny_tokenizer)
    r = sample(model, tiny_tokenizer, prompts, group_size=4, max_new_tokens=16, temperature=0.7, seed=2,
               return_logprobs=True)
    trainer = trainer_logprobs(model, tiny_tokenizer, prompts, r, 0.7)
    gap = logprob_gap(r.sampler_logp, trainer)
    assert gap["max"] < 1e-4, gap
    # the padded form with a mask gives the same figures
    padded = torch.zeros(r.response_mask.shape)
    padded[r.response_mask.bool()] = trainer
    assert logprob_gap(r.padded_logp(), padded, r.response_mask)["max"] == pytest.approx(gap["max"])
    # and a wrong temperature is caught
    assert logprob_gap(r.sampler_logp, trainer_logprobs(model, tiny_tokenizer, prompts, r, 1.0))["max"] > 0.05


def test_logprob_gap():
    a = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    b = torch.tensor([-1.5, -2.0, -0.25])
    assert logprob_gap(a, b) == pytest.approx({"mean": 0.25, "max": 0.5})
    mask = torch.tensor([[1, 0], [1, 1]])
    assert logprob_gap(torch.tensor([[0.0, 9.0], [1.0, 2.0]]), torch.zeros(2, 2), mask) == \
        pytest.approx({"mean": 1.0, "max": 2.0})
    with pytest.raises(ValueError):
        logprob_gap(a, b[:2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (static cache + compile)")
def test_static_cache_compiled_on_cuda(tiny_tokenizer):
    from model.tiny import tiny_model
    model = tiny_model(tiny_tokenizer).cuda().double().eval()  # float64: compiled kernels must not flip an argmax
    prompts = encode(tiny_tokenizer)
    dynamic = sample(model, tiny_tokenizer, prompts, greedy=True, max_new_tokens=16)
    static = sample(model, tiny_tokenizer, prompts, greedy=True, max_new_tokens=16, static_cache=True)
    assert static.completion_ids == dynamic.completion_ids


def test_row_seeds_make_rollouts_independent_of_batching(tiny_model, tiny_tokenizer):
    """Per-completion seeds: the same completion whatever else shares its batch (micro-batching, other prompts,
    another rank's shard), and exact sampling from the temperature distribution."""
    prompts = encode(tiny_tokenizer)
    G = 3
    seeds = list(range(1000, 1000 + len(prompts) * G))
    whole = sample(tiny_model, tiny_tokenizer, prompts, group_size=G, max_new_tokens=10, row_seeds=seeds,
                   return_logprobs=True)
    for i in range(len(prompts)):  # each prompt alone, as a rank holding only that prompt would sample it
        alone = sample(tiny_model, tiny_tokenizer, [prompts[i]], group_size=G, max_new_tokens=10,
                       row_seeds=seeds[i * G:(i + 1) * G])
        assert alone.completion_ids == whole.completion_ids[i * G:(i + 1) * G]
    tight = sample(tiny_model, tiny_tokenizer, prompts[::-1], group_size=G, max_new_tokens=10, token_budget=1,
                   row_seeds=[s for i in reversed(range(len(prompts))) for s in seeds[i * G:(i + 1) * G]])
    assert tight.completion_ids == [c for i in reversed(range(len(prompts)))
                                    for c in whole.completion_ids[i * G:(i + 1) * G]]
    with pytest.raises(ValueError, match="one seed per completion"):
        sample(tiny_model, tiny_tokenizer, prompts, group_size=G, row_seeds=seeds[:-1])


def test_row_seeded_draws_follow_the_temperature_distribution(tiny_model, tiny_tokenizer):
    """E[log p(x)] over x ~ p is -H(p): the mean log-prob of many one-token draws must match the entropy of the
    sampling distribution (an argmax or a wrong temperature would not)."""
    prompt = encode(tiny_tokenizer)[:1]
    n = 1500
    r = sample(tiny_model, tiny_tokenizer, prompt * 1, group_size=n, max_new_tokens=1, temperature=0.7,
               row_seeds=list(range(n)), return_logprobs=True)
    drawn = torch.stack([lp[0] for lp in r.sampler_logp]).double()
    vocab = len(tiny_tokenizer)
    with torch.no_grad():
        logits = tiny_model(torch.tensor(prompt)).logits[0, -1, :vocab].double() / 0.7
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum()
    assert abs(drawn.mean() + entropy) < 4 * drawn.std() / n ** 0.5 + 1e-3, (drawn.mean(), entropy)
    assert len(set(tuple(c) for c in r.completion_ids)) > 20  # really random across rows


def test_counter_uniforms_are_splitmix64_and_uniform():
    import numpy as np

    from model.sample import counter_uniforms
    mask = 2 ** 64 - 1

    def splitmix64(seed, step):  # the reference: pure Python integers, arithmetic mod 2**64
        z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    rng = np.random.default_rng()
    seeds = [int(s) for s in rng.integers(0, 2 ** 63, size=50)] + [0, 2 ** 63 - 1]
    for step in (0, 1, 7, int(rng.integers(0, 10 ** 6))):
        got = counter_uniforms(np.array(seeds, dtype=np.uint64), step)
        want = torch.tensor([((splitmix64(s, step) >> 11) + 0.5) * 2.0 ** -53 for s in seeds], dtype=torch.float64)
        assert torch.equal(got, want)
    u = counter_uniforms(np.arange(20_000, dtype=np.uint64), 3)
    assert (u > 0).all() and (u < 1).all()
    # Kolmogorov-Smirnov against U(0, 1): the 0.1% critical value for n = 20000 is 1.95 / sqrt(n)
    ks = (torch.sort(u).values - torch.arange(1, 20_001, dtype=torch.float64) / 20_000).abs().max()
    assert ks < 1.95 / 20_000 ** 0.5
    # consecutive steps of one row, and neighbouring seeds at one step, are not correlated
    a, b = counter_uniforms(np.arange(20_000, dtype=np.uint64), 4), u
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.03


def test_row_choice_samples_the_exact_distribution():
    """Chi-square test of the inverse-CDF draws against softmax(scores), with ids of zero probability."""
    import numpy as np

    from model.sample import RowChoice
    V, n = 9, 40_000
    scores = torch.randn(V, dtype=torch.float64) * 1.5
    scores[[2, 8]] = -math.inf  # masked ids (top-k, padded vocabulary): never drawn
    probs = torch.softmax(scores, -1)
    chooser = RowChoice(np.arange(n, dtype=np.uint64) * 7919 + 13, first_step=5, greedy=False, record=True)
    one_hot = chooser(None, scores.float().expand(n, V).clone())
    choice = one_hot.argmax(-1)
    assert torch.isfinite(one_hot).sum() == n  # exactly one finite entry per row
    counts = torch.bincount(choice, minlength=V).double()
    assert counts[[2, 8]].sum() == 0
    keep = probs > 0
    chi2 = ((counts[keep] - n * probs[keep]) ** 2 / (n * probs[keep])).sum().item()
    assert chi2 < 22.5, chi2  # 6 degrees of freedom: the 0.1% critical value is 22.46
    assert torch.allclose(chooser.logp[0].double(), torch.log(probs[choice]), atol=1e-5)


def test_finished_rows_leave_the_batch_with_the_same_results(tiny_model, tiny_tokenizer, monkeypatch):
    """Rows that end (EOS, or the caller's stop test) stop costing compute: later generate() steps run on fewer
    rows. Pruning and the shared prefix change nothing in the results (float64, per-row seeds)."""
    model = eos_likely(tiny_model.double(), tiny_tokenizer.eos_token_id, strength=3.0)
    prefix = tiny_tokenizer.encode("a shared system prompt, long enough to be encoded once per batch: ")
    prompts = [prefix + p for p in encode(tiny_tokenizer)]
    G, max_new = 4, 24
    seeds = list(range(77, 77 + len(prompts) * G))
    kw = dict(group_size=G, max_new_tokens=max_new, temperature=1.0, row_seeds=seeds, return_logprobs=True)
    rows_seen = []
    forward = type(model).forward

    @functools.wraps(forward)  # keeps the signature (the cache keyword is detected from it)
    def counting_forward(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows_seen.append(tuple(ids.shape))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting_forward)
    plain = sample(model, tiny_tokenizer, prompts, share_prefix=False, decode_chunk=max_new, **kw)
    rows_plain = list(rows_seen)
    rows_seen.clear()
    pruned = sample(model, tiny_tokenizer, prompts, share_prefix=True, decode_chunk=4, **kw)
    assert pruned.completion_ids == plain.completion_ids
    assert torch.allclose(torch.cat(pruned.sampler_logp), torch.cat(plain.sampler_logp), atol=1e-9)
    assert 0 < sum(pruned.truncated) < len(pruned), "test needs both finished and truncated completions"
    # the shared prefix went through the model once, on one row; decoding ended on the truncated rows alone
    assert rows_seen[0] == (1, len(prefix)), rows_seen[:2]
    decode_rows = [r for r, t in rows_seen if t == 1]
    assert decode_rows[0] == len(prompts) * G and decode_rows[-1] == sum(pruned.truncated)
    assert sum(r for r, t in rows_seen if t == 1) < sum(r for r, t in rows_plain if t == 1)

    # a caller's stop test ends rows too (here: once a row holds 6 tokens; checked every 4)
    stopped = sample(model, tiny_tokenizer, prompts, decode_chunk=4, stop=lambda ids: len(ids) >= 6, **kw)
    for ids, full in zip(stopped.completion_ids, plain.completion_ids):
        assert ids == full[:len(ids)] and len(ids) == min(len(full), 8)


def test_waiting_prompts_take_the_places_of_finished_rows(tiny_model, tiny_tokenizer, monkeypatch):
    """With max_rows, prompts wait until rows finish and then join the running batch (left-padded to its width,
    each from its own step of its random stream): every completion and log-prob is the one it gets alone
    (float64, per-row seeds, EOS, truncation, the shared prefix, a stop test), and no forward sees more rows."""
    model = eos_likely(tiny_model.double(), tiny_tokenizer.eos_token_id, strength=3.0)
    prefix = tiny_tokenizer.encode("the system prompt all of them share: ")
    texts = ["a", "call get_weather for Paris", "hi", "a somewhat longer prompt, with a tool list: [f(x), g(y)]",
             "book a table for two at eight", "what is 2 + 2?", "x" * 37]
    prompts = [prefix + tiny_tokenizer.encode(t) for t in texts]
    G, max_new, most = 2, 20, 4
    seeds = list(range(500, 500 + len(prompts) * G))
    kw = dict(group_size=G, max_new_tokens=max_new, temperature=1.0, return_logprobs=True, decode_chunk=3)
    shapes = []
    forward = type(model).forward

    @functools.wraps(forward)
    def recording_forward(self, *args, **kwargs):
        shapes.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", recording_forward)
    refilled = sample(model, tiny_tokenizer, prompts, row_seeds=seeds, max_rows=most, **kw)
    decode_rows = [rows for rows, width in shapes if width == 1]
    admissions_while_decoding = [i for i, (rows, width) in enumerate(shapes)
                                 if width > 1 and any(w == 1 for _, w in shapes[:i])]
    prefix_forwards = shapes.count((1, len(prefix)))
    for i, p in enumerate(prompts):
        alone = sample(model, tiny_tokenizer, [p], row_seeds=seeds[i * G:(i + 1) * G], **kw)
        assert refilled.completion_ids[i * G:(i + 1) * G] == alone.completion_ids, i
        for got, want in zip(refilled.sampler_logp[i * G:(i + 1) * G], alone.sampler_logp):
            assert torch.allclose(got, want, atol=1e-9)
    assert 0 < sum(refilled.truncated) < len(refilled), "test needs both finished and truncated completions"
    assert max(decode_rows) <= most and admissions_while_decoding, (decode_rows, admissions_while_decoding)
    assert prefix_forwards == 1  # the shared prefix was encoded once for the whole call, not once per admission
    stopped = sample(model, tiny_tokenizer, prompts, row_seeds=seeds, max_rows=3, stop=lambda ids: len(ids) >= 5, **kw)
    for ids, full in zip(stopped.completion_ids, refilled.completion_ids):
        assert ids == full[:len(ids)] and len(ids) == min(len(full), 6)  # checked every 3 tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (refill and the growing cache on CUDA)")
def test_waiting_prompts_take_the_places_of_finished_rows_on_cuda(tiny_tokenizer):
    """The refill path on CUDA (joins, left padding, the cache grown in place): every completion and log-prob is
    the one it gets alone (float64, per-row seeds)."""
    from model.tiny import tiny_model
    model = eos_likely(tiny_model(tiny_tokenizer).double().eval(), tiny_tokenizer.eos_token_id, strength=3.0).cuda()
    prompts = encode(tiny_tokenizer, PROMPTS + ["book a table for two at eight", "x" * 37])
    G = 2
    seeds = list(range(700, 700 + len(prompts) * G))
    kw = dict(group_size=G, max_new_tokens=20, temperature=1.0, return_logprobs=True, decode_chunk=3)
    refilled = sample(model, tiny_tokenizer, prompts, row_seeds=seeds, max_rows=3, **kw)
    for i, p in enumerate(prompts):
        alone = sample(model, tiny_tokenizer, [p], row_seeds=seeds[i * G:(i + 1) * G], **kw)
        assert refilled.completion_ids[i * G:(i + 1) * G] == alone.completion_ids, i
        for got, want in zip(refilled.sampler_logp[i * G:(i + 1) * G], alone.sampler_logp):
            assert torch.allclose(got, want, atol=1e-9)


def test_continuing_from_kept_caches_equals_encoding_the_whole_prompt(tiny_model, tiny_tokenizer, monkeypatch):
    """A conversation's next step (multi-turn evaluation) reuses the keys and values of what was encoded before
    and encodes only the new tokens; the results are those of encoding every prompt whole (float64, sampled with
    per-row seeds, with EOS, a stop test, a history edited midway and a prompt without a cache)."""
    from tiny_run import count_fed_tokens
    model = eos_likely(tiny_model.double(), tiny_tokenizer.eos_token_id, strength=3.0)
    tok = tiny_tokenizer
    prompts = encode(tok)
    kw = dict(group_size=1, max_new_tokens=12, temperature=1.0, return_logprobs=True, decode_chunk=4,
              stop=lambda ids: len(ids) >= 10)
    first = sample(model, tok, prompts, row_seeds=[5, 6, 7], keep_caches=True, **kw)
    for p, ids, c in zip(prompts, first.completion_ids, first.caches):
        assert c.ids == (p + ids)[:len(c.ids)] and len(p) + len(ids) - 1 <= len(c.ids) <= len(p) + len(ids)
        assert all(t.shape[1] == len(c.ids) for t in c.kv)

    tool = tok.encode(" -> result: 42. next?")
    follow = [p + ids + tool for p, ids in zip(prompts, first.completion_ids)]
    follow[1] = follow[1][:3] + tok.encode("EDITED") + follow[1][3:]  # shares only 3 tokens with its cache
    caches = [first.caches[0], first.caches[1], None]
    fed = count_fed_tokens(model, monkeypatch)  # real tokens fed per forward call
    for round_ in range(2):
        fed.clear()
        whole = sample(model, tok, follow, row_seeds=[8, 9, 10], **kw)
        fed_whole = sum(fed)
        fed.clear()
        continued = sample(model, tok, follow, row_seeds=[8, 9, 10], caches=caches, keep_caches=True, **kw)
        assert continued.completion_ids == whole.completion_ids, round_
        assert torch.allclose(torch.cat(continued.sampler_logp), torch.cat(whole.sampler_logp), atol=1e-9)
        assert sum(fed) < fed_whole, (sum(fed), fed_whole)  # the reused prefixes were not encoded again
        caches = continued.caches
        follow = [p + ids + tool for p, ids in zip(follow, continued.completion_ids)]
    assert 0 < sum(continued.truncated) < 3 or 0 < sum(first.truncated) < 3, "needs ended and cut rows"

    with pytest.raises(ValueError, match="group_size 1"):
        sample(model, tok, prompts, group_size=2, caches=[None] * 3)
    with pytest.raises(ValueError, match="one entry"):
        sample(model, tok, prompts, greedy=True, caches=[None])


def test_under_autocast_the_cache_holds_what_attention_reads(tiny_tokenizer):
    """Under autocast the sampler's cache stores keys and values in the autocast dtype (the rotary embedding
    leaves fp32 keys, which attention would otherwise cast, whole cache, every layer and step): attention over it
    gives exactly what it gives over transformers' fp32 cache, and a bf16 sampling call the same rollouts as one
    whose cache layer does not cast."""
    import torch.nn.functional as F
    from transformers.cache_utils import DynamicLayer
    from model.sample import _GrowingLayer
    from model.tiny import tiny_model

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    ours, plain = _GrowingLayer(), DynamicLayer()
    query = torch.randn(3, 4, 1, 8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for k in (9, 1, 1):
            keys, values = (torch.randn(3, 4, k, 8, generator=gen) for _ in range(2))
            got, want = ours.update(keys, values), plain.update(keys, values)
            assert got[0].dtype == got[1].dtype == torch.bfloat16 and want[0].dtype == torch.float32
            torch.testing.assert_close(F.scaled_dot_product_attention(query, *got),
                                       F.scaled_dot_product_attention(query, *want), rtol=0, atol=0)
    keys = torch.randn(3, 4, 1, 8, generator=gen)
    assert _GrowingLayer().update(keys, keys)[0].dtype == torch.float32  # outside autocast: as given

    tokenizer = tiny_tokenizer
    model = tiny_model(tokenizer, seed=int(torch.randint(0, 2**31, ()))).eval()
    prompts = [tokenizer("a prompt").input_ids, tokenizer("another, longer prompt").input_ids]

    def rollouts():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sample(model, tokenizer, prompts, group_size=3, max_new_tokens=12, return_logprobs=True,
                         row_seeds=list(range(6)))
        return out.completion_ids, [lp.tolist() for lp in out.sampler_logp]

    cast = rollouts()
    update = _GrowingLayer.update
    try:  # the layer as it was: storing what it is given
        _GrowingLayer.update = DynamicLayer.update
        uncast = rollouts()
    finally:
        _GrowingLayer.update = update
    assert cast == uncast


def test_growing_cache_layer_appends_in_place_and_holds_what_concatenation_would():
    """The sampler's cache layer: after every update, batch selection and crop it holds exactly the keys and values
    that transformers' concatenating DynamicLayer holds, and an append within the spare columns copies nothing."""
    from transformers.cache_utils import DynamicLayer
    from model.sample import _GrowingLayer

    gen = torch.Generator().manual_seed(3)
    ours, plain = _GrowingLayer(), DynamicLayer()
    B, h, d = 5, 3, 7
    pointers = []
    for step, k in enumerate([11, 1, 1, 1, 3, 1, 1, 130, 1, 1]):
        keys, values = (torch.randn(B, h, k, d, dtype=torch.float64, generator=gen) for _ in range(2))
        got, want = ours.update(keys, values), plain.update(keys, values)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), step
        pointers.append(ours.keys.data_ptr())
        if step == 4:  # rows leave the batch
            index = torch.tensor([0, 2, 3, 4])
            ours.batch_select_indices(index)
            plain.batch_select_indices(index)
            B = 4
        if step == 8:
            ours.crop(-2)
            plain.crop(-2)
    assert len(set(pointers[1:4])) == 1  # appends within the spare columns wrote in place
    assert pointers[5] != pointers[4] and pointers[7] != pointers[6]  # after a selection, and past the capacity
    assert torch.equal(ours.keys, plain.keys) and torch.equal(ours.values, plain.values)

    # a layer handed preallocated buffers (as _join builds them) appends into them, without a copy
    n = plain.keys.shape[2]
    buffers = [torch.full((B, h, n + 2, d), float("nan"), dtype=torch.float64) for _ in range(2)]
    buffers[0][..., :n, :], buffers[1][..., :n, :] = plain.keys, plain.values
    held = _GrowingLayer()
    held.hold(*buffers, n)
    for step in range(3):  # the third append passes the capacity
        keys, values = (torch.randn(B, h, 1, d, dtype=torch.float64, generator=gen) for _ in range(2))
        got, want = held.update(keys, values), plain.update(keys, values)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), step
        assert (held.keys.data_ptr() == buffers[0].data_ptr()) == (step < 2), step


def test_grouped_decoding_reads_each_prompt_once_and_samples_the_same(tiny_model, tiny_tokenizer, monkeypatch):
    """grouped_decode: the G rows of a prompt attend to one copy of its keys and values (model.cascade), merged
    with their own tokens' attention through the log-sum-exps. The same completions and log-probs (float64) as G
    copies: rows finishing and leaving, prompts of different lengths (padding inside the prompts' part), the shared
    prefix, waiting prompts joining (the batch then decodes ungrouped), and leading padding trimmed off a grouped
    batch. The prompts' part runs once per group per layer and decoding step."""
    from model import cascade
    from model.sample import _GroupedLayer, _Live
    model = eos_likely(tiny_model.double(), tiny_tokenizer.eos_token_id, strength=4.0)
    prefix = tiny_tokenizer.encode("a shared system prompt, long enough to be encoded once per batch: ")
    kernel_queries = []  # the query block of every call of the attention kernel
    flash = cascade._flash_cpu
    monkeypatch.setattr(cascade, "_flash_cpu", lambda q, *a: kernel_queries.append(q.shape) or flash(q, *a))
    trims = []  # per trim that dropped columns: whether the batch was grouped
    trim = _Live.trim

    def recording_trim(self, config, min_columns=32):
        grouped, width = any(isinstance(x, _GroupedLayer) for x in self.cache.layers), self.attention_mask.shape[1]
        trim(self, config, min_columns)
        if self.attention_mask.shape[1] < width:
            trims.append(grouped)

    monkeypatch.setattr(_Live, "trim", recording_trim)
    long_and_short = encode(tiny_tokenizer, ["hi", "a much longer question that pads the short ones: f(x=1), g(y=2)?",
                                             "ok"])

    def both(prompts, **kw):
        kernel_queries.clear()
        grouped = sample(model, tiny_tokenizer, prompts, return_logprobs=True, **kw)
        calls = list(kernel_queries)
        plain = sample(model, tiny_tokenizer, prompts, return_logprobs=True, grouped_decode=False, **kw)
        assert grouped.completion_ids == plain.completion_ids, kw
        torch.testing.assert_close(torch.cat(grouped.sampler_logp), torch.cat(plain.sampler_logp), rtol=0, atol=1e-9)
        return grouped, calls

    G = 4
    kw = dict(group_size=G, max_new_tokens=24, temperature=1.0, decode_chunk=4)
    prompts = [prefix + p for p in encode(tiny_tokenizer)]
    out, calls = both(prompts, row_seeds=list(range(77, 77 + 3 * G)), **kw)
    assert len({len(c) for c in out.completion_ids}) > 3, "the test needs rows that end at different steps"
    kv, d = model.config.num_key_value_heads, model.config.head_dim
    rep = model.config.num_attention_heads // kv
    # the first layer's first step: a block per prompt (its G rows x the query heads of a key/value head) against its
    # one copy, then every row's own token
    assert calls[:4] == [(1, kv, G * rep, d)] * 3 + [(3 * G, kv, rep, d)]
    both(prompts, row_seeds=list(range(77, 77 + 3 * G)), max_rows=2 * G, **kw)  # the third prompt joins later
    for base in range(0, 600, 6):  # seeds under which a long prompt's rows all end first, and trim fires grouped
        trims.clear()
        both(long_and_short, row_seeds=list(range(base, base + 6)), group_size=2, max_new_tokens=40,
             temperature=1.0, decode_chunk=2)
        if trims and trims[0]:
            break
    assert trims and trims[0], "no seeds made a grouped batch trim its leading padding"


def test_grouped_decoding_under_bf16_autocast_stays_as_close_to_fp32(tiny_model, tiny_tokenizer, monkeypatch):
    """Under bf16 autocast (the trainer's rollouts on CPUs with native bf16) the query leaves the rotary embedding
    in fp32 while the cache holds bf16: grouped attention attends in bf16, as autocast casts SDPA. Its log-probs
    are as close to the fp32 model's as ungrouped bf16 decoding's (each partial softmax is rounded to bf16 before
    the merge, so a little less close)."""
    from model import cascade
    from model.load import autocast_to
    model = eos_likely(tiny_model, tiny_tokenizer.eos_token_id, strength=3.0)
    prefix = tiny_tokenizer.encode("a shared system prompt, long enough to be encoded once per batch: ")
    prompts = [prefix + p for p in encode(tiny_tokenizer)]
    calls = []
    flash = cascade._flash_cpu
    monkeypatch.setattr(cascade, "_flash_cpu", lambda q, *a: calls.append(q.dtype) or flash(q, *a))
    kw = dict(group_size=4, max_new_tokens=24, temperature=1.0, row_seeds=list(range(12)), return_logprobs=True,
              decode_chunk=4)
    vocab = real_vocab_size(tiny_tokenizer, model)
    gaps = {}
    for grouped in (True, False):
        with torch.no_grad(), autocast_to(torch.bfloat16, torch.device("cpu")):
            out = sample(model, tiny_tokenizer, prompts, grouped_decode=grouped, **kw)
        gaps[grouped] = torch.cat([(reference_logp(model, prompts[i // 4], c, 1.0, vocab)
                                    - out.sampler_logp[i].double()).abs() for i, c in enumerate(out.completion_ids)
                                   if c]).mean().item()
    assert calls and set(calls) == {torch.bfloat16}
    assert 0 < gaps[True] < 2 * gaps[False], gaps


def test_packed_linear_runs_in_fp32_and_leaves_nothing_behind(tiny_model, tiny_tokenizer, monkeypatch):
    """Inside packed_linear, on CPU in fp32, a linear layer (odd shapes, with and without a bias) multiplies by its
    packed weight: outputs equal float64 to fp32 rounding; after the block (also when it raised) the layer is as
    before; under autocast or in float64 nothing is packed. Sampling with the lm_head packed gives the same
    completions and, to fp32 rounding, the same log-probs; the static-cache path packs nothing."""
    import model.sample as sample_module
    from model.sample import packed_linear
    packs = torch.backends.mkldnn.is_available()  # x86 and Arm builds have oneDNN; without it nothing is packed
    for layer in (torch.nn.Linear(37, 131), torch.nn.Linear(131, 29, bias=False), tiny_model.lm_head):
        with torch.no_grad(), packed_linear(layer):
            assert ("forward" in layer.__dict__) is packs
            x = torch.randn(3, 5, layer.in_features)
            want = torch.nn.functional.linear(x.double(), layer.weight.double(),
                                              layer.bias.double() if layer.bias is not None else None)
            torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
        assert "forward" not in layer.__dict__
    layer = torch.nn.Linear(37, 131)
    with pytest.raises(RuntimeError, match="inside"), packed_linear(layer):
        raise RuntimeError("inside")
    assert "forward" not in layer.__dict__
    with torch.autocast("cpu", dtype=torch.bfloat16), packed_linear(layer):
        assert "forward" not in layer.__dict__
    with packed_linear(layer.double()):
        assert "forward" not in layer.__dict__

    model = eos_likely(tiny_model, tiny_tokenizer.eos_token_id)
    kw = dict(group_size=4, max_new_tokens=24, temperature=1.0, return_logprobs=True, row_seeds=list(range(12)))
    wrapped = []  # the layers the sampler packs
    monkeypatch.setattr(sample_module, "packed_linear", lambda m: wrapped.append(m) or packed_linear(m))
    packed = sample(model, tiny_tokenizer, encode(tiny_tokenizer), **kw)
    assert wrapped == [model.lm_head]
    sample(model, tiny_tokenizer, encode(tiny_tokenizer), static_cache=True, compile_decode=False, **kw)
    assert wrapped == [model.lm_head]  # the static path, whose decode step torch.compile traces, packs nothing
    monkeypatch.setattr(sample_module, "packed_linear", lambda m: contextlib.nullcontext())
    plain = sample(model, tiny_tokenizer, encode(tiny_tokenizer), **kw)
    assert packed.completion_ids == plain.completion_ids
    torch.testing.assert_close(torch.cat(packed.sampler_logp), torch.cat(plain.sampler_logp), rtol=0, atol=1e-4)
