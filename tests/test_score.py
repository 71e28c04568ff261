"""Scoring forward: padded and packed batches agree with each other and with scoring each sequence alone
through the full model (float64 log-softmax of its logits); gradients reach the body and the (tied) head."""
import importlib.util
import os

import pytest
import torch

from model.score import completion_hidden, completion_logprobs

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
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-3, atol=1e-5)


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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_scoring_equals_plain_scoring(tiny_tokenizer, checkpointing):
    """Groups of completions sharing a prompt (and a lone one): the shared-prompt-cache forward gives the plain
    forward's log-probs, entropies and gradients; with gradient checkpointing in training mode too (checkpointed
    layers return no cache)."""
    from model.compat import enable_activation_checkpointing
    from model.score import shared_prompt_logprobs
    from model.tiny import tiny_model
    model = tiny_model(tiny_tokenizer, seed=int(torch.randint(0, 2**31, ())))
    prompts_once, completions = random_batch(model.config.vocab_size, [6, 3, 8], [5, 3, 4, 1, 0, 6, 2])
    prompts = [prompts_once[0]] * 3 + [prompts_once[1]] * 3 + [prompts_once[2]]  # groups of 3, 3 and 1
    weights = torch.randn(sum(len(c) for c in completions))
    plain = _logp_and_grads(model.train(), completion_logprobs, prompts, completions, weights)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    shared = _logp_and_grads(model, shared_prompt_logprobs, prompts, completions, weights)
    torch.testing.assert_close(shared[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(shared[1], plain[1], rtol=0, atol=1e-5)
    assert set(shared[2]) == set(plain[2]) == {n for n, _ in model.named_parameters()}
    for name in plain[2]:
        # fp32 sums in another order (the prompt's gradient arrives through the repeated cache): ~1e-6 noise
        torch.testing.assert_close(shared[2][name], plain[2][name], rtol=1e-4, atol=1e-5)


def test_segmented_shared_prompt_forward_gives_the_same_gradients_and_recomputes(tiny_tokenizer):
    """segment_tokens bounds the training forward's activations: the prompt and chunks of its completions run as
    recomputed segments. Same log-probs, entropies and gradients as one unsegmented forward; the body runs again
    in the backward (the recomputation), and not at all without segments."""
    from model.score import _completion_chunks, shared_prompt_logprobs
    from model.tiny import tiny_model
    model = tiny_model(tiny_tokenizer, seed=int(torch.randint(0, 2**31, ()))).train()
    prompts_once, completions = random_batch(model.config.vocab_size, [6, 3, 8], [5, 3, 4, 1, 0, 6, 2, 7])
    prompts = [prompts_once[0]] * 4 + [prompts_once[1]] * 3 + [prompts_once[2]]  # groups of 4, 3 and 1
    assert _completion_chunks([5, 3, 4, 1], 8) == [[0], [1, 2], [3]]  # 5 | 2 x 4 | 1 (3 x 4 > 8)
    assert _completion_chunks([0, 6, 2], 8) == [[1], [2]]  # the empty completion is in no chunk
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
    assert calls_whole == 3 * 2  # per group: the prompt, then its completions at once
    assert calls_segmented > 3 + 6, "the backward recomputed nothing"  # forward: 3 prompts + 6 chunks, then again
    torch.testing.assert_close(segmented[0], whole[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(segmented[1], whole[1], rtol=0, atol=1e-5)
    assert set(segmented[2]) == set(whole[2]) == {n for n, _ in model.named_parameters()}
    for name in whole[2]:
        torch.testing.assert_close(segmented[2][name], whole[2][name], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # no gradients, nothing to keep: no segments
        body_calls.clear()
        lp, _, _ = shared_prompt_logprobs(model, prompts, completions, 0.7, False, segment_tokens=8)
        assert len(body_calls) == 6
    torch.testing.assert_close(lp, whole[0], rtol=0, atol=1e-5)
