"""BFCL multi-turn: back-end loading and isolation, the safe dispatcher, the checker (against bfcl_eval's own
multi-turn checker on ground-truth, keyword-rewritten and mutated trajectories), episodes and the CLI."""
import copy
import json
import os
import random
import sys
import types

import pytest

from bfcl_official import vendor_stubs
from data.calls import PromptFormat
from eval import multiturn as mt


def _data_dir():
    from eval.bfcl import BFCLDataError, find_data_dir
    try:
        d = find_data_dir()
    except BFCLDataError:
        pytest.fail("bfcl-eval data is required for these tests: pip install --no-deps bfcl-eval")
    return d


@pytest.fixture(scope="module")
def data_dir():
    return _data_dir()


@pytest.fixture(scope="module")
def corpus(data_dir):
    return {c: mt.load_multi_turn(c, data_dir) for c in mt.MULTI_TURN_CATEGORIES}


def _entry(corpus, category, index):
    return corpus[category][index]


# ------------------------------------------------------------------------------------------------ official checker

def load_official_multi_turn():
    """bfcl_eval's multi-turn checker and prompt-mode execute decoder (tests/bfcl_official.py). Returns None when
    they do not import."""
    with vendor_stubs():
        try:
            from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker, multi_turn_utils
            from bfcl_eval.model_handler.utils import default_decode_execute_prompting
        except Exception:
            return None
    return multi_turn_checker.multi_turn_checker, default_decode_execute_prompting, multi_turn_utils


_RUN = [0]


def official_verdict(official, result, raw_entry: dict, ground_truth) -> bool:
    """What bfcl_eval's eval runner decides for one multi-turn entry (its _evaluate_single_multi_turn_entry)."""
    checker, decode, utils = official
    if not isinstance(result, list) or len(result) != len(ground_truth):
        return False
    decoded_turns = []
    for steps in result:
        decoded_steps = []
        for text in steps:
            try:
                calls = decode(text, has_tool_call_tag=False)
            except Exception:
                continue
            if utils.is_empty_execute_response(calls):
                continue
            decoded_steps.append(calls)
        decoded_turns.append(decoded_steps)
    _RUN[0] += 1
    name = f"parity{_RUN[0]}"
    try:
        verdict = checker(decoded_turns, ground_truth, copy.deepcopy(raw_entry), raw_entry["id"].rsplit("_", 1)[0],
                          name)["valid"]
    finally:  # its instances live in the module's globals: drop them
        for key in [k for k in vars(utils) if k.startswith(name + "_")]:
            del vars(utils)[key]
    return verdict


def raw_entries(data_dir, category):
    from eval.bfcl import _category_file
    path = _category_file(data_dir, category)
    with open(path) as f:
        return {e["id"]: e for e in map(json.loads, f)}


@pytest.fixture(scope="module")
def official():
    loaded = load_official_multi_turn()
    if loaded is None:
        pytest.fail("bfcl_eval's multi-turn checker cannot be imported even with stand-ins for its vendor SDKs")
    return loaded


# ------------------------------------------------------------------------------------------------ mutations

STATE_CHANGING_EXTRAS = {  # a call per back-end that changes its state in (nearly) every scenario
    "GorillaFileSystem": "mkdir(dir_name='zz_extra')",
    "MessageAPI": "add_contact(user_name='zz_extra')",
    "TradingBot": "add_to_watchlist(stock='MSFT')",
    "VehicleControlAPI": "setHeadlights(mode='on')",
}  # (posting, ticketing and travel need a login first; math has no state)


