"""Data preparation: convert function-calling data into canonical records, validate the reference
calls against the tool schemas (AST stage), let a judge model check and correct them (LLM stage),
and split into train/val.

    python -m data.prepare --input xlam_function_calling_60k.json --out data/xlam --judge-model M --rounds 2
    python -m data.prepare --input a.jsonl b.jsonl --out DIR --skip-llm
    python -m data.prepare --input ... --out DIR --judge-url http://host:8000/v1 --judge-model M   # a served judge

Input formats (auto-detected per record, or forced with --format):
  xlam      xLAM / APIGen rows: "query", "tools" and "answers" (the last two JSON strings or lists)
  bfcl      BFCL question rows ("question", "function"); the reference answer comes from
            possible_answer/<same file name> next to the file (first allowed value of each parameter)
  hermes    chats ("conversations" or "messages") whose first assistant turn holds <tool_call>{json}</tool_call>
            blocks (Hermes, ToolACE); tools from a "tools" field or a <tools>...</tools> block in the system
            prompt; a Python-style call list "[f(a=1)]" is read too
  canonical records already in the canonical format (see data/validate.py)
Input files are JSON lines, or one JSON array (as xLAM ships), UTF-8 with or without a byte-order mark.

Outputs in DIR: train.jsonl, val.jsonl (split by a hash of the id), rejects.jsonl (each with the stage
and reason), stats.json (counts per stage and reason, and the overlap with BFCL), run.json (the settings),
bfcl_overlap.jsonl (records that overlap BFCL, see data/overlap.py) and, with --judge-url, judge_cache.jsonl
(every reply received, see data/judge.py). Every input record lands in exactly one of train, val or rejects,
whatever it holds: an error raised while handling one record rejects that record and the run goes on. Outputs
are written append-only, one flushed line per
record; rerunning the same command after an interruption skips the ids already written.
"""
from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

from data.calls import CallSyntaxError, parse_python_calls
from data.judge import JudgeUnavailable, ServerJudge
from data.overlap import report_outputs
from data.validate import (RecordError, check_structure, infer_category, json_loads, load_records,  # noqa: F401
                           normalize_tool, validate_calls, validate_record)

FORMATS = ("auto", "xlam", "bfcl", "hermes", "canonical")
OUTPUT_FILES = ("train.jsonl", "val.jsonl", "rejects.jsonl")


# ============================================================================ reading

def read_items(path):
    """Yield (where, obj, error) for each record of a JSONL file or a JSON-array file (a byte-order mark is
    skipped). A record that cannot be read gives obj=None and a RecordError; reading goes on."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read().removeprefix(codecs.BOM_UTF8)
    except OSError as e:
        yield f"{path}:0", None, RecordError("read:unreadable", f"cannot open {path}: {e.strerror}")
        return
    if _is_json_array(data):  # one JSON array (xLAM ships that way), else JSON lines
        yield from _array_items(path, data)
        return
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            yield where, None, RecordError("read:not-utf8", f"byte {e.start}: {e.reason}")
            continue
        try:
            yield where, json_loads(text), None
        except ValueError as e:
            yield where, None, RecordError("read:bad-json", str(e))


def _is_json_array(data: bytes) -> bool:
    """A file starting with '[' is one JSON array unless its first line is a complete JSON value with more
    lines after it (JSON lines whose records are arrays)."""
    body = data.lstrip()
    if body[:1] != b"[":
        return False
    first, _, rest = body.partition(b"\n")
    if not rest.strip():
        return True
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        return True
    return False


def _array_items(path: str, data: bytes):
    """The elements of a JSON array, decoded one by one, so that a bad element (too deep, an over-long number,
    bytes that are not UTF-8 inside a string) is rejected alone and reading goes on after it."""
    text = data.decode("utf-8", errors="surrogateescape")  # bad bytes in a string: the record check rejects it
    decoder, ws = json.JSONDecoder(), re.compile(r"\s*")
    pos, i = ws.match(text, text.index("[") + 1).end(), 0
    if text.startswith("]", pos):
        return
    while True:
        where = f"{path}:[{i}]"
        try:
            obj, end = decoder.raw_decode(text, pos)
            item = (where, obj, None)
        except (ValueError, RecursionError) as e:
            why = (e.msg if isinstance(e, json.JSONDecodeError) else
                   "nested too deeply" if isinstance(e, RecursionError) else "a number with too many digits")
            end, item = _value_end(text, pos), (where, None, RecordError("read:bad-json", f"{why} at character {pos}"))
        yield item
        pos = ws.match(text, end).end()
        i += 1
        if text.startswith("]", pos) and not text[pos + 1:].strip():
            return
        if not text.startswith(",", pos):
            yield f"{path}:[{i}...]", None, RecordError(
                "read:bad-json", f"expected ',' or the closing ']' at character {pos}: the rest of the array "
                                 "cannot be read (fix the file, or write it as JSON lines)")
            return
        pos = ws.match(text, pos + 1).end()


def _value_end(text: str, pos: int) -> int:
    """Where the JSON value starting at pos ends, by bracket matching (strings skipped): to go on after an
    element the decoder refused. Stops before a ',' or a closing bracket at the value's own level."""
    depth, n = 0, len(text)
    while pos < n:
        c = text[pos]
        if c == '"':
            pos += 1
            while pos < n and text[pos] != '"':
                pos += 2 if text[pos] == "\\" else 1
        elif c in "[{":
            depth += 1
        elif c in "]}":
            if depth == 0:
                return pos
            depth -= 1
            if depth == 0:
                return pos + 1
        elif c == "," and depth == 0:
            return pos
        pos += 1
    return n


