"""The function-call language: the prompt format and template, a safe parser for model output, and a checker
with the semantics of BFCL's AST checker; the reason codes and the table of type names they share.

One module, used by the reward (rl/reward.py), the data pipeline and BFCL scoring (eval/bfcl.py).

Calls are plain dicts everywhere: {"name": str, "arguments": {param: value}}, the same shape as the
"answers" of a training record. Model text is never executed: the parser reads Python's AST and only
accepts literal values (numeric constant arithmetic is folded from the AST with size caps).

Reasons for a failed check are "<code>" or "<code>: <detail>"; metrics aggregate on the code (`reason_code`,
the text before the first ": "). The codes are listed in REASON_CODES.
"""
from __future__ import annotations

import ast
import io
import json
import keyword
import re
import tokenize
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------------
# Reason codes

REASON_CODES = (
    "format:too_long",      # input over the length cap
    "format:no_think",      # think format: no well-formed <think>...</think> first
    "format:no_answer",     # think format: no well-formed <answer>...</answer> after the think block
    "format:extra_text",    # think format: text outside the blocks, or repeated blocks
    "format:parse_error",   # the answer is not a call list in the requested language
    "wrong_count",          # number of calls differs from the expected number
    "wrong_function",       # function name does not match
    "missing_param",        # a required (or non-omittable expected) parameter is absent
    "unexpected_param",     # a parameter outside the schema / the expected answer
    "wrong_type",           # value has the wrong type
    "wrong_value",          # value of the right type, not among the allowed values
    "irrelevance:made_call",  # a call was made where none should be
    "relevance:no_call",    # no call was made where one should be
)

MAX_TEXT_CHARS = 200_000     # whole completion; longer text is refused before any regex work
MAX_ANSWER_CHARS = 50_000    # the part handed to the Python/JSON parser
MAX_DEPTH = 100              # nesting of values / expressions inside one call list
MAX_INT_BITS = 4096          # no integer bigger than this (a literal or a folded result)
MAX_FOLDED_SIZE = 100_000    # elements constant folding may create in one answer, nested copies counted
MAX_KEY_SIZE = 1_000         # elements (characters for a string) of one dict key
MAX_REASON_CHARS = 300       # a failure reason is cut to this length


def reason_code(reason: str) -> str:
    """The code of a reason, the key metrics and reports count it under: "wrong_value: x=3 ..." -> "wrong_value";
    "format:no_think" stays whole."""
    return reason.split(": ", 1)[0]


def _bounded(reason: str) -> str:
    # reasons are logged with every sample: a value quoted in one must not make it large
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# Type names

# Every type name met in tool schemas (JSON Schema, BFCL's dialect, Python annotations), in one table:
#   the JSON Schema name records are normalised to (None: any value),
#   the Python type the checker requires of a value (None: not checked; BFCL checks "any" as str),
#   the annotation shown in Python-signature prompts.
TYPES = {
    "string": ("string", str, "str"), "str": ("string", str, "str"),
    "integer": ("integer", int, "int"), "int": ("integer", int, "int"),
    "number": ("number", float, "float"), "float": ("number", float, "float"), "double": ("number", float, "float"),
    "boolean": ("boolean", bool, "bool"), "bool": ("boolean", bool, "bool"),
    "array": ("array", list, "list"), "list": ("array", list, "list"), "tuple": ("array", list, "tuple"),
    "object": ("object", dict, "dict"), "dict": ("object", dict, "dict"),
    "null": ("null", None, "None"), "any": (None, str, "Any"),
}


# ----------------------------------------------------------------------------------------------------
# Prompt format

@dataclass(frozen=True)
class PromptFormat:
    """How a prompt asks for calls and what the model's turn starts with: one value, saved with every run and
    checkpoint (prompt_format.json), so evaluation prompts a trained model the way it was trained."""
    answer_format: str = "think"  # think | plain | json | hermes (see parse_completion)
    tools_as: str = "json"  # json (BFCL's listing) | python (signatures with docstrings)
    prefill: str = ""  # text that opens the assistant turn (e.g. "<think>"): part of the prompt, never scored

    def __post_init__(self):
        if self.answer_format not in _FORMAT_RULES:
            raise ValueError(f"answer_format must be one of {', '.join(_FORMAT_RULES)}, got {self.answer_format!r}")
        if self.tools_as not in ("json", "python"):
            raise ValueError(f"tools_as must be 'json' or 'python', got {self.tools_as!r}")

    @property
    def starts_in_think(self) -> bool:
        """The completion begins inside <think> (the prefill opened it)."""
        return self.prefill.endswith("<think>")

    def to_json(self) -> str:
        return json.dumps({"answer_format": self.answer_format, "tools_as": self.tools_as, "prefill": self.prefill})


# ----------------------------------------------------------------------------------------------------
# Prompt template

_PROMPT_INTRO = (
    "You are an expert at composing function calls. You are given a question and a set of functions. "
    "Decide which function calls, if any, answer the question. If none of the functions can be used, say "
    "so and make no call. If the question lacks parameters that a function requires, also say so.")