def mutated_trajectories(entry, keyword, rng):
    """(label, result) near misses and harmless rewrites of the keyword-form ground truth."""
    out = []
    turns_with_calls = [t for t, steps in enumerate(keyword) if steps]
    calls_of = {t: mt.parse_python_calls(keyword[t][0]) for t in turns_with_calls}

    def text(calls):
        return mt.format_calls(calls)

    if not turns_with_calls:
        return out
    t = rng.choice(turns_with_calls)
    calls = calls_of[t]
    # a missing call
    if calls:
        result = copy.deepcopy(keyword)
        i = rng.randrange(len(calls))
        rest = calls[:i] + calls[i + 1:]
        result[t] = [text(rest)] if rest else []
        out.append(("missing_call", result))
    # a wrong argument
    with_args = [i for i, c in enumerate(calls) if c["arguments"]]
    if with_args:
        result = copy.deepcopy(keyword)
        cs = copy.deepcopy(calls)
        c = cs[rng.choice(with_args)]
        k = rng.choice(list(c["arguments"]))
        v = c["arguments"][k]
        c["arguments"][k] = (v + "_x" if isinstance(v, str) else (not v) if isinstance(v, bool)
                             else v + 1 if isinstance(v, (int, float)) else "zz")
        result[t] = [text(cs)]
        out.append(("wrong_argument", result))
    # an extra state-changing call
    changeable = [c for c in entry.involved_classes if c in STATE_CHANGING_EXTRAS]
    if changeable:
        result = copy.deepcopy(keyword)
        result[t] = [text(calls)[:-1] + ", " + STATE_CHANGING_EXTRAS[rng.choice(changeable)] + "]"]
        out.append(("extra_call", result))
    # the turn's calls split over several steps, with chat and an empty list around them (harmless)
    result = copy.deepcopy(keyword)
    result[t] = ["Let me see."] + [text([c]) for c in calls] + ["[]", "Done."]
    out.append(("split_steps", result))
    # calls in reverse order
    result = copy.deepcopy(keyword)
    result[t] = [text(calls[::-1])]
    out.append(("reversed", result))
    # a fenced answer
    result = copy.deepcopy(keyword)
    result[t] = ["```\n" + text(calls) + "\n```"]
    out.append(("fenced", result))
    # an unknown function and a dunder name next to the right calls
    result = copy.deepcopy(keyword)
    result[t] = [text(calls)[:-1] + ", not_a_tool(x=1), __import__(name='os')]"]
    out.append(("unknown_names", result))
    # the calls of this turn made a turn early (or in a turn whose ground truth is empty)
    if t > 0:
        result = copy.deepcopy(keyword)
        result[t - 1] = result[t - 1] + [text(calls)]
        result[t] = []
        out.append(("early", result))
    # a call where the right move is none (miss_param / miss_func turns)
    empty = [u for u, truth in enumerate(entry.ground_truth) if not truth]
    if empty:
        result = copy.deepcopy(keyword)
        u = rng.choice(empty)
        result[u] = [text(calls_of[turns_with_calls[0]][:1])]
        out.append(("call_in_empty_turn", result))
    # a duplicated turn (repeats its state changes)
    result = copy.deepcopy(keyword)
    result[t] = result[t] + [text(calls)]
    out.append(("duplicated", result))
    # one turn too few (force-terminated)
    out.append(("short", copy.deepcopy(keyword)[:-1]))
    return out


# ------------------------------------------------------------------------------------------------ parity

PARITY_PER_CATEGORY = 12  # seeded subset in the suite; the whole corpus is measured by `main` below


@pytest.mark.parametrize("category", mt.MULTI_TURN_CATEGORIES)
def test_parity_with_official_checker(category, corpus, data_dir, official):
    rng = random.Random(7)
    entries = rng.sample(corpus[category], PARITY_PER_CATEGORY)
    raw = raw_entries(data_dir, category)
    disagreements = []
    counts = {"agree": 0, "valid": 0}
    for entry in entries:
        keyword = mt.keyword_trajectory(entry, data_dir)
        cases = [("keyword", keyword), ("verbatim", mt.verbatim_trajectory(entry))]
        cases += mutated_trajectories(entry, keyword, rng)
        for label, result in cases:
            ours = mt.check_entry(result, entry, data_dir).valid
            theirs = official_verdict(official, result, raw[entry.id], entry.ground_truth)
            counts["agree"] += ours == theirs
            counts["valid"] += ours
            if ours != theirs:
                disagreements.append((entry.id, label, ours, theirs))
    assert not disagreements, disagreements[:5]
    assert 0 < counts["valid"] < counts["agree"]  # both verdicts occur