def count_items(path) -> int:
    """Records in a file, for the progress bar."""
    try:
        with open(path, "rb") as f:
            data = f.read().removeprefix(codecs.BOM_UTF8)
    except OSError:
        return 1
    if _is_json_array(data):
        return sum(1 for _ in _array_items(str(path), data))
    return sum(1 for line in data.split(b"\n") if line.strip())


# ============================================================================ converters

def detect_format(raw) -> str:
    if isinstance(raw, dict):
        if "question" in raw and "function" in raw:
            return "bfcl"
        if "query" in raw and "answers" in raw:
            return "xlam"
        if "messages" in raw and "answers" in raw:
            return "canonical"
        if "conversations" in raw or "messages" in raw:
            return "hermes"
    keys = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
    raise RecordError("convert:unknown-format", f"cannot tell the format from {keys}; pass --format")


def convert(raw, fmt: str, path: str) -> dict:
    """One input object -> canonical record (id may be None: the caller assigns a positional one)."""
    if not isinstance(raw, dict):
        raise RecordError("convert:not-an-object", f"expected a JSON object, got {type(raw).__name__}")
    if fmt == "auto":
        fmt = detect_format(raw)
    try:
        if fmt == "xlam":
            return from_xlam(raw)
        if fmt == "bfcl":
            return from_bfcl(raw, bfcl_ground_truth(path))
        if fmt == "hermes":
            return from_hermes(raw)
        rec = dict(raw)
        rec["tools"] = [normalize_tool(t) for t in _as_list(rec.get("tools"), "tools")]
        rec.setdefault("category", infer_category(rec["tools"], rec.get("answers") or []))
        return rec
    except RecordError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise RecordError(f"convert:{fmt}-fields", f"{type(e).__name__}: {e}") from None


def _as_list(value, field: str) -> list:
    """A list, or a JSON string holding one (xLAM stores tools and answers as strings)."""
    if isinstance(value, str):
        try:
            value = json_loads(value)
        except ValueError as e:
            raise RecordError(f"convert:{field}-not-json", str(e)) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(f"convert:{field}-type", f"field {field!r} must be a list, got {type(value).__name__}")
    return value


def _call(c) -> dict:
    """{"name", "arguments"} from the spellings in the wild ("parameters", OpenAI's nested "function")."""
    if isinstance(c, dict) and isinstance(c.get("function"), dict) and "name" not in c:
        c = c["function"]
    if not isinstance(c, dict) or "name" not in c:
        raise RecordError("convert:bad-call", f"not a call: {c!r:.120}")
    args = c.get("arguments", c.get("parameters", {}))
    return {"name": c["name"], "arguments": args}


