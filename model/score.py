"""Scoring forward: log-probs (and entropies) of completion tokens given their prompts.

Only the transformer body runs over prompt + completion; the lm_head is applied (through
model.kernels.logprob_entropy) to the hidden states that predict completion tokens and nothing else.
Position len(prompt) + j - 1 of a sequence predicts completion token j.

Two ways to batch the sequences, which give the same result:
  * padded: right-pad into [B, T_max] with an attention mask (SDPA / eager attention);
  * packed: all sequences concatenated into one row [1, sum T_i] with position ids restarting at 0 for each
    sequence and no padding at all. With flash-attention 2 this runs varlen attention (cu_seq_lens built here);
    with SDPA transformers turns the restarting position ids into a block-diagonal causal mask (fine for tests,
    no memory saving since the mask is [T, T]).
`pack=None` packs when the model runs flash-attention, and pads otherwise.

`PolicyScorer` wraps these as a module (the trainer's scoring pass, which DDP and FSDP2 wrap in turn).
"""
from __future__ import annotations

import contextlib
import math

import torch

from model import varlen
from model.compat import (activation_checkpointing_on, cache_from_tensors, cache_kwargs, cache_tensors,
                          recomputes_with_forward_attention, returned_cache)
from model.kernels import logprob_entropy
from model.load import autocast_to

# What one more body call in a chunk of completions costs, counted in tokens: a call on few tokens runs its matmuls
# far below their peak (SmolLM2 on one CPU core: 8 tokens take as long as 16, and 16 take a quarter of 128's time).
CHUNK_CALL_TOKENS = 32


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _attn_implementation(model) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def _compute_dtype(model) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on, else the weights'."""
    device_type = _device(model).type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return next(model.parameters()).dtype


def _torch_varlen_usable(model, body) -> bool:
    """Packed scoring of an SDPA model can run through torch's varlen attention. Under activation checkpointing only
    when the recompute runs the forward's attention (model.compat.enable_activation_checkpointing): otherwise the
    backward would recompute the layers on plain SDPA, after the body call, attending across the packed sequences."""
    return (_attn_implementation(model) == "sdpa" and varlen.unavailable_reason(model, _compute_dtype(model)) is None
            and (not activation_checkpointing_on(body) or recomputes_with_forward_attention(body)))


def _body(model):
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if body is None:
        raise TypeError(f"{type(model).__name__} has no decoder body (get_decoder() / .model): expected a "
                        "transformers *ForCausalLM model")
    return body


def _check(prompt_ids, completion_ids):
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions: pass one prompt per "
                         "completion (repeat a prompt for each of its group's samples)")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: the first completion token needs at least one token before it")