_FORMAT_RULES = {
    "plain": (
        "Reply with the function calls only, written as a Python list: "
        "[func_name1(param_name1=value1, param_name2=value2...), func_name2(param=value)]. "
        "Use keyword arguments and literal values only. Do not add any other text."),
    "think": (
        "First think the problem through inside <think>...</think>. Then give the function calls inside "
        "<answer>...</answer>, written as a Python list: "
        "[func_name1(param_name1=value1, param_name2=value2...), func_name2(param=value)]. "
        "Use keyword arguments and literal values only. If no function fits, say so inside <answer> "
        "instead of writing a call. The reply looks like:\n"
        "<think>your reasoning</think><answer>[func_name(param_name=value)]</answer>"),
    "json": (
        "Reply with the function calls only, as a JSON list: "
        '[{"name": "func_name1", "arguments": {"param_name1": value1}}, {"name": "func_name2", '
        '"arguments": {...}}]. Do not add any other text. If no function fits, reply with [].'),
    "hermes": (
        "For each function call, reply with a JSON object inside tool_call tags: "
        '<tool_call>{"name": "func_name", "arguments": {"param_name": value}}</tool_call>. '
        "If no function fits, say so and write no tool_call."),
}

def _py_type(schema: dict) -> str:
    t = schema.get("type", "any")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "any")
    name = TYPES[t][2] if t in TYPES else str(t)
    items = schema.get("items")
    if name in ("list", "tuple") and isinstance(items, dict) and "type" in items:
        name = f"{name}[{_py_type(items)}]"
    return name


def tool_as_python(tool: dict) -> str:
    """One tool as a Python signature with a docstring (small models read this more easily than JSON)."""
    params = tool.get("parameters") or {}
    props = params.get("properties") or {}
    required = set(params.get("required") or [])
    sig = []
    for name, schema in props.items():
        text = f"{name}: {_py_type(schema)}"
        if name not in required:
            text += f" = {schema['default']!r}" if "default" in schema else " = None"
        sig.append(text)
    # required first, as Python demands
    sig.sort(key=lambda s: "=" in s)
    lines = [f"def {tool.get('name', '')}({', '.join(sig)}):", f'    """{tool.get("description", "").strip()}']
    if props:
        lines.append("")
        lines.append("    Args:")
        for name, schema in props.items():
            desc = str(schema.get("description", "")).strip()
            extra = f" One of {schema['enum']}." if "enum" in schema else ""
            lines.append(f"        {name} ({_py_type(schema)}): {desc}{extra}".rstrip())
    lines.append('    """')
    return "\n".join(lines)


def system_prompt(tools: list[dict], answer_format: str = "think", tools_as: str = "json") -> str:
    """The system text: task, output format, and the functions (as BFCL's JSON list, or as Python)."""
    if answer_format not in _FORMAT_RULES:
        raise ValueError(f"answer_format must be one of {sorted(_FORMAT_RULES)}, got {answer_format!r}")
    if tools_as == "json":
        listing = "Here is a list of functions in JSON format that you can invoke.\n" + json.dumps(tools, indent=4)
    elif tools_as == "python":
        listing = ("Here is a list of functions, as Python signatures, that you can invoke.\n"
                   + "\n\n".join(tool_as_python(t) for t in tools))
    else:
        raise ValueError(f"tools_as must be 'json' or 'python', got {tools_as!r}")
    return f"{_PROMPT_INTRO}\n\n{_FORMAT_RULES[answer_format]}\n\n{listing}\n"


def flatten_question(question) -> list[dict]:
    """A question as flat chat messages: a string is one user turn; BFCL's list of turns (each a list of
    messages) is concatenated."""
    if isinstance(question, str):
        return [{"role": "user", "content": question}]
    messages = []
    for item in question:
        if isinstance(item, list):   # BFCL: a list of turns, each a list of messages
            messages.extend(flatten_question(item))
        else:
            messages.append({"role": item["role"], "content": item["content"]})
    return messages


def build_messages(question, tools: list[dict], answer_format: str = "think", tools_as: str = "json",
                   merge_system: bool = False) -> list[dict]:
    """Chat messages for one question. A system message in the question is appended to ours (as BFCL does).
    merge_system=True puts the system text at the top of the first user turn instead (templates without a
    system role)."""
    messages = flatten_question(question)
    system = system_prompt(tools, answer_format, tools_as)
    if messages and messages[0]["role"] == "system":
        system = system + "\n\n" + messages[0]["content"]
        messages = messages[1:]
    if not merge_system:
        return [{"role": "system", "content": system}] + messages
    for i, m in enumerate(messages):
        if m["role"] == "user":
            return messages[:i] + [{"role": "user", "content": system + "\n\n" + m["content"]}] + messages[i + 1:]
    return [{"role": "user", "content": system}] + messages


_SYSTEM_ROLE_CACHE: dict[int, bool] = {}


