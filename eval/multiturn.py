"""BFCL multi-turn: episodes on BFCL's simulated back-ends, a safe dispatcher, and BFCL's multi-turn checker.

The four categories (multi_turn_base, _miss_func, _miss_param, _long_context; 200 entries each) ship in bfcl-eval:
the entries (user turns, `initial_config`, `involved_classes`), `possible_answer/` (per-turn ground-truth calls
as Python text), `multi_turn_func_doc/` (the function docs of each back-end) and the back-ends themselves
(`eval_checker/multi_turn_eval/func_source_code/`: file system, math, messaging, posting, ticketing, trading,
travel, vehicle control).

Model text is never executed. Each step's text is decoded with the project's parser (data/calls.py: BFCL's
prompt-mode decoding, keyword arguments only, literal values only) into {"name", "arguments"} calls; a call is
dispatched to the back-end method of that name only when the name is in the entry's function docs, is public
(no leading underscore, no dots) and the arguments are within size limits. Everything else comes back as an
error result, the way BFCL returns errors ("Error during execution: ..."), and changes no state.

The back-end files are trusted package code: they are compiled once and executed into fresh module namespaces
for every episode (some keep module-level state, e.g. vehicle control writes into a shared dict of
long_context.py), without importing the bfcl_eval package or its declared dependencies (MathAPI needs mpmath,
which comes with torch's sympy).
"""
from __future__ import annotations

import builtins
import copy
import inspect
import json
import os
import sys
import types
from dataclasses import dataclass, field

from data.calls import PromptFormat, decode_bfcl_result, format_calls, parse_python_calls

MULTI_TURN_CATEGORIES = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param",
                         "multi_turn_long_context")
STEP_LIMIT = 20  # BFCL's MAXIMUM_STEP_LIMIT: a turn is force-quit when its step count exceeds this

# class name -> back-end file (without .py) and function-doc file, as BFCL maps them
BACKEND_FILES = {"GorillaFileSystem": "gorilla_file_system", "MathAPI": "math_api", "MessageAPI": "message_api",
                 "TwitterAPI": "posting_api", "TicketAPI": "ticket_api", "TradingBot": "trading_bot",
                 "TravelAPI": "travel_booking", "VehicleControlAPI": "vehicle_control"}
STATELESS_CLASSES = ("MathAPI",)  # no scenario to load
LONG_CONTEXT_MODULE = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code.long_context"
# BFCL's prompt-mode message for the turn where held-out functions are revealed (miss_func)
HELD_OUT_MESSAGE = "{functions}\nI have updated some more functions you can choose from. What about now?"
MULTI_TURN_INSTRUCTION = (
    "At each turn, try your best to complete the tasks the user asks for within the current turn. Keep writing "
    "function calls until you have fulfilled the request as well as you can; the results of your calls come back "
    "as tool messages. Once you have no more functions to call, reply without a call and the system will move on "
    "to the next turn.")

# dispatcher limits: the largest ground-truth call in the four categories is 6,839 characters
MAX_ARGUMENT_CHARS = 20_000   # repr of all arguments of one call
MAX_ARGUMENT_INT_BITS = 64    # no integer argument beyond 64 bits (some back-ends loop or exponentiate on them)


class MultiTurnDataError(Exception):
    """Missing data or back-ends, or a malformed result file: a message that says what to do."""


# ----------------------------------------------------------------------------------------------------
# Data

@dataclass
class MultiTurnEntry:
    id: str
    category: str
    turns: list[list[dict]]            # user messages per turn; a held-out turn has none in the data
    initial_config: dict
    involved_classes: list[str]
    functions: list[dict]              # every function doc of the involved classes (held-out ones included)
    held_out: dict[int, list[dict]]    # turn index -> docs revealed at that turn (miss_func)
    ground_truth: list[list[str]]      # per turn, ground-truth calls as Python text (positional arguments too)

    @property
    def long_context(self) -> bool:
        return "long_context" in self.category

    def functions_at(self, turn: int) -> list[dict]:
        """The docs the model has been shown by the start of `turn` (held-out docs appear at their turn)."""
        hidden = {d["name"] for t, docs in self.held_out.items() if t > turn for d in docs}
        return [d for d in self.functions if d["name"] not in hidden]


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_DOC_CACHE: dict[tuple[str, str], list[dict]] = {}


