"""Cascade attention for decoding G completions of one prompt: the prompt's keys and values are held once per group
and every row of the group attends to that one copy, instead of G copies of the prompt in G rows of the KV cache.

Decoding one token reads the whole KV cache once. With G = 8 rows of a ~400-token prompt and ~100 generated tokens
each, 8 copies of the prompt are ~80% of what a step reads: on a 2-core CPU attention took a quarter of the
sampler's time, reading the cache at ~7 GB/s. Here a step's attention runs in two parts that are merged exactly:
  * the prompt: per group, the queries of all its rows (and of the query heads that share a key/value head) as
    one block of queries against the group's single copy of the prompt;
  * each row's own tokens (the ones generated so far), per row;
and the two partial softmaxes are joined through their log-sum-exps: out = (o1 * exp(lse1) + o2 * exp(lse2)) /
(exp(lse1) + exp(lse2)). Same result as attending over the concatenation, up to float rounding.

The KV-cache layer that holds a group's prompt once is model.sample's `_GroupedLayer`: `shared` (keys, values)
[groups, kv heads, P, d], `rows_of_group` (each group's rows), the rows' own columns as its keys and values, and
`full_keys_values()`. `grouped_attention_forward` is registered with transformers as the attention implementation
`grouped_sdpa` and reads the layers of the cache of the generate() call in progress (`decoding_with`). Decoding
steps only (one query token per row): anything else, or a layer that is not grouped, goes to transformers' own SDPA
attention. CPU only: the partial softmaxes come from PyTorch's CPU flash-attention kernel, which returns their
log-sum-exps.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

GROUPED_ATTN = "grouped_sdpa"  # the attention implementation's name in transformers' registry

_decoding = contextvars.ContextVar("grouped_decoding_cache", default=None)


@contextlib.contextmanager
def decoding_with(cache):
    """Inside the block, grouped attention reads the grouped layers of `cache` (the KV cache of the generate() call
    the block runs)."""
    token = _decoding.set(cache)
    try:
        yield
    finally:
        _decoding.reset(token)


def available(model) -> bool:
    """Grouped decoding needs SDPA attention (the implementation it stands in for) on CPU."""
    return (model.device.type == "cpu"
            and str(getattr(model.config, "_attn_implementation", "")) in ("sdpa", GROUPED_ATTN))


def _flash_cpu(query, key, value, mask, scale):
    """Attention [B, h, q, d] over [B, h, k, d] with an additive mask (or None) -> (out, log-sum-exp [B, h, q])."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False, attn_mask=mask,
                                                                      scale=scale)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: attend) as the additive mask the CPU kernel takes (it must have the query's dtype)."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def grouped_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs):
    """transformers' attention-function interface: query [B, H, q, d], key/value [B, kvh, k, d] as the cache layer
    returned them, attention_mask None or [B, 1, q, all columns] -> ([B, q, H, d], None)."""
    cache = _decoding.get()
    layer = cache.layers[module.layer_idx] if cache is not None else None
    grouped = getattr(layer, "shared", None) is not None  # a grouped layer (model.sample._GroupedLayer)
    if not grouped or query.shape[2] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        if grouped:  # not a decoding step: every row's columns, as plain SDPA takes them
            key, value = layer.full_keys_values()
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    # Autocast casts SDPA's inputs to its dtype (the rotary embedding leaves the query in fp32), but not this
    # kernel's: cast them as it would.
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    shared_keys, shared_values = (t.to(dtype) for t in layer.shared)
    B, H, _, d = query.shape
    kvh = key.shape[1]
    rep = H // kvh
    P = shared_keys.shape[2]
    q = query.reshape(B, kvh, rep, d)  # the query heads of a key/value head side by side (one query token)
    acc = torch.promote_types(query.dtype, torch.float32)  # the kernel's log-sum-exps, and the merge's precision
    out_shared = query.new_empty((B, kvh, rep, d))
    lse_shared = query.new_empty((B, kvh, rep), dtype=acc)
    for g, rows in layer.rows_of_group:  # the prompt, once per group: its rows' queries as one block
        n = rows.numel()
        block = q.index_select(0, rows).permute(1, 0, 2, 3).reshape(1, kvh, n * rep, d)
        mask = None if attention_mask is None else _additive(attention_mask[rows[:1], :, :, :P], query.dtype)
        o, lse = _flash_cpu(block, shared_keys[g:g + 1], shared_values[g:g + 1], mask, scaling)
        out_shared.index_copy_(0, rows, o.reshape(kvh, n, rep, d).permute(1, 0, 2, 3))
        lse_shared.index_copy_(0, rows, lse.reshape(kvh, n, rep).permute(1, 0, 2))
    mask = None if attention_mask is None else _additive(attention_mask[:, :, :, P:], query.dtype)
    out_own, lse_own = _flash_cpu(q, key, value, mask, scaling)  # each row's own tokens
    lse = torch.logaddexp(lse_shared, lse_own)
    out = (out_shared.to(acc) * (lse_shared - lse).exp()[..., None]
           + out_own.to(acc) * (lse_own - lse).exp()[..., None]).to(query.dtype)
    return out.reshape(B, 1, H, d), None  # [B, q=1, H, d]


def register() -> None:
    """Make `grouped_sdpa` known to transformers' attention and mask registries (idempotent); its masks are SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_ATTN, grouped_attention_forward)
    AttentionMaskInterface.register(GROUPED_ATTN, sdpa_mask)
