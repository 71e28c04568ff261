"""Overlap of prepared records with BFCL (contamination report for data.prepare).

Three kinds of overlap, each reported per BFCL category:
  exact_text  a user turn equals a BFCL user turn after normalisation (NFKC, lower case, every run of
              non-word characters -> one space)
  near_text   the word 8-grams a user turn shares with a BFCL user turn make up at least 30% of the
              8-grams of the shorter of the two (see NGRAM_N and NEAR_THRESHOLD for why these values)
  same_tool   an offered tool has the name and the exact set of parameter names of a BFCL function
              (names compared lower-case with "." read as "_", as BFCL's own function-calling mode renames them)

    python -m data.prepare ... [--bfcl-data DIR] [--drop-bfcl-overlap]

writes DIR/bfcl_overlap.jsonl (one line per overlapping record, with the BFCL ids it matches), adds a
"bfcl_overlap" block to stats.json and prints a summary. Without BFCL data the block says "not checked".
"""
from __future__ import annotations

import json
import os
import re
import site
import sys
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# 8 words: measured on 400 random BFCL AST questions with planted edits against the embedded default data
# (written independently of BFCL). Shorter n-grams match stock phrases ("set a timer for 5 minutes", "what is
# the capital of"): n=5 flagged 54 of the 1,700 default records at 30%, n=6 seven; n=8 flags three (all one
# question, "find the greatest common divisor of 56 and 18", which shares an 8-word run with a BFCL question).
# Longer n-grams miss edited copies and cannot see short questions at all: at n=13 a quarter of BFCL's AST
# questions have fewer than 13 words; at n=8 4.5% do (those are still covered by exact_text).
NGRAM_N = 8
# 30% of the shorter text's 8-grams: at n=8 it found 95% of BFCL questions wrapped in extra sentences, 83% of
# those with every number changed and 47% with one word in the middle replaced (50% found 95%, 73% and 36%),
# with the same three default-data flags as 50%.
NEAR_THRESHOLD = 0.3
MAX_MATCHES_LISTED = 5  # per kind and record, in bfcl_overlap.jsonl
KINDS = ("exact_text", "near_text", "same_tool")
OVERLAP_FILE = "bfcl_overlap.jsonl"


def normalize_text(text: str) -> str:
    return " ".join(re.sub(r"\W+", " ", unicodedata.normalize("NFKC", text).lower()).split())


def word_ngrams(normalized: str, n: int = NGRAM_N) -> set:
    words = normalized.split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def tool_signature(tool: dict) -> tuple[str, frozenset] | None:
    """(normalised name, parameter names) of a tool schema in BFCL's or the canonical layout."""
    if not isinstance(tool, dict):
        return None
    if isinstance(tool.get("function"), dict) and "name" not in tool:
        tool = tool["function"]
    name, params = tool.get("name"), tool.get("parameters")
    if not isinstance(name, str):
        return None
    props = params.get("properties") if isinstance(params, dict) else None
    return name.lower().replace(".", "_"), frozenset(props if isinstance(props, dict) else ())


@dataclass
class BFCLIndex:
    data_dir: str
    question_texts: list = field(default_factory=list)  # (category, id, normalised user text)
    by_text: dict = field(default_factory=lambda: defaultdict(list))  # text -> [question index]
    by_ngram: dict = field(default_factory=lambda: defaultdict(list))  # 8-gram -> [question index]
    ngram_counts: list = field(default_factory=list)  # per question index: number of distinct 8-grams
    by_tool: dict = field(default_factory=lambda: defaultdict(list))  # signature -> [(category, id)]
    categories: Counter = field(default_factory=Counter)  # category -> items read


def find_bfcl_data(bfcl_dir: str | None = None) -> str | None:
    """--bfcl-data, else bfcl-eval's data/ folder found on the path (not imported), else None."""
    if bfcl_dir:
        return bfcl_dir if os.path.isdir(bfcl_dir) else None
    roots = list(sys.path)
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except Exception:  # some embedded interpreters lack these
        pass
    for root in roots:
        candidate = os.path.join(root or ".", "bfcl_eval", "data")
        if os.path.isdir(candidate):
            return candidate
    return None


def _user_turns(question) -> list[str]:
    if isinstance(question, str):
        return [question]
    out = []
    for item in question if isinstance(question, list) else []:
        if isinstance(item, list):
            out += _user_turns(item)
        elif isinstance(item, dict) and item.get("role") == "user" and isinstance(item.get("content"), str):
            out.append(item["content"])
    return out