def from_xlam(raw: dict) -> dict:
    if not isinstance(raw["query"], str):
        raise RecordError("convert:xlam-fields", f"'query' must be a string, got {type(raw['query']).__name__}")
    tools = [normalize_tool(t) for t in _as_list(raw["tools"], "tools")]
    answers = [_call(c) for c in _as_list(raw["answers"], "answers")]
    return {"id": None if raw.get("id") is None else f"xlam-{raw['id']}",
            "messages": [{"role": "user", "content": raw["query"]}], "tools": tools, "answers": answers,
            "category": infer_category(tools, answers), "source": "xlam"}


_BFCL_GT_CACHE: dict = {}


def bfcl_ground_truth(path: str) -> dict:
    """id -> ground_truth from possible_answer/<name> next to a BFCL question file ({} if absent)."""
    p = Path(path)
    answer_file = p.parent / "possible_answer" / p.name
    key = str(answer_file)
    if key not in _BFCL_GT_CACHE:
        table = {}
        if answer_file.is_file():
            for _, obj, err in read_items(answer_file):
                if err is None and isinstance(obj, dict) and "id" in obj:
                    table[obj["id"]] = obj.get("ground_truth")
        _BFCL_GT_CACHE[key] = table
    return _BFCL_GT_CACHE[key]


def bfcl_category(bfcl_id: str) -> str:
    prefix = re.split(r"_\d", bfcl_id, maxsplit=1)[0]
    prefix = prefix[5:] if prefix.startswith("live_") else prefix
    if prefix.startswith("simple"):
        return "simple"
    return prefix


def from_bfcl(raw: dict, ground_truth: dict) -> dict:
    question = raw["question"]
    turns = question if question and isinstance(question[0], list) else [question]
    messages = [{"role": m["role"], "content": m["content"]} for turn in turns for m in turn]
    tools = [normalize_tool(f) for f in _as_list(raw["function"], "function")]
    cat = bfcl_category(str(raw["id"]))
    if cat == "irrelevance":
        answers = []
    elif cat not in ("simple", "multiple", "parallel", "parallel_multiple"):
        raise RecordError("convert:bfcl-category", f"{raw['id']}: only single-turn AST categories convert "
                                                   "(relevance has no reference call, multi-turn is stateful)")
    else:
        gt = ground_truth.get(raw["id"])
        if gt is None:
            raise RecordError("convert:no-ground-truth",
                              f"{raw['id']} has no entry in possible_answer/ next to the question file")
        answers = []
        for entry in gt:
            (fname, allowed), = entry.items()
            # first allowed value of each parameter; a first value of "" means "may be omitted"
            args = {k: _first_allowed(v[0]) for k, v in allowed.items() if isinstance(v, list) and v and v[0] != ""}
            answers.append({"name": fname, "arguments": args})
    return {"id": str(raw["id"]), "messages": messages, "tools": tools, "answers": answers,
            "category": infer_category(tools, answers), "source": "bfcl"}


def _first_allowed(value):
    """Nested dict values in BFCL answers are {key: [allowed, ...]} again (usually): unwrap recursively."""
    if isinstance(value, dict):
        if value and all(isinstance(v, list) for v in value.values()):
            return {k: _first_allowed(v[0]) for k, v in value.items() if v and v[0] != ""}
        return value
    if isinstance(value, list):
        return [_first_allowed(v) for v in value]
    return value


_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system", "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
         "function_response": "tool"}
_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_TOOLS_RE = re.compile(r"<tools>(.*?)</tools>", re.S)
_JSON_START_RE = re.compile(r"[\[{]")


def _json_values(text: str) -> list:
    """All JSON values written one after another in `text` (a list, or objects separated by newlines)."""
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        m = _JSON_START_RE.search(text, i)
        if m is None:
            return out
        try:
            value, i = dec.raw_decode(text, m.start())
        except RecursionError:  # nested deeper than the decoder goes: no tool list from here on
            return out
        except ValueError:
            i = m.start() + 1
            continue
        out.extend(value if isinstance(value, list) else [value])


