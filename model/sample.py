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
    repeated G times before decoding (`prefill_once=True`). The alternative (expand the prompts G times, then
    prefill, as `num_return_sequences` does) is kept behind the flag, and is what the static-cache path uses.
  * Prompts are micro-batched so that (prompts * G) * (prompt_len + max_new_tokens) stays within a token budget.
  * Sampling is seeded per call under a forked RNG (the caller's RNG stream is left untouched): same seed, same
    inputs -> same rollouts on CPU. Under torchrun, pass `rank_seed(seed, step, rank)` and a `shard_indices`
    shard of the prompts.

    from model.sample import sample
    rollouts = sample(model, tokenizer, prompt_ids, group_size=8, max_new_tokens=256, temperature=0.7)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import LogitsProcessor

from model.compat import cache_kwargs

DEFAULT_TOKEN_BUDGET = 1 << 16  # (prompts * G) * (prompt_len + max_new_tokens) per generate call
STATIC_CACHE_LENGTH_MULTIPLE = 64  # pad prompt lengths to a multiple of this under a static cache (fewer recompiles)


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
# Logits processors (applied in this order, after none of transformers' own: see `_processors`)


class RealVocabMask(LogitsProcessor):
    """Sets the scores of padded lm_head rows (ids >= vocab_size) to -inf."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids, scores):  # scores [B, V_head] fp32, generate's own copy of the logits
        if scores.shape[-1] > self.vocab_size:
            scores[:, self.vocab_size:] = -math.inf
        return scores


class ChosenTokenLogp(LogitsProcessor):
    """Records log p(chosen token) under the final (post-warper) distribution, without keeping every step's
    [B, V] scores: at step t it keeps step t's scores and log-normaliser, and gathers them at the token that
    appears at the end of `input_ids` on step t+1 (or, for the last step, in the returned sequences)."""

    def __init__(self):
        self.pending = None  # (scores [B, V], logsumexp [B]) of the step whose token is not known yet
        self.steps: list[torch.Tensor] = []  # per step: [B] fp32

    def __call__(self, input_ids, scores):
        if self.pending is not None:
            self._resolve(input_ids[:, -1])
        self.pending = (scores, torch.logsumexp(scores, dim=-1))
        return scores

    def _resolve(self, chosen):  # chosen [B]
        scores, lse = self.pending
        self.steps.append(scores.gather(1, chosen[:, None].to(scores.device)).squeeze(1) - lse)
        self.pending = None

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """new_tokens [B, T] generated ids -> [B, T] fp32 log-probs."""
        T = new_tokens.shape[1]
        if self.pending is not None and len(self.steps) < T:
            self._resolve(new_tokens[:, len(self.steps)])
        self.pending = None
        if T == 0:
            return torch.zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(self.steps[:T], dim=1).float()


class RowSeededChoice(LogitsProcessor):
    """Draws each row's next token with that row's own generator (Gumbel-max on the final scores, which is exact
    sampling from softmax(scores)) and hands generate() a one-hot distribution, so its own multinomial can only
    pick that token. A completion's randomness then depends on its seed alone, not on which other rows share
    its batch: rollouts are the same whatever the micro-batching, the prompt order or the number of ranks."""

    def __init__(self, row_seeds: list[int], device):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in row_seeds]

    def __call__(self, input_ids, scores):  # scores [B, V] final (post-warper); a new tensor: the recorder keeps them
        gumbel = torch.stack([-torch.empty(scores.shape[1], device=scores.device).exponential_(generator=g).log()
                              for g in self.generators])  # [B, V]
        choice = (scores.float() + gumbel).argmax(dim=-1)
        out = torch.full_like(scores, -math.inf)
        out.scatter_(1, choice[:, None], 0.0)
        return out


def _processors(vocab_size: int, temperature: float, top_k: int, top_p: float, greedy: bool, record: bool):
    """Our own processor list, in a fixed order: vocab mask, temperature, top-k, top-p, then the recorder.

    The generation config carries temperature=1, top_k=0, top_p=1 so transformers adds no warpers of its own:
    its custom processors run *before* its warpers, which would put the vocab mask after top-p (top-p would then
    spend probability mass on ids that are never sampled) and leave no way to record the final distribution."""
    from transformers import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    procs = LogitsProcessorList([RealVocabMask(vocab_size)])
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if not greedy:  # argmax ignores truncation, and greedy log-probs are reported under the full distribution
        if top_k and top_k > 0:
            procs.append(TopKLogitsWarper(top_k=top_k))
        if top_p is not None and top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=top_p))
    recorder = ChosenTokenLogp() if record else None
    if recorder is not None:
        procs.append(recorder)
    return procs, recorder


def build_generation_config(model, tokenizer, max_new_tokens: int, greedy: bool = False, min_new_tokens: int = 0,
                            static_cache: bool = False):
    """A GenerationConfig with every field that changes the distribution set explicitly (see module docstring)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(
        do_sample=not greedy, num_beams=1, num_return_sequences=1, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        # our processors do temperature/top-k/top-p; these values make transformers add none of its own
        # (greedy adds no warpers at all, and transformers rejects a sampling-only top_k=0 there: leave it unset)
        temperature=1.0, top_k=None if greedy else 0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, length_penalty=1.0,
        bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
        forced_eos_token_id=None, renormalize_logits=False, remove_invalid_values=False,
        eos_token_id=eos_token_ids(model, tokenizer), pad_token_id=pad_id_of(tokenizer),
        bos_token_id=tokenizer.bos_token_id, use_cache=True, return_dict_in_generate=False,
        output_scores=False, output_logits=False)
    if static_cache:
        from transformers import CompileConfig
        cfg.cache_implementation = "static"
        cfg.compile_config = CompileConfig(fullgraph=False, dynamic=False)  # transformers compiles decode on CUDA
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
# Batching


def micro_batches(prompt_lengths: list[int], group_size: int, max_new_tokens: int, token_budget: int,
                  length_multiple: int = 1) -> list[list[int]]:
    """Split prompt indices into batches with (len(batch) * G) * (longest prompt + max_new_tokens) <= budget.

    Prompts are taken in order of length so each batch pads little; a single prompt over budget still gets a
    batch of its own (a group is never split)."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: prompt_lengths[i])
    batches, current, longest = [], [], 0
    for i in order:
        width = _round_up(max(longest, prompt_lengths[i]), length_multiple) + max_new_tokens
        if current and (len(current) + 1) * group_size * width > token_budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, prompt_lengths[i])
    if current:
        batches.append(current)
    return batches


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def left_pad(prompts: list[list[int]], pad_id: int, length_multiple: int = 1, device=None):
    """-> input_ids [B, P], attention_mask [B, P] (left padding: the last prompt token of every row is at P-1)."""
    P = _round_up(max(len(p) for p in prompts), length_multiple)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for row, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {row} is empty: every prompt needs at least one token")
        ids[row, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, P - len(p):] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # same rule generate() uses, so the prefilled cache and the decode steps agree on positions
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def _prefill_prompts_once(model, input_ids, attention_mask, group_size: int):
    """Run all but the last prompt token through the model once, then repeat the cache G times.

    generate() is then given the full expanded input_ids and mask: it sees a cache holding P-1 tokens and feeds
    only the last prompt token, whose logits give the first sampled token."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
          position_ids=_positions(attention_mask[:, :-1]), use_cache=True, logits_to_keep=1,
          **cache_kwargs(model, cache))
    cache.batch_repeat_interleave(group_size)  # [B, h, P-1, d] -> [B*G, h, P-1, d], rows grouped per prompt
    return cache