def completion_hidden(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pack: bool | None = None):
    """Last hidden states at the positions that predict each completion token.

    Returns (hidden [N, H], targets [N] int64) where N = total completion tokens, in order (sequence 0's
    tokens first), and hidden[i] predicts targets[i]. Differentiable through the model body.
    """
    _check(prompt_ids, completion_ids)
    device = _device(model)
    body = _body(model)
    flash = _attn_implementation(model).startswith("flash")
    torch_varlen = _torch_varlen_usable(model, body)
    if pack is None:
        pack = flash or torch_varlen
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    lengths = [len(s) for s in seqs]
    targets = torch.tensor([tok for c in completion_ids for tok in c], dtype=torch.long, device=device)
    if targets.numel() == 0:
        hidden_size = model.get_output_embeddings().weight.shape[1]
        dtype = next(model.parameters()).dtype
        return torch.zeros(0, hidden_size, dtype=dtype, device=device), targets
    if pack:
        # one row, no padding: [1, sum T_i]
        input_ids = torch.tensor([tok for s in seqs for tok in s], dtype=torch.long, device=device)[None]
        position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
        kwargs, attention = {}, contextlib.nullcontext()
        if flash or torch_varlen:
            # hand varlen attention its boundaries directly instead of having them re-derived per layer
            cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
            kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
        if torch_varlen:
            varlen.register()
            attention = varlen.attention_implementation(model.config, varlen.VARLEN_ATTN)
        with attention:
            out = body(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs).last_hidden_state[0]
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        index = [s + len(p) + j - 1 for s, p, c in zip(starts, prompt_ids, completion_ids) for j in range(len(c))]
        hidden = out[torch.tensor(index, device=device)]  # [N, H]
    else:
        # right padding: positions 0..T_i-1 are real, so default position ids are right
        T = max(lengths)
        pad = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0
        input_ids = torch.full((len(seqs), T), pad, dtype=torch.long, device=device)
        attention_mask = torch.zeros((len(seqs), T), dtype=torch.long, device=device)
        for b, s in enumerate(seqs):
            input_ids[b, :len(s)] = torch.tensor(s, dtype=torch.long, device=device)
            attention_mask[b, :len(s)] = 1
        out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # [B, T, H]
        rows = [b for b, c in enumerate(completion_ids) for _ in c]
        cols = [len(p) + j - 1 for p, c in zip(prompt_ids, completion_ids) for j in range(len(c))]
        hidden = out[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # [N, H]
    return hidden, targets


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
                  vocab_size: int | None):
    """(logp [N], entropy [N] or None) of `targets` from the body's hidden states [N, H], through the lm_head
    rows of the real vocabulary. The kernel keeps its own precision (fp32 inside each tile): under autocast it
    gets the head in the autocast dtype (a bf16 copy of fp32 master weights, as autocast would make for a
    matmul) and runs with autocast off."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("lm_head with a bias is not supported by the fused log-prob kernel")
    weight = head.weight if vocab_size is None else head.weight[:vocab_size]
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        weight, hidden = weight.to(dtype), hidden.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return logprob_entropy(hidden, weight, targets, temperature=temperature, with_entropy=with_entropy)


def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], temperature: float = 1.0,
                        with_entropy: bool = True, pack: bool | None = None, vocab_size: int | None = None):
    """(logp [N], entropy [N] or None, lengths) of every completion token under `model` at `temperature`.

    logp is differentiable (body and lm_head, tied or not); entropy is detached. Split per sequence with
    logp.split(lengths). `vocab_size` restricts the softmax to the tokenizer's real vocabulary (the rows the
    sampler can emit; see model.sample.real_vocab_size), so trainer and sampler score the same distribution.
    """
    hidden, targets = completion_hidden(model, prompt_ids, completion_ids, pack=pack)
    logp, entropy = head_logprobs(model, hidden, targets, temperature, with_entropy, vocab_size)
    return logp, entropy, [len(c) for c in completion_ids]


def shared_prompt_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                           temperature: float = 1.0, with_entropy: bool = True, vocab_size: int | None = None,
                           segment_tokens: int = 0):
    """Same result as `completion_logprobs`, but each run of consecutive completions that share a prompt (a GRPO
    group) runs the prompt through the body once: its KV cache is repeated for the group's completions, and
    gradients flow back through the cache into the prompt's single forward. With prompts of ~300 tokens and
    completions of ~60, a group of 8 costs ~780 token-forwards instead of ~2900. A prefix that all the prompts
    share (the system prompt's instructions, ~200 tokens on the default data) runs once for all groups.

    A group's completions run in chunks of rows of similar length, right-padded to the chunk's longest
    (`_completion_chunks`). segment_tokens > 0 bounds the activation memory of a forward with gradients: the shared
    prefix, each prompt's rest, and each chunk of at most `segment_tokens` tokens (rows x the chunk's longest
    completion; at least one row) run as separate recomputed segments (torch.utils.checkpoint): only the segments'
    outputs (KV caches, the completions' last hidden states) are kept, and the backward recomputes one segment at
    a time. That costs one more forward of the body (but for the last chunk); the result and the gradients are the
    same. Without gradients (the scoring passes) there is nothing to keep and segments are not used. A loss that
    sums over completions can skip the completions' recomputation: `shared_prompt_backward`.
    Returns (logp [N], entropy [N] or None, lengths), tokens in the order of the inputs."""
    _check(prompt_ids, completion_ids)
    body = _body(model)
    if activation_checkpointing_on(body):
        # Checkpointed layers keep no KV cache (a recomputed layer would append to it a second time), so there is
        # no prompt cache to share: score every sequence whole instead (same log-probs and gradients).
        return completion_logprobs(model, prompt_ids, completion_ids, temperature, with_entropy,
                                   vocab_size=vocab_size)
    device = _device(model)
    segmented = segment_tokens > 0 and torch.is_grad_enabled()
    plan = _Plan(prompt_ids, completion_ids, segment_tokens if segmented else 0)
    if not plan.groups:
        return torch.zeros(0, device=device), (torch.zeros(0, device=device) if with_entropy else None), \
            [len(c) for c in completion_ids]
    # All of it is embedded in one call: the embedding's backward builds a dense [vocab, H] gradient (113 MB for
    # SmolLM2), and once per segment that took ~0.8 s of a ~10 s backward (2-core CPU).
    embeds = plan.split(plan.embed(model, device))
    prefix_kv = ()
    if plan.prefix_len:
        _, prefix_kv = _run_segment(segmented, _prompt_segment, body, embeds[0])
    hidden_of = {}  # completion index -> the last hidden states that predict its tokens [len, H]
    for g, (i, first, chunks) in enumerate(plan.groups):
        last_prompt, prompt_kv = _run_segment(segmented, _prompt_segment, body, embeds[first], *prefix_kv)
        for n, rows in enumerate(chunks):
            lengths = [len(completion_ids[r]) for r in rows]
            # The last chunk keeps its activations: the backward starts with it, before it recomputes any other
            # segment, so holding them costs no more memory than a recomputation does, and saves one.
            last = g == len(plan.groups) - 1 and n == len(chunks) - 1
            comp_hidden = _run_segment(segmented and not last, _completion_segment, body, len(prompt_ids[i]),
                                       lengths, embeds[first + 1 + n], *prompt_kv)  # [k, Tc, H]
            hidden_of.update(_chunk_hidden(rows, lengths, last_prompt, comp_hidden))
    targets = torch.tensor([t for c in completion_ids for t in c], dtype=torch.long, device=device)
    hidden = torch.cat([hidden_of[n] for n in sorted(hidden_of)], dim=0)  # [N, H], in the order of the inputs
    logp, entropy = head_logprobs(model, hidden, targets, temperature, with_entropy, vocab_size)
    return logp, entropy, [len(c) for c in completion_ids]


class _Plan:
    """What the shared-prompt forward runs through the body, in order: the prefix all prompts share (if long
    enough), then per group its prompt's rest and its completion chunks (right-padded [k, Tc]).
    groups: per group (its first row, the index of its prompt's rest in `ids`, its chunks of input rows)."""

    def __init__(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], segment_tokens: int):
        from model.sample import MIN_SHARED_PREFIX, shared_prefix_length

        runs = []  # (first, end) of each run of completions with one prompt and some tokens to score
        i = 0
        while i < len(prompt_ids):
            j = i
            while j < len(prompt_ids) and prompt_ids[j] == prompt_ids[i]:
                j += 1
            if any(completion_ids[i:j]):
                runs.append((i, j))
            i = j
        self.prefix_len = 0
        if len(runs) > 1:
            prefix_len = shared_prefix_length([prompt_ids[i] for i, _ in runs])
            self.prefix_len = prefix_len if prefix_len >= MIN_SHARED_PREFIX else 0
        self.ids = [prompt_ids[runs[0][0]][:self.prefix_len]] if self.prefix_len else []
        self.groups = []
        for i, j in runs:
            chunks = _completion_chunks([len(c) for c in completion_ids[i:j]], segment_tokens)
            chunks = [[i + r for r in rows] for rows in chunks]
            self.groups.append((i, len(self.ids), chunks))
            self.ids.append(prompt_ids[i][self.prefix_len:])
            self.ids += [_right_padded([completion_ids[r] for r in rows]) for rows in chunks]
        self.shapes = [(1, len(x)) if isinstance(x, list) else tuple(x.shape) for x in self.ids]

    def embed(self, model, device) -> torch.Tensor:
        """The embeddings of all of `ids`, flat [tokens, H], from one embedding call."""
        flat = torch.cat([torch.as_tensor(x, dtype=torch.long).reshape(-1) for x in self.ids]).to(device)
        return model.get_input_embeddings()(flat)

    def split(self, embedded: torch.Tensor) -> list[torch.Tensor]:
        """Flat embeddings [tokens, H] -> views [1, T, H] or [k, Tc, H], one per entry of `ids`."""
        return [e.view(*shape, -1) for e, shape in zip(embedded.split([a * b for a, b in self.shapes]), self.shapes)]


def _chunk_hidden(rows: list[int], lengths: list[int], last_prompt: torch.Tensor, comp_hidden: torch.Tensor):
    """Per row of a chunk, the hidden states that predict its tokens [len, H]: the prompt's last state predicts
    token 0, the completion's own states the rest."""
    return {r: torch.cat([last_prompt[None], comp_hidden[k, :n - 1]], dim=0)
            for k, (r, n) in enumerate(zip(rows, lengths))}


def shared_prompt_backward(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], chunk_loss,
                           temperature: float = 1.0, vocab_size: int | None = None, segment_tokens: int = 0):
    """The gradients of a loss that sums over completions, at the memory of `shared_prompt_logprobs`' segments but
    without their recomputation: each chunk of completions runs forward, then `chunk_loss(rows, logp, entropy)`
    (rows: input indices; logp [n] and detached entropy [n] of their tokens in that order; -> a scalar) and its
    backward at once, so the chunk's activations are freed as they would be after a recomputation, and every
    completion runs through the body once instead of twice. The prompts (the shared prefix, each group's rest) run
    first without gradients, giving the chunks their KV caches as leaves that collect the chunks' gradients; after
    a group's chunks its prompt runs once more with gradients and takes them back (the prefix likewise, after all
    groups), so the prompts still run twice, as in the segmented forward. Same gradients as that forward
    followed by the backward of the sum of the losses; the backward runs once per chunk, so this is for a model
    that no DDP/FSDP wrapper reduces gradients for. Returns (logp [N], entropy [N], lengths), detached, tokens in
    the order of the inputs."""
    _check(prompt_ids, completion_ids)
    body = _body(model)
    if activation_checkpointing_on(body):
        raise ValueError("shared_prompt_backward cannot run with activation checkpointing on (its layers keep no "
                         "KV cache): use shared_prompt_logprobs and one backward")
    device = _device(model)
    plan = _Plan(prompt_ids, completion_ids, segment_tokens)
    logp_of, entropy_of = {}, {}
    if plan.groups:
        embedded = plan.embed(model, device)  # [tokens, H]
        embedded_leaf = embedded.detach().requires_grad_()  # one embedding backward at the end, not one per chunk
        embeds = plan.split(embedded_leaf)
        prefix_kv = ()
        if plan.prefix_len:
            with torch.no_grad():
                _, prefix_kv = _prompt_segment(body, embeds[0])
            prefix_kv = _leaves(prefix_kv)
        for i, first, chunks in plan.groups:
            with torch.no_grad():
                last_prompt, prompt_kv = _prompt_segment(body, embeds[first], *prefix_kv)
            last_prompt, prompt_kv = _leaves([last_prompt])[0], _leaves(prompt_kv)
            for n, rows in enumerate(chunks):
                lengths = [len(completion_ids[r]) for r in rows]
                comp_hidden = _completion_segment(body, len(prompt_ids[i]), lengths, embeds[first + 1 + n],
                                                  *prompt_kv)  # [k, Tc, H]
                hidden = torch.cat(list(_chunk_hidden(rows, lengths, last_prompt, comp_hidden).values()))
                targets = torch.tensor([t for r in rows for t in completion_ids[r]], dtype=torch.long, device=device)
                logp, entropy = head_logprobs(model, hidden, targets, temperature, True, vocab_size)
                chunk_loss(rows, logp, entropy).backward()
                for r, lp, e in zip(rows, logp.detach().split(lengths), entropy.split(lengths)):
                    logp_of[r], entropy_of[r] = lp, e
            # the prompt again, with gradients, taking back what its last state and its cache received
            outputs = _prompt_segment(body, embeds[first], *prefix_kv)
            _backward_into([outputs[0], *outputs[1]], [last_prompt, *prompt_kv])
        if plan.prefix_len:
            _backward_into(list(_prompt_segment(body, embeds[0])[1]), list(prefix_kv))
        embedded.backward(embedded_leaf.grad)
    order = [r for r in range(len(completion_ids)) if r in logp_of]
    empty = torch.zeros(0, device=device)
    logp = torch.cat([logp_of[r] for r in order]) if order else empty
    entropy = torch.cat([entropy_of[r] for r in order]) if order else empty
    return logp, entropy, [len(c) for c in completion_ids]