def template_has_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system message (some raise, some drop it)."""
    key = id(tokenizer)
    if key not in _SYSTEM_ROLE_CACHE:
        marker = "SYSTEM-ROLE-PROBE-7c1f"
        try:
            text = tokenizer.apply_chat_template([{"role": "system", "content": marker},
                                                  {"role": "user", "content": "hi"}], tokenize=False)
            _SYSTEM_ROLE_CACHE[key] = marker in text
        except Exception:
            _SYSTEM_ROLE_CACHE[key] = False
    return _SYSTEM_ROLE_CACHE[key]


def render_prompt(tokenizer, question, tools: list[dict], prompt_format: PromptFormat = PromptFormat()) -> str:
    """The prompt string: chat template with the generation prompt, then the prefill (e.g. "<think>")."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template before rendering prompts")
    merge = not template_has_system_role(tokenizer)
    messages = build_messages(question, tools, prompt_format.answer_format, prompt_format.tools_as,
                              merge_system=merge)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + prompt_format.prefill


def format_calls(calls: list[dict], style: str = "python") -> str:
    """Calls [{"name", "arguments"}] written the way the model should write them (supervised targets):
    "python" -> [f(a=1, b='x')], "json" -> a JSON list, "hermes" -> <tool_call> blocks, one a line."""
    if style == "python":
        return "[" + ", ".join(f"{c['name']}({', '.join(f'{k}={v!r}' for k, v in c['arguments'].items())})"
                               for c in calls) + "]"
    if style == "json":
        return json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls], ensure_ascii=False)
    if style == "hermes":
        return "\n".join(f"<tool_call>{json.dumps({'name': c['name'], 'arguments': c['arguments']}, ensure_ascii=False)}"
                         "</tool_call>" for c in calls)
    raise ValueError(f"style must be python, json or hermes, got {style!r}")


# ----------------------------------------------------------------------------------------------------
# Parser

class CallSyntaxError(ValueError):
    """The text is not a call list in the expected language (never raised out of parse_completion)."""


@dataclass
class Parsed:
    calls: list[dict] | None   # None when the answer is not a call list; [] when it is an empty list
    think: str | None = None
    answer: str | None = None
    error: str = ""            # "" when well formed and decoded
    well_formed: bool = True   # the think/answer structure is right (the answer may still not decode)

    @property
    def ok(self) -> bool:
        return not self.error


_NUMBER = (int, float, complex)


class _Reader:
    """What reading one call list carries along: the elements constant folding may still create, and whether
    only JSON literals are accepted (data preparation) rather than BFCL's readings of names and calls."""

    def __init__(self, literal_only: bool = False):
        self.fold_left = MAX_FOLDED_SIZE
        self.literal_only = literal_only

    def spend(self, size: int) -> None:
        self.fold_left -= size
        if self.fold_left < 0:
            raise CallSyntaxError(f"constant folding over {MAX_FOLDED_SIZE} elements")


def _folded_size(x, limit: int) -> int:
    """Elements inside x counted as if every shared reference were a copy (a string counts its characters):
    what hashing, comparing or printing x costs. Counting stops once past `limit`."""
    total, stack = 0, [x]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple)):
            total += len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += len(v)
            stack.extend(v)
            stack.extend(v.values())
    return total


def _check_number(x):
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise CallSyntaxError("number too large")
    return x


