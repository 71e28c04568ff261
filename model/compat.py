"""Differences between the transformers releases we support, detected from the installed code, never from
version strings.

KV cache keyword: transformers 5.24 renamed `past_key_values` to `cache` (model forwards, `generate`, and the
model outputs); the old name still works there but warns that it goes away in 5.40 (6.0 for `generate`).
Releases up to at least 5.17 know only `past_key_values`. A model class's forward signature tells which
release it comes from, and `generate` of the same release takes the same name.

Activation checkpointing: 5.24 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`
(the old name warns that v6 removes it). Either way the checkpointed layers carry `gradient_checkpointing = True`.
Both take the keyword arguments of torch.utils.checkpoint.checkpoint (`activation_checkpointing_kwargs`, before
5.24 `gradient_checkpointing_kwargs`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """{name: cache} for `model(...)` and `model.generate(...)`, under the name this transformers release uses."""
    return {_cache_keyword(type(model)): cache}


def returned_cache(model, output):
    """The KV cache held by a model output (`output.cache`, or `output.past_key_values` on older releases)."""
    return getattr(output, _cache_keyword(type(model)))


def cache_tensors(cache) -> tuple:
    """The keys and values of every layer of a DynamicCache, flat (k0, v0, k1, v1, ...): plain tensors, which can
    cross a checkpoint boundary."""
    return tuple(t for layer in cache.layers for t in (layer.keys, layer.values))


def cache_from_tensors(kv: tuple, config):
    """A new DynamicCache holding `kv` (as cache_tensors returns them). Appending to it concatenates into new
    tensors and leaves `kv` as they were, so several continuations can share one prefix, gradients included."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for layer in range(len(kv) // 2):
        cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
    return cache


class SameAttentionOnRecompute:
    """torch.utils.checkpoint's `context_fn`: the backward recomputes a layer with the attention implementation its
    forward ran with. Packed scoring switches the model to another attention for one body call (model.varlen); the
    recompute comes after that call, and on plain SDPA it would attend across the packed sequences."""

    def __init__(self, config):
        self.config = config

    def __call__(self):
        from model.varlen import attention_implementation

        return contextlib.nullcontext(), attention_implementation(self.config, self.config._attn_implementation)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (less memory, about 30% more compute), with the
    attention implementation of the layer's forward."""
    kwargs = {"use_reentrant": False, "context_fn": SameAttentionOnRecompute(model.config)}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def recomputes_with_forward_attention(model) -> bool:
    """True when every checkpointed layer of `model` was set up by enable_activation_checkpointing (its recompute runs
    the forward's attention implementation)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    return all(isinstance(getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", {}).get("context_fn"),
                              SameAttentionOnRecompute) for m in layers)


def activation_checkpointing_on(model) -> bool:
    """True when some layer of `model` recomputes its activations in training mode (and so keeps no KV cache)."""
    return model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
