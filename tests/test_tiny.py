"""The models and tokenizers built in code: the Qwen-sized tokenizer stub reports Qwen2.5's vocabulary and
special ids, encodes realistic prompt lengths, and round-trips text."""
import statistics

import pytest
import torch

from data.calls import PromptFormat, render_prompt
from data.default import load_default
from model.sample import real_vocab_size
from model.tiny import (QWEN_REGULAR_IDS, QWEN_SPECIAL_TOKENS, QWEN_USABLE_IDS, QWEN_VOCAB, STUB_MERGES_VOCAB,
                        byte_tokenizer,
                        qwen_shaped_model, qwen_stub_tokenizer)


@pytest.fixture(scope="module")
def stub():
    return qwen_stub_tokenizer()


def test_stub_has_qwen_vocabulary_and_special_ids(stub):
    assert len(stub) == QWEN_USABLE_IDS == 151665
    assert stub.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>"]) == \
        [151643, 151644, 151645, 151657]
    assert stub.eos_token_id == 151645 and stub.pad_token_id == 151643
    assert stub.convert_ids_to_tokens(QWEN_USABLE_IDS - 1) == QWEN_SPECIAL_TOKENS[-1] == "<|file_sep|>"
    model = qwen_shaped_model("tiny", dtype=torch.float32, device="cpu")
    assert model.get_output_embeddings().weight.shape[0] == QWEN_VOCAB == 151936
    assert real_vocab_size(stub, model) == 151665


def test_stub_prompts_are_as_long_as_a_real_bpe_makes_them(stub):
    """About 4 characters per token on the project's prompts (a real BPE on English and JSON), where the byte
    tokenizer gives 1; filler ids are never produced, and every prompt decodes back to its text."""
    byte = byte_tokenizer()
    ratios, byte_ratios = [], []
    for fmt in (PromptFormat("think", "json", ""), PromptFormat("think", "python", "<think>")):
        for record in load_default("val")[:30]:
            text = render_prompt(stub, record["messages"], record["tools"], fmt)
            ids = stub(text, add_special_tokens=False).input_ids
            assert stub.decode(ids) == text
            assert text.startswith("<|im_start|>system\n") and ids[0] == 151644
            assert all(i < STUB_MERGES_VOCAB or i >= QWEN_REGULAR_IDS for i in ids)  # learned merges or specials only
            ratios.append(len(text) / len(ids))
            byte_ratios.append(len(text) / len(byte(text, add_special_tokens=False).input_ids))
    assert 3.0 < statistics.mean(ratios) < 6.0, statistics.mean(ratios)
    assert statistics.mean(byte_ratios) < 1.1


def test_stub_encodes_text_it_never_saw(stub):
    text = "Zürich → 東京: ¿qué tal? \t\n emoji 🙂 and code `x = {'a': [1, 2]}`"
    assert stub.decode(stub(text, add_special_tokens=False).input_ids) == text
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert stub.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
