"""Differences between the transformers releases we support, detected from the installed code, never from
version strings.

KV cache keyword: transformers 5.24 renamed `past_key_values` to `cache` (model forwards, `generate`, and the
model outputs); the old name still works there but warns that it goes away in 5.40 (6.0 for `generate`).
Releases up to at least 5.17 know only `past_key_values`. A model class's forward signature tells which
release it comes from, and `generate` of the same release takes the same name.
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