@torch.no_grad()
def _generate_batch(model, prompts, group_size, gen_config, procs, recorder, pad_id, prefill_once, length_multiple):
    """-> new_tokens [B*G, T] (rows grouped per prompt), logp [B*G, T] or None."""
    device = model.device
    input_ids, attention_mask = left_pad(prompts, pad_id, length_multiple, device)  # [B, P]
    P = input_ids.shape[1]
    kwargs = {}
    if prefill_once and group_size > 1 and P > 1:
        kwargs = cache_kwargs(model, _prefill_prompts_once(model, input_ids, attention_mask, group_size))
    input_ids = input_ids.repeat_interleave(group_size, dim=0)  # [B*G, P]
    attention_mask = attention_mask.repeat_interleave(group_size, dim=0)
    if recorder is not None:
        recorder.pending, recorder.steps = None, []
    # synced_gpus=False: transformers would otherwise turn it on for an FSDP-managed model and all-reduce a flag
    # every decoding step; the trainer gathers full parameters around generation instead (rl.dist.full_params),
    # so each rank decodes alone, however many calls and steps its share takes
    sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config,
                               logits_processor=procs, synced_gpus=False, **kwargs)  # [B*G, P + T]
    new_tokens = sequences[:, P:]
    logp = recorder.finish(new_tokens) if recorder is not None else None
    return new_tokens.cpu(), (logp.cpu() if logp is not None else None)


def _cut_at_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """Sampled ids up to and including the first EOS; truncated=True when there is none."""
    for t, tok in enumerate(tokens):
        if tok in eos:
            return tokens[:t + 1], False
    return tokens, True


