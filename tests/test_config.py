"""The flat config dataclass and its command line (train.py --help, overrides, clear errors), and that CI runs
exactly the README's test command."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rl.config_cli import ConfigError, config_to_json, field_comments, parse_config

ROOT = Path(__file__).resolve().parents[1]


def _config_cls():
    # train.py is a script, not a module to import from; load its Config class by path for this test only
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_script"] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod.Config


def test_every_field_has_a_comment_and_help_lists_it():
    Config = _config_cls()
    comments = field_comments(Config)
    import dataclasses
    names = [f.name for f in dataclasses.fields(Config)]
    assert set(names) == set(comments), set(names) ^ set(comments)
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in names:
        assert "--" + name.replace("_", "-") in out.stdout
    assert "FunRL lambda" in out.stdout and "[default: 0.4]" in out.stdout


def test_overrides_and_types():
    Config = _config_cls()
    cfg = parse_config(Config, ["--lr", "3e-5", "--group-size=4", "--entropy_mode", "token", "--dynamic-sampling",
                                "--std-norm", "false"])
    assert cfg.lr == 3e-5 and cfg.group_size == 4 and cfg.entropy_mode == "token"
    assert cfg.dynamic_sampling is True and cfg.std_norm is False
    assert json.loads(config_to_json(cfg))["lr"] == 3e-5


@pytest.mark.parametrize("argv,message", [
    (["--learning-rate", "1"], "did you mean --lr"),
    (["--entropy-mod", "seq"], "did you mean --entropy-mode"),
    (["--group-size", "eight"], "expected int"),
    (["--entropy-mode", "sequence"], "not one of seq, token"),
    (["--dynamic-sampling", "maybe"], "expected true or false"),
    (["--group-size", "1"], "group_size must be >= 2"),
    (["--lr"], "needs a value"),
])
def test_bad_flags_fail_clearly(argv, message):
    Config = _config_cls()
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(Config, argv)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"# README test command.*\n(.+)\n", ci).group(1).strip()
    assert command in readme


@pytest.mark.parametrize("field,value,message", [
    ("group_size", 1, "group_size must be >= 2"),
    ("prompts_per_step", 0, "prompts_per_step must be >= 1"),
    ("entropy_kappa", 0.5, "entropy_kappa must be >= 1"),
    ("temperature", 0.0, "temperature must be > 0"),
    ("ppo_epochs", 0, "minibatches and ppo_epochs must be >= 1"),
    ("top_p", 1.5, "top_p must be in (0, 1]"),
    ("eps_low", 1.0, "eps_low must be in [0, 1)"),
    ("kl_coef", -0.1, "kl_coef and entropy_coef must be >= 0"),
    ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
    ("max_refill_rounds", -1, "max_refill_rounds must be >= 0"),
    ("keep_last", -1, "keep_last must be >= 0"),
    ("difficulty", "trivial", "difficulty must be easy, medium, hard or all"),
    ("dtype", "float8", "dtype must be auto, float32 or bfloat16"),
    ("dtype", "float16", "loss scaling"),
    ("entropy_mode", "sequence", "entropy_mode must be one of seq, token"),
    ("tools_as", "yaml", "tools_as must be one of json, python"),
])
def test_invalid_values_raise_at_construction(field, value, message):
    """Built in Python (as a fork or a test would), not only from the command line, a bad value raises at once."""
    Config = _config_cls()
    Config()  # the defaults are valid
    with pytest.raises(ValueError, match=re.escape(message)):
        Config(**{field: value})


def test_prompt_format_of_a_config():
    Config = _config_cls()
    fmt = Config(answer_format="plain", tools_as="json", prefill="").prompt_format
    assert (fmt.answer_format, fmt.tools_as, fmt.prefill) == ("plain", "json", "")
    assert Config().prompt_format.starts_in_think


def _train_module():
    _config_cls()
    return sys.modules["train_script"]


def test_recipe_egpo_v4_applies_the_papers_settings_and_explicit_flags_win():
    train = _train_module()
    recipe = train.RECIPES["egpo-v4"]
    cfg = parse_config(train.Config, ["--recipe", "egpo-v4"], recipes=train.RECIPES)
    assert (cfg.model, cfg.lr, cfg.kl_coef, cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens) == (
        "Qwen/Qwen3-4B-Instruct-2507", 1e-6, 0.001, 1024, 8, 8192)
    assert (cfg.temperature, cfg.entropy_coef, cfg.entropy_kappa, cfg.tools_as, cfg.sft_steps) == (
        0.7, 0.4, 2.0, "json", 0)
    assert all(getattr(cfg, name) == value for name, value in recipe.items())
    # an explicit flag wins whether it comes before or after --recipe; the rest of the recipe still applies
    for argv in (["--lr", "3e-6", "--recipe", "egpo-v4"], ["--recipe=egpo-v4", "--lr", "3e-6"]):
        cfg = parse_config(train.Config, argv + ["--group-size", "4"], recipes=train.RECIPES)
        assert cfg.lr == 3e-6 and cfg.group_size == 4 and cfg.max_new_tokens == 8192 and cfg.recipe == "egpo-v4"
    # the resolved values are what config.json records
    saved = json.loads(config_to_json(cfg))
    assert saved["lr"] == 3e-6 and saved["max_new_tokens"] == 8192 and saved["recipe"] == "egpo-v4"
    # without --recipe nothing of it leaks in
    assert parse_config(train.Config, [], recipes=train.RECIPES).lr == train.Config().lr != 1e-6


def test_recipe_values_are_fields_and_help_shows_the_recipe():
    train = _train_module()
    import dataclasses
    names = {f.name for f in dataclasses.fields(train.Config)}
    for recipe in train.RECIPES.values():
        assert set(recipe) <= names, set(recipe) - names
        train.Config(**recipe)  # valid values
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "--recipe STR" in out.stdout and "egpo-v4: --model Qwen/Qwen3-4B-Instruct-2507" in out.stdout


def test_unknown_recipe_is_a_one_line_error(tmp_path):
    train = _train_module()
    with pytest.raises(ConfigError, match=re.escape("unknown recipe 'egpo-v9'; choose from: egpo-v4")):
        parse_config(train.Config, ["--recipe", "egpo-v9"], recipes=train.RECIPES)
    out = subprocess.run([sys.executable, "train.py", "--recipe", "egpo-v9", "--out-dir", str(tmp_path / "run")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        "--recipe: unknown recipe 'egpo-v9'; choose from: egpo-v4"]
    assert not (tmp_path / "run").exists()  # nothing was written