def _function_docs(data_dir: str, class_name: str) -> list[dict]:
    key = (data_dir, class_name)
    if key not in _DOC_CACHE:
        path = os.path.join(data_dir, "multi_turn_func_doc", BACKEND_FILES[class_name] + ".json")
        if not os.path.isfile(path):
            raise MultiTurnDataError(f"{path} is missing: is {data_dir} a BFCL data folder with multi_turn_func_doc/?")
        _DOC_CACHE[key] = _read_jsonl(path)
    return copy.deepcopy(_DOC_CACHE[key])


def load_multi_turn(category: str, data_dir: str, limit: int | None = None) -> list[MultiTurnEntry]:
    """Entries of one multi-turn category, paired with their ground truth by position (as BFCL pairs them)."""
    if category not in MULTI_TURN_CATEGORIES:
        raise MultiTurnDataError(f"unknown multi-turn category {category!r}; choose from {', '.join(MULTI_TURN_CATEGORIES)}")
    from eval.bfcl import _category_file  # (eval.bfcl imports this module: a call-time import)
    path = _category_file(data_dir, category)
    answer_path = _category_file(os.path.join(data_dir, "possible_answer"), category)
    if path is None or answer_path is None:
        raise MultiTurnDataError(f"no BFCL_v*_{category}.json (and possible_answer/ twin) in {data_dir}: the "
                                 "multi-turn data ships in bfcl-eval (pip install --no-deps bfcl-eval)")
    raw, answers = _read_jsonl(path), _read_jsonl(answer_path)
    if len(raw) != len(answers):
        raise MultiTurnDataError(f"{path} has {len(raw)} entries but {answer_path} has {len(answers)}")
    entries = []
    for e, a in zip(raw, answers):
        unknown = [c for c in e["involved_classes"] if c not in BACKEND_FILES]
        if unknown:
            raise MultiTurnDataError(f"{e['id']}: back-end classes {unknown} are not multi-turn back-ends")
        functions = [d for c in e["involved_classes"] for d in _function_docs(data_dir, c)]
        by_name = {d["name"]: d for d in functions}
        held_out = {int(t): [by_name[n] for n in names if n in by_name]
                    for t, names in e.get("missed_function", {}).items()}
        if len(e["question"]) != len(a["ground_truth"]):
            raise MultiTurnDataError(f"{e['id']}: {len(e['question'])} turns but {len(a['ground_truth'])} "
                                     "ground-truth turns")
        entries.append(MultiTurnEntry(id=e["id"], category=category, turns=e["question"],
                                      initial_config=e.get("initial_config", {}),
                                      involved_classes=list(e["involved_classes"]), functions=functions,
                                      held_out=held_out, ground_truth=a["ground_truth"]))
    return entries[:limit] if limit is not None else entries


# ----------------------------------------------------------------------------------------------------
# Back-ends: trusted package code, executed into fresh namespaces per episode

def find_backend_dir(data_dir: str) -> str:
    """func_source_code/ next to a bfcl_eval data folder, else the installed package's (found on the path)."""
    candidates = [os.path.join(os.path.dirname(os.path.abspath(data_dir)), "eval_checker", "multi_turn_eval",
                               "func_source_code")]
    candidates += [os.path.join(root or ".", "bfcl_eval", "eval_checker", "multi_turn_eval", "func_source_code")
                   for root in sys.path]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "long_context.py")):
            return folder
    raise MultiTurnDataError("BFCL's multi-turn back-ends (bfcl_eval/eval_checker/multi_turn_eval/func_source_code) "
                             "were not found: install them with `pip install --no-deps bfcl-eval`")