def _fold_binop(node: ast.BinOp, depth: int, reader: _Reader):
    """Numeric constant arithmetic and sequence + / * int, folded without evaluating any text. Every folded
    sequence is charged to the answer's budget at its nested size, so (((0,)*n,)*n,)*n cannot build up."""
    left, right = _value(node.left, depth + 1, reader), _value(node.right, depth + 1, reader)
    op = type(node.op)
    sequence = (str, list, tuple)
    if op is ast.Add and type(left) is type(right) and isinstance(left, sequence):
        reader.spend(_folded_size(left, reader.fold_left) + _folded_size(right, reader.fold_left))
        return left + right
    if op is ast.Mult and (isinstance(left, sequence) and type(right) is int
                           or type(left) is int and isinstance(right, sequence)):
        seq, times = (left, right) if isinstance(left, sequence) else (right, left)
        if times <= 0 or not seq:
            return seq[:0]
        reader.spend(_folded_size(seq, reader.fold_left // times) * times)
        return seq * times
    if not (isinstance(left, _NUMBER) and isinstance(right, _NUMBER)):
        raise CallSyntaxError(f"unsupported expression: {type(left).__name__} {op.__name__} {type(right).__name__}")
    try:
        if op is ast.Add:
            return _check_number(left + right)
        if op is ast.Sub:
            return _check_number(left - right)
        if op is ast.Mult:
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise CallSyntaxError("number too large")
            return left * right
        if op is ast.Div:
            return left / right
        if op is ast.FloorDiv:
            return left // right
        if op is ast.Mod:
            return left % right
        if op is ast.Pow:
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 \
                    and (right > MAX_INT_BITS or left.bit_length() * right > MAX_INT_BITS):
                raise CallSyntaxError("number too large")
            if isinstance(right, (int, float)) and abs(right) > 10_000 and not isinstance(left, int):
                raise CallSyntaxError("exponent too large")
            return _check_number(left ** right)
    except CallSyntaxError:
        raise
    except Exception as e:  # ZeroDivisionError, OverflowError, ...
        raise CallSyntaxError(f"arithmetic error: {type(e).__name__}") from None
    raise CallSyntaxError(f"unsupported operator {op.__name__}")


def _subtree_depth_ok(node: ast.AST, limit: int) -> bool:
    stack = [(node, 0)]
    while stack:
        n, d = stack.pop()
        if d > limit:
            return False
        stack.extend((c, d + 1) for c in ast.iter_child_nodes(n))
    return True


def _source_text(node: ast.AST, depth: int) -> str:
    if not _subtree_depth_ok(node, MAX_DEPTH - depth):
        raise CallSyntaxError("nested too deeply")
    return ast.unparse(node)


def _value(node: ast.AST, depth: int, reader: _Reader):
    """A literal value from an AST node, following BFCL's decoding for everything realistic."""
    if depth > MAX_DEPTH:
        raise CallSyntaxError("nested too deeply")
    if isinstance(node, ast.Constant):
        return "..." if node.value is Ellipsis else _check_number(node.value)
    if isinstance(node, ast.UnaryOp):
        # only a sign in front of a number constant; a plus keeps the sign (BFCL negates it: a bug)
        if isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (bool, *_NUMBER)):
            if isinstance(node.op, ast.USub):
                return -_check_number(node.operand.value)
            if isinstance(node.op, ast.UAdd):
                return +_check_number(node.operand.value)
        raise CallSyntaxError(f"unsupported unary expression: {_short(node)}")
    if isinstance(node, ast.List):
        return [_value(v, depth + 1, reader) for v in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_value(v, depth + 1, reader) for v in node.elts)
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                raise CallSyntaxError("dict unpacking (**) is not a literal")
            key = _value(k, depth + 1, reader)
            if _folded_size(key, MAX_KEY_SIZE) > MAX_KEY_SIZE:
                raise CallSyntaxError(f"dict key over {MAX_KEY_SIZE} elements")
            try:
                out[key] = _value(v, depth + 1, reader)
            except TypeError:
                raise CallSyntaxError("unhashable dict key") from None
        return out
    if isinstance(node, ast.BinOp):
        return _fold_binop(node, depth, reader)
    if reader.literal_only:
        raise CallSyntaxError(f"not a literal: {_short(node)}")
    if isinstance(node, ast.Name):
        # a bare name is read as its own text (BFCL: a variable reference such as x=my_var or flag=true)
        return node.id
    if isinstance(node, ast.Call):
        if not node.keywords:
            return _source_text(node, depth)   # BFCL keeps a positional-only call as its source text
        return {_call_name(node): _call_args(node, depth, reader)}
    if isinstance(node, ast.Subscript):
        return _subscript_text(node, depth)    # likewise a subscript such as data[0]
    raise CallSyntaxError(f"unsupported value: {type(node).__name__}")


def _subscript_text(node: ast.Subscript, depth: int) -> str:
    # BFCL's spelling: value text + "[" + slice text + "]" (a tuple slice keeps its parentheses)
    return _source_text(node.value, depth) + "[" + _source_text(node.slice, depth) + "]"


def _short(node: ast.AST) -> str:
    try:
        return ast.unparse(node)[:60] if _subtree_depth_ok(node, 20) else type(node).__name__
    except Exception:
        return type(node).__name__


def _call_name(node: ast.Call) -> str:
    parts = []
    func = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _call_args(node: ast.Call, depth: int, reader: _Reader) -> dict:
    # positional arguments are dropped (as BFCL's decoder does); the checker then reports the parameters
    # they were meant for as missing
    if reader.literal_only and (node.args or any(kw.arg is None for kw in node.keywords)):
        raise CallSyntaxError(f"positional or ** argument: {_short(node)}")
    return {kw.arg: _value(kw.value, depth + 1, reader) for kw in node.keywords}


def bfcl_trim(text: str) -> str:
    """BFCL's prompt-mode trimming: strip backticks, newlines and spaces at both ends, then make sure the text
    is wrapped in [ ]. (So a bare ``` fence passes, a ```python fence does not; tabs and \\r are not stripped.)"""
    text = text.strip("`\n ")
    if not text.startswith("["):
        text = "[" + text
    if not text.endswith("]"):
        text = text + "]"
    return text


def parse_python_calls(text: str, literal_only: bool = False) -> list[dict]:
    """Decode a Python-style call list, BFCL's way, without executing anything. Raises CallSyntaxError.

    literal_only (data preparation): the text as written, no BFCL trimming; callees are dotted names, arguments
    keywords, values JSON literals (names, calls and subscripts are errors, not their text)."""
    if len(text) > MAX_ANSWER_CHARS:
        raise CallSyntaxError(f"answer longer than {MAX_ANSWER_CHARS} characters")
    source = text if literal_only else bfcl_trim(text)
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise CallSyntaxError(f"not a Python expression ({type(e).__name__})") from None
    body = tree.body
    if isinstance(body, ast.Call):
        nodes = [body]
    elif isinstance(body, (ast.List, ast.Tuple, ast.Set)):
        nodes = body.elts
    else:
        raise CallSyntaxError(f"not a list of calls: {type(body).__name__}")
    reader = _Reader(literal_only)
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call):
            raise CallSyntaxError(f"list item is not a call: {_short(node)}")
        func = node.func
        while isinstance(func, ast.Attribute):
            func = func.value
        if literal_only and not isinstance(func, ast.Name):
            raise CallSyntaxError(f"callee is not a dotted name: {_short(node.func)}")
        calls.append({"name": _call_name(node), "arguments": _call_args(node, 0, reader)})
    if literal_only:
        try:
            json.dumps(calls)
        except (TypeError, ValueError):
            raise CallSyntaxError("a value is not a JSON value (bytes, complex, ...)") from None
    return calls


