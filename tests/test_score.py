"""Scoring forward: padded and packed batches agree with each other and with scoring each sequence alone
through the full model (float64 log-softmax of its logits); gradients reach the body and the (tied) head."""
import functools
import importlib.util
import os

import pytest
import torch

from model.score import completion_hidden, completion_logprobs
from tiny_run import assert_grad_close

# prompt and completion lengths: uneven, a 1-token prompt, an empty completion
PROMPT_LENS = [5, 1, 9, 3, 6]
COMPLETION_LENS = [4, 7, 0, 2, 5]


def random_batch(vocab, prompt_lens=PROMPT_LENS, completion_lens=COMPLETION_LENS):
    seed = int.from_bytes(os.urandom(4), "little")  # fresh tokens each run; printed for reproduction
    print(f"random_batch seed {seed}")
    torch.manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in prompt_lens]
    completions = [torch.randint(0, vocab, (n,)).tolist() for n in completion_lens]
    return prompts, completions


def per_sequence_reference(model, prompts, completions, temperature):
    """Each sequence alone, no padding, full logits in float64."""
    logps, entropies = [], []
    device = next(model.parameters()).device
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            if not c:
                continue
            logits = model(torch.tensor([p + c], device=device)).logits[0].double() / temperature
            logp_all = torch.log_softmax(logits[len(p) - 1:len(p) + len(c) - 1], dim=-1)  # rows predicting c
            logps.append(logp_all.gather(1, torch.tensor(c, device=device)[:, None]).squeeze(1))
            entropies.append(-(logp_all.exp() * logp_all).sum(-1))
    return torch.cat(logps), torch.cat(entropies)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)])
def test_padded_and_packed_agree_with_each_sequence_alone(tiny_tokenizer, arch, tie):
    from model.tiny import tiny_model
    model = tiny_model(tiny_tokenizer, arch=arch, tie=tie, seed=int(torch.randint(0, 2**31, ())))
    model.eval()
    vocab = model.config.vocab_size
    prompts, completions = random_batch(vocab)
    ref_logp, ref_entropy = per_sequence_reference(model, prompts, completions, temperature=0.7)
    results = {}
    for pack in (False, True):
        logp, entropy, lengths = completion_logprobs(model, prompts, completions, temperature=0.7, pack=pack)
        assert lengths == COMPLETION_LENS and logp.shape == entropy.shape == (sum(COMPLETION_LENS),)
        torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-4)
        torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=1e-4)
        results[pack] = logp, entropy
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=1e-5)


def test_packed_sequences_do_not_see_each_other(tiny_model):
    # changing sequence 0 must leave the scores of sequence 1 untouched when packed
    vocab = tiny_model.config.vocab_size
    prompts, completions = random_batch(vocab, [4, 3], [3, 5])
    logp_a, _, _ = completion_logprobs(tiny_model, prompts, completions, pack=True, with_entropy=False)
    prompts[0] = [(t + 1) % vocab for t in prompts[0]]
    logp_b, _, _ = completion_logprobs(tiny_model, prompts, completions, pack=True, with_entropy=False)
    assert not torch.allclose(logp_a[:3], logp_b[:3])
    torch.testing.assert_close(logp_a[3:], logp_b[3:], rtol=0, atol=1e-5)


def test_gradients_reach_body_and_tied_head_and_match_between_paths(tiny_model):
    vocab = tiny_model.config.vocab_size
    prompts, completions = random_batch(vocab)
    weights = torch.randn(sum(COMPLETION_LENS))
    grads = {}
    for pack in (False, True):
        tiny_model.zero_grad()
        logp, entropy, _ = completion_logprobs(tiny_model, prompts, completions, pack=pack)
        assert logp.requires_grad and not entropy.requires_grad
        (logp * weights).sum().backward()
        grads[pack] = {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}
    names = {name for name, _ in tiny_model.named_parameters()}
    assert set(grads[False]) == set(grads[True]) == names  # every parameter, head (tied to embeddings) included
    assert grads[False]["model.embed_tokens.weight"].abs().sum() > 0
    for name in names:
        assert_grad_close(grads[True][name], grads[False][name])