def _leaves(tensors) -> tuple:
    """Detached copies that collect gradients (the cut between a segment that ran without them and its users)."""
    return tuple(t.detach().requires_grad_() for t in tensors)


def _backward_into(outputs: list[torch.Tensor], leaves: list[torch.Tensor]) -> None:
    """Backpropagate through `outputs` the gradients their detached copies `leaves` collected (none: nothing to)."""
    pairs = [(o, leaf.grad) for o, leaf in zip(outputs, leaves) if leaf.grad is not None]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def _run_segment(segmented: bool, fn, *args):
    """fn(*args), as a recomputed segment (its activations rebuilt in the backward) when `segmented`."""
    if not segmented:
        return fn(*args)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)


def _right_padded(completions: list[list[int]]) -> torch.Tensor:
    """Token ids [k, Tc] of completions right-padded with 0 (the padding follows every real token, so it is
    never attended to, and its outputs are not used)."""
    ids = torch.zeros(len(completions), max(len(c) for c in completions), dtype=torch.long)
    for r, c in enumerate(completions):
        ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
    return ids


def _prompt_segment(body, embeds: torch.Tensor, *past_kv):
    """Embedded prompt tokens [1, T, H] through the body, after the KV cache `past_kv` of the tokens before them
    (none, or a shared prefix's): (the last hidden state [H], the KV cache of the whole prompt as flat tensors, which
    can cross a checkpoint boundary)."""
    past = cache_kwargs(body, cache_from_tensors(past_kv, body.config)) if past_kv else {}
    out = body(inputs_embeds=embeds, use_cache=True, **past)
    return out.last_hidden_state[0, -1], cache_tensors(returned_cache(body, out))