# ---------------------------------------------------------------------------------------------------------------
# The sampler


def sample(model, tokenizer, prompt_ids: list[list[int]], group_size: int = 8, max_new_tokens: int = 256,
           temperature: float = 0.7, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
           token_budget: int = DEFAULT_TOKEN_BUDGET, return_logprobs: bool = False, greedy: bool = False,
           prefill_once: bool = True, static_cache: bool = False, min_new_tokens: int = 0,
           progress: bool = False, row_seeds: list[int] | None = None) -> Rollouts:
    """Sample `group_size` completions for each prompt (token ids, chat template already applied).

    greedy=True is for evaluation: one completion per prompt (group_size is ignored), argmax decoding.
    return_logprobs: also return the log-probs of the sampled ids under the distribution they were drawn from
        (temperature applied, real vocabulary only, top-k/top-p truncation if enabled).
    static_cache: static KV cache with torch.compile of the decode step (useful on CUDA only; the first calls
        compile). It expands the prompts before prefill, so prefill_once does not apply there.
    min_new_tokens: forbids EOS before that many tokens (benchmarks only: it changes the distribution).
    row_seeds: one seed per completion (len(prompt_ids) * group_size, grouped per prompt): each completion is
        drawn with its own generator, so it does not depend on batching or sharding (the trainer derives them
        from the global prompt index, which makes 1 and N ranks sample the same rollouts). `seed` is then unused.
    """
    if not prompt_ids:
        raise ValueError("sample() got no prompts")
    if greedy:
        group_size = 1
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"group_size ({group_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    if row_seeds is not None and len(row_seeds) != len(prompt_ids) * group_size:
        raise ValueError(f"row_seeds needs one seed per completion ({len(prompt_ids) * group_size}), "
                         f"got {len(row_seeds)}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling (got {temperature}); use greedy=True for argmax")
    temperature = temperature if temperature > 0 else 1.0

    vocab = real_vocab_size(tokenizer, model)
    eos = set(eos_token_ids(model, tokenizer))
    pad_id = pad_id_of(tokenizer)
    gen_config = build_generation_config(model, tokenizer, max_new_tokens, greedy, min_new_tokens, static_cache)
    length_multiple = STATIC_CACHE_LENGTH_MULTIPLE if static_cache else 1
    lengths = [len(p) for p in prompt_ids]
    batches = micro_batches(lengths, group_size, max_new_tokens, token_budget, length_multiple)

    # per prompt: G lists of new tokens (and log-probs), filled batch by batch, read back in prompt order
    tokens_of: dict[int, list[list[int]]] = {}
    logp_of: dict[int, list[torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    devices = [model.device] if model.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), _clean_model_generation_config(model, gen_config):
            torch.manual_seed(seed)
            for batch in tqdm(batches, desc="sampling", disable=not progress, leave=False):
                procs, recorder = _processors(vocab, temperature, top_k, top_p, greedy, return_logprobs)
                if row_seeds is not None and not greedy:
                    procs.append(RowSeededChoice([row_seeds[i * group_size + g] for i in batch
                                                  for g in range(group_size)], model.device))
                new_tokens, logp = _generate_batch(model, [prompt_ids[i] for i in batch], group_size, gen_config,
                                                   procs, recorder, pad_id, prefill_once and not static_cache,
                                                   length_multiple)
                for row, i in enumerate(batch):
                    rows = range(row * group_size, (row + 1) * group_size)
                    tokens_of[i] = [new_tokens[r].tolist() for r in rows]
                    if logp is not None:
                        logp_of[i] = [logp[r] for r in rows]
    finally:
        model.train(was_training)

    prompt_index, completion_ids, truncated, sampler_logp = [], [], [], []
    for i in range(len(prompt_ids)):
        for g in range(group_size):
            ids, cut = _cut_at_eos(tokens_of[i][g], eos)
            prompt_index.append(i)
            completion_ids.append(ids)
            truncated.append(cut)
            if return_logprobs:
                sampler_logp.append(logp_of[i][g][:len(ids)].clone())
    T = max(len(c) for c in completion_ids)
    response_mask = torch.zeros((len(completion_ids), T), dtype=torch.long)  # [N, T]
    for n, ids in enumerate(completion_ids):
        response_mask[n, :len(ids)] = 1
    texts = tokenizer.batch_decode([ids[:-1] if ids and ids[-1] in eos else ids for ids in completion_ids],
                                   skip_special_tokens=False)
    return Rollouts(prompt_index=prompt_index, completion_ids=completion_ids, response_mask=response_mask,
                    truncated=truncated, sampler_logp=sampler_logp if return_logprobs else None, texts=texts,
                    group_size=group_size)


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
