"""The canonical record and its rule-based (AST) validation.

A canonical record is one JSON object per line:

    {"id": str,
     "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "tools": [{"name": str, "description": str,
                "parameters": {"type": "object", "properties": {...}, "required": [...]}}],
     "answers": [{"name": str, "arguments": {...}}],     # [] means "no call is correct"
     "category": "simple"|"multiple"|"parallel"|"parallel_multiple"|"irrelevance",
     "reasoning": str, "difficulty": "easy"|"medium"|"hard", "source": str}   # the last three optional

Validation checks that every reference call fits its tool's schema (function exists, required
parameters present, no unknown parameters, right types and enum values). Changes that keep the
meaning of a value (the string "3" for an integer parameter, "true" for a boolean, a number for a
string, an enum value in the wrong case, ...) are applied and listed as repairs; anything else
raises RecordError. Schemas in BFCL's dialect (dict, float, tuple, any) are read as well.
Plain dict/type checks only: this runs at well over 20k records/s on one core.
"""
from __future__ import annotations

import json
import math
import re

from data.calls import TYPES, nesting_exceeds

CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")
ROLES = ("system", "user", "assistant", "tool")

# JSON Schema names and the dialects we meet in the wild (BFCL, Python annotations) -> one name (the JSON
# Schema column of data.calls.TYPES). None means "any value".
TYPE_NAMES = {name: json_name for name, (json_name, _, _) in TYPES.items()}
_INT_RE = re.compile(r"[+-]?\d+")
_NUM_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
MAX_RECORD_DEPTH = 100   # nesting of lists / objects in a record; deeper records are refused
MAX_NUMBER_CHARS = 100   # a numeric string longer than this is not repaired into a number


class DataError(ValueError):
    """A data file that cannot be used: the one-line message names the file (and line) and what to do."""


