import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from model.tiny import byte_tokenizer
    return byte_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    """Fresh per test (tests may train it). 2 layers, hidden 64, lm_head 64 rows larger than the vocab."""
    from model.tiny import tiny_model
    return tiny_model(tiny_tokenizer).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