def load_bfcl_index(data_dir: str) -> BFCLIndex:
    """Every BFCL_v<N>_<category>.json in data_dir (the newest version of each category); unreadable lines
    are skipped (one BFCL file is not JSON lines)."""
    index = BFCLIndex(data_dir=data_dir)
    newest: dict = {}
    for name in os.listdir(data_dir):
        m = re.fullmatch(r"BFCL_v(\d+)_(\w+)\.json", name)
        if m and int(m.group(1)) >= newest.get(m.group(2), (-1, ""))[0]:
            newest[m.group(2)] = (int(m.group(1)), name)
    for category, (_, name) in sorted(newest.items()):
        with open(os.path.join(data_dir, name), encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(item, dict):
                    continue
                index.categories[category] += 1
                item_id = str(item.get("id"))
                for turn in _user_turns(item.get("question")):
                    text = normalize_text(turn)
                    if not text:
                        continue
                    q = len(index.question_texts)
                    index.question_texts.append((category, item_id, text))
                    index.by_text[text].append(q)
                    grams = word_ngrams(text)
                    index.ngram_counts.append(len(grams))
                    for g in grams:
                        index.by_ngram[g].append(q)
                for tool in item.get("function") or []:
                    sig = tool_signature(tool)
                    if sig is not None:
                        index.by_tool[sig].append((category, item_id))
    return index


@dataclass
class Match:
    kind: str  # exact_text | near_text | same_tool
    category: str  # BFCL category of the matched item
    bfcl_id: str
    score: float  # 1.0 for exact_text and same_tool; the shared 8-gram fraction for near_text
    what: str  # the BFCL text matched (exact/near) or the tool name


def record_overlaps(rec: dict, index: BFCLIndex) -> list[Match]:
    matches: list[Match] = []
    seen = set()

    def add(m: Match):
        if (m.kind, m.bfcl_id) not in seen:
            seen.add((m.kind, m.bfcl_id))
            matches.append(m)

    for msg in rec.get("messages") or []:
        if not (isinstance(msg, dict) and msg.get("role") == "user" and isinstance(msg.get("content"), str)):
            continue
        text = normalize_text(msg["content"])
        for q in index.by_text.get(text, ()):
            cat, qid, qtext = index.question_texts[q]
            add(Match("exact_text", cat, qid, 1.0, qtext))
        grams = word_ngrams(text)
        shared = Counter(q for g in grams for q in index.by_ngram.get(g, ()))
        for q, k in shared.items():
            score = k / min(len(grams), index.ngram_counts[q])
            cat, qid, qtext = index.question_texts[q]
            if score >= NEAR_THRESHOLD and text != qtext:
                add(Match("near_text", cat, qid, round(score, 3), qtext))
    for tool in rec.get("tools") or []:
        sig = tool_signature(tool)
        for cat, qid in index.by_tool.get(sig, ()) if sig else ():
            add(Match("same_tool", cat, qid, 1.0, tool.get("name", "")))
    return matches


# ============================================================================ the report in data.prepare

def report_outputs(out_dir, stats: dict, bfcl_dir: str | None = None, drop: bool = False, log=print) -> dict:
    """Check train.jsonl and val.jsonl in out_dir against BFCL; write bfcl_overlap.jsonl; with drop, move the
    overlapping records to rejects.jsonl (stage "bfcl-overlap"). Returns stats with a "bfcl_overlap" block
    (recounted from the files when records moved)."""
    out = Path(out_dir)
    data_dir = find_bfcl_data(bfcl_dir)
    if data_dir is None:
        why = (f"--bfcl-data {bfcl_dir} is not a folder" if bfcl_dir else
               "BFCL data not found (pip install --no-deps bfcl-eval, or pass --bfcl-data DIR)")
        stats["bfcl_overlap"] = {"status": "not checked", "why": why}
        log(f"[bfcl overlap] not checked: {why}")
        return stats
    index = load_bfcl_index(data_dir)
    if not index.question_texts:
        stats["bfcl_overlap"] = {"status": "not checked", "why": f"no BFCL question files in {data_dir}"}
        log(f"[bfcl overlap] not checked: no BFCL_v*_<category>.json files in {data_dir}")
        return stats
    records_by_kind: Counter = Counter()
    by_category: dict = defaultdict(Counter)  # category -> kind -> records
    overlapping: dict = {"train": set(), "val": set(), "dropped": set()}  # split -> ids
    tmp_path = out / (OVERLAP_FILE + ".tmp")
    with open(tmp_path, "w", encoding="utf-8") as listing:
        for split, rec in _prepared_records(out):
            found = record_overlaps(rec, index)
            if not found:
                continue
            overlapping[split].add(rec["id"])
            kinds = sorted({m.kind for m in found}, key=KINDS.index)
            records_by_kind.update(kinds + ["any"])
            for cat, kind in {(m.category, m.kind) for m in found}:
                by_category[cat][kind] += 1
            for cat in {m.category for m in found}:
                by_category[cat]["any"] += 1
            listed = [m for kind in kinds for m in [x for x in found if x.kind == kind][:MAX_MATCHES_LISTED]]
            listing.write(json.dumps({
                "id": rec["id"], "split": split, "kinds": kinds, "matches_found": len(found),
                "matches": [{"kind": m.kind, "category": m.category, "bfcl_id": m.bfcl_id, "score": m.score,
                             "bfcl": m.what} for m in listed],
                "user": [m["content"] for m in rec["messages"] if m.get("role") == "user"]},
                ensure_ascii=False) + "\n")
    os.replace(tmp_path, out / OVERLAP_FILE)
    moved = _move_to_rejects(out, overlapping) if drop else 0
    dropped = moved + len(overlapping["dropped"])  # dropped by this run, and by an earlier one
    if moved:
        from data.prepare import compute_stats  # recount the splits from the files after the move
        stats.update(compute_stats(out))
    stats["bfcl_overlap"] = {
        "status": "checked", "bfcl_data": data_dir, "bfcl_items": dict(index.categories),
        "ngram_n": NGRAM_N, "near_threshold": NEAR_THRESHOLD,
        "records": {k: records_by_kind.get(k, 0) for k in (*KINDS, "any")},
        "by_category": {cat: {k: c.get(k, 0) for k in (*KINDS, "any")} for cat, c in sorted(by_category.items())},
        "dropped": dropped, "listed_in": OVERLAP_FILE}
    log(overlap_summary(stats["bfcl_overlap"]))
    return stats


def _prepared_records(out: Path):
    """(split, record) for train.jsonl, val.jsonl and the records an earlier run moved to rejects ("dropped")."""
    for split in ("train", "val", "dropped"):
        path = out / ("rejects.jsonl" if split == "dropped" else f"{split}.jsonl")
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if split != "dropped":
                    yield split, obj
                elif obj.get("stage") == "bfcl-overlap" and isinstance(obj.get("record"), dict):
                    yield split, obj["record"]


def overlap_summary(block: dict) -> str:
    if block.get("status") != "checked":
        return f"[bfcl overlap] not checked: {block.get('why')}"
    r = block["records"]
    lines = [f"[bfcl overlap] {r['any']} records overlap BFCL: {r['exact_text']} same user text, {r['near_text']} "
             f"near-duplicate ({block['ngram_n']}-gram overlap >= {block['near_threshold']:.0%}), {r['same_tool']} "
             f"offer a BFCL function (same name and parameter names); listed in {block['listed_in']}"
             + (f"; {block['dropped']} dropped to rejects.jsonl" if block["dropped"] else "")]
    for cat, c in block["by_category"].items():
        lines.append(f"[bfcl overlap]   {cat:<24} any {c['any']:>6}  exact {c['exact_text']:>6}  "
                     f"near {c['near_text']:>6}  tool {c['same_tool']:>6}")
    return "\n".join(lines)


def _move_to_rejects(out: Path, overlapping: dict) -> int:
    """Rewrite train/val without the overlapping ids (atomically) and append them to rejects.jsonl."""
    moved = 0
    listing = {}
    with open(out / OVERLAP_FILE, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            listing[obj["id"]] = obj
    with open(out / "rejects.jsonl", "a", encoding="utf-8") as rejects:
        for split in ("train", "val"):
            ids = overlapping[split]
            if not ids:
                continue
            path = out / f"{split}.jsonl"
            tmp = path.with_suffix(".jsonl.tmp")
            with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
                for line in src:
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if rec["id"] not in ids:
                        dst.write(line if line.endswith("\n") else line + "\n")
                        continue
                    info = listing[rec["id"]]
                    first = info["matches"][0]
                    rejects.write(json.dumps({
                        "id": rec["id"], "where": f"{split}.jsonl", "stage": "bfcl-overlap",
                        "reason": f"bfcl:{info['kinds'][0]}",
                        "detail": f"{first['category']} {first['bfcl_id']}: {first['bfcl']!r:.200}", "record": rec},
                        ensure_ascii=False) + "\n")
                    moved += 1
            rejects.flush()
            os.fsync(rejects.fileno())  # the rejects are safe on disk before the split loses them
            os.replace(tmp, path)
    return moved
