"""Rollouts for GRPO on Hugging Face `generate`: G completions per prompt, with the masks and log-probs the
trainer needs.

What this module guarantees, and why each point matters:
  * The generation config is built from scratch and the model's own `generation_config` is swapped out for the
    duration of the call: transformers fills every unset (None) field from the model's defaults and then from
    global defaults (top_k=50!), so a checkpoint's repetition_penalty or top_k would otherwise silently change the
    distribution we sample from, and the trainer would score a different one.
  * Every EOS id counts (the model's generation config, its config and the tokenizer's).
  * Ids beyond the tokenizer's real vocabulary (lm_head rows added for padding) are never sampled; the trainer
    must score the same restricted softmax: slice the head weight to `real_vocab_size(tokenizer, model)` rows.
  * The response mask is computed from the first EOS in the sampled ids, never from pad ids (pad == eos for
    SmolLM2 and for the byte tokenizer of the tests).
  * A group's prompt is encoded once: the prompt batch is run through the model once, and the KV cache is
    repeated G times before decoding (`prefill_once=True`); a prefix that all prompts of a call share (the system
    prompt's instructions) is encoded once for the whole call, with the padding placed after it
    (`share_prefix=True`). On CPU the cache is not even repeated: the G rows decode against one copy of their
    prompt's keys and values (cascade attention, model/cascade.py; `grouped_decode=True`).
  * Rows that are done cost nothing more: generate() runs in rounds of DECODE_CHUNK tokens, and after each round
    the rows that reached EOS (or the caller's `stop` condition, e.g. a closed </answer> in evaluation) leave the
    batch and the KV cache, and prompts still waiting take their places (left-padded to the batch's width), so
    one long row does not keep a batch of mostly finished rows decoding.
  * Sampling is exact inverse-CDF sampling with counter-based uniforms: completion n's draw at decode step t is a
    function of (row seed n, t) alone, computed for all rows in one op sequence. Same seeds -> same rollouts,
    whatever the batching, the prompt order, the number of ranks, or a resume; the caller's RNG is never touched.
    Under torchrun, the trainer passes seeds derived from the global prompt index (rl/rollout.py).
  * At most `max_rows` rows decode at once, and (rows) * (longest row + max_new_tokens) stays within a token
    budget; prompts are admitted in order of length (less padding).

    from model.sample import sample
    rollouts = sample(model, tokenizer, prompt_ids, group_size=8, max_new_tokens=256, temperature=0.7)
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache, LogitsProcessor
from transformers.cache_utils import DynamicLayer

from model.cascade import available as cascade_available
from model.compat import cache_kwargs

DEFAULT_TOKEN_BUDGET = 1 << 16  # rows * (longest row + max_new_tokens) decoding at once
STATIC_CACHE_LENGTH_MULTIPLE = 64  # pad prompt lengths to a multiple of this under a static cache (fewer recompiles)


@dataclass
class RowCache:
    """The keys and values the model computed for one sequence, and the token ids they are of: a conversation
    continued later (a multi-turn episode's next step) passes it back to `sample(..., caches=...)`, which then
    encodes only the tokens after the longest prefix the prompt shares with `ids`."""
    ids: list[int]  # [L] the tokens whose keys and values are held, from the start of the sequence
    kv: tuple  # per layer (k0, v0, k1, v1, ...), each [kv_heads, L, head_dim], positions 0..L-1


@dataclass
class Rollouts:
    """G consecutive completions per prompt, in the order of the prompts given to `sample`."""
    prompt_index: list[int]  # [N] which prompt each completion came from
    completion_ids: list[list[int]]  # [N][len_i] sampled ids up to and including the first EOS, nothing after
    response_mask: torch.Tensor  # [N, T] long, 1 for the len_i sampled tokens (incl. the EOS), 0 after
    truncated: list[bool]  # [N] True iff no EOS within max_new_tokens
    sampler_logp: list[torch.Tensor] | None  # [N][len_i] fp32 log-probs of the sampled ids under the sampler
    texts: list[str]  # [N] decoded completions (without the terminating EOS)
    group_size: int = 1
    caches: list[RowCache] | None = None  # [N] what each sequence's KV cache holds at the end (keep_caches=True)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def padded_ids(self, pad_id: int) -> torch.Tensor:
        """[N, T] completion ids, right-padded with `pad_id` (use response_mask, not pad_id, to find the end)."""
        out = torch.full(self.response_mask.shape, pad_id, dtype=torch.long)
        for i, ids in enumerate(self.completion_ids):
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def padded_logp(self) -> torch.Tensor:
        """[N, T] sampler log-probs, 0 where response_mask is 0."""
        if self.sampler_logp is None:
            raise ValueError("no sampler log-probs: call sample(..., return_logprobs=True)")
        out = torch.zeros(self.response_mask.shape, dtype=torch.float32)
        for i, lp in enumerate(self.sampler_logp):
            out[i, :len(lp)] = lp
        return out


# ---------------------------------------------------------------------------------------------------------------
# Ids and seeds


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the model's generation config, its config, and the tokenizer's EOS."""
    ids: list[int] = []
    sources = [getattr(getattr(model, "generation_config", None), "eos_token_id", None),
               getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id]
    for src in sources:
        if src is None:
            continue
        for i in ([src] if isinstance(src, int) else list(src)):
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("no EOS id found in the model's generation config, its config or the tokenizer: set "
                         "tokenizer.eos_token or model.generation_config.eos_token_id")
    return ids


def real_vocab_size(tokenizer, model) -> int:
    """Number of ids the tokenizer can produce. The lm_head may have more rows (padding to a multiple of 64/128):
    those ids are never sampled, and the trainer must score with `lm_head.weight[:real_vocab_size]` so that both
    sides use the same softmax."""
    head_rows = model.get_output_embeddings().weight.shape[0]
    return min(len(tokenizer), head_rows)


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return int(pad)


def rank_seed(seed: int, step: int, rank: int) -> int:
    """A distinct, reproducible sampling seed for each (run seed, step, rank): no two ranks or steps share a
    random stream. Fits in 63 bits (torch.manual_seed accepts it)."""
    import numpy as np
    return int(np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(1, np.uint64)[0] >> 1)


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The prompts rank `rank` samples: a strided shard, so shards differ in size by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return list(range(rank, n, world_size))


# ---------------------------------------------------------------------------------------------------------------
# Counter-based random numbers: one uniform per (row seed, decode step), computed for all rows at once


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (numpy wraps uint64 arithmetic modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def counter_uniforms(row_seeds: np.ndarray, step) -> torch.Tensor:
    """[B] float64 uniforms in (0, 1): a pure function of (row seed, step), so a completion's draws do not depend on
    the other rows of its batch, on the batch's order or on the number of ranks. Row seed s gives the stream
    SplitMix64(s), whose step-th output is used at decode step `step` (53 bits). step: an int, or one per row ([B]:
    rows that joined the batch later are at earlier steps of their streams)."""
    with np.errstate(over="ignore"):
        z = _mix64(row_seeds.astype(np.uint64) + (np.asarray(step, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
    return torch.from_numpy(((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53)


# ---------------------------------------------------------------------------------------------------------------
# Logits processors (applied in this order, after none of transformers' own: see `_processors`)


class RealVocabMask(LogitsProcessor):
    """Sets the scores of padded lm_head rows (ids >= vocab_size) to -inf."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids, scores):  # scores [B, V_head] fp32, generate's own copy of the logits
        if scores.shape[-1] > self.vocab_size:
            scores[:, self.vocab_size:] = -math.inf
        return scores


class RowChoice(LogitsProcessor):
    """Chooses every row's next token from the final (post-warper) scores and hands generate() a one-hot
    distribution, so that its greedy pick is that token.

    Sampling is by inverse CDF with one counter-based uniform per row and step (`counter_uniforms`): exact sampling
    from softmax(scores), with one op sequence for all rows. greedy: argmax. record: keeps log p(chosen) under the
    final distribution, per step ([B] fp32 each)."""

    def __init__(self, row_seeds: np.ndarray, first_step, greedy: bool, record: bool):  # first_step: int or [B]
        self.row_seeds, self.step, self.greedy = row_seeds, first_step, greedy
        self.logp: list[torch.Tensor] | None = [] if record else None

    def __call__(self, input_ids, scores):  # scores [B, V]
        scores = scores.float()
        if self.greedy:
            choice = scores.argmax(dim=-1)  # [B]
        else:
            u = counter_uniforms(self.row_seeds, self.step).to(scores.device)  # [B]
            probs = torch.softmax(scores, dim=-1, dtype=torch.float64)  # [B, V]; 0 where masked (-inf)
            cdf = probs.cumsum_(dim=-1)
            # the first id whose cumulative probability exceeds u * total: an id of zero probability never is
            choice = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
            choice = choice.clamp_(max=scores.shape[1] - 1)
        if self.logp is not None:
            self.logp.append(scores.gather(1, choice[:, None]).squeeze(1) - torch.logsumexp(scores, dim=-1))
        self.step += 1
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, choice[:, None], 0.0)


def _processors(vocab_size: int, temperature: float, top_k: int, top_p: float, chooser: RowChoice | None):
    """Our own processor list, in a fixed order: vocab mask, temperature, top-k, top-p, then the chooser.

    generate() runs in greedy mode with no processors or warpers of its own (see build_generation_config): all
    that shapes the distribution is here, in this order, and the chooser sees the final distribution."""
    from transformers import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    procs = LogitsProcessorList([RealVocabMask(vocab_size)])
    greedy = chooser is None or chooser.greedy
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if not greedy:  # argmax ignores truncation, and greedy log-probs are reported under the full distribution
        if top_k and top_k > 0:
            procs.append(TopKLogitsWarper(top_k=top_k))
        if top_p is not None and top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=top_p))
    if chooser is not None:
        procs.append(chooser)
    return procs


def build_generation_config(model, tokenizer, max_new_tokens: int, static_cache: bool = False,
                            compile_decode: bool = True):
    """A greedy GenerationConfig with every field that changes the distribution set explicitly (see the module
    docstring): the tokens are chosen by our processors (`RowChoice`), generate() only takes their argmax."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(
        do_sample=False, num_beams=1, num_return_sequences=1, max_new_tokens=max_new_tokens,
        temperature=1.0, top_k=None, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, length_penalty=1.0,
        bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
        forced_eos_token_id=None, renormalize_logits=False, remove_invalid_values=False,
        eos_token_id=eos_token_ids(model, tokenizer), pad_token_id=pad_id_of(tokenizer),
        bos_token_id=tokenizer.bos_token_id, use_cache=True, return_dict_in_generate=False,
        output_scores=False, output_logits=False)
    if static_cache:
        from transformers import CompileConfig
        cfg.cache_implementation = "static"
        if compile_decode:
            cfg.compile_config = CompileConfig(fullgraph=False, dynamic=False)
            cfg.compile_config._compile_all_devices = True  # transformers would compile on CUDA only
        else:
            cfg.disable_compile = True
    return cfg


@contextlib.contextmanager
def _clean_model_generation_config(model, gen_config):
    """generate() fills our config's None fields from model.generation_config: make that our own config."""
    saved = model.generation_config
    model.generation_config = gen_config
    try:
        yield
    finally:
        model.generation_config = saved


# ---------------------------------------------------------------------------------------------------------------
# Batching and prompt layout


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens that every prompt starts with, leaving each prompt at least one token of its own (generate() feeds
    each row's last prompt token itself)."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def left_pad(prompts: list[list[int]], pad_id: int, length_multiple: int = 1, device=None, prefix_len: int = 0):
    """-> input_ids [B, P], attention_mask [B, P], the last prompt token of every row at P-1.

    prefix_len > 0 (a prefix all prompts share): the prefix stays at positions 0..prefix_len-1 of every row and the
    padding goes between it and the rest, so the prefix is the same tensor on every row (encoded once)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty: every prompt needs at least one token")
    P = prefix_len + _round_up(max(len(p) for p in prompts) - prefix_len, length_multiple)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, :prefix_len] = torch.tensor(p[:prefix_len], dtype=torch.long)
        mask[row, :prefix_len] = 1
        rest = p[prefix_len:]
        ids[row, P - len(rest):] = torch.tensor(rest, dtype=torch.long)
        mask[row, P - len(rest):] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # same rule generate() uses, so the prefilled cache and the decode steps agree on positions
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# Prefill and decoding


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends a decoding step's keys and values into spare columns of its buffers instead of
    concatenating, so a step no longer copies the whole cache (at 32 rows x 700 columns the copies took a fifth of
    a CPU decode step). `keys`/`values` are views of the buffers' first columns; after anything replaces them
    (batch_select_indices, ...) the next append copies them into new buffers with SPARE free columns."""
    SPARE = 128

    def update(self, key_states, value_states, *args, **kwargs):
        device_type = key_states.device.type
        if torch.is_autocast_enabled(device_type):
            # Attention reads the cache in the autocast dtype, and the rotary embedding leaves fp32 keys: stored in
            # fp32, the whole cache would be cast again in every layer at every step (a sixth of a bf16 CPU decode
            # step). Stored cast, attention gets the same values.
            dtype = torch.get_autocast_dtype(device_type)
            key_states, value_states = key_states.to(dtype), value_states.to(dtype)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, k = DynamicLayer.get_seq_length(self), key_states.shape[-2]  # the columns in the buffers
        held = getattr(self, "_held", None)  # (key buffer, value buffer) [B, h, capacity, d]
        if (held is None or n == 0 or self.keys.data_ptr() != held[0].data_ptr()
                or self.keys.shape[:2] != held[0].shape[:2] or n + k > held[0].shape[-2]):
            self._held = None  # free the old buffers (after a row selection, keys is a copy) before allocating
            held = tuple(new.new_empty((*new.shape[:2], n + k + self.SPARE, new.shape[-1]))
                         for new in (key_states, value_states))
            if n:
                held[0][..., :n, :], held[1][..., :n, :] = self.keys, self.values
            self._held = held
        held[0][..., n:n + k, :], held[1][..., n:n + k, :] = key_states, value_states
        self.keys, self.values = held[0][..., :n + k, :], held[1][..., :n + k, :]
        return self.keys, self.values

    def hold(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, n: int) -> None:
        """Take buffers [B, h, capacity, d] whose first n columns are the keys and values (no copy)."""
        self.lazy_initialization(key_buffer[..., :0, :], value_buffer[..., :0, :])
        self._held = (key_buffer, value_buffer)
        self.keys, self.values = key_buffer[..., :n, :], value_buffer[..., :n, :]


def _new_cache(config, kv: tuple = ()):
    """A DynamicCache whose full-attention layers append in place (_GrowingLayer), holding `kv` (flat per-layer
    keys and values, as model.compat.cache_tensors returns them) if given."""
    cache = DynamicCache(config=config)
    cache.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    for layer in range(len(kv) // 2):
        cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
    return cache


class _GroupedLayer(_GrowingLayer):
    """A _GrowingLayer for G rows per prompt that holds each prompt's keys and values once (model.cascade):
    `shared` (keys, values) [groups, h, P, d] are the prompts' columns, `group` [rows] each row's prompt; the buffers
    (`keys`, `values`) hold only the columns after them, each row's own. The attention function `grouped_sdpa`
    reads both; everything else sees the P columns through get_seq_length and full_keys_values."""

    def __init__(self, shared: tuple[torch.Tensor, torch.Tensor], group: torch.Tensor):
        super().__init__()
        self.shared = shared
        self.set_group(group)

    def set_group(self, group: torch.Tensor) -> None:
        self.group = group
        self.rows_of_group = [(g, (group == g).nonzero().squeeze(1)) for g in group.unique().tolist()]

    def get_seq_length(self) -> int:
        return self.shared[0].shape[2] + DynamicLayer.get_seq_length(self)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if DynamicLayer.get_seq_length(self) > 0:
            self.keys, self.values = self.keys[indices], self.values[indices]
        self.set_group(self.group[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a grouped cache layer is built from a repeated one, not repeated itself")

    def full_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's keys and values [rows, h, P + own, d], as an ungrouped layer holds them (a copy)."""
        own = DynamicLayer.get_seq_length(self) > 0
        return tuple(torch.cat([t.index_select(0, self.group), mine], dim=2) if own else t.index_select(0, self.group)
                     for t, mine in zip(self.shared, (self.keys, self.values)))


def _grouped(cache, group_size: int):
    """The cache of n prompts -> the same for n * group_size rows (each prompt's G rows together), each prompt's
    columns held once per full-attention layer (_GroupedLayer); other layers are repeated."""
    group = torch.arange(len(cache.layers[0].keys), device=cache.layers[0].keys.device)
    group = group.repeat_interleave(group_size)
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, _GrowingLayer):
            cache.layers[i] = _GroupedLayer((layer.keys.contiguous(), layer.values.contiguous()), group)
        else:
            layer.batch_repeat_interleave(group_size)
    return cache


def _ungrouped(cache, config):
    """A cache whose layers hold every row's columns (a copy if any layer is grouped, else the cache itself)."""
    if not any(isinstance(layer, _GroupedLayer) for layer in cache.layers):
        return cache
    kv = tuple(t for layer in cache.layers for t in (layer.full_keys_values() if isinstance(layer, _GroupedLayer)
                                                     else (layer.keys, layer.values)))
    return _new_cache(config, kv)


@torch.no_grad()
def _prefix_kv(model, prefix: list[int], device) -> tuple:
    """The keys and values of a prefix that every prompt of a call shares, computed once on one row (flat tensors,
    as cache_tensors returns them): each admission of new prompts starts its cache from them."""
    from model.compat import cache_tensors

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prefix], dtype=torch.long, device=device)
    model(input_ids=ids, attention_mask=torch.ones_like(ids),
          position_ids=torch.arange(len(prefix), device=device)[None], use_cache=True, logits_to_keep=1,
          **cache_kwargs(model, cache))
    return cache_tensors(cache)


@torch.no_grad()
def _prefill(model, input_ids, attention_mask, group_size: int, prefix_len: int, prefix_kv: tuple = (),
             grouped: bool = False):
    """Run all but the last prompt token through the model, once per prompt (not per completion), starting from the
    shared prefix's keys and values (`prefix_kv`, its first prefix_len columns); then repeat the cache G times, or
    with `grouped` hold each prompt's columns once for its G rows (_GroupedLayer, read by model.cascade).
    -> a DynamicCache holding P-1 tokens per row.

    generate() is then given the full expanded input_ids and mask: it sees a cache holding P-1 tokens and feeds
    only the last prompt token, whose logits give the first sampled token."""
    n, P = input_ids.shape
    cache = _new_cache(model.config, tuple(t.expand(n, -1, -1, -1) for t in prefix_kv) if prefix_len > 0 else ())
    if P - 1 > prefix_len:
        mask = attention_mask[:, :P - 1]
        model(input_ids=input_ids[:, prefix_len:P - 1], attention_mask=mask,
              position_ids=_positions(mask)[:, prefix_len:], use_cache=True, logits_to_keep=1,
              **cache_kwargs(model, cache))
    if group_size > 1 and grouped and cache.get_seq_length() > 0:
        return _grouped(cache, group_size)
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)  # [B, h, P-1, d] -> [B*G, h, P-1, d], rows grouped per prompt
    return cache


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < limit and n < len(a) and a[n] == b[n]:
        n += 1
    return n


@torch.no_grad()
def _prefill_from_caches(model, prompts: list[list[int]], caches: list[RowCache | None], pad_id: int):
    """Like left_pad then _prefill, for prompts that continue sequences encoded before: row r reuses the keys and
    values of the longest prefix its prompt shares with caches[r].ids (at most all but its last token, which
    generate() feeds) and encodes only the rest. Layout per row: [padding | reused prefix | padding | rest], so
    the reused prefixes end together at column C and the prompts together at P-1; positions follow the mask.
    -> input_ids [B, P], attention_mask [B, P], a DynamicCache holding P-1 tokens per row."""
    held = [_common_prefix(c.ids, p, len(p) - 1) if c is not None else 0 for c, p in zip(caches, prompts)]
    C = max(held)
    N = max(len(p) - h for p, h in zip(prompts, held))
    P = C + N
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for row, (p, h) in enumerate(zip(prompts, held)):
        ids[row, C - h:C] = torch.tensor(p[:h], dtype=torch.long)
        mask[row, C - h:C] = 1
        ids[row, P - (len(p) - h):] = torch.tensor(p[h:], dtype=torch.long)
        mask[row, P - (len(p) - h):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    if C == 0:
        cache = _new_cache(model.config)
    else:
        like = next(c.kv for c, h in zip(caches, held) if h > 0)  # shapes and dtype of the cached tensors
        kv = []
        for t, ref in enumerate(like):
            block = ref.new_zeros((len(prompts), ref.shape[0], C, ref.shape[2]))  # [B, h, C, d]
            for row, (c, h) in enumerate(zip(caches, held)):
                if h:
                    block[row, :, C - h:] = c.kv[t][:, :h]
            kv.append(block)
        cache = _new_cache(model.config, tuple(kv))
    if P - 1 > C:
        m = mask[:, :P - 1]
        model(input_ids=ids[:, C:P - 1], attention_mask=m, position_ids=_positions(m)[:, C:], use_cache=True,
              logits_to_keep=1, **cache_kwargs(model, cache))
    return ids, mask, cache


def _row_cache(cache, j: int, attention_mask, generated: int, prompt: list[int], new: list[int]) -> RowCache:
    """Row j's keys and values (its masked columns, in order) and the ids they are of: the prompt, then the tokens
    it generated (`new`, cut at EOS). `generated` columns follow attention_mask; the cache holds all but the last."""
    from model.compat import cache_tensors

    tensors = cache_tensors(cache)
    width = tensors[0].shape[2]
    mask = torch.cat([attention_mask[j], attention_mask.new_ones(generated)])[:width].bool()
    seq = (prompt + new)[:int(mask.sum())]
    cols = mask.nonzero().squeeze(1)[:len(seq)]
    return RowCache(ids=seq, kv=tuple(t[j][:, cols] for t in tensors))


@dataclass
class _Decoding:
    """What decoding needs besides the model and the prompts."""
    gen_config: object  # GenerationConfig
    vocab: int
    temperature: float
    top_k: int
    top_p: float
    greedy: bool
    record: bool
    eos: set
    max_new_tokens: int
    chunk: int  # tokens per generate() call between checks for finished rows (max_new_tokens: no checks)
    stop: object  # None, or a function (generated ids of a row) -> True when the row is done
    keep_caches: bool = False  # return each row's RowCache


@dataclass
class _Live:
    """The rows decoding together, as generate() takes them: the KV cache holds all but the last column of
    input_ids (generate feeds that one). Rows admitted at different times are left-padded to a common width."""
    rows: list[int]  # [n] completion index of each row
    prompts: list[list[int]]  # [n] each row's prompt ids (for its RowCache)
    input_ids: torch.Tensor  # [n, L] prompt + generated so far (padding where attention_mask is 0)
    attention_mask: torch.Tensor  # [n, L]
    cache: object  # a DynamicCache holding L-1 columns per row; None under a static cache (generate builds it)
    steps: np.ndarray  # [n] tokens each row has generated so far (its position in its random stream)

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.input_ids.device)
        self.cache.batch_select_indices(index)
        self.input_ids, self.attention_mask = self.input_ids[index], self.attention_mask[index]
        self.rows, self.prompts = [self.rows[j] for j in keep], [self.prompts[j] for j in keep]
        self.steps = self.steps[keep]

    def trim(self, config, min_columns: int = 32) -> None:
        """Drop leading columns that are padding on every row (left by a long row that has left), when there
        are at least min_columns of them: attention no longer pays for them."""
        from model.compat import cache_tensors

        first = int(self.attention_mask.any(0).long().argmax())
        if first >= min_columns:
            self.input_ids, self.attention_mask = self.input_ids[:, first:], self.attention_mask[:, first:]
            if any(isinstance(layer, _GroupedLayer) for layer in self.cache.layers):
                # the leading columns are prompt padding, in the prompts' part (a row's own columns are all real)
                for layer in self.cache.layers:
                    if isinstance(layer, _GroupedLayer):
                        layer.shared = tuple(t[:, :, first:] for t in layer.shared)
                    else:
                        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
                return
            self.cache = _new_cache(config, tuple(t[:, :, first:] for t in cache_tensors(self.cache)))


def _join(a: _Live, b: _Live, pad_id: int, config) -> _Live:
    """One batch of a's rows then b's, the narrower left-padded (ids pad_id, mask 0, keys and values 0): positions
    follow the mask, so padding on the left changes nothing for a row. The joined keys and values are written once,
    straight into the buffers the cache then grows in (while a's cache is alive: twice a's size at the peak)."""
    from model.compat import cache_tensors

    L = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def left(x: torch.Tensor, width: int, value, dim: int) -> torch.Tensor:
        if x.shape[dim] == width:
            return x
        shape = list(x.shape)
        shape[dim] = width - x.shape[dim]
        return torch.cat([x.new_full(shape, value), x], dim=dim)

    na, width = len(a.rows), L - 1  # the cache holds all but the last column
    buffers = []
    # [n, h, columns, d] per layer; joined rows of different prompts lose their grouping (a prompt's columns in
    # each of its rows)
    for ta, tb in zip(cache_tensors(_ungrouped(a.cache, config)), cache_tensors(_ungrouped(b.cache, config))):
        buffer = ta.new_empty((na + len(b.rows), ta.shape[1], width + _GrowingLayer.SPARE, ta.shape[3]))
        for rows, t in ((slice(0, na), ta), (slice(na, None), tb)):
            pad = width - t.shape[2]
            buffer[rows, :, :pad] = 0  # masked columns: zeros, never uninitialised memory (0 x NaN is NaN)
            buffer[rows, :, pad:width] = t
        buffers.append(buffer)
    cache = _new_cache(config)
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, _GrowingLayer):
            layer.hold(buffers[2 * i], buffers[2 * i + 1], width)
        else:
            cache.update(buffers[2 * i][..., :width, :], buffers[2 * i + 1][..., :width, :], i)
    return _Live(rows=a.rows + b.rows, prompts=a.prompts + b.prompts,
                 input_ids=torch.cat([left(a.input_ids, L, pad_id, 1), left(b.input_ids, L, pad_id, 1)]),
                 attention_mask=torch.cat([left(a.attention_mask, L, 0, 1), left(b.attention_mask, L, 0, 1)]),
                 cache=cache, steps=np.concatenate([a.steps, b.steps]))


@torch.no_grad()
def _decode_round(model, live: _Live, row_seeds: np.ndarray, how: _Decoding):
    """One generate() call of up to `how.chunk` tokens for every live row (fewer if a row's max_new_tokens comes
    sooner). -> per row, in live order: (new ids cut after the first EOS, their log-probs or None, whether the row
    is done: EOS, max_new_tokens or `how.stop`), and the number of tokens generated."""
    how.gen_config.max_new_tokens = int(min(how.chunk, (how.max_new_tokens - live.steps).min()))
    chooser = RowChoice(row_seeds[live.rows], live.steps.copy(), how.greedy, how.record) \
        if (how.record or not how.greedy) else None
    procs = _processors(how.vocab, how.temperature, how.top_k, how.top_p, chooser)
    kwargs = cache_kwargs(model, live.cache) if live.cache is not None else {}
    grouped = live.cache is not None and any(isinstance(layer, _GroupedLayer) for layer in live.cache.layers)
    with _grouped_attention(model, live.cache) if grouped else contextlib.nullcontext():
        # synced_gpus=False: transformers would otherwise turn it on for an FSDP-managed model and all-reduce a
        # flag every decoding step; the trainer gathers full parameters around generation instead
        # (rl.dist.full_params), so each rank decodes alone, however many calls and steps its share takes
        sequences = model.generate(input_ids=live.input_ids, attention_mask=live.attention_mask,
                                   generation_config=how.gen_config, logits_processor=procs, synced_gpus=False,
                                   **kwargs)  # [n, L + k]
    new = sequences[:, live.input_ids.shape[1]:]
    k = new.shape[1]
    logp = torch.stack(chooser.logp[:k], dim=1).cpu() if how.record and k else None  # [n, k]
    live.steps = live.steps + k
    results = []
    for j, ids in enumerate(new.cpu().tolist()):
        ids, ended = _cut_at_eos(ids, how.eos)
        results.append((ids, logp[j, :len(ids)] if logp is not None else None,
                        ended or live.steps[j] >= how.max_new_tokens))
    live.input_ids = sequences  # the cache holds all of it but the last token, which the next call feeds
    live.attention_mask = torch.cat([live.attention_mask, live.attention_mask.new_ones((len(live.rows), k))], dim=1)
    return results, k


@contextlib.contextmanager
def _grouped_attention(model, cache):
    """generate() inside the block decodes with model.cascade's attention over `cache`'s grouped layers."""
    from model import cascade
    from model.varlen import attention_implementation

    cascade.register()
    with attention_implementation(model.config, cascade.GROUPED_ATTN), cascade.decoding_with(cache):
        yield


@contextlib.contextmanager
def packed_linear(layer):
    """Inside the block (no-grad calls only, such as the sampler's), on CPU in fp32 without autocast, the linear
    layer multiplies by its weight reordered once into oneDNN's blocked layout (a copy, alive for the block). The
    sampler packs the lm_head: each decoding step multiplies a few rows by it, the largest matrix of a small model,
    where MKL's fp32 GEMM is slow (16 rows x SmolLM2's [49152, 576] head on one core of a 2-core AMD EPYC: 27
    GFLOP/s, oneDNN 47). The same fp32 products, summed in another order. Packing the layers' products as well
    gained the sampler nothing more. Elsewhere (GPU, bf16, autocast, sharded weights, a torch without oneDNN) it
    does nothing."""
    weight = getattr(layer, "weight", None)
    if not (isinstance(layer, torch.nn.Linear) and type(weight.detach()) is torch.Tensor
            and weight.device.type == "cpu" and weight.dtype == torch.float32
            and (layer.bias is None or layer.bias.dtype == torch.float32) and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        yield
        return
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    bias = layer.bias.detach() if layer.bias is not None else None
    layer.forward = functools.partial(torch.ops.mkldnn._linear_pointwise, W=packed, B=bias, attr="none", scalars=[],
                                      algorithm="")
    try:
        yield
    finally:
        del layer.forward


def _cut_at_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """Sampled ids up to and including the first EOS, and whether there was one."""
    for t, tok in enumerate(tokens):
        if tok in eos:
            return tokens[:t + 1], True
    return tokens, False


# ---------------------------------------------------------------------------------------------------------------
# The sampler

DECODE_CHUNK = 16  # tokens per generate() call; rows that finished within a call leave the batch after it
MIN_SHARED_PREFIX = 16  # encode a prefix shared by a batch's prompts once when it is at least this long


def sample(model, tokenizer, prompt_ids: list[list[int]], group_size: int = 8, max_new_tokens: int = 256,
           temperature: float = 0.7, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
           token_budget: int = DEFAULT_TOKEN_BUDGET, return_logprobs: bool = False, greedy: bool = False,
           prefill_once: bool = True, share_prefix: bool = True, static_cache: bool = False,
           compile_decode: bool = True, progress: bool = False, row_seeds: list[int] | None = None, stop=None,
           decode_chunk: int = DECODE_CHUNK, caches: list[RowCache | None] | None = None,
           keep_caches: bool = False, max_rows: int | None = None, grouped_decode: bool = True) -> Rollouts:
    """Sample `group_size` completions for each prompt (token ids, chat template already applied).

    greedy=True is for evaluation: one completion per prompt (group_size is ignored), argmax decoding.
    return_logprobs: also return the log-probs of the sampled ids under the distribution they were drawn from
        (temperature applied, real vocabulary only, top-k/top-p truncation if enabled).
    prefill_once: encode each prompt once for its G completions (else: expand the prompts G times, then prefill).
    share_prefix: encode the prefix that all prompts share (the system prompt) once per call.
    grouped_decode: with prefill_once and G > 1, the G rows of a prompt decode against one copy of its keys and
        values (cascade attention, model.cascade) instead of G copies; CPU with SDPA attention only, else ignored.
        Once waiting prompts join a running batch, the batch decodes ungrouped.
    static_cache: static KV cache, prompt lengths padded to a multiple of 64 (fewer distinct shapes). It expands the
        prompts before prefill and decodes every row to the end. compile_decode: torch.compile the decode step
        (on any device; one compile per distinct batch size x cache length, on the first call of each).
    row_seeds: one seed per completion (len(prompt_ids) * group_size, grouped per prompt): each completion's draws
        are a function of its seed alone, so it does not depend on batching or sharding (the trainer derives them
        from the global prompt index, which makes 1 and N ranks sample the same rollouts). Without them completion
        n gets rank_seed(seed, 0, n).
    stop: a function (the ids a row generated so far) -> bool, checked every `decode_chunk` tokens; a row for which
        it is True stops there (its completion keeps what it generated, and counts as truncated unless it has EOS).
    caches: per prompt, a RowCache of an earlier call (or None): a prompt that continues that sequence encodes only
        the tokens after the prefix they share. keep_caches: return each completion's RowCache (Rollouts.caches).
        Both need group_size 1 and the dynamic cache; the caches stay on the model's device.
    max_rows: at most this many rows decode at once (None: as many as token_budget allows); when rows finish,
        waiting prompts join (dynamic cache with prefill_once; otherwise one batch after another).
    progress: True for a progress bar of completions, or a bar of the caller's (anything with update(n)).
    One call at a time per model: a call swaps the lm_head's forward (packed_linear) and, decoding grouped, the
    attention implementation, for its duration, so calls from two threads on one model break each other.
    """
    if not prompt_ids:
        raise ValueError("sample() got no prompts")
    if greedy:
        group_size = 1
    if group_size < 1 or max_new_tokens < 1 or decode_chunk < 1:
        raise ValueError(f"group_size ({group_size}), max_new_tokens ({max_new_tokens}) and decode_chunk "
                         f"({decode_chunk}) must be >= 1")
    if row_seeds is not None and len(row_seeds) != len(prompt_ids) * group_size:
        raise ValueError(f"row_seeds needs one seed per completion ({len(prompt_ids) * group_size}), "
                         f"got {len(row_seeds)}")
    if (caches is not None or keep_caches) and (group_size != 1 or static_cache):
        raise ValueError("caches and keep_caches need group_size 1 and the dynamic cache (static_cache=False)")
    if caches is not None and len(caches) != len(prompt_ids):
        raise ValueError(f"caches needs one entry (a RowCache or None) per prompt ({len(prompt_ids)}), "
                         f"got {len(caches)}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling (got {temperature}); use greedy=True for argmax")
    temperature = temperature if temperature > 0 else 1.0
    if row_seeds is None:
        row_seeds = [rank_seed(seed, 0, n) for n in range(len(prompt_ids) * group_size)]
    seeds = np.array(row_seeds, dtype=np.uint64)

    eos = set(eos_token_ids(model, tokenizer))
    how = _Decoding(gen_config=build_generation_config(model, tokenizer, max_new_tokens, static_cache, compile_decode),
                    vocab=real_vocab_size(tokenizer, model), temperature=temperature, top_k=top_k, top_p=top_p,
                    greedy=greedy, record=return_logprobs, eos=eos, max_new_tokens=max_new_tokens,
                    chunk=max_new_tokens if static_cache else decode_chunk, stop=stop, keep_caches=keep_caches)
    pad_id = pad_id_of(tokenizer)
    length_multiple = STATIC_CACHE_LENGTH_MULTIPLE if static_cache else 1
    dynamic = not static_cache
    refill = dynamic and prefill_once  # rows that finish make room for prompts still waiting
    prefix_len = shared_prefix_length(prompt_ids) if refill and share_prefix and len(prompt_ids) > 1 else 0
    prefix_len = prefix_len if prefix_len >= MIN_SHARED_PREFIX else 0
    grouped = grouped_decode and refill and group_size > 1 and cascade_available(model)
    waiting = deque(sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i])))  # short first: less padding
    most_rows = max_rows if max_rows else math.inf

    def room_for_next(live: _Live | None, take: list[int]) -> bool:
        """May the next waiting prompt (its G rows) join the batch? Always when nothing else would run."""
        if live is None and not take:
            return True
        if live is not None and not refill:
            return False
        rows = (len(live.rows) if live is not None else 0) + (len(take) + 1) * group_size
        longest = _round_up(max(len(prompt_ids[i]) for i in take + [waiting[0]]), length_multiple)
        width = max(longest, live.input_ids.shape[1] if live is not None else 0) + max_new_tokens
        return rows <= most_rows and rows * width <= token_budget

    def admit(take: list[int]) -> _Live:
        """Prefill the prompts `take` (each once, from the shared prefix's keys and values) -> their G rows each."""
        prompts = [prompt_ids[i] for i in take]
        held = [caches[i] for i in take] if caches is not None else []
        if any(c is not None for c in held):  # continuations: each row reuses what its cache holds
            input_ids, attention_mask, cache = _prefill_from_caches(model, prompts, held, pad_id)
        else:
            input_ids, attention_mask = left_pad(prompts, pad_id, length_multiple, model.device, prefix_len)
            if refill:
                cache = _prefill(model, input_ids, attention_mask, group_size, prefix_len, prefix_kv, grouped)
            elif dynamic:
                cache = _new_cache(model.config)
            else:
                cache = None  # generate() builds the static cache
        rows = [i * group_size + g for i in take for g in range(group_size)]  # completion indices
        return _Live(rows=rows, prompts=[p for p in prompts for _ in range(group_size)],
                     input_ids=input_ids.repeat_interleave(group_size, dim=0),  # [B*G, P]
                     attention_mask=attention_mask.repeat_interleave(group_size, dim=0), cache=cache,
                     steps=np.zeros(len(rows), dtype=np.int64))

    N = len(prompt_ids) * group_size
    tokens_of: list[list[int]] = [[] for _ in range(N)]  # completion index (prompt * G + g) -> new ids
    logp_of: list[list[torch.Tensor]] = [[] for _ in range(N)]
    cache_of: dict[int, RowCache] = {}
    bar = progress if hasattr(progress, "update") else tqdm(total=N, desc="sampling", disable=not progress,
                                                             leave=False)
    was_training = model.training
    model.eval()
    try:
        # the packed head is an opaque oneDNN tensor, which torch.compile (the static path's decode step) cannot trace
        head = packed_linear(model.get_output_embeddings()) if dynamic else contextlib.nullcontext()
        with _clean_model_generation_config(model, how.gen_config), head:
            prefix_kv = _prefix_kv(model, prompt_ids[0][:prefix_len], model.device) if prefix_len else ()
            live = None
            while waiting or live is not None:
                take = []
                while waiting and room_for_next(live, take):
                    take.append(waiting.popleft())
                if take:
                    joining = admit(take)
                    live = joining if live is None else _join(live, joining, pad_id, model.config)
                results, _ = _decode_round(model, live, seeds, how)
                keep = []
                for j, (ids, logp, done) in enumerate(results):
                    n = live.rows[j]
                    tokens_of[n] += ids
                    if logp is not None:
                        logp_of[n].append(logp)
                    if not done and not (stop and stop(tokens_of[n])):
                        keep.append(j)
                        continue
                    if keep_caches:  # taken before the row leaves the cache
                        cache_of[n] = _row_cache(live.cache, j, live.attention_mask, 0, live.prompts[j], tokens_of[n])
                    bar.update(1)
                if not keep or live.cache is None:  # a static cache decodes every row to its end in one call
                    bar.update(len(keep))
                    live = None
                elif len(keep) < len(live.rows):
                    live.select(keep)
                    live.trim(model.config)
    finally:
        model.train(was_training)
        if bar is not progress:
            bar.close()

    completion_ids = tokens_of
    truncated = [not ids or ids[-1] not in eos for ids in completion_ids]
    T = max(1, max(len(c) for c in completion_ids))
    response_mask = torch.zeros((N, T), dtype=torch.long)  # [N, T]
    for n, ids in enumerate(completion_ids):
        response_mask[n, :len(ids)] = 1
    texts = tokenizer.batch_decode([ids[:-1] if ids and ids[-1] in eos else ids for ids in completion_ids],
                                   skip_special_tokens=False)
    sampler_logp = [torch.cat(lp) if lp else torch.zeros(0) for lp in logp_of] if return_logprobs else None
    return Rollouts(prompt_index=[n // group_size for n in range(N)], completion_ids=completion_ids,
                    response_mask=response_mask, truncated=truncated, sampler_logp=sampler_logp, texts=texts,
                    group_size=group_size, caches=[cache_of[n] for n in range(N)] if keep_caches else None)


def logprob_gap(sampler_logp, trainer_logp, mask=None) -> dict:
    """Mean and max |sampler - trainer| log-prob over valid tokens, to log every step.

    Accepts lists of per-completion tensors (flattened and concatenated), flat tensors [N], or padded tensors
    [B, T] with `mask` [B, T] marking the valid tokens."""
    def flat(x):
        if isinstance(x, (list, tuple)):
            return torch.cat([torch.as_tensor(t, dtype=torch.float64).reshape(-1) for t in x]) if len(x) else \
                torch.zeros(0, dtype=torch.float64)
        return torch.as_tensor(x).detach().to(torch.float64)

    a, b = flat(sampler_logp), flat(trainer_logp).to(flat(sampler_logp).device)
    if a.shape != b.shape:
        raise ValueError(f"sampler and trainer log-probs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    gap = (a - b).abs()
    if mask is not None:
        gap = gap[torch.as_tensor(mask).to(gap.device).bool()]
    else:
        gap = gap.reshape(-1)
    if gap.numel() == 0:
        return {"mean": 0.0, "max": 0.0}
    return {"mean": gap.mean().item(), "max": gap.max().item()}