def _completion_segment(body, prompt_len: int, lengths: list[int], embeds: torch.Tensor, *prompt_kv):
    """Embedded completions of one prompt [k, Tc, H] (right-padded, `lengths` real tokens each) through the body
    on a copy of the prompt's KV cache repeated k times: the last hidden states [k, Tc, H]. A fresh cache per
    call, so a recomputation appends to its own."""
    device = embeds.device
    k, Tc = embeds.shape[0], embeds.shape[1]
    cache = cache_from_tensors(prompt_kv, body.config)
    cache.batch_repeat_interleave(k)  # [k, heads, Tp, d] per layer, in the autograd graph
    comp_mask = (torch.arange(Tc)[None] < torch.tensor(lengths)[:, None]).long().to(device)  # [k, Tc]
    attention_mask = torch.cat([torch.ones(k, prompt_len, dtype=torch.long, device=device), comp_mask], dim=1)
    position_ids = (prompt_len + torch.arange(Tc, device=device))[None].expand(k, -1)
    return body(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **cache_kwargs(body, cache)).last_hidden_state


def _completion_chunks(lengths: list[int], segment_tokens: int, call_tokens: int = CHUNK_CALL_TOKENS
                       ) -> list[list[int]]:
    """The rows of a group with a non-empty completion, cut into chunks that each run as one right-padded
    [rows, longest] body call, rows of similar length together: completions of one group range from a few tokens to
    max_new_tokens, and one chunk for all pads every row to the longest (on the default data that was 40% of the
    scoring's completion tokens). The partition minimises the padded tokens plus `call_tokens` per chunk, with at
    most segment_tokens tokens (rows x longest) per chunk, a longer row alone (0 = no bound). Some optimal partition
    cuts the rows sorted by length into runs (swapping a longer row into the chunk with the longer rows never costs
    more), so a dynamic programme over the sorted rows finds it. Rows in order of length within a chunk."""
    rows = sorted((r for r, n in enumerate(lengths) if n > 0), key=lambda r: lengths[r])
    best = [0] + [math.inf] * len(rows)  # best[j]: the cost of the j shortest rows
    start = [0] * (len(rows) + 1)  # start[j]: where the last chunk of the best cut of the j shortest rows starts
    for j in range(1, len(rows) + 1):
        longest = lengths[rows[j - 1]]
        for i in range(j - 1, -1, -1):  # the last chunk is rows[i:j]
            tokens = (j - i) * longest
            if segment_tokens and tokens > segment_tokens and j - i > 1:
                break  # longer runs only grow
            if best[i] + tokens + call_tokens < best[j]:
                best[j], start[j] = best[i] + tokens + call_tokens, i
    chunks, j = [], len(rows)
    while j > 0:
        chunks.append(rows[start[j]:j])
        j = start[j]
    return chunks[::-1]