def _json_call(obj) -> dict:
    if not isinstance(obj, dict):
        raise CallSyntaxError("call is not a JSON object")
    name = obj.get("name", obj.get("function"))
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _json_loads(args)
    if not isinstance(name, str) or not isinstance(args, dict):
        raise CallSyntaxError('call must be {"name": str, "arguments": {...}}')
    return {"name": name, "arguments": args}


def _json_loads(text: str):
    if len(text) > MAX_ANSWER_CHARS:
        raise CallSyntaxError(f"answer longer than {MAX_ANSWER_CHARS} characters")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise CallSyntaxError("not valid JSON") from None
    if nesting_exceeds(value, MAX_DEPTH):
        raise CallSyntaxError("nested too deeply")
    return value


def nesting_exceeds(value, limit: int) -> bool:
    """Whether lists / tuples / dicts nest deeper than `limit` (walked level by level, without recursion)."""
    containers = (list, tuple, dict)
    level, depth = [value] if isinstance(value, containers) else [], 0
    while level:
        if depth >= limit:
            return True
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, containers)]
        depth += 1
    return False


def parse_json_calls(text: str) -> list[dict]:
    """A JSON list of {"name", "arguments"} objects (a single object is taken as a list of one)."""
    text = text.strip()
    if len(text) >= 6 and text.startswith("```") and text.endswith("```"):
        text = text[3:-3]
        text = text[4:] if text.startswith("json") else text
    obj = _json_loads(text)
    return [_json_call(o) for o in (obj if isinstance(obj, list) else [obj])]


def parse_hermes_calls(text: str) -> list[dict]:
    """Hermes-style <tool_call>{json}</tool_call> blocks; no block means no call."""
    calls, pos, rest = [], 0, []
    while True:
        block = _block(text, "<tool_call>", "</tool_call>", pos)
        if block is None:
            break
        calls.append(_json_call(_json_loads(block[0].strip())))
        rest.append(text[pos:block[1]])
        pos = block[2]
    rest.append(text[pos:])
    if any("<tool_call>" in r or "</tool_call>" in r for r in rest):
        raise CallSyntaxError("unbalanced <tool_call> tags")
    return calls


# special tokens a decoder may leave at the end of a completion
_TRAILING_SPECIAL_RE = re.compile(r"(?:<\|[^|<>\s]{1,30}\|>|</s>)\Z")


def _block(text: str, open_tag: str, close_tag: str, start: int = 0):
    """(content, start of open tag, end of close tag) of the first complete block at or after `start`, or None.
    str.find keeps this linear on adversarial text (a lazy regex is quadratic on many unclosed tags)."""
    i = text.find(open_tag, start)
    if i < 0:
        return None
    j = text.find(close_tag, i + len(open_tag))
    if j < 0:
        return None
    return text[i + len(open_tag):j], i, j + len(close_tag)


def _strip_trailing_specials(text: str) -> str:
    text = text.rstrip()
    while True:
        m = _TRAILING_SPECIAL_RE.search(text[-40:])
        if not m:
            return text
        text = text[:len(text) - (len(text[-40:]) - m.start())].rstrip()


def extract_answer(text: str) -> str:
    """For scoring raw results: the content of the first <answer> block if there is one, else the whole text."""
    block = _block(text, "<answer>", "</answer>")
    return block[0] if block else text


def _leading_think(text: str):
    """(think content, rest) when the text starts (after whitespace) with a complete <think> block, else None."""
    body = text.lstrip()
    if not body.startswith("<think>"):
        return None
    block = _block(body, "<think>", "</think>")
    if block is None:
        return None
    return block[0], body[block[2]:]


