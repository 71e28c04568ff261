"""Randomly initialised models built from a config: tiny ones for unit tests, Qwen2.5-shaped ones for
GPU benchmarks (no weights to download), and a byte-level tokenizer built in code with a ChatML template.
"""
from __future__ import annotations

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