def test_completion_hidden_positions_and_targets(tiny_model):
    vocab = tiny_model.config.vocab_size
    prompts, completions = random_batch(vocab)
    hidden, targets = completion_hidden(tiny_model, prompts, completions)
    assert hidden.shape == (sum(COMPLETION_LENS), tiny_model.config.hidden_size)
    assert targets.tolist() == [t for c in completions for t in c]
    # hidden[i] is the body's output at the position before completion token i
    with torch.no_grad():
        out = tiny_model.model(torch.tensor([prompts[1] + completions[1]])).last_hidden_state[0]
    start = COMPLETION_LENS[0]
    torch.testing.assert_close(hidden[start:start + COMPLETION_LENS[1]], out[len(prompts[1]) - 1:-1],
                               rtol=0, atol=1e-5)


def test_empty_and_invalid_inputs(tiny_model):
    logp, entropy, lengths = completion_logprobs(tiny_model, [[1, 2]], [[]])
    assert logp.shape == (0,) and entropy.shape == (0,) and lengths == [0]
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        completion_logprobs(tiny_model, [[]], [[3]])
    with pytest.raises(ValueError, match="one prompt per completion"):
        completion_logprobs(tiny_model, [[1]], [[3], [4]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_flash_attention_varlen_matches_padded_sdpa(tiny_tokenizer):
    from model.tiny import tiny_model
    model = tiny_model(tiny_tokenizer, hidden=128, heads=4, kv_heads=2).to("cuda", torch.bfloat16).eval()
    prompts, completions = random_batch(model.config.vocab_size, [37, 5, 80, 1], [20, 64, 3, 9])
    model.set_attn_implementation("sdpa")
    padded, padded_entropy, _ = completion_logprobs(model, prompts, completions, pack=False)
    model.set_attn_implementation("flash_attention_2")
    packed, packed_entropy, _ = completion_logprobs(model, prompts, completions)  # pack=None -> packed varlen
    torch.testing.assert_close(packed, padded, rtol=0, atol=5e-2)  # bf16 activations, different kernels
    torch.testing.assert_close(packed_entropy, padded_entropy, rtol=0, atol=5e-2)


def _logp_and_grads(model, score, prompts, completions, weights):
    model.zero_grad()
    logp, entropy, _ = score(model, prompts, completions, temperature=0.7, with_entropy=True)
    (logp * weights).sum().backward()
    return logp.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing,prefix", [(False, 0), (True, 0), (False, 21)])
def test_shared_prompt_scoring_equals_plain_scoring(tiny_tokenizer, checkpointing, prefix):
    """Groups of completions sharing a prompt (and a lone one): the shared-prompt-cache forward gives the plain
    forward's log-probs, entropies and gradients; with gradient checkpointing in training mode too (checkpointed
    layers return no cache), and with a prefix common to all prompts (run once for all groups)."""
    from model.compat import enable_activation_checkpointing
    from model.score import shared_prompt_logprobs
    from model.tiny import tiny_model
    model = tiny_model(tiny_tokenizer, seed=int(torch.randint(0, 2**31, ())))
    prompts_once, completions = random_batch(model.config.vocab_size, [6, 3, 8], [5, 3, 4, 1, 0, 6, 2])
    common = torch.randint(3, model.config.vocab_size, (prefix,)).tolist()
    prompts_once = [common + p for p in prompts_once]
    prompts = [prompts_once[0]] * 3 + [prompts_once[1]] * 3 + [prompts_once[2]]  # groups of 3, 3 and 1
    weights = torch.randn(sum(len(c) for c in completions))
    plain = _logp_and_grads(model.train(), completion_logprobs, prompts, completions, weights)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    embedded, shapes = [], []  # the embedding's calls; the [rows, tokens] of each call of the first layer

    def layer_input(module, args, kwargs, out):
        shapes.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2]))
    hooks = [model.get_input_embeddings().register_forward_hook(lambda *_: embedded.append(1)),
             model.get_decoder().layers[0].register_forward_hook(layer_input, with_kwargs=True)]
    shared = _logp_and_grads(model, shared_prompt_logprobs, prompts, completions, weights)
    for hook in hooks:
        hook.remove()
    if not checkpointing:  # every token embedded in one call (its backward builds a [vocab, H] gradient once)
        assert len(embedded) == 1, embedded
    if prefix and not checkpointing:  # the common prefix ran once, then each prompt's own part
        assert shapes[:2] == [(1, prefix), (1, len(prompts_once[0]) - prefix)], shapes
    torch.testing.assert_close(shared[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(shared[1], plain[1], rtol=0, atol=1e-5)
    assert set(shared[2]) == set(plain[2]) == {n for n, _ in model.named_parameters()}
    for name in plain[2]:
        # fp32 sums in another order (the prompt's gradient arrives through the repeated cache)
        assert_grad_close(shared[2][name], plain[2][name])


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _set_partitions(rest):
        yield [[first]] + partition
        for k in range(len(partition)):
            yield partition[:k] + [[first] + partition[k]] + partition[k + 1:]


def test_completion_chunks_pad_the_least():
    """A group's completions cut into right-padded chunks: every non-empty row in exactly one chunk, every chunk
    within the token bound (rows x its longest) unless it is a lone row, and the least cost (padded tokens plus
    call_tokens per chunk) over every partition of the rows, found by brute force."""
    import random

    from model.score import _completion_chunks
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    rng = random.Random(seed)
    for _ in range(300):
        lengths = [rng.choice([0, rng.randint(1, 9), rng.randint(1, 60)]) for _ in range(rng.randint(1, 7))]
        bound, call = rng.choice([0, 12, 40, 100]), rng.choice([0, 5, 32])
        chunks = _completion_chunks(lengths, bound, call_tokens=call)

        def cost(partition):
            return sum(len(c) * max(lengths[r] for r in c) + call for c in partition)

        def allowed(partition):
            return all(len(c) == 1 or not bound or len(c) * max(lengths[r] for r in c) <= bound for c in partition)

        rows = [r for r, n in enumerate(lengths) if n > 0]
        assert sorted(r for c in chunks for r in c) == rows, (lengths, chunks)
        assert allowed(chunks), (lengths, bound, chunks)
        best = min((cost(p) for p in _set_partitions(rows) if allowed(p)), default=0)
        assert cost(chunks) == best, (lengths, bound, call, chunks)


@pytest.mark.parametrize("prefix", [0, 19])
def test_segmented_shared_prompt_forward_gives_the_same_gradients_and_recomputes(tiny_tokenizer, prefix):
    """segment_tokens bounds the training forward's activations: the prompt (after the prefix all prompts share,
    a segment of its own) and chunks of its completions run as recomputed segments. Same log-probs, entropies and
    gradients as one unsegmented forward; the body runs again in the backward (the recomputation), and not at all
    without segments."""
    from model.score import _completion_chunks, shared_prompt_logprobs
    from model.tiny import tiny_model
    model = tiny_model(tiny_tokenizer, seed=int(torch.randint(0, 2**31, ()))).train()
    prompts_once, completions = random_batch(model.config.vocab_size, [6, 3, 8], [5, 3, 4, 1, 0, 6, 2, 7])
    common = torch.randint(3, model.config.vocab_size, (prefix,)).tolist()
    prompts_once = [common + p for p in prompts_once]
    prompts = [prompts_once[0]] * 4 + [prompts_once[1]] * 3 + [prompts_once[2]]  # groups of 4, 3 and 1
    prefix_calls = 1 if prefix else 0
    # by length: 1 | 3, 4 (2 x 4 = 8 tokens) | 5; the shortest row first, so the chunks are not in row order
    assert _completion_chunks([5, 3, 4, 1], 8, call_tokens=32) == [[3], [1, 2], [0]]
    assert _completion_chunks([0, 6, 2], 8) == [[2], [1]]  # the empty completion is in no chunk; 2 x 6 > 8
    weights = torch.randn(sum(len(c) for c in completions))
    body_calls = []  # calls of the first decoder layer (the recomputation stops before the body's forward returns)
    model.get_decoder().layers[0].register_forward_hook(lambda *_: body_calls.append(1))

    def run(segment_tokens):
        body_calls.clear()
        def score(m, p, c, **kw):
            return shared_prompt_logprobs(m, p, c, segment_tokens=segment_tokens, **kw)
        out = _logp_and_grads(model, score, prompts, completions, weights)
        return out, len(body_calls)

    (whole, calls_whole), (segmented, calls_segmented) = run(0), run(8)
    assert calls_whole == prefix_calls + 3 * 2  # (the prefix,) then per group: the prompt, its completions at once
    # forward: (the prefix,) 3 prompts and 6 chunks; then the backward runs the segments again
    assert calls_segmented > prefix_calls + 3 + 6, "the backward recomputed nothing"
    torch.testing.assert_close(segmented[0], whole[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(segmented[1], whole[1], rtol=0, atol=1e-5)
    assert set(segmented[2]) == set(whole[2]) == {n for n, _ in model.named_parameters()}
    for name in whole[2]:
        assert_grad_close(segmented[2][name], whole[2][name])
    with torch.no_grad():  # no gradients, nothing to keep: no segments
        body_calls.clear()
        lp, _, _ = shared_prompt_logprobs(model, prompts, completions, 0.7, False, segment_tokens=8)
        assert len(body_calls) == prefix_calls + 6
    torch.testing.assert_close(lp, whole[0], rtol=0, atol=1e-5)



@pytest.mark.parametrize("prefix", [0, 19])
def test_backward_by_chunks_gives_the_segmented_gradients_without_recomputing_completions(tiny_tokenizer, prefix):
    """shared_prompt_backward runs each chunk's loss backward right after its forward: the same log-probs,
    entropies, loss and gradients as the segmented forward followed by one backward of the summed loss (here a
    nonlinear per-token loss that also reads the entropies), with every completion chunk through the body once;
    only the prompts (and the prefix) run twice."""
    from model.score import PolicyScorer, shared_prompt_backward, shared_prompt_logprobs
    from model.tiny import tiny_model
    model = tiny_model(tiny_tokenizer, seed=int(torch.randint(0, 2**31, ()))).train()
    prompts_once, completions = random_batch(model.config.vocab_size, [6, 3, 8], [5, 3, 4, 1, 0, 6, 2, 7])
    common = torch.randint(3, model.config.vocab_size, (prefix,)).tolist()
    prompts_once = [common + p for p in prompts_once]
    prompts = [prompts_once[0]] * 4 + [prompts_once[1]] * 3 + [prompts_once[2]]  # groups of 4, 3 and 1
    lengths = [len(c) for c in completions]
    starts = [sum(lengths[:r]) for r in range(len(lengths))]
    weights = torch.randn(sum(lengths))

    def token_loss(logp, entropy, w):
        return (w * logp + 0.3 * logp.square() * entropy).sum()

    body_calls = []
    model.get_decoder().layers[0].register_forward_hook(lambda *_: body_calls.append(1))
    model.zero_grad()
    logp, entropy, _ = shared_prompt_logprobs(model, prompts, completions, 0.7, True, segment_tokens=8)
    whole_loss = token_loss(logp, entropy, weights)
    whole_loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    body_calls.clear()
    seen, losses = [], []

    def chunk_loss(rows, lp, ent):
        seen.extend(rows)
        w = torch.cat([weights[starts[r]:starts[r] + lengths[r]] for r in rows])
        losses.append(token_loss(lp, ent, w))
        return losses[-1]

    scorer = PolicyScorer(model, model.config.vocab_size, segment_tokens=8)
    assert scorer.can_backward_by_chunks() and not PolicyScorer(model, 10).can_backward_by_chunks()
    lp, ent, out_lengths = shared_prompt_backward(model, prompts, completions, chunk_loss, 0.7, segment_tokens=8)
    assert sorted(seen) == [r for r, n in enumerate(lengths) if n]  # every completion in exactly one chunk
    assert out_lengths == lengths and not lp.requires_grad
    # (the prefix,) 3 prompts and 6 chunks forward without and then the prompts with gradients: nothing else
    assert len(body_calls) == 2 * (1 if prefix else 0) + 2 * 3 + 6
    torch.testing.assert_close(lp, logp.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(sum(losses).detach(), whole_loss.detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        assert_grad_close(p.grad, whole[name])
    assert sum(int(g.abs().max() > 1e-4) for g in whole.values()) > len(whole) // 2  # not vacuous

# ---------------------------------------------------------------------------------------------------------------
# Packed scoring through torch's varlen attention (model.varlen). Its kernels are CUDA-only, so on CPU varlen_attn
# is replaced by a float64 reference under each calling convention torch has had, and the CUDA/bf16 gate is opened.

def _reference_attention(query, key, value, cu_seq, scale):
    """Per-sequence causal attention from cu_seq boundaries, GQA by repeating key/value heads: [T, Hq, D]."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = torch.empty_like(query)
    bounds = cu_seq.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # [H, n, D]
        scores = (q @ k.transpose(1, 2)) * scale
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        out[start:end] = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v).transpose(0, 1)
    return out


class ReferenceVarlen:
    """Stand-ins for torch.nn.attention.varlen.varlen_attn with the signatures of torch 2.10 (is_causal, no scale,
    no GQA), 2.11 (window_size, scale) and 2.12+ (enable_gqa); each records its calls."""

    def __init__(self):
        self.calls = []

    def _run(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale, gqa):
        assert causal and torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
        assert gqa or key.shape[1] == query.shape[1], "fewer key/value heads without enable_gqa"
        self.calls.append(dict(cu_seq=cu_seq_q.tolist(), max_q=max_q, max_k=max_k, gqa=gqa, scale=scale,
                               heads=(query.shape[1], key.shape[1])))
        return _reference_attention(query, key, value, cu_seq_q, query.shape[-1] ** -0.5 if scale is None else scale)

    def torch_2_10(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        return self._run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None, False)

    def torch_2_11(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1)):
        return self._run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, tuple(window_size) == (-1, 0), scale,
                         False)

    def torch_2_13(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        return self._run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, tuple(window_size) == (-1, 0), scale,
                         enable_gqa)


@pytest.fixture()
def reference_varlen(monkeypatch):
    """Open the varlen path on CPU in float64; returns a function installing one signature's stand-in."""
    from model import varlen
    monkeypatch.setattr(varlen, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(varlen, "KERNEL_DTYPES", (torch.bfloat16, torch.float16, torch.float64))
    ref = ReferenceVarlen()

    def install(release):
        monkeypatch.setattr(varlen, "varlen_attn", getattr(ref, release))
        return ref
    return install


def _spy_attention_masks(monkeypatch):
    """Record the attention_mask every varlen_sdpa attention call receives."""
    from model import varlen
    seen = []
    real = varlen.varlen_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return real(module, query, key, value, attention_mask, **kwargs)
    monkeypatch.setattr(varlen, "varlen_attention_forward", spy)
    return seen


@pytest.mark.parametrize("release", ["torch_2_10", "torch_2_11", "torch_2_13"])
@pytest.mark.parametrize("arch,tie,heads,kv_heads", [("qwen2", False, 4, 2), ("llama", True, 4, 4)])
def test_torch_varlen_packed_scoring_equals_padded_sdpa(tiny_tokenizer, reference_varlen, monkeypatch, release,
                                                        arch, tie, heads, kv_heads):
    """float64: log-probs, entropies and every gradient of packed varlen scoring (pack=None picks it) equal padded
    SDPA; varlen_attn got the batch's boundaries, no attention mask reached the attention, and the model is back on
    SDPA afterwards."""
    from model.tiny import tiny_model
    ref = reference_varlen(release)
    masks = _spy_attention_masks(monkeypatch)
    model = tiny_model(tiny_tokenizer, arch=arch, tie=tie, heads=heads, kv_heads=kv_heads,
                       seed=int(torch.randint(0, 2**31, ()))).double().train()
    prompt_lens, completion_lens = [7, 1, 13, 4, 2], [5, 11, 0, 3, 9]
    prompts, completions = random_batch(model.config.vocab_size, prompt_lens, completion_lens)
    weights = torch.randn(sum(completion_lens), dtype=torch.float64)
    results = {}
    for pack in (False, None):
        model.zero_grad()
        logp, entropy, _ = completion_logprobs(model, prompts, completions, temperature=0.7, pack=pack)
        (logp * weights).sum().backward()
        results[pack] = logp.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters()}
        assert model.config._attn_implementation == "sdpa"
        if pack is False:
            assert ref.calls == [] and masks == []  # padded scoring stays on SDPA
    layers = model.config.num_hidden_layers
    seq_lens = [p + c for p, c in zip(prompt_lens, completion_lens)]
    bounds = [sum(seq_lens[:i]) for i in range(len(seq_lens) + 1)]
    assert [c["cu_seq"] for c in ref.calls] == [bounds] * layers
    assert all(c["max_q"] == c["max_k"] == max(seq_lens) for c in ref.calls)
    assert masks == [None] * layers  # no [T, T] mask was built
    if release == "torch_2_13":
        assert all(c["gqa"] == (heads != kv_heads) and c["scale"] is not None for c in ref.calls)
    if release == "torch_2_10":  # no enable_gqa: the key/value heads arrive repeated
        assert all(c["heads"] == (heads, heads) for c in ref.calls)
    torch.testing.assert_close(results[None][0], results[False][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(results[None][1], results[False][1], rtol=0, atol=1e-10)
    assert results[False][2]["model.embed_tokens.weight"].abs().sum() > 0
    for name, grad in results[False][2].items():
        torch.testing.assert_close(results[None][2][name], grad, rtol=1e-9, atol=1e-10)


def test_torch_varlen_is_switched_off_again_when_the_forward_raises(tiny_tokenizer, reference_varlen, monkeypatch):
    from model import varlen
    from model.tiny import tiny_model
    reference_varlen("torch_2_13")
    calls = []
    model = tiny_model(tiny_tokenizer, arch="qwen2").double()
    prompts, completions = random_batch(model.config.vocab_size, [3, 5], [4, 2])

    def broken(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        calls.append(model.config._attn_implementation)
        raise RuntimeError("kernel failed")
    monkeypatch.setattr(varlen, "varlen_attn", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        completion_logprobs(model, prompts, completions)
    assert calls == [varlen.VARLEN_ATTN] and model.config._attn_implementation == "sdpa"
    # and a plain SDPA forward afterwards still runs (with the mask SDPA needs)
    assert torch.isfinite(model(torch.tensor([prompts[0]])).logits).all()


def _plain_activation_checkpointing(model):
    """transformers' own set-up, without the recompute context of model.compat's."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@pytest.mark.parametrize("set_up_by", ["compat", "transformers"])
def test_torch_varlen_under_activation_checkpointing(tiny_tokenizer, reference_varlen, set_up_by):
    """The backward recomputes checkpointed layers after the body call. Set up by enable_activation_checkpointing,
    the recompute runs varlen again (log-probs and gradients equal padded SDPA's); set up any other way, the
    recompute would run plain SDPA and attend across the packed sequences, so scoring pads instead."""
    from model.compat import enable_activation_checkpointing
    from model.tiny import tiny_model
    ref = reference_varlen("torch_2_13")
    model = tiny_model(tiny_tokenizer, arch="qwen2", seed=int(torch.randint(0, 2**31, ()))).double().train()
    prompts, completions = random_batch(model.config.vocab_size, [3, 6, 2], [4, 5, 7])
    weights = torch.randn(16, dtype=torch.float64)
    padded = _logp_and_grads(model, functools.partial(completion_logprobs, pack=False), prompts, completions, weights)
    assert ref.calls == []
    if set_up_by == "compat":
        enable_activation_checkpointing(model)
    else:
        _plain_activation_checkpointing(model)
    model.train()
    layers = model.config.num_hidden_layers
    checkpointed = _logp_and_grads(model, completion_logprobs, prompts, completions, weights)
    # forward + the backward's recompute of each layer, or nothing when it pads
    assert len(ref.calls) == (2 * layers if set_up_by == "compat" else 0)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(checkpointed[0], padded[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(checkpointed[1], padded[1], rtol=0, atol=1e-10)
    for name, grad in padded[2].items():
        torch.testing.assert_close(checkpointed[2][name], grad, rtol=1e-9, atol=1e-10)


def test_why_torch_varlen_is_not_used(tiny_tokenizer, monkeypatch):
    """The start-up line names the varlen path, or says why scoring pads."""
    from model import varlen
    from model.score import describe_attention
    from model.tiny import tiny_model
    model = tiny_model(tiny_tokenizer, arch="qwen2")
    assert describe_attention(model, torch.bfloat16) == "sdpa, padded scoring"  # CPU: no varlen kernels
    assert varlen.unavailable_reason(model, torch.bfloat16) == "not on CUDA"
    monkeypatch.setattr(varlen, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(varlen, "varlen_attn", ReferenceVarlen().torch_2_13)
    assert describe_attention(model, torch.bfloat16) == "varlen (torch), packed scoring (no padding)"
    assert describe_attention(model, torch.float32) == \
        "sdpa, padded scoring (flash-attn not installed; no torch varlen: float32 compute; its kernels take bf16/fp16)"
    monkeypatch.setattr(varlen, "varlen_attn", None)
    assert "no torch varlen: this torch has no torch.nn.attention.varlen" in describe_attention(model, torch.bfloat16)
    monkeypatch.setattr(varlen, "varlen_attn", lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k: query)
    assert varlen.unavailable_reason(model, torch.bfloat16) == "this torch's varlen_attn takes no causal flag"
    monkeypatch.setattr(varlen, "varlen_attn", ReferenceVarlen().torch_2_10)
    sliding = tiny_model(tiny_tokenizer, arch="qwen2")
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert varlen.unavailable_reason(sliding, torch.float16) == "the model has sliding-window layers"
    monkeypatch.setattr(varlen, "varlen_attn", ReferenceVarlen().torch_2_13)
    _plain_activation_checkpointing(model)
    assert describe_attention(model, torch.bfloat16) == "varlen (torch), packed scoring (no padding); padded under " \
        "this activation checkpointing (its recompute would run plain SDPA)"
    from model.compat import enable_activation_checkpointing
    enable_activation_checkpointing(model)
    assert describe_attention(model, torch.bfloat16) == "varlen (torch), packed scoring (no padding)"
    model.config._attn_implementation = "flash_attention_2"
    assert describe_attention(model, torch.bfloat16) == "flash_attention_2, packed scoring (no padding)"


def test_the_varlen_attention_refuses_calls_outside_packed_scoring(tiny_tokenizer, monkeypatch):
    from model import varlen
    from model.tiny import tiny_model
    model = tiny_model(tiny_tokenizer)
    varlen.register()
    with varlen.attention_implementation(model.config, varlen.VARLEN_ATTN):
        with pytest.raises(ValueError, match="needs cu_seq_lens_q"):
            model(torch.tensor([[3, 4, 5]]))
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_varlen_packed_bf16_matches_padded_sdpa_on_cuda(tiny_tokenizer):
    """Qwen-shaped (GQA 4:2, head dim 32) random model on CUDA: packed scoring through torch's varlen_attn (chosen
    by pack=None with SDPA) against padded SDPA, in pure bf16 and under bf16 autocast over fp32 weights."""
    from model import varlen
    from model.load import autocast_to
    from model.tiny import tiny_model
    assert varlen.varlen_attn is not None, "this torch has no torch.nn.attention.varlen.varlen_attn (needs >= 2.10)"
    model = tiny_model(tiny_tokenizer, arch="qwen2", tie=False, hidden=128, heads=4, kv_heads=2,
                       seed=int(torch.randint(0, 2**31, ()))).to("cuda").train()
    model.set_attn_implementation("sdpa")
    prompts, completions = random_batch(model.config.vocab_size, [37, 5, 80, 1, 13], [20, 64, 3, 9, 0])
    weights = torch.randn(sum(len(c) for c in completions), device="cuda")
    calls = []
    real = varlen.varlen_attention_forward
    varlen.varlen_attention_forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for mode in ("bf16 weights", "autocast"):
            if mode == "bf16 weights":
                model.to(torch.bfloat16)
            else:
                model.float()
            results = {}
            for pack in (False, None):
                model.zero_grad()
                with autocast_to(torch.bfloat16 if mode == "autocast" else torch.float32, torch.device("cuda")):
                    logp, entropy, _ = completion_logprobs(model, prompts, completions, pack=pack)
                (logp.float() * weights).sum().backward()
                results[pack] = logp.float(), entropy.float(), \
                    {n: p.grad.float() for n, p in model.named_parameters()}
            assert len(calls) == model.config.num_hidden_layers, mode  # packed went through varlen_attn
            calls.clear()
            torch.testing.assert_close(results[None][0], results[False][0], rtol=0, atol=5e-2)
            torch.testing.assert_close(results[None][1], results[False][1], rtol=0, atol=5e-2)
            for name, grad in results[False][2].items():
                scale = grad.abs().max().clamp_min(1e-6)
                assert (results[None][2][name] - grad).abs().max() / scale < 5e-2, (mode, name)
            assert model.config._attn_implementation == "sdpa"
    finally:
        varlen.varlen_attention_forward = real