class RecordError(Exception):
    """A record that cannot be used: `reason` is a short code for statistics ("ast:unknown-param"),
    `detail` says what exactly was wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- JSON text

def json_loads(text: str):
    """json.loads that fails only with ValueError and a one-line message, whatever the text holds
    (a byte-order mark is skipped; nesting too deep for the decoder and over-long integers are errors)."""
    try:
        return json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
    except ValueError:  # int() refuses integers of over 4300 digits
        raise ValueError("a number with too many digits") from None


def record_line(rec) -> str:
    """The JSON line of a record; RecordError if it cannot be one (text that is not valid Unicode, NaN or
    infinity, values that are not JSON). check_structure checks the nesting first."""
    try:
        line = json.dumps(rec, ensure_ascii=False, allow_nan=False)
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError("record:unicode", f"text holds a lone surrogate ({e.object[e.start:e.end]!a}) or "
                                            "bytes that are not UTF-8") from None
    except ValueError:
        raise RecordError("record:number", "NaN or infinity is not a JSON number") from None
    except (TypeError, RecursionError) as e:
        raise RecordError("record:not-json", f"{type(e).__name__}: {str(e)[:200]}") from None
    return line


# ----------------------------------------------------------------------------- record structure

def check_structure(rec) -> str:
    """Raise RecordError("record:...") if `rec` is not shaped like a canonical record; else its JSON line."""
    if not isinstance(rec, dict):
        raise RecordError("record:not-an-object", f"expected a JSON object, got {type(rec).__name__}")
    if nesting_exceeds(rec, MAX_RECORD_DEPTH):
        raise RecordError("record:too-deep", f"lists/objects nested deeper than {MAX_RECORD_DEPTH} levels")
    if not isinstance(rec.get("id"), str) or not rec["id"]:
        raise RecordError("record:id", "field 'id' must be a non-empty string")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("record:messages", "field 'messages' must be a non-empty list of chat messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RecordError("record:messages",
                              f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.120}")
    if not any(m["role"] == "user" for m in msgs):
        raise RecordError("record:messages", "no user message")
    tools = rec.get("tools")
    if not isinstance(tools, list):
        raise RecordError("record:tools", "field 'tools' must be a list of function schemas")
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise RecordError("record:tools", f"tools[{i}] has no name")
        p = t.get("parameters", {})
        if not isinstance(p, dict) or not isinstance(p.get("properties", {}), dict) \
                or not isinstance(p.get("required", []), list) or not all(isinstance(r, str) for r in p.get("required", [])):
            raise RecordError("record:tools", f"tools[{i}] ({t['name']}): 'parameters' must be "
                                              "{'type': 'object', 'properties': {...}, 'required': [names]}")
    answers = rec.get("answers")
    if not isinstance(answers, list):
        raise RecordError("record:answers", "field 'answers' must be a list of calls ([] = no call)")
    if rec.get("category") not in CATEGORIES:
        raise RecordError("record:category", f"field 'category' must be one of {CATEGORIES}, "
                                             f"got {rec.get('category')!r}")
    for key in ("reasoning", "difficulty", "source"):
        if key in rec and not isinstance(rec[key], str):
            raise RecordError("record:" + key, f"optional field {key!r} must be a string")
    return record_line(rec)


def infer_category(tools: list, answers: list) -> str:
    if not answers:
        return "irrelevance"
    if len(answers) == 1:
        return "simple" if len(tools) == 1 else "multiple"
    return "parallel" if len(tools) == 1 else "parallel_multiple"


def load_records(path) -> list[dict]:
    """Read a canonical JSONL file (a byte-order mark is skipped), checking every record's structure.
    Raises DataError (a ValueError) with one line naming the file (and line) and what is wrong."""
    records = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json_loads(raw.decode("utf-8-sig"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 text ({e.reason}); canonical files are UTF-8 JSONL") from None
                except ValueError as e:
                    raise DataError(f"{where}: {e}; canonical files hold one JSON record per line") from None
                try:
                    check_structure(rec)
                except RecordError as e:
                    raise DataError(f"{where}: {e}. Convert it first: python -m data.prepare --input ... --out DIR") \
                        from None
                records.append(rec)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; pass a canonical JSONL file "
                        "(made by python -m data.prepare)") from None
    if not records:
        raise DataError(f"{path} holds no records; pass a canonical JSONL file (made by python -m data.prepare)")
    return records


# ----------------------------------------------------------------------------- AST validation

def validate_record(rec: dict) -> list[str]:
    """Check (and safely repair, in place) rec["answers"] against rec["tools"] and the category.
    Returns the list of repairs made; raises RecordError on anything that cannot be repaired."""
    fixed, repairs = validate_calls(rec["answers"], rec["tools"])
    rec["answers"] = fixed
    cat, n = rec["category"], len(fixed)
    if (cat == "irrelevance") != (n == 0) or (cat in ("simple", "multiple") and n != 1) \
            or (cat in ("parallel", "parallel_multiple") and n < 2):
        raise RecordError("ast:category", f"category {cat!r} does not fit {n} reference call(s)")
    if not rec["tools"]:
        raise RecordError("ast:no-tools", "no tools offered")
    return repairs


def validate_calls(calls, tools: list) -> tuple[list, list[str]]:
    """Validate a list of calls [{"name", "arguments"}] against tool schemas.
    Returns (calls with safe repairs applied, repairs); raises RecordError otherwise."""
    if not isinstance(calls, list):
        raise RecordError("ast:not-a-list", f"the answer must be a list of calls, got {type(calls).__name__}")
    by_name = {}
    for t in tools:
        by_name[t["name"]] = t.get("parameters") or {}
    repairs: list[str] = []
    out = []
    for i, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise RecordError("ast:not-a-call", f"call {i} is not {{'name': str, 'arguments': {{...}}}}: {call!r:.120}")
        name = call["name"]
        args = call.get("arguments", {})
        if isinstance(args, str):  # OpenAI-style arguments as a JSON string
            try:
                args = json_loads(args)
            except ValueError:
                raise RecordError("ast:not-a-call", f"{name}: arguments are a string that is not JSON") from None
            repairs.append(f"arguments-from-json-string:{name}")
        if not isinstance(args, dict):
            raise RecordError("ast:not-a-call", f"{name}: arguments must be an object, got {type(args).__name__}")
        schema = by_name.get(name)
        if schema is None:
            raise RecordError("ast:unknown-function", f"{name!r} is not among the tools {sorted(by_name)}")
        props = schema.get("properties") or {}
        fixed_args = {}
        for key, value in args.items():
            spec = props.get(key)
            if spec is None:
                raise RecordError("ast:unknown-param", f"{name}: unknown parameter {key!r} (known: {sorted(props)})")
            if value is None and key not in schema.get("required", ()):
                repairs.append(f"drop-null-optional:{name}.{key}")  # null for an optional parameter = omitted
                continue
            fixed_args[key] = _fit(value, spec, f"{name}.{key}", repairs)
        for key in schema.get("required", ()):
            if key not in fixed_args:
                raise RecordError("ast:missing-required", f"{name}: required parameter {key!r} is missing")
        out.append({"name": name, "arguments": fixed_args})
    return out, repairs


def _fit(value, spec, where: str, repairs: list):
    """Return `value` checked against `spec` (safely repaired if needed, repairs appended)."""
    if not isinstance(spec, dict):
        return value
    enum = spec.get("enum")
    t = spec.get("type")
    if isinstance(t, list):  # ["string", "null"]: accept the value if any alternative fits as is
        for alt in t:
            try:
                return _fit(value, {**spec, "type": alt}, where, [])
            except RecordError:
                pass
        raise RecordError("ast:type", f"{where}: {value!r:.60} fits none of the types {t}")
    kind = TYPE_NAMES.get(t, None) if isinstance(t, str) else None
    if enum is not None and not isinstance(enum, list):
        raise RecordError("ast:schema", f"{where}: 'enum' must be a list, got {type(enum).__name__}")
    if kind is not None:
        value = _fit_type(value, kind, spec, where, repairs)
    if enum is not None and kind == "array" and type(value) is list:  # BFCL puts item enums on the array
        return [_fit(v, {"enum": enum}, f"{where}[{i}]", repairs) for i, v in enumerate(value)]
    if enum is not None and value not in enum:
        if isinstance(value, str):
            for e in enum:
                if isinstance(e, str) and e.lower() == value.lower():
                    repairs.append(f"enum-case:{where}")
                    return e
        raise RecordError("ast:enum", f"{where}: {value!r:.60} is not one of {enum}")
    return value


def _fit_type(value, kind: str, spec: dict, where: str, repairs: list):
    vt = type(value)
    if kind == "string":
        if vt is str:
            return value
        if vt is int or (vt is float and math.isfinite(value)):
            repairs.append(f"string-from-number:{where}")
            return str(value)
    elif kind == "integer":
        if vt is int:
            return value
        if vt is float and value.is_integer():
            repairs.append(f"int-from-float:{where}")
            return int(value)
        if vt is str and len(value) <= MAX_NUMBER_CHARS and _INT_RE.fullmatch(value.strip()):
            repairs.append(f"int-from-string:{where}")
            return int(value)
    elif kind == "number":
        if vt is float or vt is int:
            return value
        if vt is str and len(value) <= MAX_NUMBER_CHARS and _NUM_RE.fullmatch(value.strip()) \
                and math.isfinite(float(value)):
            repairs.append(f"number-from-string:{where}")
            return int(value) if _INT_RE.fullmatch(value.strip()) else float(value)
    elif kind == "boolean":
        if vt is bool:
            return value
        if vt is str and value.strip().lower() in ("true", "false"):
            repairs.append(f"bool-from-string:{where}")
            return value.strip().lower() == "true"
    elif kind == "array":
        if vt is str and value.lstrip().startswith("["):
            try:
                decoded = json_loads(value)
            except ValueError:
                decoded = None
            if type(decoded) is list:
                repairs.append(f"array-from-json-string:{where}")
                value, vt = decoded, list
        if vt is list:
            items = spec.get("items")
            if isinstance(items, dict) and items:
                return [_fit(v, items, f"{where}[{i}]", repairs) for i, v in enumerate(value)]
            return value
    elif kind == "object":
        if vt is str and value.lstrip().startswith("{"):
            try:
                decoded = json_loads(value)
            except ValueError:
                decoded = None
            if type(decoded) is dict:
                repairs.append(f"object-from-json-string:{where}")
                value, vt = decoded, dict
        if vt is dict:
            props = spec.get("properties")
            if not isinstance(props, dict) or not props:
                return value
            # nested keys are typed when known; unknown nested keys are tolerated (schemas are often loose)
            fixed = {k: (_fit(v, props[k], f"{where}.{k}", repairs) if k in props else v) for k, v in value.items()}
            for k in spec.get("required", ()) if isinstance(spec.get("required"), list) else ():
                if isinstance(k, str) and k not in fixed:
                    raise RecordError("ast:missing-required", f"{where}: required field {k!r} is missing")
            return fixed
    elif kind == "null":
        if value is None:
            return value
    raise RecordError("ast:type", f"{where}: expected {kind}, got {type(value).__name__} {value!r:.60}")


# ----------------------------------------------------------------------------- schema normalisation

def normalize_schema(spec):
    """A parameter schema in BFCL's or Python's dialect -> JSON Schema (dict->object, float->number,
    tuple->array, any->no type), recursively through properties and items."""
    if not isinstance(spec, dict):
        return spec
    out = {}
    for k, v in spec.items():
        if k == "type" and isinstance(v, str):
            kind = TYPE_NAMES.get(v.lower(), "?")
            if kind == "?":
                kind = python_type(v)[0].get("type")
            if kind is not None:
                out["type"] = kind
        elif k == "properties" and isinstance(v, dict):
            out[k] = {name: normalize_schema(s) for name, s in v.items()}
        elif k == "items":
            out[k] = normalize_schema(v)
        else:
            out[k] = v
    return out


def normalize_tool(tool: dict) -> dict:
    """{"type": "function", "function": {...}} or a bare function schema -> canonical tool."""
    if isinstance(tool.get("function"), dict) and "name" not in tool:
        tool = tool["function"]
    params = tool.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}, "required": []}
    elif isinstance(params, dict) and not _is_json_schema_object(params):
        params = xlam_parameters(params)
    else:
        params = normalize_schema(params)
        params["type"] = "object"
        params.setdefault("properties", {})
        params.setdefault("required", [])
    return {"name": tool.get("name"), "description": tool.get("description") or "", "parameters": params}


def _is_json_schema_object(params: dict) -> bool:
    # a parameter may itself be called "type", so look at the value, not the key
    return isinstance(params.get("type"), str) and isinstance(params.get("properties", {}), dict)


def xlam_parameters(params: dict) -> dict:
    """xLAM/APIGen parameters {name: {"type": "str, optional", "description", "default"}} -> JSON Schema.
    A parameter is required unless its type says optional or it carries a default."""
    props, required = {}, []
    for name, p in params.items():
        if not isinstance(p, dict):
            p = {"type": str(p)}
        schema, optional = python_type(str(p.get("type", "")))
        if p.get("description"):
            schema["description"] = p["description"]
        if "default" in p and p["default"] not in ("", None):
            schema["default"] = p["default"]
        if "enum" in p:
            schema["enum"] = p["enum"]
        props[name] = schema
        if not optional and "default" not in p:
            required.append(name)
    return {"type": "object", "properties": props, "required": required}


def python_type(t: str) -> tuple[dict, bool]:
    """A Python-style annotation ("List[int]", "str, optional", "Optional[float]") -> (schema, optional)."""
    s = t.strip()
    low = s.lower()
    optional = "optional" in low
    cut = low.find(", optional")
    if cut >= 0:
        s, low = s[:cut].strip(), low[:cut].strip()
    if low.startswith("optional[") and low.endswith("]"):
        s, low = s[9:-1].strip(), low[9:-1].strip()
    head = low.split("[", 1)[0].strip()
    if head in ("list", "set", "tuple", "sequence", "array"):
        inner = s[s.find("[") + 1:-1] if "[" in s and s.endswith("]") else ""
        items = python_type(inner)[0] if inner and "," not in inner else {}
        return ({"type": "array", "items": items} if items else {"type": "array"}), optional
    if head == "union" and low in ("union[int, float]", "union[float, int]"):
        return {"type": "number"}, optional
    kind = TYPE_NAMES.get(head)
    if head == "mapping":
        kind = "object"
    return ({"type": kind} if kind else {}), optional