def test_keyword_ground_truth_scores_100_and_verbatim_matches_official_counts(corpus, data_dir):
    """Every entry of the four categories: keyword-rewritten ground truth passes; verbatim ground truth fails
    exactly on the entries whose ground truth uses positional arguments (BFCL's decoder drops them)."""
    for category, entries in corpus.items():
        for entry in entries:
            verdict = mt.check_entry(mt.keyword_trajectory(entry, data_dir), entry, data_dir)
            assert verdict.valid, (entry.id, verdict.reason)
        verbatim = sum(mt.check_entry(mt.verbatim_trajectory(e), e, data_dir).valid for e in entries)
        positional = sum(any("(" in c and _has_positional(c) for t in e.ground_truth for c in t) for e in entries)
        assert verbatim == len(entries) - positional, (category, verbatim, positional)
    assert verbatim == 176  # multi_turn_long_context, as the official checker scores it (88%)


def _has_positional(call_text):
    import ast
    return bool(ast.parse(call_text, mode="eval").body.args)


@pytest.mark.parametrize("label,code", [("missing_call", "multi_turn:"), ("wrong_argument", "multi_turn:"),
                                        ("extra_call", "multi_turn:instance_state_mismatch")])
def test_targeted_wrong_trajectories_fail_with_a_reason(label, code, corpus, data_dir):
    rng = random.Random(3)
    failed = 0
    for entry in rng.sample(corpus["multi_turn_base"], 8):
        keyword = mt.keyword_trajectory(entry, data_dir)
        for name, result in mutated_trajectories(entry, keyword, random.Random(entry.id)):
            if name != label:
                continue
            verdict = mt.check_entry(result, entry, data_dir)
            if not verdict.valid:
                failed += 1
                assert verdict.reason.startswith(code) and verdict.turn is not None, verdict
    assert failed >= 6  # a dropped read-only call of a repeated result can still pass, as in BFCL


def test_known_wrong_trajectories_on_one_entry(corpus, data_dir):
    entry = _entry(corpus, "multi_turn_base", 0)  # cd, mkdir temp, mv final_report.pdf; then cd, grep; ...
    keyword = mt.keyword_trajectory(entry, data_dir)
    assert mt.check_entry(keyword, entry, data_dir).valid
    missing = copy.deepcopy(keyword)
    missing[0] = ["[cd(folder='document'), mkdir(dir_name='temp')]"]
    v = mt.check_entry(missing, entry, data_dir)
    assert not v.valid and v.reason.startswith("multi_turn:instance_state_mismatch") and v.turn == 0
    wrong = copy.deepcopy(keyword)
    wrong[0] = ["[cd(folder='document'), mkdir(dir_name='tmp'), mv(source='final_report.pdf', destination='tmp')]"]
    assert mt.check_entry(wrong, entry, data_dir).reason.startswith("multi_turn:instance_state_mismatch")
    nothing = copy.deepcopy(keyword)
    nothing[1] = ["I will not do that."]
    v = mt.check_entry(nothing, entry, data_dir)
    assert v.reason.startswith("multi_turn:empty_turn_model_response") and v.turn == 1
    assert mt.check_entry(keyword[:-1], entry, data_dir).reason.startswith("multi_turn:force_terminated")
    assert mt.check_entry("not a list", entry, data_dir).reason.startswith("multi_turn:inference_error")


# ------------------------------------------------------------------------------------------------ dispatcher

