"""The memory model of eval.memory: its parameter counts, its per-token activation count and the fit table."""
import torch

from eval.memory import (USABLE, _config, activation_bytes_per_token, fit_table, layer_saved_bytes_per_token,
                         parameter_counts, state_bytes)


def test_parameter_counts_match_the_models():
    from transformers import Qwen2ForCausalLM
    for shape in ("tiny", "tiny-untied"):
        config = _config(shape)
        model = Qwen2ForCausalLM(config)
        counts = parameter_counts(config)
        assert counts["total"] == sum(p.numel() for p in model.parameters()), shape
        assert counts["layer"] == sum(p.numel() for p in model.model.layers[0].parameters()), shape


def test_activation_count_is_per_token_and_checkpointing_keeps_less():
    """The count is linear in tokens (the same bytes per token from two pairs of lengths), bf16 compute keeps less
    than fp32, and a checkpointed stack keeps less than a plain one."""
    config = _config(dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True))
    a = layer_saved_bytes_per_token(config, torch.float32, lengths=(16, 40))
    b = layer_saved_bytes_per_token(config, torch.float32, lengths=(24, 72))
    assert a == b > 0
    # at least the layer's input, the MLP's gate, up, activation and product (fp32) are kept
    assert a >= 4 * (config.hidden_size + 4 * config.intermediate_size)
    assert layer_saved_bytes_per_token(config, torch.bfloat16, lengths=(16, 40)) < a
    plain = activation_bytes_per_token(config, torch.float32, False, a)["per_token"]
    checkpointed = activation_bytes_per_token(config, torch.float32, True, a)["per_token"]
    assert checkpointed < plain


def test_fit_table_fills_the_usable_memory():
    layer_bytes = {"qwen2.5-0.5b": 66880.0, "qwen2.5-7b": 262264.0}
    rows = fit_table(layer_bytes)
    assert len(rows) == 8
    for r in rows:
        config = _config(r["model"])
        ranks = 8 if r["fsdp"] else 1
        capacity = 80e9 if "H100" in r["gpus"] else 141e9
        per_token = activation_bytes_per_token(config, torch.bfloat16, r["checkpointing"],
                                               layer_bytes[r["model"]])["per_token"]
        state = state_bytes(config, ranks, r["fsdp"])["total"]
        assert state + r["max_micro_batch_tokens"] * per_token <= USABLE * capacity
        assert state + (r["max_micro_batch_tokens"] + 1) * per_token > USABLE * capacity
    # sharding divides the 16 bytes per parameter of the training state, not the unsharded reference
    config = _config("qwen2.5-7b")
    one, eight = state_bytes(config, 1, True), state_bytes(config, 8, True)
    assert one["optimizer"] == 8 * eight["optimizer"] and one["reference"] == eight["reference"]