def from_hermes(raw: dict) -> dict:
    chat = raw.get("conversations") or raw.get("messages")
    if not isinstance(chat, list):
        raise RecordError("convert:hermes-fields", "'conversations'/'messages' must be a list of turns")
    turns = []
    for m in chat:
        role = _ROLE.get(str(m.get("from", m.get("role", ""))).lower())
        content = m.get("value", m.get("content"))
        if role is None or not isinstance(content, str):
            raise RecordError("convert:hermes-fields", f"turn is not a chat message: {m!r:.120}")
        turns.append({"role": role, "content": content})
    tools_src, tools_turn = raw.get("tools"), None
    if tools_src is None:  # look in the system prompt: a <tools> block, else the first JSON value
        sources = ([(None, raw["system"])] if isinstance(raw.get("system"), str) else []) + \
                  [(i, t["content"]) for i, t in enumerate(turns) if t["role"] == "system"]
        for i, text in sources:
            block = _TOOLS_RE.search(text)
            found = _json_values(block.group(1) if block else text)
            if found:
                tools_src, tools_turn = found, i
                break
    if not tools_src:
        raise RecordError("convert:no-tools", "no tools: neither a 'tools' field nor a <tools> block / JSON "
                                              "list in the system prompt")
    tools = [normalize_tool(t) for t in _as_list(tools_src, "tools")]
    first = next((i for i, t in enumerate(turns) if t["role"] == "assistant"), None)
    if first is None:
        raise RecordError("convert:no-assistant-turn", "the chat has no assistant turn to take the answer from")
    reply = turns[first]["content"]
    blocks = _TOOL_CALL_RE.findall(reply)
    if blocks:
        answers = []
        for b in blocks:
            try:
                answers.append(_call(json_loads(b.strip())))
            except ValueError as e:
                raise RecordError("convert:bad-tool-call", f"<tool_call> block: {e}") from None
    else:
        answers = parse_call_list(reply) or []  # ToolACE writes "[f(a=1)]"; plain text = no call
    # the system turn that carried the tools is dropped: the trainer writes its own system prompt
    messages = [t for i, t in enumerate(turns[:first])
                if not (t["role"] == "system" and (i == tools_turn or _TOOLS_RE.search(t["content"])))]
    return {"id": None if raw.get("id") is None else str(raw["id"]), "messages": messages, "tools": tools,
            "answers": answers, "category": infer_category(tools, answers), "source": "hermes"}


def parse_call_list(text: str):
    """A list of calls written as JSON ([{"name", "arguments"}]) or Python-style ([f(a=1), g.h(b='x')]),
    or None. Python is read by data.calls' parser with literal values only: nothing is ever executed."""
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").split("\n", 1)[-1] if "\n" in text else text.strip("`")
        text = text.strip().rstrip("`").strip()
    if not text:
        return None
    if text[0] in "[{":
        try:
            value = json_loads(text)
            value = value if isinstance(value, list) else [value]
            return [_call(c) for c in value]
        except (ValueError, RecordError):
            pass
    try:
        return parse_python_calls(text, literal_only=True)
    except CallSyntaxError:
        return None


# ============================================================================ LLM evaluation

JUDGE_SYSTEM = """You review training examples for function calling. You get the available tools (JSON \
schemas), a conversation and a proposed answer: the list of function calls that should answer the last \
user message. An empty list [] means that none of the tools fits the request.
Answer two questions:
1. Can the user's request be solved with these tools?
2. Are the function(s) and all parameter values of the proposed answer right for the request?
Reply in exactly this format and nothing else:
SOLVABLE: yes or no
CORRECT: yes or no
ANSWER: the corrected list of calls as JSON, [{"name": ..., "arguments": {...}}] (only when CORRECT is no)"""

_VERDICT_RE = {key: re.compile(rf"^[ \t]*{key}:[ \t]*(yes|no)[ \t.]*$", re.I | re.M) for key in ("SOLVABLE", "CORRECT")}
_ANSWER_RE = re.compile(r"^[ \t]*ANSWER:(.*)", re.I | re.M | re.S)


def judge_messages(rec: dict) -> list[dict]:
    chat = "\n".join(f"{m['role']}: {m['content']}" for m in rec["messages"])
    user = (f"Tools:\n{json.dumps(rec['tools'], ensure_ascii=False)}\n\nConversation:\n{chat}\n\n"
            f"Proposed answer:\n{json.dumps(rec['answers'], ensure_ascii=False)}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> dict:
    """Strict reading of a judge reply -> {"solvable", "correct", "answer", "error"}.
    Anything but exactly one SOLVABLE and one CORRECT line counts as "no" with error "judge:unparseable"."""
    if not isinstance(text, str):
        return {"solvable": None, "correct": False, "answer": None, "error": "judge:unparseable"}
    found = {}
    for key, rx in _VERDICT_RE.items():
        hits = rx.findall(text)
        if len(hits) != 1:
            return {"solvable": None, "correct": False, "answer": None, "error": "judge:unparseable"}
        found[key] = hits[0].lower() == "yes"
    m = _ANSWER_RE.search(text)
    answer = parse_call_list(m.group(1)) if m else None
    error = None
    if not found["CORRECT"] and answer is None:
        error = "judge:bad-correction" if m and m.group(1).strip() else "judge:no-correction"
    return {"solvable": found["SOLVABLE"], "correct": found["CORRECT"], "answer": answer, "error": error}


def llm_stage(records: list[dict], judge, rounds: int = 2) -> list:
    """Judge each record; on "no" take the judge's corrected answer (after AST validation) and ask again,
    up to `rounds` corrections; answers still not confirmed get one final judgement.
    judge: callable(list of chat-message lists) -> list of reply texts.
    Returns, per record in order, (record, None) when kept or (None, (stage, reason, detail)) when rejected."""
    results: list = [None] * len(records)
    state = [{"rounds": 0, "corrected": False} for _ in records]
    pending = list(range(len(records)))
    for r in range(rounds + 1):
        final = r == rounds
        if not pending:
            break
        replies = judge([judge_messages(records[i]) for i in pending])
        if len(replies) != len(pending):
            raise RuntimeError(f"the judge returned {len(replies)} replies for {len(pending)} prompts")
        still = []
        stage = "llm-final" if final else "llm"
        for i, reply in zip(pending, replies):
            rec, v = records[i], parse_verdict(reply)
            reply = str(reply)
            state[i]["rounds"] = r + 1
            if v["error"] == "judge:unparseable":
                results[i] = (None, (stage, "judge:unparseable", f"round {r + 1}: {reply[:300]!r}"))
            elif v["solvable"] is False and rec["answers"]:
                results[i] = (None, (stage, "judge:unsolvable", f"round {r + 1}: the tools cannot solve the query"))
            elif v["correct"]:
                results[i] = (_with_prep(rec, state[i]), None)
            elif final:
                results[i] = (None, (stage, "judge:no", f"final pass: answer still judged wrong after {rounds} "
                                                        "correction round(s)"))
            elif v["error"]:
                results[i] = (None, (stage, v["error"], f"round {r + 1}: {reply[:300]!r}"))
            else:
                try:
                    fixed, _ = validate_calls(v["answer"], rec["tools"])
                except Exception as e:  # whatever the correction holds, it rejects this record only
                    e = as_record_error(e, "ast")
                    results[i] = (None, (stage, "judge:correction-" + e.reason, f"round {r + 1}: {e.detail}"))
                    continue
                rec["answers"] = fixed
                rec["category"] = infer_category(rec["tools"], fixed)
                rec.pop("reasoning", None)  # a templated reasoning text no longer matches the answer
                state[i]["corrected"] = True
                still.append(i)
        pending = still
    return results


def _with_prep(rec: dict, state: dict) -> dict:
    prep = rec.setdefault("prep", {})
    prep["judge_rounds"] = state["rounds"]
    if state["corrected"]:
        prep["corrected"] = True
    return rec


def hf_judge(model, tokenizer, max_new_tokens: int = 384, seed: int = 0):
    """A judge callable on any HF causal LM, generating greedily in one batch with the project's sampler."""
    from data.calls import template_has_system_role
    from model.sample import sample  # imported here: only a judge model needs the sampler

    merge_system = not template_has_system_role(tokenizer)

    def judge(prompts: list[list[dict]]) -> list[str]:
        prompt_ids = []
        for messages in prompts:
            if merge_system and messages[0]["role"] == "system":  # e.g. Gemma's template has no system turn
                messages = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]},
                            *messages[2:]]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        out = sample(model, tokenizer, prompt_ids, group_size=1, max_new_tokens=max_new_tokens, greedy=True,
                     seed=seed)
        return list(out.texts)

    return judge


# ============================================================================ the pipeline

def split_of(rec_id: str, val_fraction: float) -> str:
    """Deterministic train/val assignment from a hash of the id (stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha1(rec_id.encode("utf-8")).digest()[:8], "big")
    return "val" if h < val_fraction * 2 ** 64 else "train"


def _repair_tail(path: Path) -> None:
    """Cut a half-written last line (the process died mid-write) so the file stays valid JSONL."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def _done_ids(out: Path) -> set:
    done = set()
    for name in OUTPUT_FILES:
        path = out / name
        _repair_tail(path)
        if path.is_file():
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        done.add(json.loads(line)["id"])
    return done


def prepare(inputs, out_dir, fmt: str = "auto", judge=None, rounds: int = 2, val_fraction: float = 0.05,
            batch_size: int = 16, settings: dict | None = None, progress: bool = True, on_record=None) -> dict:
    """Run the pipeline over `inputs` into `out_dir`; returns the statistics (also written to stats.json).
    judge: None skips the LLM stage (see llm_stage for the callable). on_record(id) is called after each
    record is written (tests use it to simulate an interruption)."""
    from tqdm import tqdm

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    inputs = [str(p) for p in inputs]
    names = [Path(p).name for p in inputs]
    if len(set(names)) != len(names):
        raise SystemExit("input files must have distinct file names (record ids without an 'id' field are "
                         f"built from the file name): {names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"format": fmt, "rounds": rounds if judge else None, "llm": judge is not None,
                "val_fraction": val_fraction, **(settings or {})}
    run_file = out / "run.json"
    if run_file.is_file():
        old = json.loads(run_file.read_text())
        if old != settings:
            raise SystemExit(f"{out} holds a run with other settings ({old}); resuming would mix them. "
                             "Use a new --out directory, or delete this one.")
    else:
        run_file.write_text(json.dumps(settings, indent=1) + "\n")
    done = _done_ids(out)
    files = {name: open(out / name, "a", encoding="utf-8") for name in OUTPUT_FILES}
    seen: set = set()
    this_run = Counter()
    t0 = time.time()
    total = sum(count_items(p) for p in inputs)
    bar = tqdm(total=total, unit="rec", desc="prepare", disable=not progress, dynamic_ncols=True)

    def report(msg: str) -> None:  # unreadable input is named on stderr (the first 20), all go to rejects
        this_run["reported"] += 1
        if this_run["reported"] <= 20:
            tqdm.write(msg, file=sys.stderr)
        elif this_run["reported"] == 21:
            tqdm.write(f"... more unreadable records: see {out / 'rejects.jsonl'}", file=sys.stderr)

    def write(name: str, rec_id: str, line: str) -> None:
        files[name].write(line + "\n")
        files[name].flush()
        this_run["written"] += 1
        if on_record is not None:
            on_record(rec_id)

    def reject(rec_id, where, stage, reason, detail, record) -> None:
        write("rejects.jsonl", rec_id, reject_line({"id": rec_id, "where": where, "stage": stage, "reason": reason,
                                                    "detail": str(detail)[:MAX_DETAIL_CHARS], "record": record}))

    def keep(rec: dict, where: str) -> None:
        try:
            line = check_structure(rec)  # again: a repair or a correction can make a record unreadable
        except RecordError as e:
            reject(rec["id"], where, "write", e.reason, e.detail, None)
            return
        write(split_of(rec["id"], val_fraction) + ".jsonl", rec["id"], line)

    batch: list = []  # (record, where) waiting for the judge

    def flush_batch() -> None:
        if not batch:
            return
        results = llm_stage([r for r, _ in batch], judge, rounds)
        for (rec, where), (kept, rej) in zip(batch, results):
            if kept is not None:
                keep(kept, where)
            else:
                reject(rec["id"], where, *rej, rec)
        batch.clear()

    try:
        for path in inputs:
            stem = Path(path).name
            for where, raw, err in read_items(path):
                bar.update(1)
                this_run["seen"] += 1
                fallback_id = f"{stem}:{where.rsplit(':', 1)[1]}"
                if err is not None:
                    if fallback_id not in done:
                        reject(fallback_id, where, "read", err.reason, err.detail, None)
                        report(f"{where}: {err}")
                    continue
                try:
                    rec = convert(raw, fmt, path)
                    rec["id"] = fallback_id if rec.get("id") is None else str(rec["id"])
                except Exception as e:  # whatever a record holds, it is rejected alone: the run goes on
                    e = as_record_error(e, "convert")
                    if fallback_id not in done:  # positional id: unconvertible records have no trusted id
                        reject(fallback_id, where, "convert", e.reason, e.detail, raw)
                        report(f"{where}: {e}")
                    continue
                if rec["id"] in seen:  # same id twice in the input: the first one counts
                    dup_id = f"{rec['id']}@{fallback_id}"
                    if dup_id not in done:
                        reject(dup_id, where, "dedup", "dedup:duplicate-id", f"id {rec['id']!r} seen before", rec)
                    continue
                seen.add(rec["id"])
                if rec["id"] in done:
                    this_run["skipped_done"] += 1
                    continue
                try:
                    check_structure(rec)
                    repairs = validate_record(rec)
                except Exception as e:
                    e = as_record_error(e, "ast")
                    reject(rec["id"], where, "ast", e.reason, e.detail, rec)
                    continue
                if repairs:
                    rec["prep"] = {"repairs": repairs}
                if judge is None:
                    keep(rec, where)
                else:
                    batch.append((rec, where))
                    if len(batch) >= batch_size:
                        flush_batch()
        flush_batch()
    finally:
        bar.close()
        for f in files.values():
            f.close()
    stats = compute_stats(out)
    seconds = time.time() - t0
    stats["this_run"] = {**this_run, "seconds": round(seconds, 2),
                         "records_per_s": round(this_run["seen"] / max(seconds, 1e-9), 1)}
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats


MAX_DETAIL_CHARS = 500  # a reject's detail is cut to this length


def as_record_error(e: Exception, stage: str) -> RecordError:
    """An exception raised while handling one record, as that record's rejection (never fatal to the run)."""
    if isinstance(e, RecordError):
        return e
    return RecordError(f"{stage}:unexpected", f"{type(e).__name__}: {str(e)[:MAX_DETAIL_CHARS]}")


def reject_line(obj: dict) -> str:
    """A rejects.jsonl line, whatever the rejected record holds: lone surrogates are written as \\u escapes,
    a record that is not JSON at all is left out (the detail says so)."""
    try:
        line = json.dumps(obj, ensure_ascii=False)
        line.encode("utf-8")
        return line
    except UnicodeEncodeError:
        return json.dumps(obj)
    except (TypeError, ValueError, RecursionError) as e:
        return json.dumps({**obj, "record": None, "detail": f"{obj['detail']} (record not stored: {type(e).__name__})"})


def compute_stats(out_dir) -> dict:
    """Counts over the output files (so they stay right across resumed runs)."""
    out = Path(out_dir)
    stats = {"train": 0, "val": 0, "rejected": 0}
    by_stage, by_reason, repairs, cats, corrected = Counter(), Counter(), Counter(), Counter(), 0
    for name in OUTPUT_FILES:
        path = out / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if name == "rejects.jsonl":
                    stats["rejected"] += 1
                    by_stage[obj["stage"]] += 1
                    by_reason[obj["reason"]] += 1
                    continue
                split = name.split(".")[0]
                stats[split] += 1
                cats[f"{split}/{obj['category']}"] += 1
                prep = obj.get("prep") or {}
                for r in prep.get("repairs", ()):
                    repairs[r.split(":", 1)[0]] += 1
                corrected += bool(prep.get("corrected"))
    stats["total"] = stats["train"] + stats["val"] + stats["rejected"]
    stats.update(rejected_by_stage=dict(by_stage), rejected_by_reason=dict(by_reason), repairs=dict(repairs),
                 categories=dict(cats), judge_corrected=corrected)
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="input files (JSON lines or one JSON array)")
    ap.add_argument("--out", required=True, help="output directory (created; rerun to resume)")
    ap.add_argument("--format", default="auto", choices=FORMATS)
    ap.add_argument("--judge-model", default=None,
                    help="HF causal LM (id or directory) that judges and corrects the samples; "
                         "smollm2-135m runs on CPU but only exercises the path. With --judge-url: the served "
                         "model's name")
    ap.add_argument("--judge-url", default=None,
                    help="OpenAI-compatible server (vLLM, SGLang, llama.cpp, a hosted API), e.g. "
                         "http://localhost:8000/v1: judge with it instead of loading a model here")
    ap.add_argument("--judge-concurrency", type=int, default=8, help="--judge-url: requests in flight")
    ap.add_argument("--judge-timeout", type=float, default=120.0, help="--judge-url: seconds per request")
    ap.add_argument("--judge-retries", type=int, default=6,
                    help="--judge-url: retries (exponential backoff) on 429, 5xx, timeouts and malformed replies")
    ap.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                    help="--judge-url: environment variable holding the API key (sent as a bearer token if set; "
                         "never written anywhere)")
    ap.add_argument("--rounds", type=int, default=2, help="correction rounds K before the final judgement")
    ap.add_argument("--skip-llm", action="store_true", help="AST validation only")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--judge-batch", type=int, default=None,
                    help="records judged together (default 16; with --judge-url 4 x --judge-concurrency)")
    ap.add_argument("--judge-max-new-tokens", type=int, default=384)
    ap.add_argument("--device", default=None, help="local judge model only: auto (default), cpu, cuda")
    ap.add_argument("--bfcl-data", default=None,
                    help="BFCL data folder for the overlap report (default: the installed bfcl-eval package)")
    ap.add_argument("--drop-bfcl-overlap", action="store_true",
                    help="move records that overlap BFCL from train/val to rejects (stage bfcl-overlap)")
    args = ap.parse_args(argv)
    if not args.skip_llm and not args.judge_model:
        ap.error("choose a judge with --judge-model (a strong model on GPU, or the served model's name with "
                 "--judge-url; smollm2-135m only exercises the path on CPU) or pass --skip-llm for AST "
                 "validation only")
    if args.judge_url and args.device is not None:
        ap.error("--device applies to a local judge model; with --judge-url the server decides (drop --device)")
    for p in args.input:
        if not os.path.isfile(p):
            ap.error(f"input file not found: {p}")
    judge = None
    if not args.skip_llm and args.judge_url:
        try:
            judge = ServerJudge(args.judge_url, args.judge_model, concurrency=args.judge_concurrency,
                                timeout=args.judge_timeout, retries=args.judge_retries,
                                max_tokens=args.judge_max_new_tokens, api_key_env=args.judge_api_key_env,
                                cache_path=Path(args.out) / "judge_cache.jsonl")
        except ValueError as e:
            ap.error(str(e))
        Path(args.out).mkdir(parents=True, exist_ok=True)
    elif not args.skip_llm:
        from model.load import load  # the judge model is loaded only when asked for
        model, tokenizer = load(args.judge_model, device=args.device or "auto")
        judge = hf_judge(model.eval(), tokenizer, max_new_tokens=args.judge_max_new_tokens)
    batch = args.judge_batch or (4 * args.judge_concurrency if args.judge_url else 16)
    # the server's address may change between reruns (a restarted server); the judge model may not
    settings = {"judge_model": args.judge_model, **({"judge_server": True} if args.judge_url else {})}
    try:
        stats = prepare(args.input, args.out, fmt=args.format, judge=judge, rounds=args.rounds,
                        val_fraction=args.val_fraction, batch_size=batch, settings=settings)
    except JudgeUnavailable as e:
        raise SystemExit(f"judge server: {e}. Every record written so far is kept, and every reply received is "
                         f"cached in {Path(args.out) / 'judge_cache.jsonl'}: rerun the same command to resume.")
    stats = report_outputs(args.out, stats, bfcl_dir=args.bfcl_data, drop=args.drop_bfcl_overlap)
    if args.judge_url:
        stats["this_run"]["judge_server"] = judge.counters.as_dict()
        print(f"[judge] {args.judge_url}: {judge.counters.as_dict()}")
    (Path(args.out) / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: stats[k] for k in ("total", "train", "val", "rejected", "rejected_by_reason",
                                            "repairs", "judge_corrected")}))


if __name__ == "__main__":
    main()