def test_adversarial_calls_are_refused_without_side_effects(corpus, data_dir, tmp_path):
    entry = _entry(corpus, "multi_turn_base", 0)
    model, _ = mt.new_backend_pair(entry, data_dir)
    before = copy.deepcopy({k: {a: v for a, v in vars(i).items() if not a.startswith("_")}
                            for k, i in model.instances.items()})
    marker = tmp_path / "pwned"
    texts = [
        f"[__import__(name='os')]", f"[eval(source='open(\"{marker}\", \"w\")')]",
        f"[exec(source='open(\"{marker}\", \"w\")')]", "[os.system(command='touch x')]",
        "[cd.__globals__(x=1)]", "[_load_scenario(scenario={})]", "[__init__()]", "[__class__()]",
        "[GorillaFileSystem.cd(folder='document')]", "[root.contents.clear()]", "[subprocess.run(args='ls')]",
        "[_navigate_to_directory(path='/')]",
        "[mean(numbers=[1.0])]",  # MathAPI is not an involved class of this entry
        "[cd(folder='x' * 30000)]", "[touch(file_name='a' * 40000)]", "[echo(content='b' * 25000, file_name='f')]",
        "[mkdir(dir_name=2 ** 400)]", "[mkdir(dir_name=[1] * 20000)]",
        "[cd(folder=cd(folder='document'))]",  # a nested call is a value here, never a call
    ]
    results = []
    for text in texts:
        calls = mt.decode_step(text)
        for call in calls or []:
            results.append(model.execute(call))
    after = {k: {a: v for a, v in vars(i).items() if not a.startswith("_")} for k, i in model.instances.items()}
    assert after == before
    assert not marker.exists()
    assert len(results) >= len(texts) - 2  # nearly all decode; every one is refused or fails inside the method
    assert all(r.startswith("Error during execution") or "error" in r for r in results), results
    # the private dispatcher never resolves a refused name
    assert model.refusal({"name": "_load_scenario", "arguments": {}})
    assert model.refusal({"name": "cd", "arguments": {"folder": "x" * (mt.MAX_ARGUMENT_CHARS + 1)}})
    assert model.refusal({"name": "cd", "arguments": {"folder": 1 << 80}})
    assert model.refusal({"name": "cd", "arguments": {"folder": "document"}}) is None
    assert "document" in model.execute({"name": "cd", "arguments": {"folder": "document"}})


def test_only_documented_methods_are_callable(corpus, data_dir):
    entry = _entry(corpus, "multi_turn_base", 0)
    model, _ = mt.new_backend_pair(entry, data_dir)
    documented = {d["name"] for d in entry.functions}
    assert set(model.methods) <= documented and len(model.methods) == len(documented)
    public = {n for i in model.instances.values() for n in dir(i) if not n.startswith("_") and callable(getattr(i, n))}
    for name in public - documented:
        assert model.execute({"name": name, "arguments": {}}).startswith("Error during execution: name")


def test_errors_come_back_like_bfcl(corpus, data_dir):
    entry = _entry(corpus, "multi_turn_base", 0)
    model, _ = mt.new_backend_pair(entry, data_dir)
    out = model.execute({"name": "cd", "arguments": {"nope": 1}})
    assert out.startswith("Error during execution: ") and "unexpected keyword argument 'nope'" in out
    assert model.execute({"name": "cd", "arguments": {}}).startswith("Error during execution: ")
    assert json.loads(model.execute({"name": "cd", "arguments": {"folder": "document"}})) == {"current_working_directory": "document"}


def test_episodes_are_isolated(corpus, data_dir):
    """Vehicle control writes into a module-level dict of long_context.py; two episodes never share it."""
    entry = next(e for e in corpus["multi_turn_long_context"] if "VehicleControlAPI" in e.involved_classes)
    classes_a = mt.backend_library(data_dir).fresh_classes(entry.involved_classes)
    classes_b = mt.backend_library(data_dir).fresh_classes(entry.involved_classes)
    a, b = mt.Backends(entry, classes_a), mt.Backends(entry, classes_b)
    ra = a.execute({"name": "get_outside_temperature_from_google", "arguments": {}})
    assert classes_a["VehicleControlAPI"] is not classes_b["VehicleControlAPI"]
    module_a = sys.modules.get(classes_a["VehicleControlAPI"].__module__)
    assert module_a is None  # nothing registered globally
    long_a = classes_a["VehicleControlAPI"].get_outside_temperature_from_google.__globals__["LONG_WEATHER_EXTENSION"]
    long_b = classes_b["VehicleControlAPI"].get_outside_temperature_from_google.__globals__["LONG_WEATHER_EXTENSION"]
    assert long_a is not long_b and "outsideTemperature" in ra
    # a state change in one episode is not seen by a new one
    a.execute({"name": "setHeadlights", "arguments": {"mode": "on"}})
    c = mt.Backends(entry, mt.backend_library(data_dir).fresh_classes(entry.involved_classes))
    assert vars(c.instances["VehicleControlAPI"])["headLightStatus"] == vars(b.instances["VehicleControlAPI"])["headLightStatus"]