def parse_completion(text, answer_format: str = "think") -> Parsed:
    """Split and decode a completion (the full assistant text, prefill included). Never raises.

    answer_format: "think" (<think>...</think><answer>[calls]</answer>), "plain" (the call list, BFCL trimming),
    "json" (JSON list of {"name", "arguments"}), "hermes" (<tool_call>{...}</tool_call> blocks).
    For json/hermes a leading <think>...</think> block is allowed and skipped.
    """
    try:
        return _parse_completion(text, answer_format)
    except Exception as e:  # belt and braces: the parser must never raise on model text
        return Parsed(None, error=f"format:parse_error: {type(e).__name__}", well_formed=False)


def _decode(answer: str, answer_format: str):
    if answer_format in ("think", "plain"):
        return parse_python_calls(answer)
    if answer_format == "json":
        return parse_json_calls(answer)
    return parse_hermes_calls(answer)


def _parse_completion(text, answer_format: str) -> Parsed:
    if answer_format not in ("think", "plain", "json", "hermes"):
        raise ValueError(f"answer_format must be think, plain, json or hermes, got {answer_format!r}")
    if not isinstance(text, str):
        return Parsed(None, error="format:parse_error: not a string", well_formed=False)
    if len(text) > MAX_TEXT_CHARS:
        return Parsed(None, error="format:too_long", well_formed=False)
    think = None
    if answer_format == "think":
        lead = _leading_think(text)
        if lead is None or "<think>" in lead[0]:
            return Parsed(None, error="format:no_think", well_formed=False)
        think, rest = lead
        rest = _strip_trailing_specials(rest).lstrip()
        block = _block(rest, "<answer>", "</answer>")
        if block is None:
            return Parsed(None, think=think, error="format:no_answer", well_formed=False)
        answer = block[0]
        if block[1] != 0 or block[2] != len(rest) or any(t in answer for t in ("<answer>", "<think>", "</think>")):
            return Parsed(None, think=think, answer=answer, error="format:extra_text", well_formed=False)
    elif answer_format in ("json", "hermes"):
        lead = _leading_think(text)
        think, answer = lead if lead else (None, text)
    else:
        answer = text
    try:
        calls = _decode(answer, answer_format)
    except CallSyntaxError as e:
        return Parsed(None, think=think, answer=answer, error=_bounded(f"format:parse_error: {e}"))
    except (RecursionError, MemoryError, ValueError, TypeError) as e:
        return Parsed(None, think=think, answer=answer, error=f"format:parse_error: {type(e).__name__}")
    return Parsed(calls, think=think, answer=answer)


def decode_bfcl_result(result) -> list[dict] | None:
    """A raw BFCL result string as scored by eval.bfcl: the <answer> content if present, else the whole text,
    decoded with BFCL's prompt-mode rules. None when it does not decode."""
    if not isinstance(result, str) or len(result) > MAX_TEXT_CHARS:
        return None
    try:
        return parse_python_calls(extract_answer(result))
    except Exception:
        return None


# Tokens after which an expression must begin (or the bracket close), and operators no expression begins with.
# (`/` is left out: `lambda a, /: a` is an expression.)
_EXPRESSION_FOLLOWS = {"[", "(", "{", ","}
_STARTS_NO_EXPRESSION = {"<", ">", "<=", ">=", "<<", ">>", "==", "!=", "=", "%", "|", "&", "^", ","}
_ENDS_OPERAND = {")", "]", "}"}
_KEYWORDS = set(keyword.kwlist) | set(keyword.softkwlist) | {"type"}
_SKIPPED_TOKENS = {tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT}
_EXTENDS_TOKEN = re.compile(r"[A-Za-z0-9_'\"]|[^\x00-\x7f]")  # a character that could belong to the token before it


def undecodable_prefix(text: str) -> bool:
    """True when `text + anything` never decodes with parse_python_calls (BFCL's trimming, then a Python
    expression): the call list is already broken, whatever text follows. False when it might still decode (False is
    always safe to answer). Read with Python's tokenizer; two adjacent tokens settle it:
      * an operand (a name that is not a keyword, a number, a string, a closing bracket), whitespace, then a name
        that is not a keyword or a number: `The change`, `[f(x)] then`. No expression has two operands side by side.
      * an opening bracket or a comma, then a comparison, `=`, `%`, `|`, `&`, `^` or a comma: `[<think>`. No expression
        begins with one.
    Only tokens that no continuation can change count: reading stops at the first token error, and the second
    name or number must be followed by a character that cannot extend it."""
    source = text.lstrip("`\n ")
    source = source if source.startswith("[") else "[" + source
    line_starts = [0]
    for line in source.split("\n")[:-1]:
        line_starts.append(line_starts[-1] + len(line) + 1)

    def offset(position: tuple[int, int]) -> int:  # a token's (row, column) -> index in source
        return line_starts[position[0] - 1] + position[1]

    before = None
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.ERRORTOKEN or token.type == tokenize.ENDMARKER:
                return False
            if token.type in _SKIPPED_TOKENS:
                continue
            if before is not None:
                if before.string in _EXPRESSION_FOLLOWS and token.string in _STARTS_NO_EXPRESSION:
                    return True
                end = offset(token.end)
                if (_is_operand(before, _ENDS_OPERAND) and _is_operand(token, ())
                        and source[offset(before.end):offset(token.start)].isspace()
                        and end < len(source) and not _EXTENDS_TOKEN.match(source[end])):
                    return True
            before = token
    except (tokenize.TokenError, SyntaxError):
        return False
    return False