class BackendLibrary:
    """The back-end source files of one folder, compiled once; `fresh_classes` runs them into new modules."""

    def __init__(self, folder: str):
        self.folder = folder
        self._code: dict[str, types.CodeType] = {}

    def _compiled(self, stem: str) -> types.CodeType:
        if stem not in self._code:
            path = os.path.join(self.folder, stem + ".py")
            if not os.path.isfile(path):
                raise MultiTurnDataError(f"back-end file {path} is missing (reinstall bfcl-eval)")
            with open(path, encoding="utf-8") as f:
                self._code[stem] = compile(f.read(), path, "exec")
        return self._code[stem]

    def _run(self, stem: str, importer) -> types.ModuleType:
        module = types.ModuleType(f"bfcl_backend_{stem}")
        module.__dict__["__builtins__"] = {**builtins.__dict__, "__import__": importer}
        exec(self._compiled(stem), module.__dict__)  # trusted package source, never model text
        return module

    def fresh_classes(self, class_names) -> dict[str, type]:
        """New module namespaces (a new long_context too) so that no module-level state leaks between episodes."""
        long_context = self._run("long_context", builtins.__import__)

        def importer(name, globals=None, locals=None, fromlist=(), level=0):
            if name == LONG_CONTEXT_MODULE:
                return long_context
            return builtins.__import__(name, globals, locals, fromlist, level)

        modules = {}
        classes = {}
        for name in class_names:
            stem = BACKEND_FILES[name]
            if stem not in modules:
                modules[stem] = self._run(stem, importer)
            classes[name] = getattr(modules[stem], name)
        return classes


_LIBRARIES: dict[str, BackendLibrary] = {}


def backend_library(data_dir: str) -> BackendLibrary:
    folder = find_backend_dir(data_dir)
    if folder not in _LIBRARIES:
        _LIBRARIES[folder] = BackendLibrary(folder)
    return _LIBRARIES[folder]


def format_result(value) -> str:
    """An execution result as BFCL writes it: strings as they are, dicts as JSON (else str), anything else str."""
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except Exception:
            return str(value)
    return str(value)


def _int_too_big(value, depth: int = 0) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value.bit_length() > MAX_ARGUMENT_INT_BITS
    if isinstance(value, (list, tuple)):
        return any(_int_too_big(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_int_too_big(k, depth + 1) or _int_too_big(v, depth + 1) for k, v in value.items())
    return False


class Backends:
    """The back-end instances of one side (the model's or the ground truth's) of one entry."""

    def __init__(self, entry: MultiTurnEntry, classes: dict[str, type]):
        self.instances = {}
        for name in entry.involved_classes:
            instance = classes[name]()
            if name not in STATELESS_CLASSES:
                instance._load_scenario(copy.deepcopy(entry.initial_config.get(name, {})),
                                        long_context=entry.long_context)
            self.instances[name] = instance
        documented = {d["name"] for d in entry.functions}
        self.methods: dict[str, str] = {}  # method name -> class name (a later class wins, as in BFCL)
        for class_name, instance in self.instances.items():
            for method_name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction):
                if not method_name.startswith("_") and method_name in documented:
                    self.methods[method_name] = class_name

    def refusal(self, call: dict) -> str | None:
        """Why a call may not run (an error result), or None. Checked before anything executes."""
        name = call.get("name")
        if not isinstance(name, str) or "." in name or name.startswith("_") or name not in self.methods:
            return f"Error during execution: name '{name}' is not defined"
        arguments = call.get("arguments")
        if not isinstance(arguments, dict) or not all(isinstance(k, str) and k.isidentifier() for k in arguments):
            return "Error during execution: arguments must be keyword arguments"
        try:
            size = len(repr(arguments))
        except Exception:
            return "Error during execution: arguments cannot be represented"
        if size > MAX_ARGUMENT_CHARS:
            return f"Error during execution: arguments longer than {MAX_ARGUMENT_CHARS} characters are refused"
        if _int_too_big(arguments):
            return f"Error during execution: integer arguments beyond {MAX_ARGUMENT_INT_BITS} bits are refused"
        return None

    def execute(self, call: dict) -> str:
        """Run one {"name", "arguments"} call; errors (refusals, exceptions) come back as result strings."""
        refused = self.refusal(call)
        if refused is not None:
            return refused
        method = getattr(self.instances[self.methods[call["name"]]], call["name"])
        try:
            return format_result(method(**call["arguments"]))
        except Exception as e:
            return f"Error during execution: {e}"

    def signature(self, name: str) -> inspect.Signature | None:
        if name not in self.methods:
            return None
        return inspect.signature(getattr(self.instances[self.methods[name]], name))