class PolicyScorer(torch.nn.Module):
    """Per-token log-probs (and detached entropies) of completions under a policy, as a module: DDP's gradient
    all-reduce and FSDP's unshard/reshard hooks need the training forward to go through a module's forward."""

    def __init__(self, policy, vocab_size: int, share_prompt_kv: bool = True,
                 compute_dtype: torch.dtype = torch.float32, segment_tokens: int = 0):
        super().__init__()
        self.policy, self.vocab_size, self.share_prompt_kv = policy, vocab_size, share_prompt_kv
        self.compute_dtype = compute_dtype  # below fp32: the forward runs under autocast (mixed precision)
        self.segment_tokens = segment_tokens  # shared-prompt forwards with gradients: see shared_prompt_logprobs

    def forward(self, prompts, completions, *, temperature: float = 1.0, with_entropy: bool = False,
                grouped: bool = False):
        """grouped: G consecutive completions share a prompt (rollouts), so its forward can be shared."""
        with autocast_to(self.compute_dtype, next(self.policy.parameters()).device):
            if grouped and self.share_prompt_kv:
                return shared_prompt_logprobs(self.policy, prompts, completions, temperature, with_entropy,
                                              self.vocab_size, self.segment_tokens)
            return completion_logprobs(self.policy, prompts, completions, temperature, with_entropy,
                                       vocab_size=self.vocab_size)

    def can_backward_by_chunks(self) -> bool:
        """backward_by_chunks saves something: shared prompts, recomputed segments, no activation checkpointing."""
        return self.share_prompt_kv and self.segment_tokens > 0 and not activation_checkpointing_on(_body(self.policy))

    def backward_by_chunks(self, prompts, completions, chunk_loss, *, temperature: float = 1.0):
        """Rollout groups (G consecutive completions per prompt): the backward of the sum of chunk_loss over the
        chunks of completions, each right after its chunk's forward (see shared_prompt_backward). Returns the
        detached (logp [N], entropy [N], lengths)."""
        with autocast_to(self.compute_dtype, next(self.policy.parameters()).device):
            return shared_prompt_backward(self.policy, prompts, completions, chunk_loss, temperature, self.vocab_size,
                                          self.segment_tokens)