def _is_operand(token, closing: set) -> bool:
    """A name that is no keyword, a number, or (with closing) a string or one of the closing brackets."""
    if token.type == tokenize.NAME:
        return token.string.isascii() and token.string not in _KEYWORDS
    if token.type == tokenize.NUMBER:
        return token.string.isascii()
    return bool(closing) and (token.type == tokenize.STRING or token.string in closing)


# ----------------------------------------------------------------------------------------------------
# Checker (BFCL AST semantics)



def _schema_type(schema) -> tuple[str | None, type | None]:
    if not isinstance(schema, dict):
        return None, None
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    return t, TYPES[t][1] if t in TYPES else None


def category_kind(category: str) -> str:
    """simple | multiple | parallel | irrelevance | relevance, by BFCL's rules ('parallel' wins over
    'multiple'; anything else AST-checked is simple)."""
    if "irrelevance" in category:
        return "irrelevance"
    if "relevance" in category:
        return "relevance"
    if "parallel" in category:
        return "parallel"
    if "multiple" in category:
        return "multiple"
    return "simple"


def normalize_string(s: str) -> str:
    """BFCL's string normalisation: drop spaces and , . / - _ * ^, lower-case, single quotes -> double."""
    return _STRIP_CHARS_RE.sub("", s).lower().replace("'", '"')


_STRIP_CHARS_RE = re.compile(r"[ ,./\-_*^]")


def _norm_str(x):
    return normalize_string(x) if type(x) is str else x


def _first_answer_type(allowed: list):
    for a in allowed:
        if not (type(a) is str and a == ""):
            return type(a)
    return None


def _contains(seq, value) -> bool:
    """`value in seq` with Python's == (1 == 1.0 == True), guarded against odd values."""
    try:
        return value in seq
    except Exception:
        return False


def _type_check(value, allowed: list, expected: type, nested: type | None) -> tuple[bool, bool]:
    """(valid, is_variable). A value whose type is not the schema's but is the type of the allowed values
    counts as a 'variable' (BFCL: e.g. a string naming a variable for an integer parameter)."""
    answer_type = _first_answer_type(allowed)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if nested is None:
            return True, is_variable
        # arrays: every element must have the item type (or the type of that allowed list's first element);
        # an allowed value that is not a list (such as "") lets any element types through
        for item in allowed:
            if type(item) is not list:
                return True, is_variable
            item_type = _first_answer_type(item)
            if all(type(v) is nested or (item_type is not None and type(v) is item_type) for v in value):
                return True, is_variable
        return False, is_variable
    if answer_type is not None and type(value) is answer_type:
        return True, True
    return False, is_variable


def _dict_match(value: dict, allowed_dict) -> str:
    """'' if the dict matches one allowed dict (keys known, values allowed after string normalisation,
    every non-omittable key present), else a reason."""
    if not isinstance(allowed_dict, dict):
        return "wrong_value"
    for k, v in value.items():
        if not _contains(allowed_dict, k):
            return f"unexpected_param: dict key {k!r}"
        options = allowed_dict[k]
        if not isinstance(options, list):
            return "wrong_value"
        if not _contains([_norm_str(o) for o in options], _norm_str(v)):
            return f"wrong_value: dict key {k!r}"
    for k, options in allowed_dict.items():
        if k not in value and not _contains(options, ""):
            return f"missing_param: dict key {k!r}"
    return ""


def _check_value(param: str, value, schema, allowed: list) -> str:
    """'' if `value` is acceptable for `param`, else a reason."""
    if not isinstance(allowed, list):
        allowed = [allowed]
    type_name, expected = _schema_type(schema)
    nested = None
    if type_name in ("array", "tuple", "list"):
        _, nested = _schema_type(schema.get("items"))
    if type_name == "tuple" and type(value) is tuple:
        value = list(value)
    if type_name in ("float", "number") and type(value) is int:
        value = float(value)
    is_variable = False
    if expected is not None:
        valid, is_variable = _type_check(value, allowed, expected, nested)
        if not valid:
            return f"wrong_type: {param} got {type(value).__name__}, expected {type_name}"
    if not is_variable:
        if expected is dict:
            reasons = [_dict_match(value, a) for a in allowed if not (type(a) is str and a == "")]
            if "" in reasons:
                return ""
            reason = reasons[-1] if reasons else "wrong_value"
            return f"{reason} (in {param})" if ": " in reason else f"{reason}: {param}"  # the code stays first
        if expected is list and nested is dict:
            for a in allowed:
                a_list = a if isinstance(a, list) else []   # an allowed "" is an empty list here
                if len(a_list) != len(value):
                    continue
                if all(isinstance(v, dict) and _dict_match(v, d) == "" for v, d in zip(value, a_list)):
                    return ""
            return f"wrong_value: {param}"
        if expected is str:
            options = [normalize_string(a) for a in allowed if type(a) is str]
            return "" if normalize_string(value) in options else f"wrong_value: {param}"
        if expected is list:
            got = [_norm_str(v) for v in value]
            # elements of each allowed list normalised; an allowed "" is an empty list here
            options = [[_norm_str(x) for x in a] if isinstance(a, (list, str)) else a for a in allowed]
            return "" if _contains(options, got) else f"wrong_value: {param}"
    return "" if _contains(allowed, value) else f"wrong_value: {param}"


