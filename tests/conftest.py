import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_run import _finish, _run  # noqa: E402  (train.py runs on the tiny model)


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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_data):
    """The tiny random model after a supervised warm-up on the data (train.py --steps 0): it then writes
    well-formed answers with varying arguments, so graded rewards differ within a group and GRPO has a gradient."""
    from model.tiny import byte_tokenizer, tiny_model
    root = tmp_path_factory.mktemp("tiny")
    tok = byte_tokenizer()
    tiny_model(tok, seed=1).save_pretrained(root / "random")
    tok.save_pretrained(root / "random")
    _finish(_run(["--model", str(root / "random"), "--train-data", str(tiny_data), "--val-data", str(tiny_data),
                  "--difficulty", "all", "--out-dir", str(root / "warm"), "--steps", "0", "--sft-steps", "60",
                  "--sft-lr", "3e-3", "--sft-batch-size", "6", "--eval-limit", "1", "--max-new-tokens", "4"]))
    return root / "warm" / "warmup"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A few short records so the byte-level prompts stay small."""
    tools = [{"name": "f", "description": "F.", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer", "description": "X."}}, "required": ["x"]}}]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as fh:
        for i in range(6):
            fh.write(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": f"x={i}"}], "tools": tools,
                                 "answers": [{"name": "f", "arguments": {"x": i}}], "category": "simple",
                                 "reasoning": "f"}) + "\n")
    return path