def new_backend_pair(entry: MultiTurnEntry, data_dir: str) -> tuple[Backends, Backends]:
    """(model side, ground-truth side) on one fresh set of modules: states compare across the two (their classes'
    __eq__ checks isinstance), and nothing is shared with any other entry."""
    classes = backend_library(data_dir).fresh_classes(entry.involved_classes)
    return Backends(entry, classes), Backends(entry, classes)


# ----------------------------------------------------------------------------------------------------
# Ground truth: positional arguments bound by the method's signature

def keyword_form(call_text: str, backends: Backends) -> str:
    """A ground-truth call rewritten with keyword arguments only (`sort('a.pdf')` -> `sort(file_name='a.pdf')`).
    Ground truth is data from the package, but it is still read with the AST, never evaluated."""
    import ast
    node = ast.parse(call_text.strip(), mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise MultiTurnDataError(f"ground-truth call {call_text!r} is not a plain call")
    if node.args:
        signature = backends.signature(node.func.id)
        if signature is None:
            raise MultiTurnDataError(f"ground-truth call {call_text!r} names no documented method")
        names = [p.name for p in signature.parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(node.args) > len(names):
            raise MultiTurnDataError(f"ground-truth call {call_text!r} has more positional arguments than parameters")
        node.keywords = [ast.keyword(arg=n, value=v) for n, v in zip(names, node.args)] + node.keywords
        node.args = []
    return ast.unparse(node)


def ground_truth_calls(turn: list[str], backends: Backends) -> list[dict]:
    """One turn's ground truth as {"name", "arguments"} calls (keyword form, decoded by the project's parser)."""
    if not turn:
        return []
    return parse_python_calls("[" + ", ".join(keyword_form(c, backends) for c in turn) + "]")


def keyword_trajectory(entry: MultiTurnEntry, data_dir: str) -> list[list[str]]:
    """The ground truth as a model result (one step per turn, keyword arguments): what a perfect model writes.
    Turns with no ground truth get no step."""
    _, ground = new_backend_pair(entry, data_dir)
    return [[format_calls(ground_truth_calls(turn, ground))] if turn else [] for turn in entry.ground_truth]


def verbatim_trajectory(entry: MultiTurnEntry) -> list[list[str]]:
    """The ground truth as written (positional arguments too), one step per turn."""
    return [["[" + ", ".join(turn) + "]"] if turn else [] for turn in entry.ground_truth]


# ----------------------------------------------------------------------------------------------------
# Checker: BFCL's multi-turn rules

def decode_step(text) -> list[dict] | None:
    """A step's calls with BFCL's prompt-mode decoding (keyword arguments only: positional ones are dropped, as
    BFCL's decoder drops them); the <answer> content when present. None when it does not decode."""
    return decode_bfcl_result(text)


@dataclass
class Verdict:
    valid: bool
    reason: str = ""             # "<code>: <detail>"; codes are BFCL's multi-turn error types
    turn: int | None = None


def _state_difference(model: Backends, ground: Backends) -> str | None:
    for class_name, truth in ground.instances.items():
        mine = model.instances[class_name]
        for attr in vars(truth):
            if attr.startswith("_"):
                continue
            if getattr(mine, attr) != getattr(truth, attr):
                return f"{class_name}.{attr}"
    return None


def _missing(expected: list[str], seen: list[str]) -> list[str]:
    pool = list(seen)
    missing = []
    for item in expected:
        try:
            pool.remove(item)
        except ValueError:
            missing.append(item)
    return missing


def check_entry(result, entry: MultiTurnEntry, data_dir: str) -> Verdict:
    """BFCL's verdict on one entry's result (a list of turns, each a list of step texts).

    - Not a list: inference_error. A turn count other than the ground truth's (a force-quit episode):
      force_terminated.
    - Every step decodes with BFCL's prompt-mode decoder; steps that do not decode or decode to no call are
      skipped. The model's calls run on its own back-ends, the ground truth's on its own, cumulatively.
    - A turn whose ground truth is empty (the right move is no call: a missing parameter or function) is not
      checked, but the model's calls in it still run, so that later state checks see them.
    - Other turns: the model must have a call in that turn (empty_turn_model_response), every public attribute
      of every back-end must equal the ground truth's (instance_state_mismatch), and the ground truth's execution
      results for that turn must all appear, as a multiset, among the model's results of all turns so far
      (execution_response_mismatch)."""
    if not isinstance(result, list) or not all(isinstance(t, list) for t in result):
        return Verdict(False, "multi_turn:inference_error: the result is not a list of turns of step texts")
    if len(result) != len(entry.ground_truth):
        return Verdict(False, f"multi_turn:force_terminated: {len(result)} turns for {len(entry.ground_truth)}")
    model, ground = new_backend_pair(entry, data_dir)
    all_model_results: list[str] = []
    for turn, (steps, truth) in enumerate(zip(result, entry.ground_truth)):
        decoded = [calls for calls in (decode_step(text) for text in steps) if calls]
        for calls in decoded:
            all_model_results.extend(model.execute(call) for call in calls)
        truth_results = [ground.execute(call) for call in ground_truth_calls(truth, ground)]
        if not truth:
            continue
        if not decoded:
            return Verdict(False, f"multi_turn:empty_turn_model_response: no call in turn {turn}", turn)
        diff = _state_difference(model, ground)
        if diff is not None:
            return Verdict(False, f"multi_turn:instance_state_mismatch: {diff} differs after turn {turn}", turn)
        missing = _missing(truth_results, all_model_results)
        if missing:
            return Verdict(False, f"multi_turn:execution_response_mismatch: turn {turn} misses {missing[0][:120]!r}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""), turn)
    return Verdict(True)


def reason_code(reason: str) -> str:
    return reason.split(": ", 1)[0]


def score_results(entries: list[MultiTurnEntry], rows: list[dict], data_dir: str) -> dict:
    """Score {"id", "result"} rows (BFCL's multi-turn result format) -> accuracy, correct, total, per_id, reasons.
    A row may carry "error" (why its episode stopped early, e.g. an over-long prompt): it is counted as the reason."""
    by_id = {e.id: e for e in entries}
    per_id, reasons = {}, {}
    for row in rows:
        rid = row.get("id")
        if rid not in by_id:
            raise MultiTurnDataError(f"result id {rid!r} is not in category "
                                     f"{entries[0].category if entries else '?'}; check the results file")
        if rid in per_id:
            raise MultiTurnDataError(f"result id {rid!r} appears twice in the results file")
        verdict = check_entry(row.get("result"), by_id[rid], data_dir)
        per_id[rid] = verdict.valid
        if not verdict.valid:
            code = reason_code(row["error"]) if row.get("error") else reason_code(verdict.reason)
            reasons[code] = reasons.get(code, 0) + 1
    correct = sum(per_id.values())
    return {"accuracy": correct / len(per_id) if per_id else 0.0, "correct": correct, "total": len(per_id),
            "per_id": per_id, "reasons": reasons}


# ----------------------------------------------------------------------------------------------------
# Episodes: the model talks to the back-ends

def tools_listing(docs: list[dict], tools_as: str) -> str:
    from data.calls import tool_as_python
    if tools_as == "python":
        return "\n\n".join(tool_as_python(d) for d in docs)
    return json.dumps(docs, indent=4)


@dataclass
class Episode:
    """One entry's conversation. `prompt_messages()` is what the model sees next; `advance(text)` feeds its reply:
    calls run on the back-ends and come back as tool messages; a reply without a (decodable) call ends the turn."""
    entry: MultiTurnEntry
    backends: Backends
    prompt_format: PromptFormat = PromptFormat("plain")
    turn: int = 0
    steps_in_turn: int = 0
    messages: list[dict] = field(default_factory=list)
    result: list[list[str]] = field(default_factory=list)   # BFCL's result: per turn, the raw text of each step
    done: bool = False
    error: str = ""        # why the episode stopped early ("" when it ran every turn)

    def __post_init__(self):
        self._start_turn()

    def system_text(self) -> str:
        from data.calls import system_prompt
        fmt = self.prompt_format
        return system_prompt(self.entry.functions_at(0), fmt.answer_format, fmt.tools_as) + "\n" + MULTI_TURN_INSTRUCTION

    def _start_turn(self):
        if self.turn >= len(self.entry.turns):
            self.done = True
            return
        if self.turn in self.entry.held_out:
            content = HELD_OUT_MESSAGE.format(functions=tools_listing(self.entry.held_out[self.turn],
                                                                   self.prompt_format.tools_as))
            new = [{"role": "user", "content": content}]
        else:
            new = [{"role": m["role"], "content": m["content"]} for m in self.entry.turns[self.turn]]
        self.messages.extend(new)
        self.result.append([])
        self.steps_in_turn = 0

    def prompt_messages(self) -> list[dict]:
        messages = [dict(m) for m in self.messages]
        system = self.system_text()
        if messages and messages[0]["role"] == "system":
            system += "\n\n" + messages.pop(0)["content"]
        return [{"role": "system", "content": system}] + messages

    def stop(self, reason: str):
        self.error = reason
        self.done = True

    def advance(self, text: str):
        self.result[-1].append(text)
        self.messages.append({"role": "assistant", "content": text})
        calls = decode_step(text)
        if not calls:
            self.turn += 1
            self._start_turn()
            return
        for call in calls:
            self.messages.append({"role": "tool", "content": self.backends.execute(call)})
        self.steps_in_turn += 1
        if self.steps_in_turn > STEP_LIMIT:
            self.stop(f"multi_turn:force_terminated: more than {STEP_LIMIT} steps in turn {self.turn}")


def render_messages(tokenizer, messages: list[dict], prefill: str = "") -> str:
    """Chat template with the generation prompt; tool messages become user messages for templates without a
    tool role, and the system text moves into the first user turn for templates without a system role."""
    from data.calls import template_has_system_role
    out = [dict(m) for m in messages]
    if not template_has_system_role(tokenizer) and out and out[0]["role"] == "system":
        system = out.pop(0)["content"]
        for m in out:
            if m["role"] == "user":
                m["content"] = system + "\n\n" + m["content"]
                break
    try:
        text = tokenizer.apply_chat_template(out, tokenize=False, add_generation_prompt=True)
    except Exception:
        out = [{"role": "user", "content": "Tool result: " + m["content"]} if m["role"] == "tool" else m for m in out]
        text = tokenizer.apply_chat_template(out, tokenize=False, add_generation_prompt=True)
    return text + prefill


def context_limit(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


CACHE_BYTES = 8 << 30  # KV caches kept between steps, all episodes together (a 7B model holds ~57 KB per token)


def run_episodes(model, tokenizer, entries: list[MultiTurnEntry], data_dir: str,
                 prompt_format: PromptFormat = PromptFormat("plain"), max_new_tokens: int = 256, batch_size: int = 16,
                 greedy: bool = True, temperature: float = 0.7, seed: int = 0, stop_at_answer: bool = False,
                 bar=None, reuse_cache: bool = True) -> list[dict]:
    """Run every entry's episode; episodes advance in lockstep, one generate call per step across the episodes
    still open. -> rows {"id", "result"} (+ "error" when an episode stopped early), in entry order.
    A prompt that does not fit the model's context with max_new_tokens to spare stops its episode with a reason
    (the result then has fewer turns than the ground truth, which BFCL scores as force-terminated).
    reuse_cache: keep each open episode's KV cache between steps (up to CACHE_BYTES in all), so that a step encodes
    only the tokens its conversation gained (the tool results, the next user turn), not the whole conversation."""
    from eval.bfcl import generate_texts

    episodes = []
    for entry in entries:
        model_side, _ = new_backend_pair(entry, data_dir)
        episodes.append(Episode(entry, model_side, prompt_format))
    prefill = prompt_format.prefill
    limit = context_limit(model)
    step = 0
    kv = {}  # episode -> what the model holds of its conversation (a step encodes only what was added since)
    while True:
        open_episodes = [e for e in episodes if not e.done]
        if not open_episodes:
            break
        ready, prompts = [], []
        for episode in open_episodes:
            prompt = render_messages(tokenizer, episode.prompt_messages(), prefill)
            n_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
            if limit is not None and n_tokens + max_new_tokens > limit:
                episode.stop(f"prompt_too_long: {n_tokens} prompt tokens + {max_new_tokens} new tokens exceed the "
                             f"model's {limit}-token context at turn {episode.turn} (try --tools-as python)")
                continue
            ready.append(episode)
            prompts.append(prompt)
        if not ready:
            continue
        caches = [kv.pop(id(e), None) for e in ready] if reuse_cache else None
        texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, greedy=greedy,
                               temperature=temperature, seed=seed + step, stop_at_answer=stop_at_answer,
                               prefill=prefill, caches=caches)
        step += 1
        held = 0
        for n, (episode, text) in enumerate(zip(ready, texts)):
            episode.advance(prefill + text)
            kept = caches[n] if caches is not None and not episode.done else None
            size = sum(t.numel() * t.element_size() for t in kept.kv) if kept is not None else 0
            if kept is not None and held + size <= CACHE_BYTES:
                kv[id(episode)] = kept  # over the budget: that episode's next step encodes it all again
                held += size
            if episode.done and bar is not None:
                bar.update(1)
    rows = []
    for episode in episodes:
        row = {"id": episode.entry.id, "result": episode.result}
        if episode.error:
            row["error"] = episode.error
        rows.append(row)
    return rows


def select_entries(entries: list[MultiTurnEntry], limit: int | None, seed: int = 0) -> list[MultiTurnEntry]:
    """The fixed random subset of `run --limit` (eval.bfcl.select_subset: the single-turn categories' draw)."""
    from eval.bfcl import select_subset  # (eval.bfcl imports this module: a call-time import)
    return select_subset(entries, limit, seed)


# ----------------------------------------------------------------------------------------------------
# Used by eval/bfcl.py (run / score / report) and by train.py's --eval-bfcl

def read_result_rows(path: str) -> list[dict]:
    """A multi-turn result file: one {"id", "result": [[step text, ...] per turn]} JSON object per line (read like
    every results file: eval.bfcl's reader, a byte-order mark allowed, file:line in errors)."""
    from eval.bfcl import _read_jsonl
    if not os.path.exists(path):
        raise MultiTurnDataError(f"results file {path} does not exist")
    rows = []
    for n, row in _read_jsonl(path, "results"):
        if not isinstance(row, dict) or "id" not in row or "result" not in row:
            raise MultiTurnDataError(f'{path}:{n} must be {{"id": ..., "result": [[step texts] per turn]}}')
        rows.append(row)
    return rows


def score_file(category: str, path: str, data_dir: str) -> dict:
    return score_results(load_multi_turn(category, data_dir), read_result_rows(path), data_dir)


def run_category(model, tokenizer, category: str, entries: list[MultiTurnEntry], data_dir: str, out_path: str,
                 settings: dict, batch_size: int, greedy: bool = True, temperature: float = 0.7, seed: int = 0,
                 bar=None) -> None:
    """Episodes for one category's entries, written to out_path in BFCL's multi-turn result format."""
    prompt_format = PromptFormat(settings["answer_format"], settings["tools_as"], settings["prefill"])
    rows = run_episodes(model, tokenizer, entries, data_dir, prompt_format, max_new_tokens=settings["max_new_tokens"], batch_size=batch_size, greedy=greedy,
                        temperature=temperature, seed=seed, stop_at_answer=settings.get("stop_at_answer", False),
                        bar=bar)
    with open(out_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def evaluate_multi_turn(model, tokenizer, categories: list[str], limit: int, data_dir: str, rank: int = 0,
                        world: int = 1, all_reduce=lambda t: t, prompt_format: PromptFormat = PromptFormat("plain"),
                        max_new_tokens: int = 256, batch_size: int = 16) -> dict:
    """Greedy accuracy per multi-turn category on the fixed subset select_entries(entries, limit), entries sharded
    [rank::world]. Each rank runs its episodes on its own (no collective inside, so ranks may finish at different
    times) and then joins exactly one all_reduce of the [correct, total] counts. -> {category: accuracy}."""
    import torch
    entries = []
    for category in categories:
        entries += select_entries(load_multi_turn(category, data_dir), limit)[rank::world]
    rows = run_episodes(model, tokenizer, entries, data_dir, prompt_format, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, stop_at_answer=prompt_format.answer_format == "think") if entries else []
    counts = torch.zeros(len(categories), 2, dtype=torch.float64)
    for entry, row in zip(entries, rows):
        c = categories.index(entry.category)
        counts[c, 0] += float(check_entry(row["result"], entry, data_dir).valid)
        counts[c, 1] += 1
    counts = all_reduce(counts)
    return {cat: (counts[c, 0] / counts[c, 1].clamp(min=1)).item() for c, cat in enumerate(categories)}