def _find_tool(tools: list[dict], name: str) -> dict | None:
    for t in tools:
        if t.get("name") == name:
            return t
    return None


def check_one(call: dict, tool: dict | None, expected: dict) -> str:
    """'' if one decoded call matches one expected call {name: {param: [allowed...]}}, else a reason.
    `tool` is the schema of the expected function."""
    (exp_name, exp_params), = expected.items()
    if tool is None:
        tool = {"name": exp_name, "parameters": {"properties": {}, "required": []}}
    name = tool.get("name", exp_name)
    if call.get("name") != name:
        return f"wrong_function: got {call.get('name')!r}, expected {name!r}"
    args = call.get("arguments") or {}
    schema = tool.get("parameters") or {}
    props = schema.get("properties") or {}
    for p in schema.get("required") or []:
        if p not in args:
            return f"missing_param: {p}"
    for p, value in args.items():
        if p not in props or p not in exp_params:
            return f"unexpected_param: {p}"
        reason = _check_value(p, value, props[p], exp_params[p])
        if reason:
            return reason
    for p, allowed in exp_params.items():
        if p not in args and not _contains(allowed if isinstance(allowed, list) else [allowed], ""):
            return f"missing_param: {p} (not omittable)"
    return ""


def check_calls(calls: list[dict] | None, ground_truth: list[dict], tools: list[dict], category: str):
    """BFCL verdict for decoded calls. Returns (ok, reason); reason is '' when ok (at most MAX_REASON_CHARS).

    calls: decoded calls, or None when the output did not decode (counts as 'no call').
    ground_truth: BFCL's list of {function_name: {param: [allowed values]}} ("" allowed = omittable).
    """
    ok, reason = _check_calls(calls, ground_truth, tools, category)
    return ok, _bounded(reason)


def _check_calls(calls, ground_truth, tools, category):
    kind = category_kind(category)
    if kind == "irrelevance":
        return (True, "") if not calls else (False, f"irrelevance:made_call: {calls[0].get('name')!r}")
    if kind == "relevance":
        return (True, "") if calls else (False, "relevance:no_call")
    if calls is None:
        return False, "format:parse_error"
    if kind == "simple":
        if len(calls) != 1:
            return False, f"wrong_count: got {len(calls)}, expected 1"
        # BFCL checks a simple entry against its first (only) function
        tool = tools[0] if tools else None
        if ground_truth and tool is not None and tool.get("name") not in ground_truth[0]:
            tool = _find_tool(tools, next(iter(ground_truth[0]))) or tool
        reason = check_one(calls[0], tool, ground_truth[0])
        return reason == "", reason
    if len(calls) != len(ground_truth):
        return False, f"wrong_count: got {len(calls)}, expected {len(ground_truth)}"
    if kind == "multiple":
        if not ground_truth:
            return True, ""
        expected = ground_truth[0]
        reason = check_one(calls[0], _find_tool(tools, next(iter(expected))), expected)
        return reason == "", reason
    # parallel: expected calls in order, each takes the first unmatched call that fits (greedy, one-to-one)
    used = [False] * len(calls)
    for expected in ground_truth:
        tool = _find_tool(tools, next(iter(expected)))
        first_reason, same_name_reason = "", ""
        for i, call in enumerate(calls):
            if used[i]:
                continue
            reason = check_one(call, tool, expected)
            if not reason:
                used[i] = True
                break
            first_reason = first_reason or reason
            if not same_name_reason and reason_code(reason) != "wrong_function":
                same_name_reason = reason
        else:
            return False, same_name_reason or first_reason or "wrong_function"
    return True, ""


def ground_truth_from_answers(answers: list[dict], tools: list[dict]) -> list[dict]:
    """Training answers [{"name", "arguments"}] -> BFCL ground truth. Optional schema parameters the answer
    leaves out may be omitted or given their schema default."""
    ground_truth = []
    for ans in answers:
        tool = _find_tool(tools, ans["name"]) or {}
        schema = tool.get("parameters") or {}
        required = set(schema.get("required") or [])
        params = {p: [v] for p, v in (ans.get("arguments") or {}).items()}
        for p, prop in (schema.get("properties") or {}).items():
            if p not in params and p not in required:
                params[p] = [""] + ([prop["default"]] if isinstance(prop, dict) and "default" in prop
                                    and prop["default"] != "" else [])
        ground_truth.append({ans["name"]: params})
    return ground_truth