def describe_attention(model, compute_dtype: torch.dtype) -> str:
    """The attention part of describe_paths: which attention scoring runs, packed or padded, and why not packed."""
    attn = _attn_implementation(model)
    if attn.startswith("flash"):
        return f"{attn}, packed scoring (no padding)"
    if attn == "sdpa" and _device(model).type in varlen.DEVICE_TYPES:
        why = varlen.unavailable_reason(model, compute_dtype)
        if why is None:
            checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
            unsafe = checkpointed and not recomputes_with_forward_attention(model)
            return "varlen (torch), packed scoring (no padding)" + \
                ("; padded under this activation checkpointing (its recompute would run plain SDPA)" if unsafe else "")
        return f"{attn}, padded scoring (flash-attn not installed; no torch varlen: {why})"
    return f"{attn}, padded scoring"


def describe_paths(model, compute_dtype: torch.dtype, fsdp: bool = False) -> str:
    """One line naming the attention, head-kernel and precision paths in use, with the reason for any fallback
    to a slower one (logged once at start: a missing package must not silently cost speed or memory)."""
    from model.kernels import fp32_output_matmul_available, pick_backend

    device = _device(model)
    attention = describe_attention(model, compute_dtype)
    backend = pick_backend("auto", device)
    head = f"{backend} log-prob/entropy kernel"
    if device.type == "cuda" and backend == "torch":
        head += " (triton not installed)"
    if device.type == "cuda" and compute_dtype != torch.float32 and not fp32_output_matmul_available(device):
        head += ", bf16 products (no fp32-output matmul in this torch)"
    if compute_dtype == torch.float32:
        precision = "fp32"
    else:
        how = "FSDP2 mixed precision" if fsdp else "autocast"
        precision = f"{str(compute_dtype).removeprefix('torch.')} compute, fp32 master weights ({how})"
    return f"attention: {attention} | head: {head} | precision: {precision}"


def pad_rows(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter a flat [N] tensor of completion tokens into [S, T] at mask's 1s (detached, fp32)."""
    out = torch.zeros(mask.shape, device=mask.device, dtype=torch.float32)
    out[mask.bool()] = flat.detach().float().to(mask.device)
    return out
