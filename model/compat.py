"""Differences between the transformers releases we support, detected from the installed code, never from
version strings.

KV cache keyword: transformers 5.24 renamed `past_key_values` to `cache` (model forwards, `generate`, and the
model outputs); the old name still works there but warns that it goes away in 5.40 (6.0 for `generate`).
Releases up to at least 5.17 know only `past_key_values`. A model class's forward signature tells which
release it comes from, and `generate` of the same release takes the same name.

Activation checkpointing: 5.24 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`
(the old name warns that v6 removes it). Either way the checkpointed layers carry `gradient_checkpointing = True`.
"""
from __future__ import annotations

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


def fork_cache(cache, config):
    """A new DynamicCache starting from `cache`'s keys and values: appending to it leaves `cache` as it was (the
    appends concatenate into new tensors), so several continuations can share one prefix, gradients included."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k, v) for k, v, *_ in cache], config=config)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (less memory, about 30% more compute)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def activation_checkpointing_on(model) -> bool:
    """True when some layer of `model` recomputes its activations in training mode (and so keeps no KV cache)."""
    return model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
