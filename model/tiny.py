"""Randomly initialised models built from a config: tiny ones for unit tests, Qwen2.5-shaped ones for
GPU benchmarks (no weights to download), and two tokenizers built in code with a ChatML template: a byte-level one
(any text, tiny vocabulary) and a stub with Qwen2.5's vocabulary size and realistic prompt lengths.
"""
from __future__ import annotations

import functools
import itertools
import json

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Shapes of the Qwen2.5 family (hidden, intermediate, layers, heads, kv heads) for benchmarks.
QWEN25_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    # the same layout at toy width (the real 151,936-row head kept), for CPU runs of the GPU check
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "tiny-untied": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=False),
}
QWEN_VOCAB = 151936


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials), built in code: encodes any text.
    Like SmolLM2, pad == eos (<|im_end|>), which is exactly the case samplers get wrong."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>",
                                  additional_special_tokens=SPECIAL_TOKENS)
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_model(tokenizer=None, arch: str = "llama", hidden: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, vocab_pad: int = 64, tie: bool = True, seed: int = 0):
    """A 2-layer causal LM whose lm_head is larger than the tokenizer's vocab (vocab_pad extra rows),
    as real models' often are: a sampler must never emit those ids."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = tokenizer or byte_tokenizer()
    cls_cfg, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = cls_cfg(vocab_size=len(tokenizer) + vocab_pad, hidden_size=hidden, intermediate_size=hidden * 2,
                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     max_position_embeddings=4096, tie_word_embeddings=tie,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = cls_model(config)
    # defaults a sloppy sampler would silently pick up
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.3, top_k=5, do_sample=True, temperature=0.3)
    return model


def qwen_shaped_model(shape: str = "qwen2.5-0.5b", dtype=torch.bfloat16, device="cuda", layers: int | None = None,
                      attn: str = "sdpa"):
    """A randomly initialised Qwen2.5-shaped model, for timing only."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(QWEN25_SHAPES[shape])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    config = Qwen2Config(vocab_size=QWEN_VOCAB, max_position_embeddings=32768, bos_token_id=151643,
                         eos_token_id=151645, pad_token_id=151643, attn_implementation=attn, **kw)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model


# Qwen2.5's vocabulary layout: 151,643 regular byte-level BPE ids, then 22 special tokens (151,665 usable ids),
# in an lm_head of 151,936 rows (padded to a multiple of 128).
QWEN_REGULAR_IDS = 151643
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_USABLE_IDS = QWEN_REGULAR_IDS + len(QWEN_SPECIAL_TOKENS)  # 151,665
STUB_MERGES_VOCAB = 32768  # BPE tokens learned from the project's text; the rest of the regular ids are filler


def _stub_training_text() -> list[str]:
    """Text the project carries: the embedded default data (questions, reasoning, tool schemas as compact and as
    indented JSON, answers) and the README (English prose, code, the prompt wording). The stub's merges follow
    these files: a changed README can move a prompt's length by a token or two."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    texts = []
    for name in ("train.jsonl", "val.jsonl"):
        for line in (root / "data" / "default" / name).read_text().splitlines():
            record = json.loads(line)
            texts += [m["content"] for m in record["messages"]] + [record.get("reasoning", "")]
            texts += [json.dumps(record["tools"]), json.dumps(record["tools"], indent=4), json.dumps(record["answers"])]
    texts.append((root / "README.md").read_text())
    return texts


@functools.lru_cache(maxsize=1)
def qwen_stub_tokenizer():
    """A tokenizer with Qwen2.5's vocabulary size and special-token ids, built in code from nothing: a byte-level
    BPE learned from the embedded default data and the README (so prompts come out about as long as a real BPE
    tokenizer makes them, not 4x longer like the byte tokenizer), its regular ids padded with never-produced filler
    tokens up to 151,643, then Qwen's 22 special tokens at 151,643..151,664, and a ChatML template. For GPU checks and
    benchmarks of randomly initialised Qwen-shaped models: the head is 151,936 rows with 151,665 real ids, as in
    the real models. Builds in a few seconds, once per process (callers must not modify it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learner.train_from_iterator(_stub_training_text(), trainers.BpeTrainer(
        vocab_size=STUB_MERGES_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = dict(learned["vocab"])
    filler = (f"<|filler_{i}|>" for i in itertools.count())
    while len(vocab) < QWEN_REGULAR_IDS:  # ids a real tokenizer has and this text never produces
        vocab[next(filler)] = len(vocab)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(QWEN_SPECIAL_TOKENS)  # ids 151,643.. in this order
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token=None, additional_special_tokens=QWEN_SPECIAL_TOKENS)
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok
