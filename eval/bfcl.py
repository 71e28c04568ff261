"""BFCL: load the single-turn categories, generate with a model, score with BFCL's AST semantics, report, compare.

    python -m eval.bfcl run --model smollm2-135m --categories ast --limit 50 [--out DIR] [--batch-size 16]
    python -m eval.bfcl score --category simple_python --results results.jsonl [--data-dir DIR]
    python -m eval.bfcl report DIR                      # rebuild report.json / report.md from DIR's result files
    python -m eval.bfcl compare DIR_A DIR_B ...         # side-by-side table with deltas + a bar chart

Multi-turn categories (multi_turn_base, _miss_func, _miss_param, _long_context; shorthand multi_turn) run as
episodes on BFCL's simulated back-ends and are scored with BFCL's multi-turn rules: see eval/multiturn.py.

`run` writes, per category, <category>_result.jsonl (BFCL's result format) and then report.json / report.md with
per-category accuracy and the leaderboard's summary columns (see `summarize` for exactly how they are computed).

results.jsonl holds one {"id": ..., "result": "<raw model text>"} per line (BFCL's result format). The raw
text may carry <think>/<answer> tags: the <answer> content is scored when present, else the whole text,
decoded with BFCL's prompt-mode rules. Prints one JSON object: accuracy, correct, total, per_id (and the
count of each failure reason).

Data: the files shipped in the PyPI package bfcl-eval (`pip install --no-deps bfcl-eval`), found on the
Python path without importing the package, or any directory laid out like its data/ folder (--data-dir):
BFCL_v<N>_<category>.json and possible_answer/BFCL_v<N>_<category>.json, one JSON object per line.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import re
import site
import sys
import time

import torch
from tqdm import tqdm

from data.calls import (PromptFormat, category_kind, check_calls, decode_bfcl_result, flatten_question, reason_code,
                        render_prompt, undecodable_prefix)
from data.validate import json_loads
from eval import multiturn
from eval.multiturn import MULTI_TURN_CATEGORIES

# single-turn categories scored here; "simple" is accepted as a short name for simple_python
AST_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
                  "live_parallel", "live_parallel_multiple")
RELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance", "live_relevance")
CATEGORIES = AST_CATEGORIES + RELEVANCE_CATEGORIES
ALIASES = {"simple": "simple_python"}
INSTALL = "pip install --no-deps bfcl-eval"


class BFCLDataError(Exception):
    """Missing data, unknown category or mismatched ids: a message that says what to do."""


def find_data_dir() -> str:
    """The data/ folder of the installed bfcl-eval package, located on the path without importing it."""
    roots = list(sys.path)
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except Exception:
        pass
    for root in roots:
        candidate = os.path.join(root or ".", "bfcl_eval", "data")
        if os.path.isdir(candidate):
            return candidate
    raise BFCLDataError(f"BFCL data not found: install it with `{INSTALL}` "
                        "or pass --data-dir pointing at a folder laid out like bfcl_eval/data")


def _category_file(folder: str, category: str) -> str | None:
    """The newest BFCL_v<N>_<category>.json in folder, or None."""
    if not os.path.isdir(folder):
        return None
    pattern = re.compile(rf"BFCL_v(\d+)_{re.escape(category)}\.json")
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := pattern.fullmatch(name))]
    return os.path.join(folder, max(found)[1]) if found else None


def _read_jsonl(path: str, what: str = "BFCL data") -> list[tuple[int, object]]:
    """(line number, JSON value) for each line of a JSON-lines file (a byte-order mark is skipped); BFCLDataError
    naming file:line and what is wrong otherwise."""
    if not os.path.isfile(path):
        raise BFCLDataError(f"{path} is not a file; pass the {what} file")
    values = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                values.append((n, json_loads(raw.decode("utf-8-sig"))))
            except UnicodeDecodeError as e:
                raise BFCLDataError(f"{path}:{n}: not UTF-8 text ({e.reason}); {what} files are UTF-8 JSON lines") \
                    from None
            except ValueError as e:
                raise BFCLDataError(f"{path}:{n}: {e}; {what} files hold one JSON object per line") from None
    return values


def load_category(category: str, data_dir: str | None = None, limit: int | None = None) -> list[dict]:
    """Items of one category: {"id", "question" (flat list of chat messages), "function" (tool schemas),
    "ground_truth" (list of {name: {param: [allowed]}}; None for irrelevance/relevance), "category"}."""
    category = ALIASES.get(category, category)
    if category not in CATEGORIES:
        raise BFCLDataError(f"unknown or unsupported category {category!r}; choose one of: {', '.join(CATEGORIES)}")
    data_dir = data_dir or find_data_dir()
    path = _category_file(data_dir, category)
    if path is None:
        raise BFCLDataError(f"no BFCL_v*_{category}.json in {data_dir}: is this a BFCL data folder? (the data ships "
                            f"in bfcl-eval: {INSTALL}, then leave out --data-dir)")
    entries = [entry for _, entry in _read_jsonl(path)]
    if not all(isinstance(e, dict) and {"id", "question", "function"} <= e.keys() for e in entries):
        raise BFCLDataError(f"{path}: every line must be a BFCL entry with id, question and function")
    answers = [None] * len(entries)
    if category in AST_CATEGORIES:
        answer_path = _category_file(os.path.join(data_dir, "possible_answer"), category)
        if answer_path is None:
            raise BFCLDataError(f"no possible_answer/BFCL_v*_{category}.json in {data_dir}: the category "
                                "needs its ground truth")
        answers = [a.get("ground_truth") if isinstance(a, dict) else None for _, a in _read_jsonl(answer_path)]
        if len(answers) != len(entries):
            raise BFCLDataError(f"{path} has {len(entries)} entries but {answer_path} has {len(answers)}")
    # BFCL pairs questions and answers by position (some answer ids are spelled differently)
    items = [{"id": e["id"], "question": flatten_question(e["question"]), "function": e["function"],
              "ground_truth": gt, "category": category} for e, gt in zip(entries, answers)]
    return items[:limit] if limit is not None else items


def score_results(items: list[dict], results: list[dict]) -> dict:
    """Score {"id", "result"} rows against loaded items. Every id must be in the data, once."""
    by_id = {it["id"]: it for it in items}
    per_id, reasons = {}, collections.Counter()
    for row in results:
        rid = row.get("id")
        if rid not in by_id:
            raise BFCLDataError(f"result id {rid!r:.100} is not in category {items[0]['category'] if items else '?'}; "
                                "check --category and the results file")
        if rid in per_id:
            raise BFCLDataError(f"result id {rid!r:.100} appears twice in the results file")
        item = by_id[rid]
        calls = decode_bfcl_result(row.get("result"))
        ok, reason = check_calls(calls, item["ground_truth"] or [], item["function"], item["category"])
        per_id[rid] = ok
        if not ok:
            reasons[reason_code(reason)] += 1
    correct = sum(per_id.values())
    total = len(per_id)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "per_id": per_id, "reasons": dict(reasons)}


def _read_json(path: str):
    """A JSON file we wrote (report.json, run_config.json); BFCLDataError if it does not read."""
    try:
        with open(path, "rb") as f:
            return json_loads(f.read().decode("utf-8-sig"))
    except (OSError, ValueError) as e:
        raise BFCLDataError(f"cannot read {path}: {e}; regenerate or remove it") from None


def read_results(path: str) -> list[dict]:
    """Rows {"id": str, "result": str} of a results file; BFCLDataError with file:line for anything else."""
    if not os.path.exists(path):
        raise BFCLDataError(f"results file {path} does not exist")
    rows = []
    for n, row in _read_jsonl(path, "results"):
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("result"), str):
            raise BFCLDataError(f'{path}:{n} must be {{"id": "<BFCL id>", "result": "<raw model text>"}} '
                                "(both strings)")
        rows.append(row)
    return rows


def cmd_score(args) -> dict:
    if args.category in MULTI_TURN_CATEGORIES:  # episodes re-executed on BFCL's back-ends (eval/multiturn.py)
        data_dir = args.data_dir or find_data_dir()
        return {"category": args.category, **multiturn.score_file(args.category, args.results, data_dir)}
    items = load_category(args.category, args.data_dir)
    rows = read_results(args.results)
    if not rows:
        raise BFCLDataError(f"results file {args.results} holds no results")
    result = score_results(items, rows)
    coverage = result["total"] / len(items) if items else 0.0
    if coverage < 1:
        print(f"warning: {args.results} holds {result['total']} of the {len(items)} items of {args.category}; "
              "the accuracy is over those items only", file=sys.stderr)
    return {"category": items[0]["category"] if items else args.category, **result, "items": len(items),
            "coverage": coverage}


# ----------------------------------------------------------------------------------------------------
# Subsets, prompts and generation

SUBSET_SEED = 0  # the fixed seed of every --limit subset (same items in `run` and in training-time evaluation)


def select_subset(items: list[dict], limit: int | None, seed: int = SUBSET_SEED) -> list[dict]:
    """`limit` items drawn at random with a fixed seed, kept in data order; all items when limit is None or larger.
    A random draw rather than the first N: BFCL files are ordered by source, so a prefix is a biased sample."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 0:
        raise BFCLDataError(f"--limit must be >= 0, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def parse_categories(spec) -> list[str]:
    """'simple_python,multiple' or a list -> validated category names. Shorthands: all (single-turn), ast, non_live,
    live, multi_turn."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    groups = {"all": CATEGORIES, "ast": AST_CATEGORIES, "non_live": NON_LIVE_AST, "live": LIVE_AST,
              "multi_turn": MULTI_TURN_CATEGORIES}
    out = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        expanded = groups.get(name, [ALIASES.get(name, name)])
        for c in expanded:
            if c not in CATEGORIES + MULTI_TURN_CATEGORIES:
                raise BFCLDataError(f"unknown or unsupported category {name!r}; choose from: "
                                    f"{', '.join(CATEGORIES + MULTI_TURN_CATEGORIES)} "
                                    f"(or the groups {', '.join(groups)})")
            if c not in out:
                out.append(c)
    if not out:
        raise BFCLDataError(f"no categories given; choose from: {', '.join(CATEGORIES)}")
    return out


def score_text(text, item: dict) -> tuple[bool, str]:
    """BFCL's verdict on one raw result text (exactly what `score` does for one row of a result file)."""
    calls = decode_bfcl_result(text)
    return check_calls(calls, item["ground_truth"] or [], item["function"], item["category"])


def answer_end(text: str) -> int | None:
    """End of the first <answer>...</answer> block in text, or None (BFCL decoding reads only that block)."""
    start = text.find("<answer>")
    stop = text.find("</answer>", start + len("<answer>")) if start >= 0 else -1
    return stop + len("</answer>") if stop >= 0 else None


def verdict_settled(text: str) -> bool:
    """Whether BFCL's verdict on every result that begins with `text` is already that on `text` (score_text):
    its first <answer> block is closed (decoding reads only that block), or one is open and neither its content nor
    the whole text (what decoding reads while no block is closed) can decode any more, whatever follows
    (data.calls.undecodable_prefix). The second case stops a model that answers in prose, `<answer>The change in
    entropy is ...`, which would otherwise write on to the token limit."""
    if answer_end(text) is not None:
        return True
    start = text.find("<answer>")
    if start < 0 or not undecodable_prefix(text):
        return False
    content = text[start + len("<answer>"):]
    tail = content.rfind("<", max(0, len(content) - len("</answer>") + 1))
    if tail >= 0 and "</answer>".startswith(content[tail:]):  # the closing tag may be beginning here
        content = content[:tail]
    return undecodable_prefix(content)


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 16,
                   greedy: bool = True, temperature: float = 0.7, seed: int = 0, stop_at_answer: bool = False,
                   prefill: str = "", bar=None, caches: list | None = None,
                   stop_when_settled: bool = False) -> list[str]:
    """Completions for rendered prompts, in prompt order, with the project's sampler.

    Up to `batch_size` rows decode at once; when rows finish, the next prompts (in order of token length) take
    their places, so a row that runs long does not hold the others up. Greedy by default; sampled completions are
    seeded as when prompts were cut into batches of `batch_size` in that order (the batch's number added to seed).
    stop_at_answer: a row stops once prefill + its text holds a closed <answer> block (checked every few tokens by
    the sampler; the text is cut there). Small models often ramble on after </answer>: stopping the row is what
    keeps a CPU evaluation within minutes. BFCL scoring reads only the first <answer> block, so its verdicts are
    unchanged (greedy); the strict format check then sees no trailing text.
    stop_when_settled: a row also stops once its BFCL verdict can no longer change (`verdict_settled`: a prose answer
    such as `<answer>The change in entropy is`); its text is kept as far as it got. Single-turn BFCL only: in a
    multi-turn episode the text goes on into the next turn's prompt.
    caches: a list with one entry per prompt (None, or the model.sample.RowCache of an earlier call whose sequence
    the prompt continues), replaced in place by each sequence's cache at the end of this call (multi-turn
    episodes: a step encodes only what the conversation gained since the last)."""
    from model.sample import eos_token_ids, rank_seed, sample

    eos = set(eos_token_ids(model, tokenizer))
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]

    def done(ids: list[int]) -> bool:
        text = prefill + tokenizer.decode(ids, skip_special_tokens=False)
        return verdict_settled(text) if stop_when_settled else answer_end(text) is not None

    stop = done if stop_at_answer or stop_when_settled else None
    batch_size = max(1, batch_size)
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    row_seeds = [0] * len(prompts)
    for position, i in enumerate(order):
        row_seeds[i] = rank_seed(seed + position // batch_size, 0, position % batch_size)
    out = sample(model, tokenizer, prompt_ids, group_size=1, max_new_tokens=max_new_tokens, temperature=temperature,
                 greedy=greedy, stop=stop, row_seeds=row_seeds, caches=caches, keep_caches=caches is not None,
                 max_rows=batch_size, progress=bar if bar is not None else False)
    new_ids = out.completion_ids
    if caches is not None:
        caches[:] = out.caches
    texts = []
    for ids in new_ids:
        text = tokenizer.decode(ids[:-1] if ids and ids[-1] in eos else ids, skip_special_tokens=False)
        end = answer_end(prefill + text) if stop_at_answer or stop_when_settled else None
        texts.append((prefill + text)[len(prefill):end] if end is not None and end > len(prefill) else text)
    return texts


def item_prompt(tokenizer, item: dict, prompt_format: PromptFormat) -> str:
    return render_prompt(tokenizer, item["question"], item["function"], prompt_format)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One evaluated record or BFCL item: what `eval_records/<tag>.jsonl` of a training run holds, one per line."""
    split: str  # "val" (held-out records, training reward) or "bfcl" (BFCL items, BFCL's decoding)
    category: str
    id: str
    correct: bool
    reason: str  # "correct" or the failure's reason code


def write_verdicts(path, verdicts: list[Verdict]) -> None:
    """Replace `path` with one JSON line per verdict (written aside, then renamed: never half a file)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(dataclasses.asdict(v)) + "\n" for v in verdicts)
    os.replace(path + ".tmp", path)


def read_verdicts(path) -> list[Verdict]:
    """The verdicts of a file write_verdicts wrote; BFCLDataError with file:line for anything else."""
    fields = [f.name for f in dataclasses.fields(Verdict)]
    out = []
    for n, row in _read_jsonl(os.fspath(path), "verdicts"):
        if not isinstance(row, dict) or sorted(row) != sorted(fields) or not isinstance(row["correct"], bool):
            raise BFCLDataError(f"{path}:{n} is not a verdict row ({', '.join(fields)}); rerun the evaluation")
        out.append(Verdict(**{k: row[k] for k in fields}))
    return out


# ----------------------------------------------------------------------------------------------------
# Used by train.py: held-out records and fixed BFCL subsets, greedy

def evaluate_records(model, tokenizer, records: list[dict], prompt_format: PromptFormat = PromptFormat(),
                     max_new_tokens: int = 256, batch_size: int = 16) -> dict:
    """Greedy accuracy on canonical records (data/ format), scored with the training reward (format gate + checker)
    on prefill + completion. -> {"correct", "total", "per_category": {cat: [correct, total]}, "outputs",
    "verdicts": [Verdict per record, in order]}."""
    from rl.reward import reward

    if not records:
        return {"correct": 0, "total": 0, "per_category": {}, "outputs": [], "verdicts": []}
    prefill = prompt_format.prefill
    prompts = [render_prompt(tokenizer, r["messages"], r["tools"], prompt_format) for r in records]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size)
    per_category, correct, verdicts = {}, 0, []
    for record, text in zip(records, texts):
        score, why = reward(prefill + text, record, answer_format=prompt_format.answer_format)
        ok = score >= 1.0
        category = record.get("category", "unknown")
        counts = per_category.setdefault(category, [0, 0])
        counts[0] += int(ok)
        counts[1] += 1
        correct += int(ok)
        verdicts.append(Verdict("val", category, str(record.get("id", "")), ok, "correct" if ok else reason_code(why)))
    return {"correct": correct, "total": len(records), "per_category": per_category,
            "outputs": [prefill + t for t in texts], "verdicts": verdicts}


def evaluate_bfcl(model, tokenizer, categories: list[str], limit: int, rank: int = 0, world: int = 1,
                  all_reduce=lambda t: t, prompt_format: PromptFormat = PromptFormat(), max_new_tokens: int = 256,
                  batch_size: int = 16, data_dir: str | None = None) -> dict:
    """Greedy BFCL accuracy per category on the fixed subset select_subset(items, limit) (seed 0: the same items on
    every call and as `run --limit`), scored like `run` (BFCL decoding of prefill + completion). Items are
    sharded items[rank::world]; [correct, total] counts are summed with all_reduce. -> {category: accuracy}.
    In the think format generation stops after the first </answer> (see generate_texts): same verdicts, faster.
    Multi-turn categories run as episodes (eval.multiturn.evaluate_multi_turn), with one all_reduce of their own."""
    return evaluate_bfcl_verdicts(model, tokenizer, categories, limit, rank, world, all_reduce, prompt_format,
                                  max_new_tokens, batch_size, data_dir)[0]


def evaluate_bfcl_verdicts(model, tokenizer, categories: list[str], limit: int, rank: int = 0, world: int = 1,
                           all_reduce=lambda t: t, prompt_format: PromptFormat = PromptFormat(),
                           max_new_tokens: int = 256, batch_size: int = 16,
                           data_dir: str | None = None) -> tuple[dict, list[Verdict]]:
    """evaluate_bfcl, plus this rank's verdict on each single-turn item it scored (multi-turn categories have
    accuracies only). -> ({category: accuracy}, [Verdict])."""
    categories = parse_categories(categories)
    multi = [c for c in categories if c in MULTI_TURN_CATEGORIES]
    categories = [c for c in categories if c not in MULTI_TURN_CATEGORIES]
    accuracy = multiturn.evaluate_multi_turn(
        model, tokenizer, multi, limit, data_dir or find_data_dir(), rank=rank, world=world, all_reduce=all_reduce,
        prompt_format=prompt_format, max_new_tokens=max_new_tokens, batch_size=batch_size) if multi else {}
    if not categories:
        return accuracy, []
    items = []
    for category in categories:
        items += select_subset(load_category(category, data_dir), limit)[rank::world]
    prefill = prompt_format.prefill
    prompts = [item_prompt(tokenizer, it, prompt_format) for it in items]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size,
                           stop_at_answer=prompt_format.answer_format == "think",
                           stop_when_settled=prompt_format.answer_format == "think", prefill=prefill) if items else []
    counts = torch.zeros(len(categories), 2, dtype=torch.float64)  # [C, (correct, total)]
    verdicts = []
    for item, text in zip(items, texts):
        c = categories.index(item["category"])
        ok, why = score_text(prefill + text, item)
        counts[c, 0] += float(ok)
        counts[c, 1] += 1
        verdicts.append(Verdict("bfcl", item["category"], str(item["id"]), bool(ok),
                                "correct" if ok else reason_code(why)))
    counts = all_reduce(counts)
    return ({**{cat: (counts[c, 0] / counts[c, 1].clamp(min=1)).item() for c, cat in enumerate(categories)},
             **accuracy}, verdicts)



# ----------------------------------------------------------------------------------------------------
# Summary columns, the leaderboard's way

NON_LIVE_AST = ("simple_python", "multiple", "parallel", "parallel_multiple")
LIVE_AST = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
SIMPLE_LANGUAGES = ("simple_python",)  # the leaderboard's "simple" also averages simple_java, simple_javascript
SUMMARY_COLUMNS = ("overall", "non_live_ast", "live", "irrelevance", "relevance", "multi_turn")

AGGREGATION_DOC = """\
How the summary columns are computed (the rules of the BFCL leaderboard's aggregation, v3/v4):
- Non-Live AST = unweighted mean of four groups: simple, multiple, parallel, parallel_multiple. The leaderboard's
  simple is itself the unweighted mean of simple_python, simple_java and simple_javascript; java and javascript
  are not evaluated here, so simple = simple_python (the leaderboard would count the missing two as 0).
- Live = mean over live_simple, live_multiple, live_parallel, live_parallel_multiple weighted by each category's
  full item count in the data (258, 1053, 16, 24 in BFCL v4), as the leaderboard weights them. With --limit each
  category's accuracy comes from its fixed random subset (seed 0), but the weights stay the full counts, so the
  number estimates the full-data Live score (it is not the pooled accuracy of the evaluated items).
- Irrelevance = unweighted mean of irrelevance and live_irrelevance; Relevance = live_relevance.
- Overall (the paper's) = mean of Non-Live AST and Live.
- Multi Turn = unweighted mean of multi_turn_base, multi_turn_miss_func, multi_turn_miss_param and
  multi_turn_long_context (the leaderboard's Multi Turn Overall Acc); an entry is right when BFCL's multi-turn
  checker passes every turn (state equal to the ground truth's, its execution results among the model's).
- A column whose parts were not all evaluated is the mean (or weighted mean) of the parts that were, marked with
  * and its missing parts listed; the leaderboard would count a missing part as 0.
- Items are scored with BFCL's decoding: the <answer> content when present, else the whole text, parsed as a
  Python call list; irrelevance is right when no call decodes, relevance when at least one does. "strict" is the
  training reward on the same text: the answer format must also be right (e.g. <think>..</think><answer>..).
  With the think format, a row stops once its verdict is settled unless --no-stop-at-answer: after the first
  </answer>, or (outside the irrelevance categories) once an open <answer> block can no longer decode whatever
  follows (prose such as "<answer>The change in entropy is"). BFCL's verdicts are the same either way; strict then
  does not see what the model would have written after that point.
"""


def _mean(values):
    return sum(values) / len(values) if values else None


def summarize(per_category: dict, full_counts: dict | None = None) -> dict:
    """Summary columns from per-category results {category: {"accuracy": float, ...}}.
    full_counts {category: full item count} weights Live (default: the "n_full" or "total" of each entry).
    -> {column: {"value": float | None, "missing": [categories not evaluated]}}; see AGGREGATION_DOC."""
    acc = {c: r["accuracy"] for c, r in per_category.items()}
    weight = {c: (full_counts or {}).get(c) or r.get("n_full") or r.get("total") or 0 for c, r in per_category.items()}

    def column(value, parts):
        return {"value": value, "missing": [p for p in parts if p not in acc]}

    simple = _mean([acc[c] for c in SIMPLE_LANGUAGES if c in acc])
    groups = [simple] + [acc.get(c) for c in NON_LIVE_AST[1:]]
    non_live = column(_mean([g for g in groups if g is not None]), NON_LIVE_AST)
    live_parts = [c for c in LIVE_AST if c in acc]
    total_weight = sum(weight[c] for c in live_parts)
    live_value = sum(acc[c] * weight[c] for c in live_parts) / total_weight if total_weight else None
    live = column(live_value, LIVE_AST)
    irrelevance = column(_mean([acc[c] for c in ("irrelevance", "live_irrelevance") if c in acc]),
                         ("irrelevance", "live_irrelevance"))
    relevance = column(acc.get("live_relevance"), ("live_relevance",))
    overall = {"value": _mean([v for v in (non_live["value"], live["value"]) if v is not None]),
               "missing": non_live["missing"] + live["missing"]}
    multi_turn = column(_mean([acc[c] for c in MULTI_TURN_CATEGORIES if c in acc]), MULTI_TURN_CATEGORIES)
    return {"overall": overall, "non_live_ast": non_live, "live": live, "irrelevance": irrelevance,
            "relevance": relevance, "multi_turn": multi_turn}


# ----------------------------------------------------------------------------------------------------
# Reports

COLUMN_TITLES = {"overall": "Overall (mean of Non-Live AST and Live)", "non_live_ast": "Non-Live AST",
                 "live": "Live", "irrelevance": "Irrelevance", "relevance": "Relevance",
                 "multi_turn": "Multi Turn (mean of the four multi-turn categories)"}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def build_report(out_dir: str, data_dir: str | None = None, meta: dict | None = None) -> dict:
    """Score every <category>_result.jsonl in out_dir and write report.json and report.md. `meta` (settings,
    timings) is stored as is; per-category timings of an earlier report are kept for categories not re-run."""
    from rl.reward import reward

    meta = dict(meta or {})
    old_path = os.path.join(out_dir, "report.json")
    old = _read_json(old_path) if os.path.exists(old_path) else {}
    timings = {**old.get("timing", {}).get("per_category", {}), **meta.pop("per_category_timing", {})}
    answer_format = meta.get("settings", old.get("settings", {})).get("answer_format", "think")
    per_category = {}
    for category in CATEGORIES + MULTI_TURN_CATEGORIES:
        path = os.path.join(out_dir, f"{category}_result.jsonl")
        if not os.path.exists(path):
            continue
        if category in MULTI_TURN_CATEGORIES:  # no strict column: the training reward is single-turn
            scored = multiturn.score_file(category, path, data_dir or find_data_dir())
            per_category[category] = {"accuracy": scored["accuracy"], "correct": scored["correct"],
                                      "total": scored["total"], "strict_accuracy": None, "reasons": scored["reasons"],
                                      "n_full": len(multiturn.load_multi_turn(category, data_dir or find_data_dir())),
                                      **({"timing": timings[category]} if category in timings else {})}
            continue
        items = load_category(category, data_dir)
        rows = read_results(path)
        scored = score_results(items, rows)
        by_id = {it["id"]: it for it in items}
        strict = sum(reward(r["result"], by_id[r["id"]], answer_format=answer_format)[0] >= 1.0 for r in rows)
        per_category[category] = {"accuracy": scored["accuracy"], "correct": scored["correct"],
                                  "total": scored["total"], "n_full": len(items),
                                  "strict_accuracy": strict / max(len(rows), 1), "reasons": scored["reasons"],
                                  **({"timing": timings[category]} if category in timings else {})}
    if not per_category:
        raise BFCLDataError(f"no <category>_result.jsonl files in {out_dir}: run `python -m eval.bfcl run` first")
    report = {"model": meta.get("model", old.get("model")), "settings": meta.get("settings", old.get("settings", {})),
              "categories": per_category, "summary": summarize(per_category),
              "timing": {**old.get("timing", {}), **meta.get("timing", {}), "per_category": timings},
              "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(old_path, "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_markdown(report))
    return report


def report_markdown(report: dict) -> str:
    s = report.get("settings", {})
    lines = [f"# BFCL report: {report.get('model')}", "",
             f"Settings: {', '.join(f'{k}={v!r}' for k, v in s.items())}. Date: {report.get('date')}.", "",
             AGGREGATION_DOC, "| column | score |", "|---|---:|"]
    for key in SUMMARY_COLUMNS:
        col = report["summary"][key]
        mark = f" * (missing: {', '.join(col['missing'])})" if col["missing"] and col["value"] is not None else ""
        lines.append(f"| {COLUMN_TITLES[key]} | {_pct(col['value'])}{mark} |")
    lines += ["", "| category | items | of | correct | accuracy | strict | most common failure |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for category, r in report["categories"].items():
        reason = max(r["reasons"].items(), key=lambda kv: kv[1]) if r["reasons"] else None
        lines.append(f"| {category} | {r['total']} | {r['n_full']} | {r['correct']} | {_pct(r['accuracy'])} | "
                     f"{_pct(r['strict_accuracy'])} | {f'{reason[0]} ({reason[1]})' if reason else '-'} |")
    t = report.get("timing", {})
    if t.get("wall_s") is not None:
        lines += ["", f"Wall time {t['wall_s']:.1f} s (model load {t.get('load_s', 0):.1f} s, generation "
                      f"{t.get('generate_s', 0):.1f} s for {t.get('items', 0)} items: {t.get('items_per_s', 0):.2f} "
                      f"items/s, {t.get('threads')} threads, {t.get('device')})."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# run

def resolve_settings(args, model_dir: str | None) -> PromptFormat:
    """The prompt format: the flags, else what a run checkpoint was trained with (prompt_format.json, or the
    run_config.json of older checkpoints), else think / json / "<think>" (with think) or "" (with plain)."""
    trained, path = {}, None
    for name in ("prompt_format.json", "run_config.json"):
        candidate = os.path.join(model_dir, name) if model_dir else None
        if candidate and os.path.isfile(candidate):
            config = _read_json(candidate)
            trained = {k: config[k] for k in ("answer_format", "tools_as", "prefill") if k in config}
            path = candidate
            break
    answer_format = args.answer_format or trained.get("answer_format", "think")
    tools_as = args.tools_as or trained.get("tools_as", "json")
    if args.prefill is not None:
        prefill = args.prefill
    elif "prefill" in trained and answer_format == trained.get("answer_format"):
        prefill = trained["prefill"]
    else:
        prefill = "<think>" if answer_format == "think" else ""
    if trained:
        print(f"[bfcl] {path}: trained with answer_format={trained.get('answer_format')!r}, "
              f"tools_as={trained.get('tools_as')!r}, prefill={trained.get('prefill')!r}; using answer_format="
              f"{answer_format!r}, tools_as={tools_as!r}, prefill={prefill!r}")
    return PromptFormat(answer_format, tools_as, prefill)


def _model_dir(name: str) -> str | None:
    """A local model directory for --model, following a run directory to its newest checkpoint."""
    if not os.path.isdir(name):
        return None
    if os.path.isdir(os.path.join(name, "checkpoints")) and not os.path.exists(os.path.join(name, "model.safetensors")):
        from model.checkpoint import latest_checkpoint
        ckpt = latest_checkpoint(name)
        if ckpt is None:
            raise BFCLDataError(f"{name} is a run directory without a complete checkpoint; pass a checkpoint "
                                "directory (<run>/checkpoints/step-NNNNNN) or a model directory")
        print(f"[bfcl] {name} is a run directory: using its newest checkpoint {ckpt}")
        return str(ckpt)
    return name


def _default_out_dir(model: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.normpath(model).strip("/\\")).strip("_") or "model"
    return os.path.join("runs", "bfcl", slug)


def cmd_run(args) -> dict:
    t_start = time.time()
    categories = parse_categories(args.categories)
    data_dir = args.data_dir or find_data_dir()
    if not os.path.isdir(data_dir):
        raise BFCLDataError(f"--data-dir {data_dir} does not exist; the BFCL data ships in bfcl-eval: "
                            f"{INSTALL} (then leave out --data-dir)")
    selected = {c: multiturn.select_entries(multiturn.load_multi_turn(c, data_dir), args.limit, SUBSET_SEED)
                if c in MULTI_TURN_CATEGORIES else select_subset(load_category(c, data_dir), args.limit)
                for c in categories}
    model_dir = _model_dir(args.model)
    prompt_format = resolve_settings(args, model_dir)
    settings = dict(dataclasses.asdict(prompt_format))
    stop = settings["answer_format"] == "think" and not args.no_stop_at_answer
    # not in the irrelevance categories: a prose answer is right there, and strict wants to see its block closed
    settings.update(stop_at_answer=stop, stop_when_settled=stop,
                    max_new_tokens=args.max_new_tokens, limit=args.limit, batch_size=args.batch_size,
                    decoding=f"sampled (temperature {args.temperature}, seed {args.seed})" if args.sample else "greedy")
    out_dir = args.out or _default_out_dir(args.model)
    os.makedirs(out_dir, exist_ok=True)

    from model.load import ModelLoadError, load
    t_load = time.time()
    try:
        model, tokenizer = load(model_dir or args.model, device=args.device, dtype=args.dtype)
    except (ModelLoadError, OSError, ValueError) as e:
        raise BFCLDataError(" ".join(str(e).split())) from None
    model.eval()
    load_s = time.time() - t_load
    print(f"[bfcl] {args.model} on {model.device}, {torch.get_num_threads()} threads; "
          f"{sum(len(v) for v in selected.values())} items in {len(categories)} categories -> {out_dir}")

    per_category_timing, generate_s = {}, 0.0
    bar = tqdm(total=sum(len(v) for v in selected.values()), desc="bfcl", unit="item")
    for category, items in selected.items():
        bar.set_postfix_str(category)
        t0 = time.time()
        if category in MULTI_TURN_CATEGORIES:  # episodes on BFCL's back-ends (eval/multiturn.py)
            multiturn.run_category(model, tokenizer, category, items, data_dir,
                                   os.path.join(out_dir, f"{category}_result.jsonl"), settings, args.batch_size,
                                   greedy=not args.sample, temperature=args.temperature, seed=args.seed, bar=bar)
            seconds = time.time() - t0
            generate_s += seconds
            per_category_timing[category] = {"seconds": seconds, "items_per_s": len(items) / max(seconds, 1e-9)}
            continue
        prompts = [item_prompt(tokenizer, it, prompt_format) for it in items]
        texts = generate_texts(model, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                               greedy=not args.sample, temperature=args.temperature, seed=args.seed,
                               stop_at_answer=settings["stop_at_answer"], prefill=settings["prefill"], bar=bar,
                               stop_when_settled=(settings["stop_when_settled"]
                                                  and category_kind(category) != "irrelevance"))
        seconds = time.time() - t0
        generate_s += seconds
        per_category_timing[category] = {"seconds": seconds, "items_per_s": len(items) / max(seconds, 1e-9)}
        # the full assistant text (prefill included), so that BFCL-style re-scoring sees what the model answered
        with open(os.path.join(out_dir, f"{category}_result.jsonl"), "w", encoding="utf-8") as f:
            for it, text in zip(items, texts):
                f.write(json.dumps({"id": it["id"], "result": settings["prefill"] + text}, ensure_ascii=False) + "\n")
    bar.close()
    n_items = sum(len(v) for v in selected.values())
    timing = {"wall_s": time.time() - t_start, "load_s": load_s, "generate_s": generate_s, "items": n_items,
              "items_per_s": n_items / max(generate_s, 1e-9), "threads": torch.get_num_threads(),
              "device": str(model.device)}
    report = build_report(out_dir, data_dir, {"model": args.model, "settings": settings, "timing": timing,
                                              "per_category_timing": per_category_timing})
    print(report_markdown(report))
    print(f"[bfcl] wrote {out_dir}/report.md, report.json and {len(selected)} result files")
    return report


def cmd_report(args) -> dict:
    report = build_report(args.dir, args.data_dir)
    print(report_markdown(report))
    return report


# ----------------------------------------------------------------------------------------------------
# compare

def read_report(run_dir: str) -> dict:
    path = os.path.join(run_dir, "report.json")
    if not os.path.isfile(path):
        raise BFCLDataError(f"{run_dir}: no report.json (make one with `python -m eval.bfcl run ... --out {run_dir}`)")
    return _read_json(path)


def compare_table(reports: list[dict], labels: list[str]) -> tuple[list[str], list[list]]:
    """Rows of (name, score per report, delta of each later report vs the first), summary columns first.
    Scores are fractions (None where a report lacks the row)."""
    rows = []
    for key in SUMMARY_COLUMNS:
        rows.append([COLUMN_TITLES[key].split(" (")[0]] + [r["summary"].get(key, {}).get("value") for r in reports])
    for category in CATEGORIES + MULTI_TURN_CATEGORIES:
        if any(category in r["categories"] for r in reports):
            rows.append([category] + [r["categories"].get(category, {}).get("accuracy") for r in reports])
    header = ["", *labels] + [f"Δ {label}" for label in labels[1:]]
    table = []
    for name, *values in rows:
        deltas = [None if v is None or values[0] is None else v - values[0] for v in values[1:]]
        table.append([name, *values, *deltas])
    return header, table


def compare_markdown(header, table) -> str:
    n = len(header) // 2  # header: name, n labels, n - 1 deltas
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, *cells in table:
        out = [_pct(v) for v in cells[:n]]
        out += ["-" if d is None else f"{100 * d:+.2f}" for d in cells[n:]]
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def cmd_compare(args) -> dict:
    reports = [read_report(d) for d in args.dirs]
    labels = args.labels.split(",") if args.labels else [os.path.basename(os.path.normpath(d)) for d in args.dirs]
    if len(labels) != len(args.dirs):
        raise BFCLDataError(f"--labels has {len(labels)} names for {len(args.dirs)} directories")
    if len(set(labels)) != len(labels):  # same folder names: tell them apart by their parent
        labels = [os.path.join(*os.path.normpath(d).split(os.sep)[-2:]) for d in args.dirs]
    header, table = compare_table(reports, labels)
    text = compare_markdown(header, table)
    out = args.out or os.path.join(os.path.dirname(os.path.normpath(args.dirs[0])) or ".", "compare.png")
    from eval.plot import bar_chart
    png = bar_chart([row[0] for row in table], {label: [100 * (row[1 + i] or 0.0) for row in table]
                                                for i, label in enumerate(labels)},
                    out, title="BFCL accuracy", ylabel="accuracy (%)")
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"[bfcl] bar chart: {png}")
    return {"header": header, "table": table, "png": str(png), "markdown": text}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eval.bfcl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="generate with a model on BFCL categories, write result files and a report")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a model or checkpoint directory, a run "
                   "directory (its newest checkpoint), or a Hugging Face id in the local cache")
    p.add_argument("--categories", default="ast", help="comma-separated categories, or all (single-turn) / ast / "
                   f"non_live / live / multi_turn (categories: {', '.join(CATEGORIES + MULTI_TURN_CATEGORIES)})")
    p.add_argument("--limit", type=int, default=None, help="items per category: a fixed random subset (seed 0)")
    p.add_argument("--out", default=None, help="output folder (default runs/bfcl/<model>)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="rows decoding at once (prompts sorted by length; a finished row's place goes to the next one)")
    p.add_argument("--answer-format", choices=("think", "plain"), default=None,
                   help="think: <think>..</think><answer>[calls]</answer>; plain: the call list (default: the "
                   "checkpoint's run_config.json, else think)")
    p.add_argument("--tools-as", choices=("json", "python"), default=None,
                   help="tools in the prompt as BFCL's JSON or as Python signatures (default: run_config.json, else json)")
    p.add_argument("--prefill", default=None, help="text opening the assistant turn (default: run_config.json, "
                   "else '<think>' with --answer-format think and '' with plain)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--no-stop-at-answer", action="store_true", help="think format: keep generating until EOS after "
                   "the first </answer> and after an <answer> that can no longer decode (slower; BFCL's verdicts "
                   "are the same, strict can differ)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="with --sample")
    p.add_argument("--seed", type=int, default=0, help="with --sample")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--data-dir", default=None, help="folder laid out like bfcl_eval/data (default: the installed package)")
    p = sub.add_parser("score", help="score a results file (BFCL's {id, result} JSON lines)")
    p.add_argument("--category", required=True, help=f"one of: {', '.join(CATEGORIES + MULTI_TURN_CATEGORIES)}")
    p.add_argument("--results", required=True, help="JSON lines of {\"id\": ..., \"result\": \"raw model text\"} "
                   "(multi-turn: \"result\" is a list of turns, each a list of step texts)")
    p.add_argument("--data-dir", default=None, help="folder laid out like bfcl_eval/data (default: the installed package)")
    p = sub.add_parser("report", help="re-score DIR's <category>_result.jsonl files into report.json / report.md")
    p.add_argument("dir")
    p.add_argument("--data-dir", default=None)
    p = sub.add_parser("compare", help="side-by-side table of several run reports with deltas, and a bar chart")
    p.add_argument("dirs", nargs="+", help="output folders of `run` (the first is the baseline of the deltas)")
    p.add_argument("--labels", default=None, help="comma-separated names for the folders (default: folder names)")
    p.add_argument("--out", default=None, help="bar chart PNG (default: compare.png next to the first folder); "
                   "the table is also written beside it as .md")
    args = parser.parse_args(argv)
    commands = {"run": cmd_run, "score": cmd_score, "report": cmd_report, "compare": cmd_compare}
    try:
        out = commands[args.command](args)
    except (BFCLDataError, multiturn.MultiTurnDataError) as e:
        raise SystemExit(f"error: {e}")
    if args.command == "score":
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
