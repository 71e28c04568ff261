"""Packed, padding-free attention through PyTorch's own variable-length attention
(`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10, CUDA only): packed scoring without flash-attn, which cannot
be installed on every GPU machine (PyPI carries only its source).

It is registered with transformers as the attention implementation `varlen_sdpa`, together with a mask function
that builds nothing: the sequence boundaries reach the attention as `cu_seq_lens_q/k` (the same keyword arguments
transformers hands flash-attention), so no [T, T] block-diagonal mask is ever materialised. Scoring switches a model
that runs SDPA to it for the packed body call only (`attention_implementation`); generation and everything else keep
plain SDPA. Under activation checkpointing the backward recomputes each layer after that call;
model.compat.enable_activation_checkpointing makes the recompute run the attention its forward ran.

varlen_attn's signature changed between releases; it is read from the installed function, never from a version:
  * 2.10: (q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None)
  * 2.11: (..., *, return_aux=None, scale=None, window_size=(-1, -1)); causal is window_size=(-1, 0)
  * 2.12+: also enable_gqa (fewer key/value heads than query heads).
Without `scale` the query is pre-scaled when the model's scaling differs from 1/sqrt(head_dim); without `enable_gqa`
the key/value heads are repeated.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

VARLEN_ATTN = "varlen_sdpa"  # the attention implementation's name in transformers' registry
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # what the flash kernels behind varlen_attn take
DEVICE_TYPES = ("cuda",)  # where varlen_attn has kernels


@dataclass(frozen=True)
class VarlenSignature:
    """How the installed varlen_attn is called."""
    causal_keyword: str  # "window_size" (causal = (-1, 0)) or "is_causal"
    takes_scale: bool
    takes_gqa: bool


def varlen_signature(fn) -> VarlenSignature | None:
    """The calling convention of `fn` (a varlen_attn), or None when it is not one we know how to make causal."""
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        causal = "window_size"
    elif "is_causal" in params:
        causal = "is_causal"
    else:
        return None
    return VarlenSignature(causal, "scale" in params, "enable_gqa" in params)


def _has_sliding_window_layers(config) -> bool:
    return "sliding_attention" in (getattr(config, "layer_types", None) or ()) or \
        bool(getattr(config, "use_sliding_window", False))


def unavailable_reason(model, compute_dtype: torch.dtype) -> str | None:
    """None when packed scoring of `model` can run through varlen_attn at `compute_dtype`, else why it cannot."""
    if next(model.parameters()).device.type not in DEVICE_TYPES:
        return "not on CUDA"
    if varlen_attn is None:
        return "this torch has no torch.nn.attention.varlen"
    if varlen_signature(varlen_attn) is None:
        return "this torch's varlen_attn takes no causal flag"
    if compute_dtype not in KERNEL_DTYPES:
        return f"{str(compute_dtype).removeprefix('torch.')} compute; its kernels take bf16/fp16"
    if _has_sliding_window_layers(model.config):
        return "the model has sliding-window layers"
    return None


def varlen_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, softcap: float | None = None,
                             is_causal: bool | None = None, **kwargs):
    """transformers' attention-function interface: query [1, Hq, T, D], key/value [1, Hkv, T, D] of one packed row
    whose sequences end at cu_seq_lens_q/k; returns ([1, T, Hq, D], None), causal within each sequence."""
    cu_seq_q, cu_seq_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_seq_q is None or cu_seq_k is None:
        raise ValueError(f"the {VARLEN_ATTN} attention needs cu_seq_lens_q/cu_seq_lens_k (packed sequences): it "
                         "runs only inside packed scoring, use sdpa elsewhere")
    if attention_mask is not None or query.shape[0] != 1:
        raise ValueError(f"the {VARLEN_ATTN} attention takes one packed row and no attention mask")
    if dropout or sliding_window is not None or softcap is not None:
        raise NotImplementedError(f"the {VARLEN_ATTN} attention has no attention dropout, sliding window or "
                                  "soft-capping")
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise NotImplementedError(f"the {VARLEN_ATTN} attention is causal only")
    call = varlen_signature(varlen_attn)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    device_type = q.device.type
    if q.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        # autocast leaves custom ops alone; rotary embeddings in fp32 can lift q and k back to fp32
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    heads_q, heads_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    options = {}
    if heads_q != heads_kv:
        if call.takes_gqa:
            options["enable_gqa"] = True
        else:
            k = k.repeat_interleave(heads_q // heads_kv, dim=1)
            v = v.repeat_interleave(heads_q // heads_kv, dim=1)
    if scaling is not None:
        if call.takes_scale:
            options["scale"] = scaling
        elif abs(scaling * head_dim ** 0.5 - 1.0) > 1e-6:  # the kernel's default is 1/sqrt(head_dim)
            q = q * (scaling * head_dim ** 0.5)
    if call.causal_keyword == "window_size":
        options["window_size"] = (-1, 0)
    else:
        options["is_causal"] = True
    out = varlen_attn(q, k, v, cu_seq_q, cu_seq_k, int(kwargs["max_length_q"]), int(kwargs["max_length_k"]),
                      **options)
    return out[None], None  # [1, T, Hq, D]


def no_mask(*args, **kwargs):
    """The mask function of `varlen_sdpa`: sequence boundaries travel as cu_seq_lens, so there is no mask to build."""
    return None


def register() -> None:
    """Make `varlen_sdpa` known to transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTN, no_mask)


@contextlib.contextmanager
def attention_implementation(config, name: str):
    """Run the model of `config` with attention implementation `name` inside the block, then restore the previous
    one (also when the block raises). The attention modules read it from the shared config at call time."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