def test_long_context_pads_the_state(corpus, data_dir):
    base = next(e for e in corpus["multi_turn_base"] if "GorillaFileSystem" in e.involved_classes)
    long = next(e for e in corpus["multi_turn_long_context"] if e.initial_config == base.initial_config
                and e.involved_classes == base.involved_classes)
    a, _ = mt.new_backend_pair(base, data_dir)
    b, _ = mt.new_backend_pair(long, data_dir)
    found_base = json.loads(a.execute({"name": "find", "arguments": {"path": "."}}))["matches"]
    found_long = json.loads(b.execute({"name": "find", "arguments": {"path": "."}}))["matches"]
    assert set(found_base) < set(found_long) and len(found_long) > 2 * len(found_base)


def test_no_bfcl_eval_import_needed(data_dir):
    import subprocess
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.startswith('bfcl_eval') and 'long_context' not in name: raise ImportError(name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from eval import multiturn as mt\n"
            f"d = {data_dir!r}\n"
            "e = mt.load_multi_turn('multi_turn_base', d, limit=3)[2]\n"
            "assert mt.check_entry(mt.keyword_trajectory(e, d), e, d).valid\n"
            "assert not any(m.startswith('bfcl_eval') for m in sys.modules), [m for m in sys.modules if 'bfcl' in m]\n"
            "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ episodes

def _drive(episode, steps_per_turn):
    while not episode.done:
        turn = episode.turn
        queue = steps_per_turn[turn] if turn < len(steps_per_turn) else []
        text = queue.pop(0) if queue else "No more calls."
        episode.advance(text)


def test_episode_with_ground_truth_replies_scores_right(corpus, data_dir):
    for category in mt.MULTI_TURN_CATEGORIES:
        entry = _entry(corpus, category, 3)
        keyword = mt.keyword_trajectory(entry, data_dir)
        model_side, _ = mt.new_backend_pair(entry, data_dir)
        episode = mt.Episode(entry, model_side, PromptFormat("plain", "python"))
        _drive(episode, copy.deepcopy(keyword))
        assert len(episode.result) == len(entry.ground_truth) and not episode.error
        assert mt.check_entry(episode.result, entry, data_dir).valid, category
        roles = [m["role"] for m in episode.messages]
        assert "tool" in roles and roles.count("user") == len(entry.turns)
        if entry.held_out:  # the held-out docs appear in their turn's message only
            turn = next(iter(entry.held_out))
            names = [d["name"] for d in entry.held_out[turn]]
            assert all(f"def {n}(" not in episode.system_text() for n in names)
            shown = [m["content"] for m in episode.messages if m["role"] == "user" and "def " in m["content"]]
            assert len(shown) == 1 and all(f"def {n}(" in shown[0] for n in names)


def test_episode_step_limit(corpus, data_dir):
    entry = _entry(corpus, "multi_turn_base", 0)
    model_side, _ = mt.new_backend_pair(entry, data_dir)
    episode = mt.Episode(entry, model_side)
    for _ in range(mt.STEP_LIMIT + 1):
        assert not episode.done
        episode.advance("[pwd()]")
    assert episode.done and episode.error.startswith("multi_turn:force_terminated")
    assert len(episode.result) == 1 and len(episode.result[0]) == mt.STEP_LIMIT + 1
    assert not mt.check_entry(episode.result, entry, data_dir).valid


def test_run_episodes_with_a_tiny_model(corpus, data_dir, tiny_model, tiny_tokenizer):
    """The lockstep runner on a random model: every episode ends and results are BFCL's format; a prompt too long
    for the model's context stops the episode with a reason instead of being truncated."""
    import dataclasses
    short = [dataclasses.replace(_entry(corpus, "multi_turn_base", i),
                                 functions=[d for d in _entry(corpus, "multi_turn_base", i).functions
                                            if d["name"] in ("cd", "ls")]) for i in (0,)]
    rows = mt.run_episodes(tiny_model, tiny_tokenizer, short, data_dir, PromptFormat("plain", "python"), max_new_tokens=4)
    assert [r["id"] for r in rows] == [e.id for e in short]
    for row, entry in zip(rows, short):
        assert "error" not in row and len(row["result"]) == len(entry.ground_truth)
        assert all(isinstance(s, str) for t in row["result"] for s in t)
    entries = [_entry(corpus, "multi_turn_base", i) for i in (0, 1)]  # the full docs: ~10k bytes > 4096 positions
    rows = mt.run_episodes(tiny_model, tiny_tokenizer, entries, data_dir, PromptFormat("plain", "python"), max_new_tokens=4)
    assert all(r["error"].startswith("prompt_too_long") and r["result"] == [[]] for r in rows)
    scored = mt.score_results(entries, rows, data_dir)
    assert scored["correct"] == 0 and scored["reasons"] == {"prompt_too_long": 2}


def test_episode_steps_reuse_the_conversations_cache(corpus, data_dir, tiny_model, tiny_tokenizer, monkeypatch):
    """Each step encodes only what the conversation gained since the last one; the episodes' results are those of
    encoding every conversation whole (float64 model)."""
    import dataclasses
    from tiny_run import count_fed_tokens
    model = tiny_model.double()
    short = [dataclasses.replace(_entry(corpus, "multi_turn_base", i),
                                 functions=[d for d in _entry(corpus, "multi_turn_base", i).functions
                                            if d["name"] in ("cd", "ls")]) for i in (0, 3)]
    fed = count_fed_tokens(model, monkeypatch)  # real tokens fed per forward call
    runs = {}
    for reuse in (False, True):
        fed.clear()
        rows = mt.run_episodes(model, tiny_tokenizer, short, data_dir, PromptFormat("plain", "python"),
                               max_new_tokens=6, reuse_cache=reuse)
        runs[reuse] = (rows, sum(fed))
    assert runs[True][0] == runs[False][0]
    assert all(len(r["result"]) == len(e.ground_truth) > 1 for r, e in zip(runs[True][0], short))
    assert runs[True][1] < 0.6 * runs[False][1], (runs[True][1], runs[False][1])
    monkeypatch.setattr(mt, "CACHE_BYTES", 1)  # no room for any cache: every step encodes its conversation whole
    fed.clear()
    rows = mt.run_episodes(model, tiny_tokenizer, short, data_dir, PromptFormat("plain", "python"), max_new_tokens=6)
    assert rows == runs[False][0] and sum(fed) == runs[False][1]


class _LongContextStub:
    """Stands in for a model: only its context length is read (generation is replaced by ground_truth_replies)."""
    config = types.SimpleNamespace(max_position_embeddings=10 ** 7)


def ground_truth_replies(data_dir, entries, calls_log=None):
    """A stand-in for eval.bfcl.generate_texts that replies to each episode's prompt with the keyword ground truth
    of the turn it is in, and with plain text once it has answered (which ends the turn)."""
    script = {}
    for e in entries:
        keyword = mt.keyword_trajectory(e, data_dir)
        markers = [("I have updated some more functions" if t in e.held_out else e.turns[t][-1]["content"])
                   for t in range(len(e.turns))]
        script[e.id] = (markers, [steps[0] if steps else "I cannot do that without more details." for steps in keyword])

    def generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=16, **kwargs):
        if calls_log is not None:
            calls_log.append(len(prompts))
        out = []
        for prompt in prompts:
            markers, replies = next(v for v in script.values() if v[0][0] in prompt)
            turn = max(range(len(markers)), key=lambda t: prompt.rfind(markers[t]))
            answered = "<|im_start|>assistant\n" in prompt[prompt.rfind(markers[turn]):-len("<|im_start|>assistant\n")]
            out.append("Done." if answered else replies[turn])
        return out
    return generate


