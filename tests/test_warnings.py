"""No library warnings on our hot paths: a deprecated call or an invalid generation flag is a break waiting for the
next release of transformers/torch, and noise in every run's console.

Each check runs in a fresh interpreter: transformers emits many warnings once per process (`warning_once`), so a
warning already emitted by an earlier test would be invisible in-process. There, every Warning is an error and a
handler on the `transformers` logger records anything at WARNING or above."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r'''
import logging, sys, warnings
warnings.simplefilter("error")  # FutureWarning, DeprecationWarning, UserWarning...: all fail the probe

class Record(logging.Handler):
    def emit(self, record):
        print("LOGGED WARNING:", record.name, record.getMessage(), flush=True)
        Record.seen = True
Record.seen = False
logging.getLogger("transformers").addHandler(Record(level=logging.WARNING))
logging.getLogger("torch").addHandler(Record(level=logging.WARNING))

import torch
from model.tiny import byte_tokenizer, tiny_model

def sampling_call():
    from model.sample import sample
    tok = byte_tokenizer()
    model = tiny_model(tok).eval()
    prompts = [tok("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False).input_ids,
               tok("<|im_start|>user\nhello there<|im_end|>\n", add_special_tokens=False).input_ids]
    out = sample(model, tok, prompts, group_size=3, max_new_tokens=6, temperature=0.7, return_logprobs=True,
                 row_seeds=list(range(6)))
    assert len(out) == 6

def greedy_evaluation_call():
    from eval.bfcl import generate_texts
    tok = byte_tokenizer()
    model = tiny_model(tok).eval()
    texts = generate_texts(model, tok, ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], 6, 4)
    assert len(texts) == 1

def scoring_call():
    from model.score import completion_logprobs, shared_prompt_logprobs
    tok = byte_tokenizer()
    model = tiny_model(tok)
    prompts, completions = [[5, 6, 7]] * 2 + [[8, 9]], [[10, 11], [12], [13, 14, 15]]
    lp, ent, _ = shared_prompt_logprobs(model, prompts, completions, 0.7, True)
    lp.sum().backward()
    lp, ent, _ = completion_logprobs(model, prompts, completions, 0.7, True)
    lp.sum().backward()

def train_run(args):
    import train
    train.main(args)

name = sys.argv[1]
if name == "train_run":
    train_run(sys.argv[2:])
else:
    globals()[name]()
sys.exit(3 if Record.seen else 0)
'''


def _probe(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert "LOGGED WARNING" not in out and proc.returncode == 0, out[-4000:]


def test_sampling_greedy_and_scoring_calls_warn_nothing():
    for name in ("sampling_call", "greedy_evaluation_call", "scoring_call"):
        _probe(name)


def test_one_step_train_run_warns_nothing(tmp_path):
    tools = [{"name": "f", "description": "F.", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer", "description": "X."}}, "required": ["x"]}}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": f"x={i}"}],
                                        "tools": tools, "answers": [{"name": "f", "arguments": {"x": i}}],
                                        "category": "simple"}) + "\n" for i in range(4)))
    from model.tiny import byte_tokenizer, tiny_model
    tok = byte_tokenizer()
    tiny_model(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    _probe("train_run", "--model", str(tmp_path / "model"), "--train-data", str(data), "--val-data", str(data),
           "--difficulty", "all", "--out-dir", str(tmp_path / "run"), "--steps", "1", "--sft-steps", "1",
           "--sft-batch-size", "2", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "8",
           "--eval-limit", "2", "--kl-coef", "0.01", "--grad-checkpointing", "true")
