"""What fits where: a memory model of the GRPO update, checked against a measurement.

    python -m eval.memory                  # the table for Qwen2.5-0.5B / 7B on H100 (80 GB) and H200 (141 GB),
                                           # after the CPU check of the model's activation term
    python -m eval.memory --skip-check     # the table only

The update's memory on a rank = training state + activations of one micro-batch (train.py --micro-batch-tokens):
  * state: fp32 master weights, fp32 gradients and AdamW's two fp32 moments (16 bytes per parameter; sharded over
    the ranks under --fsdp), the frozen reference in the compute dtype (2 bytes per parameter, on every rank: it is
    not sharded), and the compute-dtype copies of the weights in use: without FSDP autocast keeps a bf16 copy of
    every weight for the forward and backward (2 bytes per parameter); under FSDP2 the layer being computed and the
    next one (prefetch) plus the root's embedding and head are gathered in bf16.
  * activations: what autograd keeps per token. It is counted, not estimated: one decoder layer of the real shape
    runs forward on CPU at two lengths under the trainer's precision (fp32 masters, bf16 autocast) and every tensor
    saved for the backward is counted (torch.autograd.graph.saved_tensors_hooks); the difference per token is the
    layer's cost (weights and other constants cancel). SDPA runs its flash kernel there (one unpadded sequence,
    causal), which keeps q, k, v, the output and the log-sum-exp, as the GPU kernels do. With activation
    checkpointing a layer keeps only its input (the fp32 residual stream) and one layer's activations exist at a time
    during the backward. The head adds its input and gradient (the fused log-prob kernel keeps no logits).
The check (CPU, fp32, the default model's shape): the model's per-token activation bytes against the measured growth
of a forward+backward's peak resident memory between two sequence lengths, each in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

GIB = 2 ** 30
GPUS = {"H100 80 GB": 80e9, "H200 141 GB": 141e9}
USABLE = 0.9  # of the GPU's memory: the allocator's fragmentation, CUDA context, NCCL buffers
RECIPE_SEQUENCE = 1024 + 8192  # the paper's recipe: a ~1k-token prompt (tool listing) + up to 8,192 new tokens


def _config(shape: str | dict, dtype=torch.float32):
    from transformers import Qwen2Config

    from model.tiny import QWEN25_SHAPES, QWEN_VOCAB
    kw = dict(QWEN25_SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    kw.setdefault("vocab_size", QWEN_VOCAB)
    config = Qwen2Config(max_position_embeddings=32768, **kw)
    config._attn_implementation = "sdpa"
    return config


def parameter_counts(config) -> dict:
    """Parameters: total, per decoder layer, and of the root (embedding, final norm, head)."""
    h, i, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    layer = h * h + 2 * h * kv + (h + 2 * kv) + h * h + 3 * h * i + 2 * h  # q,k,v (+ biases), o, mlp, 2 norms
    root = V * h * (1 if config.tie_word_embeddings else 2) + h
    return {"total": L * layer + root, "layer": layer, "root": root}


def layer_saved_bytes_per_token(config, compute_dtype: torch.dtype, lengths=(32, 96)) -> float:
    """Bytes autograd keeps per token for one decoder layer: saved tensors counted at two sequence lengths (one
    unpadded causal sequence), the difference divided by the difference in tokens."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    torch.manual_seed(0)
    layer = Qwen2DecoderLayer(config, layer_idx=0).float()
    rotary = Qwen2RotaryEmbedding(config=config)
    totals = []
    for T in lengths:
        seen: dict[int, int] = {}

        def pack(t):  # a storage saved twice (a tensor and a view of it) counts once
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return t

        x = torch.randn(1, T, config.hidden_size, requires_grad=True)
        position_ids = torch.arange(T)[None]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            cos_sin = rotary(x, position_ids)
            out = layer(x, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
        param_storages = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        totals.append(sum(n for ptr, n in seen.items() if ptr not in param_storages))
        del out
    return (totals[1] - totals[0]) / (lengths[1] - lengths[0])


def activation_bytes_per_token(config, compute_dtype: torch.dtype, checkpointing: bool,
                               layer_bytes: float | None = None) -> dict:
    """Per token of a micro-batch: kept through the forward, and the peak during the backward."""
    if layer_bytes is None:
        layer_bytes = layer_saved_bytes_per_token(config, compute_dtype)
    h, L = config.hidden_size, config.num_hidden_layers
    residual = 4 * h  # fp32 residual stream (fp32 master embeddings), a checkpointed layer's saved input
    head = 2 * 4 * h  # the head's input hidden state and its gradient
    if checkpointing:
        per_token = L * residual + layer_bytes + head
    else:
        per_token = L * layer_bytes + head
    return {"layer_bytes": layer_bytes, "per_token": per_token}


def state_bytes(config, ranks: int, fsdp: bool, compute_bytes: int = 2) -> dict:
    """Training state on one rank during the update (see the module's docstring)."""
    n = parameter_counts(config)
    shards = ranks if fsdp else 1
    optimizer = 16 * n["total"] / shards  # fp32 master + gradient + exp_avg + exp_avg_sq
    reference = compute_bytes * n["total"]
    if fsdp:
        working = compute_bytes * (2 * n["layer"] + n["root"])
    else:
        working = compute_bytes * n["total"]  # autocast's bf16 copy of every weight
    return {"optimizer": optimizer, "reference": reference, "working": working,
            "total": optimizer + reference + working}


def fit_table(layer_bytes: dict) -> list[dict]:
    """Largest micro-batch (tokens) per configuration; `layer_bytes` maps shape -> bf16 saved bytes per token."""
    rows = []
    for shape, ranks, fsdp in (("qwen2.5-0.5b", 1, False), ("qwen2.5-7b", 8, True)):
        config = _config(shape)
        state = state_bytes(config, ranks, fsdp)
        for gpu, capacity in GPUS.items():
            for checkpointing in (False, True):
                act = activation_bytes_per_token(config, torch.bfloat16, checkpointing, layer_bytes[shape])
                free = USABLE * capacity - state["total"]
                tokens = max(0, int(free // act["per_token"]))
                rows.append({"model": shape, "gpus": f"{ranks} x {gpu}", "fsdp": fsdp,
                             "checkpointing": checkpointing, "state_gb": state["total"] / 1e9,
                             "activation_mb_per_token": act["per_token"] / 1e6, "max_micro_batch_tokens": tokens,
                             "recipe_sequence_fits": tokens >= RECIPE_SEQUENCE})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The CPU check: measured peak-memory growth per token of a forward+backward against the model's count.

def _peak_worker(shape: dict, tokens: int, checkpointing: bool) -> dict:
    """In a fresh process: a random model of `shape` (fp32), one forward+backward of the body + head on `tokens`
    tokens after a warm-up one on 16 (which allocates the gradients); VmHWM growth over the warm-up's."""
    from transformers import Qwen2ForCausalLM

    from model.compat import enable_activation_checkpointing
    from model.score import completion_logprobs

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(_config(shape)).train()
    if checkpointing:
        enable_activation_checkpointing(model)

    def step(n):
        ids = torch.randint(0, model.config.vocab_size, (n,)).tolist()
        logp, _, _ = completion_logprobs(model, [ids[:8]], [ids[8:]], with_entropy=False)
        logp.sum().backward()

    step(16)
    base = _vm_hwm()
    step(tokens)
    return {"tokens": tokens, "peak_growth": _vm_hwm() - base}


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure_growth(shape: dict, tokens: int, checkpointing: bool) -> int:
    cmd = [sys.executable, "-m", "eval.memory", "--worker", json.dumps([shape, tokens, checkpointing])]
    # glibc keeps freed blocks of a size it has seen mapped (its mmap threshold adapts upwards), so the resident set
    # would grow with every recomputed layer's short-lived activations; a fixed threshold returns them at free()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth"]


def cpu_check(lengths=(1024, 4096)) -> list[dict]:
    """The default model's shape (SmolLM2-135M, fp32 on CPU): the model's count against the measurement."""
    shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    config = _config(shape)
    layer = layer_saved_bytes_per_token(config, torch.float32)
    rows = []
    for checkpointing in (False, True):
        predicted = activation_bytes_per_token(config, torch.float32, checkpointing, layer)["per_token"]
        growth = [measure_growth(shape, n, checkpointing) for n in lengths]
        measured = (growth[1] - growth[0]) / (lengths[1] - lengths[0])
        rows.append({"shape": "smollm2-135m (fp32)", "checkpointing": checkpointing, "tokens": list(lengths),
                     "predicted_kb_per_token": predicted / 1e3, "measured_kb_per_token": measured / 1e3,
                     "measured_over_predicted": measured / predicted})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-check", action="store_true", help="only the table (no CPU measurement)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_peak_worker(*json.loads(args.worker))))
        return
    result: dict = {"bench": "memory", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    if not args.skip_check:
        check = cpu_check()
        print("check: activation bytes per token of a forward+backward, the model's count vs the measured growth "
              "of peak resident memory")
        print(f"{'shape':22}{'checkpointing':>15}{'predicted KB':>14}{'measured KB':>13}{'ratio':>8}")
        for r in check:
            print(f"{r['shape']:22}{str(r['checkpointing']):>15}{r['predicted_kb_per_token']:>14.1f}"
                  f"{r['measured_kb_per_token']:>13.1f}{r['measured_over_predicted']:>8.2f}")
        result["check"] = check
    layer_bytes = {s: layer_saved_bytes_per_token(_config(s), torch.bfloat16) for s in ("qwen2.5-0.5b", "qwen2.5-7b")}
    table = fit_table(layer_bytes)
    print(f"\nlargest micro-batch (tokens) for the update, bf16 compute over fp32 masters, {USABLE:.0%} of each GPU; "
          f"the paper's recipe needs one sequence of ~{RECIPE_SEQUENCE} tokens")
    print(f"{'model':14}{'GPUs':>18}{'ckpt':>6}{'state GB':>10}{'act MB/token':>14}{'max tokens':>12}{'recipe':>8}")
    for r in table:
        print(f"{r['model']:14}{r['gpus']:>18}{'yes' if r['checkpointing'] else 'no':>6}{r['state_gb']:>10.1f}"
              f"{r['activation_mb_per_token']:>14.3f}{r['max_micro_batch_tokens']:>12}"
              f"{'fits' if r['recipe_sequence_fits'] else 'no':>8}")
    result["layer_bytes_per_token_bf16"] = layer_bytes
    result["table"] = table
    print(json.dumps(result))


if __name__ == "__main__":
    main()