def test_evaluate_bfcl_multi_turn_ground_truth_replies(corpus, data_dir, tiny_tokenizer, monkeypatch):
    import eval.bfcl as bfcl
    entries = mt.select_entries(corpus["multi_turn_miss_func"], 3)
    monkeypatch.setattr(bfcl, "generate_texts", ground_truth_replies(data_dir, entries))
    acc = bfcl.evaluate_bfcl(_LongContextStub(), tiny_tokenizer, ["multi_turn_miss_func"], limit=3,
                             prompt_format=PromptFormat("plain", "python"), data_dir=data_dir)
    assert acc == {"multi_turn_miss_func": 1.0}
    monkeypatch.setattr(bfcl, "generate_texts", lambda m, t, prompts, *a, **k: ["[ls(a=1)]"] * len(prompts))
    acc = bfcl.evaluate_bfcl(_LongContextStub(), tiny_tokenizer, ["multi_turn_miss_func"], limit=3,
                             prompt_format=PromptFormat("plain", "python"), data_dir=data_dir)
    assert acc == {"multi_turn_miss_func": 0.0}


def _rank_worker(rank, init_file, data_dir, results):
    import torch
    import torch.distributed as dist

    import eval.bfcl as bfcl
    from model.tiny import byte_tokenizer
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        entries = mt.select_entries(mt.load_multi_turn("multi_turn_base", data_dir), 3)
        calls = []
        bfcl.generate_texts = ground_truth_replies(data_dir, entries, calls)

        def all_reduce(t):
            dist.all_reduce(t)
            return t
        acc = bfcl.evaluate_bfcl(_LongContextStub(), byte_tokenizer(), ["multi_turn_base"], limit=3, rank=rank,
                                 world=2, all_reduce=all_reduce, prompt_format=PromptFormat("plain", "python"),
                                 data_dir=data_dir)
        total = torch.tensor([float(len(calls))])
        dist.all_reduce(total)  # both ranks reach this: neither hung in evaluate_bfcl
        results[rank] = (acc, len(calls), sum(calls))
    finally:
        dist.destroy_process_group()


def test_evaluate_multi_turn_two_ranks_unequal_work(data_dir, tmp_path):
    """Two gloo processes: 2 episodes on rank 0, 1 on rank 1 (different numbers of steps); both finish, and both
    get the accuracy over all 3."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), data_dir, results), nprocs=2, join=True)
    assert results[0][0] == results[1][0] == {"multi_turn_base": 1.0}
    assert results[0][2] != results[1][2]  # unequal work: prompts generated per rank

def test_train_eval_bfcl_multi_turn_two_ranks(tiny_tokenizer, tmp_path):
    """train.py --eval-bfcl multi_turn_base under torchrun with 2 processes ends and logs the accuracy (the tiny
    model's byte-level context is too short for the real prompts: every episode stops with prompt_too_long)."""
    import subprocess
    from model.tiny import tiny_model
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tiny_model(tiny_tokenizer).save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    tools = [{"name": "f", "description": "F.", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer", "description": "X."}}, "required": ["x"]}}]
    with open(tmp_path / "data.jsonl", "w") as fh:
        for i in range(2):
            fh.write(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": f"x={i}"}], "tools": tools,
                                 "answers": [{"name": "f", "arguments": {"x": i}}], "category": "simple"}) + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(root, "train.py"), "--model", str(tmp_path / "tiny"), "--train-data", str(tmp_path / "data.jsonl"),
           "--val-data", str(tmp_path / "data.jsonl"), "--difficulty", "all", "--out-dir", str(tmp_path / "run"),
           "--steps", "0", "--sft-steps", "0", "--eval-limit", "1", "--max-new-tokens", "4",
           "--eval-bfcl", "multi_turn_base", "--eval-bfcl-limit", "3", "--tools-as", "python"]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "bfcl_multi_turn_base=0.000" in out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_run_score_report_compare(corpus, data_dir, tiny_tokenizer, tmp_path, capsys):
    from eval.bfcl import main
    from model.tiny import tiny_model
    model_dir = tmp_path / "tiny"
    tiny_model(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    report = main(["run", "--model", str(model_dir), "--categories", "multi_turn", "--limit", "2", "--answer-format",
                   "plain", "--max-new-tokens", "4", "--out", str(out)])
    for category in mt.MULTI_TURN_CATEGORIES:
        rows = [json.loads(line) for line in open(out / f"{category}_result.jsonl")]
        assert [r["id"] for r in rows] == [e.id for e in mt.select_entries(corpus[category], 2)]
        assert all(r["error"].startswith("prompt_too_long") for r in rows)  # 4096 positions, byte-level tokens
        assert report["categories"][category]["total"] == 2
    assert report["summary"]["multi_turn"] == {"value": 0.0, "missing": []}
    assert "| Multi Turn" in (out / "report.md").read_text()
    # a result file in BFCL's multi-turn format: three right entries and one wrong, re-scored by `score`
    entries = mt.select_entries(corpus["multi_turn_miss_param"], 4)
    rows = [{"id": e.id, "result": mt.keyword_trajectory(e, data_dir)} for e in entries]
    rows[1]["result"][0] = ["[ls()]"]
    scored_dir = tmp_path / "scored"
    scored_dir.mkdir()
    path = scored_dir / "multi_turn_miss_param_result.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = main(["score", "--category", "multi_turn_miss_param", "--results", str(path)])
    assert (scored["correct"], scored["total"]) == (3, 4) and sum(scored["reasons"].values()) == 1
    again = main(["report", str(scored_dir)])
    assert again["summary"]["multi_turn"]["value"] == 0.75
    assert again["summary"]["multi_turn"]["missing"] == [c for c in mt.MULTI_TURN_CATEGORIES if "miss_param" not in c]
    table = main(["compare", str(out), str(scored_dir), "--out", str(tmp_path / "cmp.png")])
    assert "| Multi Turn | 0.00 | 75.00 | +75.00 |" in table["markdown"]
    path.write_text('{"id": "nope", "result": []}\n')
    with pytest.raises(SystemExit, match="not in category"):
        main(["score", "--category", "multi_turn_miss_param", "--results", str(path)])


if __name__ == "__main__":  # full-corpus parity (PYTHONPATH=. python tests/test_multiturn.py): 800 entries, all mutations
    import collections
    import time
    directory = _data_dir()
    checker = load_official_multi_turn()
    start = time.time()
    agree, total, valid, by_label = 0, 0, 0, collections.Counter()
    for cat in mt.MULTI_TURN_CATEGORIES:
        raw = raw_entries(directory, cat)
        for entry in mt.load_multi_turn(cat, directory):
            rng = random.Random(entry.id)
            kw = mt.keyword_trajectory(entry, directory)
            for label, result in [("keyword", kw), ("verbatim", mt.verbatim_trajectory(entry))] + \
                    mutated_trajectories(entry, kw, rng):
                ours = mt.check_entry(result, entry, directory).valid
                theirs = official_verdict(checker, result, raw[entry.id], entry.ground_truth)
                total += 1
                agree += ours == theirs
                valid += theirs
                if ours != theirs:
                    by_label[label] += 1
                    print("disagree", entry.id, label, ours, theirs)
    print(f"{agree}/{total} verdicts agree ({valid} valid officially) ({time.time() - start:.0f} s); disagreements by mutation: {dict(by_label)}")
