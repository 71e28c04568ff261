"""data/calls.py: prompt template, safe parser, BFCL-semantics checker.

The checker tests are derived from BFCL's rules (its documentation, data and observed verdicts); the optional
differential test at the end compares verdicts with the official checker on generated outputs."""
import ast
import copy
import dataclasses
import json
import os
import random
import time
import warnings

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bfcl_official import vendor_stubs
from data.calls import (MAX_FOLDED_SIZE, MAX_KEY_SIZE, MAX_REASON_CHARS, MAX_TEXT_CHARS, REASON_CODES, CallSyntaxError,
                        PromptFormat, bfcl_trim, build_messages, category_kind, check_calls, decode_bfcl_result,
                        extract_answer, format_calls, ground_truth_from_answers, normalize_string, parse_completion,
                        parse_python_calls, reason_code, render_prompt, system_prompt, undecodable_prefix)

WEATHER = {"name": "weather.get", "description": "Current weather for a city.",
           "parameters": {"type": "dict", "required": ["city"], "properties": {
               "city": {"type": "string", "description": "City name."},
               "unit": {"type": "string", "description": "Unit.", "enum": ["celsius", "fahrenheit"],
                        "default": "celsius"},
               "days": {"type": "integer", "description": "Days ahead."}}}}
AREA = {"name": "area", "description": "Area of a rectangle.",
        "parameters": {"type": "dict", "required": ["w", "h"], "properties": {
            "w": {"type": "float", "description": "width"}, "h": {"type": "float", "description": "height"}}}}


def calls_of(text):
    return parse_python_calls(text)


def verdict(text, ground_truth, tools, category="simple"):
    return check_calls(decode_bfcl_result(text), ground_truth, tools, category)


# ------------------------------------------------------------------------------------------------ prompt

def test_system_prompt_lists_tools_and_format():
    p = system_prompt([WEATHER], "think", "json")
    assert json.loads(p[p.index("\n[") + 1:p.rindex("]") + 1]) == [WEATHER]
    assert "<think>" in p and "<answer>" in p and "[func_name1(" in p
    py = system_prompt([WEATHER], "plain", "python")
    assert "def weather.get(city: str, unit: str = 'celsius', days: int = None):" in py
    assert "city (str): City name." in py and "<think>" not in py
    assert "<tool_call>" in system_prompt([WEATHER], "hermes")
    assert '"arguments"' in system_prompt([WEATHER], "json")
    with pytest.raises(ValueError, match="answer_format"):
        system_prompt([WEATHER], "xml")
    with pytest.raises(ValueError, match="tools_as"):
        system_prompt([WEATHER], tools_as="yaml")


def test_build_messages_system_and_turns():
    question = [[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Weather in Paris?"}]]
    msgs = build_messages(question, [WEATHER])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].endswith("\n\nBe terse.") and "weather.get" in msgs[0]["content"]
    merged = build_messages(question, [WEATHER], merge_system=True)
    assert [m["role"] for m in merged] == ["user", "assistant", "user"]
    assert merged[0]["content"].startswith(msgs[0]["content"]) and merged[0]["content"].endswith("Hi")
    assert build_messages("Weather?", [WEATHER])[1] == {"role": "user", "content": "Weather?"}


def test_render_prompt_chat_template_and_prefill(tiny_tokenizer):
    text = render_prompt(tiny_tokenizer, "Weather in Paris?", [WEATHER], PromptFormat(prefill="<think>"))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n<think>")
    assert "Weather in Paris?" in text


def test_render_prompt_merges_system_when_template_has_no_system_role(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    text = render_prompt(tok, [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                               {"role": "user", "content": "Q2"}], [WEATHER], PromptFormat(answer_format="plain"))
    assert text.startswith("<user>You are an expert") and "weather.get" in text
    assert text.index("Q1") < text.index("A1") < text.index("Q2") and text.endswith("<assistant>")


# ------------------------------------------------------------------------------------------------ parser

def test_parse_think_answer():
    p = parse_completion("<think>Paris, so weather.get.</think>\n<answer>[weather.get(city='Paris', days=-2), "
                         "area(w=1.5, h=2)]</answer><|im_end|>")
    assert p.ok and p.think == "Paris, so weather.get."
    assert p.calls == [{"name": "weather.get", "arguments": {"city": "Paris", "days": -2}},
                       {"name": "area", "arguments": {"w": 1.5, "h": 2}}]


@pytest.mark.parametrize("text,code", [
    ("[f(x=1)]", "format:no_think"),
    ("<think>a</think>", "format:no_answer"),
    ("<think>a</think><answer>[f(x=1)]", "format:no_answer"),
    ("<think>a</think>hi<answer>[f(x=1)]</answer>", "format:extra_text"),
    ("<think>a</think><answer>[f(x=1)]</answer> trailing", "format:extra_text"),
    ("<think>a</think><answer>[f(x=1)]</answer><answer>[]</answer>", "format:extra_text"),
    ("<think><think>a</think><answer>[]</answer>", "format:no_think"),
    ("<think>a</think><answer>[f(x=1]</answer>", "format:parse_error"),
    ("<think>a</think><answer>[f(x=lambda: 1)]</answer>", "format:parse_error"),
])
def test_parse_think_format_errors(text, code):
    p = parse_completion(text)
    assert p.calls is None and reason_code(p.error) == code


def test_parse_values():
    (call,) = calls_of("[f(a='s', b=1, c=-2.5, d=True, e=None, f=[1, [2, 3]], g=(1, 'x'), h={'k': {'n': [1]}}, "
                       "i=1e3, j=-0, k=3 * 4 + 1, l=2 ** 10, m='a' 'b', n=\"x\" + 'y', o=...)]")
    assert call["arguments"] == {"a": "s", "b": 1, "c": -2.5, "d": True, "e": None, "f": [1, [2, 3]],
                                 "g": (1, "x"), "h": {"k": {"n": [1]}}, "i": 1000.0, "j": 0, "k": 13,
                                 "l": 1024, "m": "ab", "n": "xy", "o": "..."}
    assert type(call["arguments"]["g"]) is tuple


def test_parse_follows_bfcl_decoding():
    # positional arguments are dropped, bare names and keyword-less calls become text, calls with keywords dicts
    assert calls_of("[f(1, x=2)]") == [{"name": "f", "arguments": {"x": 2}}]
    assert calls_of("f(x=true, y=my_var, z=g(), w=g(q=1), v=d[0])")[0]["arguments"] == {
        "x": "true", "y": "my_var", "z": "g()", "w": {"g": {"q": 1}}, "v": "d[0]"}
    assert calls_of("a.b.c(x=1)")[0]["name"] == "a.b.c"
    assert calls_of("f(x=1), g(y=2)") == [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"y": 2}}]
    assert calls_of("") == [] and calls_of("[]") == [] and calls_of("```\n[f()]\n```") == [{"name": "f", "arguments": {}}]


@pytest.mark.parametrize("text", [
    "```python\n[f(x=1)]\n```",      # only backticks, newlines and spaces are trimmed: 'python' stays
    "\t[f(x=1)]", "[f(x=1)]\r\n",     # tabs and \r are not trimmed
    "Sure! [f(x=1)]", "[f(x=1)]\nThis calls f.", "[f(x=1)] [g(y=2)]", "[f(x=1)], [g(y=2)]",
    "[f(x=a.b)]", "[f(x=not True)]", "[f(x={1, 2})]", "[f(x=f'{y}')]", "[f(x=-y)]", "[f(x=a+1)]", "[f(x=1/0)]",
    "[f(x={**d})]", "[f(x={[1]: 2})]", "[None]", "['f(x=1)']", "[f(x=1) g(y=2)]", "[f(x=lambda: 0)]",
    "[f(x=[i for i in y])]", "[f(x=1 if y else 2)]", "[f(x=1 < 2)]", "[f(x=2 ** 100000)]",
])
def test_parse_rejects(text):
    with pytest.raises(ValueError):
        calls_of(text)
    assert parse_completion(text, "plain").calls is None


def test_bfcl_trim():
    assert bfcl_trim(" ``` f(x=1) ```\n") == "[f(x=1)]"
    assert bfcl_trim("[f(x=1)]\r") == "[f(x=1)]\r]"


def test_parse_json_and_hermes():
    j = parse_completion('```json\n[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": "{\\"y\\": [2]}"}]\n```',
                         "json")
    assert j.calls == [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"y": [2]}}]
    assert parse_completion('{"name": "f", "arguments": {}}', "json").calls == [{"name": "f", "arguments": {}}]
    h = parse_completion('<think>t</think><tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
                         '<tool_call>{"name": "g", "arguments": {}}</tool_call>', "hermes")
    assert h.think == "t" and [c["name"] for c in h.calls] == ["f", "g"]
    assert parse_completion("No tool fits.", "hermes").calls == []
    for bad, fmt in [('[{"name": 1}]', "json"), ("[f(x=1)]", "json"), ("<tool_call>{oops}</tool_call>", "hermes"),
                     ('<tool_call>{"name": "f", "arguments": {}}', "hermes")]:
        p = parse_completion(bad, fmt)
        assert p.calls is None and reason_code(p.error) == "format:parse_error"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["f", "a.b", "get_x"]), st.dictionaries(
    st.sampled_from(["x", "y_1", "z"]), st.recursive(
        st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=10), lambda inner: st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8), max_size=3)), max_size=3))
def test_format_calls_round_trips(spec):
    calls = [{"name": n, "arguments": a} for n, a in spec]
    assert parse_completion(format_calls(calls), "plain").calls == calls
    assert parse_completion(f"<think>t</think><answer>{format_calls(calls)}</answer>").calls == calls
    assert parse_completion(format_calls(calls, "json"), "json").calls == calls
    assert parse_completion(format_calls(calls, "hermes"), "hermes").calls == calls


def test_extract_answer():
    assert extract_answer("<think>x</think><answer>[f()]</answer>") == "[f()]"
    assert extract_answer("[f()]") == "[f()]" and extract_answer("<answer>[f()]") == "<answer>[f()]"


# ------------------------------------------------------------------------------------------------ safety

ADVERSARIAL = [
    "__import__('os').system('touch /tmp/_calls_pwned')", "[f(x=__import__('os').system('touch /tmp/_calls_pwned'))]",
    "[f(x=__import__('os').system('touch /tmp/_calls_pwned') + 1)]", "[f(x=open('/etc/passwd').read())]",
    "[f(x=os.system)]", "[f(x=lambda: __import__('os'))]", "[f(x=f'{__import__(\"os\")}')]", "[f(x=(1).__class__)]",
    "[f(x=" + "[" * 5000 + "]" * 5000 + ")]", "[f(x=" + "(" * 150 + "1" + ")" * 150 + ")]", "-" * 100_000 + "1",
    "[f(x=" + "1+" * 30_000 + "1)]", "[f(x=" + "-" * 199 + "1)]", "[f(x=" + "a." * 10_000 + "b)]",
    "[f(x=g" + "(y=1)" * 5000 + ")]", "[f(x=9**9**9)]", "[f(x=10**4300)]", "[f(x=1<<100000000)]", "[f(x='a'*10**9)]",
    "\x00", "[f(x='\x00')]", "[f(x=1)]\x00", "<think>\x00</think><answer>[f(x=1)]</answer>", "\ud800", "[f(x='\udcff')]",
    "<answer>" * 30_000, "<think>" + "<answer>" * 20_000, "<tool_call>" * 20_000, " " * 100_000 + "x",
    "x" * 1_000_000, "[f(x='" + "é" * 300_000 + "')]", "<think>" + "a" * 1_000_000 + "</think><answer>[]</answer>",
    "[f(x=1)]" * 10_000, "[f(" + ", ".join(f"a{i}={i}" for i in range(5000)) + ")]",
]


@pytest.mark.parametrize("fmt", ["think", "plain", "json", "hermes"])
def test_adversarial_inputs_never_raise_or_execute(fmt):
    if os.path.exists("/tmp/_calls_pwned"):
        os.remove("/tmp/_calls_pwned")
    for text in ADVERSARIAL:
        t0 = time.perf_counter()
        p = parse_completion(text, fmt)
        assert time.perf_counter() - t0 < 1.0, text[:40]
        assert p.calls is None or isinstance(p.calls, list)
        if p.calls is None:
            assert reason_code(p.error) in REASON_CODES
        for category in ("simple", "parallel", "irrelevance", "live_relevance"):
            ok, reason = check_calls(p.calls, [{"f": {"x": [1]}}], [{"name": "f", "parameters": {
                "properties": {"x": {"type": "integer"}}, "required": ["x"]}}], category)
            assert isinstance(ok, bool) and (ok or reason_code(reason) in REASON_CODES)
    assert not os.path.exists("/tmp/_calls_pwned")
    assert parse_completion("x" * (MAX_TEXT_CHARS + 1), fmt).error == "format:too_long"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300), st.sampled_from(["think", "plain", "json", "hermes"]))
def test_random_text_never_raises(text, fmt):
    for candidate in (text, f"<think>{text}</think><answer>{text}</answer>", f"[f(x={text})]", f"<tool_call>{text}</tool_call>"):
        p = parse_completion(candidate, fmt)
        assert p.calls is None or all(isinstance(c["name"], str) and isinstance(c["arguments"], dict) for c in p.calls)
        check_calls(p.calls, [{"f": {"x": [1, ""]}}], [{"name": "f", "parameters": {"properties": {"x": {"type": "integer"}}}}],
                    "parallel")


_SAFE_ALPHABET = st.sampled_from(list("[](){}=,.'\"-+*/ _:xyf019\n\\`#<>") + ["f(", "x=", "**", "lambda", "__import__"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_SAFE_ALPHABET, max_size=60).map("".join))
def test_call_like_text_never_raises(text):
    p = parse_completion(text, "plain")
    assert p.calls is not None or reason_code(p.error) == "format:parse_error"


# ------------------------------------------------------------------------------------------------ undecodable prefixes

# Continuations that try to rescue a broken prefix: close strings and brackets, turn names into keywords' operands,
# start comments or line continuations.
RESCUES = ["", "]", ")]", "))]", "}]", "'", '"', '"""', "'" * 3, '")]', "')]", "#", "\\\n", " if x else y]", " in y]",
           " for x in y]", ", f(a=1)]", "(1)]", "=1)]", ".x]", "[0]]", " or f(x=1)]", "\n]", "`", "``` ", "5)]", "e5)]",
           "+1)]", "j]", "f]", "if x else y)]", "</answer>", "not in y]", "x='", 'x="', '"])]']


def _never_parses(prefix: str) -> bool:
    for rest in RESCUES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)  # "invalid decimal literal" on `1if` and the like
                ast.parse(bfcl_trim(prefix + rest), mode="eval")
            return False
        except (SyntaxError, ValueError):
            pass
    return True


@pytest.mark.parametrize("text,undecodable", [
    ("The change in entropy is", True), ("<think>Your reasoning</think><answer>The", True),
    ("You can use the `get_data` function", True), ("\n\nThe JSON format is:", True), ("10 is the only one", True),
    ("Here is a list of", True), ("Yes, you can perform", True), ("[f(x)] then ", True), ("[f(x)]\nThe end", True),
    ("'a' b ", True), ("[f(x=1) g(", True), ("<answer></answ", True), ("[, x", True), ("(== ", True),
    ("print x ", True),
    # might still decode: an incomplete last name, keywords and soft keywords, numbers that may grow, lambdas
    ("The i", False), ("Your answer", False), ("print x", False), ("x 1e+", False), ("1e+", False), ("1e ", False),
    ("[f(x) for x in y", False), ("[f(x) if y else g(", False), ("(lambda a, /: a)", False), ("f(a=1, b=", False),
    ("[match x", False), ("[x not in y", False), ("[x is not y", False), ("x if", False), ("f'{x!r:>{w}}' ", False),
    ("[mix_paint_color(\n    \"yellow\",\n    \"blue\"", False), ("You've already", False), ("", False),
    ("[get_weather(city='Paris', unit=\"c\")]", False), ("'a' 'b' ", False), ("0x1f ", False), ("f(*a, **k) ", False),
])
def test_undecodable_prefix(text, undecodable):
    assert undecodable_prefix(text) is undecodable
    if undecodable:  # and then indeed no continuation parses
        assert _never_parses(text)


VALID_EXPRESSIONS = [
    "[f(x=1), g.h(y='a b c', z=[1, 2.5e-3, -4j, 0x1F, 1_000, True, None])]", "f(a=lambda x, /, *, y=1: x if y else -x)",
    "[f(x=[i for i in range(3) if i not in (1,)], y={k: v for k, v in d.items()})]", "f(x=(y := 2), z=not y)",
    "[f(s=f'{a!r:>{w}} and {b=}'), g(t=rb'\\x00' b'concat', u='a' \"more\")]", "f(x=a[1:2, ::3], y=b.c(d)[0].e)",
    "[f(x=1 if a else 2, y=a is not b, z=c in d or e and not f)]", "f(x='''multi\nline''', y=1e+5, z=.5)",
    "[f(x={'a': [1, {'b': (2, 3)}]}, y=-(1 + 2) * 3 ** 4 // 5 % 6)]", "f(match=1, case=2, type=3, _=4)",
    "[get_weather(city='San Francisco, CA', unit=\"fahrenheit\")]", "f(x=await_, y=print)", "f(\n    a=1,\n    b=2\n)",
]


def test_no_prefix_of_a_decodable_answer_is_undecodable():
    """Every prefix of a text that parses might still decode: BFCL's ground truths written as calls (as a model
    should answer) and Python's less common expression syntax."""
    from eval.bfcl import find_data_dir, load_category

    answers = list(VALID_EXPRESSIONS)
    rng = random.Random(0)
    for category in ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple"):
        for item in rng.sample(load_category(category, find_data_dir()), 25):
            calls = [{"name": name, "arguments": {k: v[0] for k, v in args.items() if v and v[0] != ""}}
                     for truth in item["ground_truth"] for name, args in truth.items()]
            answers.append(format_calls(calls))
    for answer in answers:
        ast.parse(bfcl_trim(answer), mode="eval")  # the test's own premise: the whole text parses
        for text in (answer, f"\n {answer}", f"```\n{answer}"):
            flagged = [text[:n] for n in range(len(text) + 1) if undecodable_prefix(text[:n])]
            assert not flagged, (answer, flagged[:3])


_PIECES = st.sampled_from(["The", "change", "is", "not", "if", "x", "f(", ")", "]", "[", "1", "1e", "+", "'a'", '"',
                           "'", ",", "=", "<", "<answer>", "lambda", "/", ":", "\n", " ", "  ", "#", "\\", "`", "_",
                           "in", "for", "0x", "j", "f'{", "}", "match", "é", "."])


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=14).map("".join))
def test_undecodable_prefixes_never_parse(text):
    if undecodable_prefix(text):
        assert _never_parses(text), text


# ------------------------------------------------------------------------------------------------ checker

def test_category_kind():
    assert [category_kind(c) for c in ("simple_python", "live_simple", "multiple", "live_multiple", "parallel",
                                       "live_parallel_multiple", "irrelevance", "live_irrelevance", "live_relevance")] == [
        "simple", "simple", "multiple", "multiple", "parallel", "parallel", "irrelevance", "irrelevance", "relevance"]


def test_normalize_string():
    assert normalize_string("New York, NY") == normalize_string("new-york_ny.") == "newyorkny"
    assert normalize_string("a/b*c^d") == "abcd" and normalize_string("it's") == 'it"s'
    assert normalize_string("a!b") == "a!b" and normalize_string("a\tb") == "a\tb"   # only ' ,./-_*^ are dropped


GT = [{"weather.get": {"city": ["Paris", "Paris, France"], "unit": ["celsius", ""], "days": [""]}}]


@pytest.mark.parametrize("text,ok,code", [
    ("[weather.get(city='Paris')]", True, ""),
    ("weather.get(city='paris, france', unit='CELSIUS')", True, ""),         # case, punctuation, spaces
    ("[weather.get(city='P a-r_i.s')]", True, ""),
    ("[weather.get(city='Paris!')]", False, "wrong_value"),
    ("[weather.get(city='Paris', unit='fahrenheit')]", False, "wrong_value"),
    ("[weather.get(city='Paris', days=2)]", False, "wrong_value"),            # only "" allowed: must be omitted
    ("[weather.get(unit='celsius')]", False, "missing_param"),
    ("[weather.get(city='Paris', country='FR')]", False, "unexpected_param"),
    ("[weather.get(city=1)]", False, "wrong_type"),
    ("[weather_get(city='Paris')]", False, "wrong_function"),
    ("[weather.get(city='Paris'), weather.get(city='Paris')]", False, "wrong_count"),
    ("[]", False, "wrong_count"),
    ("Paris is sunny.", False, "format:parse_error"),
])
def test_simple_rules(text, ok, code):
    got, reason = verdict(text, GT, [WEATHER], "simple_python")
    assert got is ok and reason_code(reason) == code


def _tool(**props):
    return [{"name": "f", "parameters": {"type": "dict", "properties": props, "required": []}}]


@pytest.mark.parametrize("schema,allowed,text,ok", [
    ({"type": "float"}, [2.0], "f(x=2)", True),                 # int accepted where float is expected
    ({"type": "float"}, [2.5], "f(x=2)", False),
    ({"type": "integer"}, [2], "f(x=2.0)", False),              # but not float for integer
    ({"type": "integer"}, [1], "f(x=True)", False),             # bool is not an integer
    ({"type": "boolean"}, [True], "f(x=1)", False),
    ({"type": "boolean"}, [False], "f(x=False)", True),
    ({"type": "integer"}, [-3], "f(x=-3)", True),
    ({"type": "integer"}, ["n"], "f(x='n')", True),             # a "variable": allowed values are strings
    ({"type": "integer"}, ["n"], "f(x='N')", False),            # ... compared exactly, not normalised
    ({"type": "integer"}, ["n"], "f(x=n)", True),               # a bare name reads as its text
    ({"type": "string"}, [None, ""], "f(x=None)", True),
    ({"type": "string"}, ["a", ""], "f(x=None)", False),
    ({"type": "any"}, ["a"], "f(x='A')", True),
    ({"type": "array", "items": {"type": "string"}}, [["New York", "LA"]], "f(x=['new york', 'la'])", True),
    ({"type": "array", "items": {"type": "string"}}, [["a", "b"]], "f(x=['b', 'a'])", False),   # order matters
    ({"type": "array", "items": {"type": "string"}}, [["a"]], "f(x=('a',))", False),            # tuple is not a list
    ({"type": "array", "items": {"type": "integer"}}, [[1, 2]], "f(x=[1, 2.0])", False),        # element types
    ({"type": "array", "items": {"type": "float"}}, [[1.0, 2.0]], "f(x=[1, 2])", False),        # no int->float inside
    ({"type": "array", "items": {"type": "float"}}, [[1, 2.5]], "f(x=[1, 2.5])", True),         # ...unless the answer has ints
    ({"type": "array", "items": {"type": "float"}}, [[1.0], ""], "f(x=[1])", True),            # "" skips element types
    ({"type": "array", "items": {"type": "string"}}, [["a"], ""], "f(x=[])", True),             # "" allows []
    ({"type": "array", "items": {"type": "array"}}, [[["A b"]]], "f(x=[['a b']])", False),      # no normalisation deeper
    ({"type": "array", "items": {"type": "array"}}, [[["a"]]], "f(x=[['a']])", True),
    ({"type": "tuple", "items": {"type": "integer"}}, [[1, 2]], "f(x=(1, 2))", True),           # tuple type: tuple or list
    ({"type": "tuple", "items": {"type": "integer"}}, [[1, 2]], "f(x=[1, 2])", True),
    ({"type": "dict"}, [{"a": ["X y"], "b": [1, ""]}], "f(x={'a': 'x-Y'})", True),              # dict: normalised values
    ({"type": "dict"}, [{"a": ["x"], "b": [1]}], "f(x={'a': 'x'})", False),                    # missing key
    ({"type": "dict"}, [{"a": ["x"]}], "f(x={'a': 'x', 'c': 1})", False),                       # unexpected key
    ({"type": "dict"}, [{"a": [[1.0]]}], "f(x={'a': [1]})", True),                              # == inside dicts
    ({"type": "dict"}, [{"a": ["x"]}, {"a": ["y"]}], "f(x={'a': 'y'})", True),                  # any allowed dict
    ({"type": "dict"}, [""], "f(x={})", False),                                                 # only omission allowed
    ({"type": "array", "items": {"type": "dict"}}, [[{"a": ["x"]}, {"a": ["y"]}]], "f(x=[{'a': 'X'}, {'a': 'y'}])", True),
    ({"type": "array", "items": {"type": "dict"}}, [[{"a": ["x"]}, {"a": ["y"]}]], "f(x=[{'a': 'y'}, {'a': 'x'}])", False),
    ({"type": "array", "items": {"type": "dict"}}, [[{"a": ["x"]}]], "f(x=[{'a': 'x'}, {'a': 'x'}])", False),
    ({"type": "dict"}, [{"g": {"q": [1]}}], "f(x=g(q=1))", False),                              # nested call value
])
def test_type_and_value_rules(schema, allowed, text, ok):
    got, reason = verdict(text, [{"f": {"x": allowed}}], _tool(x=schema))
    assert got is ok, reason


def test_optional_omission_and_schema():
    tools = _tool(x={"type": "integer"}, y={"type": "integer"})
    assert verdict("f(x=1)", [{"f": {"x": [1], "y": ["", 3]}}], tools)[0]
    assert reason_code(verdict("f(x=1)", [{"f": {"x": [1], "y": [3]}}], tools)[1]) == "missing_param"
    # a schema parameter that the expected answer does not list cannot be passed
    assert reason_code(verdict("f(x=1, y=3)", [{"f": {"x": [1]}}], tools)[1]) == "unexpected_param"
    tools[0]["parameters"]["required"] = ["y"]
    assert reason_code(verdict("f(x=1)", [{"f": {"x": [1], "y": [""]}}], tools)[1]) == "missing_param"


MULTI_TOOLS = [AREA, WEATHER]


def test_multiple_and_parallel():
    gt = [{"area": {"w": [2.0], "h": [3.0]}}]
    assert verdict("[area(w=2, h=3)]", gt, MULTI_TOOLS, "multiple")[0]
    assert reason_code(verdict("[weather.get(city='x')]", gt, MULTI_TOOLS, "multiple")[1]) == "wrong_function"
    pgt = [{"area": {"w": [1.0], "h": [1.0]}}, {"area": {"w": [2.0], "h": [2.0]}}, {"weather.get": {"city": ["Rome"]}}]
    for order in ("area(w=1, h=1), area(w=2, h=2), weather.get(city='rome')",
                  "weather.get(city='Rome'), area(w=2.0, h=2), area(h=1, w=1)"):
        assert verdict(f"[{order}]", pgt, MULTI_TOOLS, "parallel_multiple")[0]
    assert not verdict("[area(w=1, h=1), area(w=1, h=1), weather.get(city='Rome')]", pgt, MULTI_TOOLS, "parallel")[0]
    assert reason_code(verdict("[area(w=1, h=1)]", pgt, MULTI_TOOLS, "live_parallel")[1]) == "wrong_count"
    assert reason_code(verdict("[area(w=1, h=1), area(w=2, h=5), weather.get(city='Rome')]", pgt, MULTI_TOOLS,
                               "parallel")[1]) == "wrong_value"


def test_parallel_pairs_greedily_in_expected_order():
    # expected #1 accepts either call, expected #2 only the first: a perfect matching exists, but pairing in
    # the expected answer's order takes the first call for #1 and leaves #2 unmatched (BFCL's rule)
    tools = _tool(x={"type": "integer"})
    gt = [{"f": {"x": [1, 2]}}, {"f": {"x": [1]}}]
    assert not verdict("[f(x=1), f(x=2)]", gt, tools, "parallel")[0]
    assert verdict("[f(x=2), f(x=1)]", gt, tools, "parallel")[0]


@pytest.mark.parametrize("text,irrelevant_ok", [
    ("", True), ("[]", True), ("```\n[]\n```", True), ("I cannot answer: no function fits.", True),
    ("None", True), ("[weather.get]", True), ("<answer>[]</answer>", True),
    ("[weather.get(city='Paris')]", False), ("weather.get()", False), ("[f(1)]", False),
    ("<think>no fit</think><answer>[area(w=1, h=2)]</answer>", False),
])
def test_irrelevance_and_relevance(text, irrelevant_ok):
    calls = decode_bfcl_result(text)
    assert check_calls(calls, [], [WEATHER], "irrelevance")[0] is irrelevant_ok
    assert check_calls(calls, [], [WEATHER], "live_irrelevance")[0] is irrelevant_ok
    ok, reason = check_calls(calls, [], [WEATHER], "live_relevance")
    assert ok is (not irrelevant_ok) and (ok or reason == "relevance:no_call")


def test_ground_truth_from_answers():
    gt = ground_truth_from_answers([{"name": "weather.get", "arguments": {"city": "Paris"}}], [WEATHER])
    assert gt == [{"weather.get": {"city": ["Paris"], "unit": ["", "celsius"], "days": [""]}}]
    assert check_calls(calls_of("weather.get(city='paris', unit='celsius')"), gt, [WEATHER], "simple")[0]
    assert not check_calls(calls_of("weather.get(city='paris', days=1)"), gt, [WEATHER], "simple")[0]


def test_json_schema_types():
    tools = [{"name": "g", "parameters": {"type": "object", "required": ["n"], "properties": {
        "n": {"type": "number"}, "k": {"type": "integer"}, "o": {"type": "object"}, "l": {"type": ["array", "null"],
                                                                                       "items": {"type": "string"}}}}}]
    gt = [{"g": {"n": [1.0], "k": [2, ""], "o": [{"a": [1]}, ""], "l": [["A"], ""]}}]
    assert check_calls(calls_of("g(n=1, k=2, o={'a': 1}, l=['a'])"), gt, tools, "simple")[0]
    assert not check_calls(calls_of("g(n=1, k=2.0)"), gt, tools, "simple")[0]


# ------------------------------------------------------------------------------------------------ BFCL data

def _bfcl_data_dir():
    from eval.bfcl import find_data_dir
    return find_data_dir()


def _pick(options, rng):
    choices = [o for o in options if not (type(o) is str and o == "")]
    return copy.deepcopy(rng.choice(choices)) if choices else None


def _resolve(value, rng):
    """Allowed values of dict parameters hold {key: [allowed]}: choose one value per key."""
    if isinstance(value, dict):
        out = {}
        for k, opts in value.items():
            v = _pick(opts, rng) if isinstance(opts, list) else opts
            if v is not None or (isinstance(opts, list) and None in opts):
                out[k] = _resolve(v, rng)
        return out
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        return [_resolve(x, rng) for x in value]
    return value


def _answer_text(ground_truth, rng, omit=False):
    calls = []
    for expected in ground_truth:
        (name, params), = expected.items()
        args = {}
        for p, options in params.items():
            if omit and "" in options:
                continue
            choices = [o for o in options if not (type(o) is str and o == "")]
            if choices:
                args[p] = _resolve(_pick(options, rng), rng)
        calls.append(f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})")
    return "[" + ", ".join(calls) + "]"


@pytest.mark.parametrize("category", ["simple_python", "multiple", "live_simple", "live_multiple", "parallel",
                                      "live_parallel_multiple"])
def test_answers_built_from_bfcl_ground_truth_pass(category):
    from eval.bfcl import load_category
    rng = random.Random(0)
    items = load_category(category, _bfcl_data_dir(), limit=120)
    passed = 0
    for it in items:
        gt = it["ground_truth"]
        passed += check_calls(calls_of(_answer_text(gt, rng, omit=True)), gt, it["function"], category)[0]
    # parallel answers whose calls accept each other's values can fail the greedy pairing, as in BFCL
    assert passed >= 0.95 * len(items), (passed, len(items))


# ------------------------------------------------------------------------------------------------ differential

def load_official_checker():
    """BFCL's own checker and prompt-mode decoder (tests/bfcl_official.py). Returns None when they do not import."""
    with vendor_stubs():
        try:
            from bfcl_eval.constants.enums import Language
            from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
            from bfcl_eval.model_handler.utils import default_decode_ast_prompting
            from bfcl_eval.utils import is_empty_output
        except Exception:
            return None
    return ast_checker, default_decode_ast_prompting, is_empty_output, Language


def mutations(ground_truth, tools, rng):
    """Correct answers and near misses for one entry (values are literals only: the official decoder
    evaluates arithmetic with eval, so none is generated)."""
    base = _answer_text(ground_truth, rng, omit=rng.random() < 0.5)
    out = [base]
    calls = calls_of(base)
    pool = [1, 1.0, 2.5, "1", True, None, [], {}, [1.0], ["a"], ("a",), {"a": 1}, "", "é", -1]

    def text(cs):
        return "[" + ", ".join(f"{c['name']}({', '.join(f'{k}={v!r}' for k, v in c['arguments'].items())})"
                               for c in cs) + "]"

    for _ in range(6):
        cs = copy.deepcopy(calls)
        c = rng.choice(cs)
        keys = list(c["arguments"])
        r = rng.random()
        if r < 0.3 and keys:
            k = rng.choice(keys)
            v = c["arguments"][k]
            if isinstance(v, str):
                c["arguments"][k] = rng.choice([v.upper(), v + "x", v.replace(" ", ""), v + ".", v.title(), ""])
            elif isinstance(v, bool):
                c["arguments"][k] = rng.choice([not v, str(v)])
            elif isinstance(v, (int, float)):
                c["arguments"][k] = rng.choice([v + 1, float(v), int(v), str(v)])
            elif isinstance(v, list):
                c["arguments"][k] = rng.choice([tuple(v), v[::-1], v[:-1], [str(x) for x in v]])
            else:
                c["arguments"][k] = rng.choice(pool)
        elif r < 0.45:
            props = list(next((t for t in tools if t["name"] == c["name"]), {"parameters": {"properties": {}}})
                         ["parameters"]["properties"]) or ["x"]
            c["arguments"][rng.choice(props)] = rng.choice(pool)
        elif r < 0.55 and keys:
            del c["arguments"][rng.choice(keys)]
        elif r < 0.65:
            rng.shuffle(cs)
        elif r < 0.72:
            c["name"] = rng.choice([t["name"] for t in tools] + [c["name"] + "_v2"])
        s = text(cs)
        wrap = rng.choice([lambda s: s, lambda s: s[1:-1], lambda s: f"```\n{s}\n```", lambda s: f"```python\n{s}\n```",
                           lambda s: f" {s}\n", lambda s: f"{s}\r\n", lambda s: f"Sure: {s}", lambda s: s.replace("'", '"'),
                           lambda s: s.replace("=", " = "), lambda s: s[:len(s) // 2]])
        out.append(wrap(s))
    return out


@pytest.mark.parametrize("category", ["simple_python", "multiple", "parallel", "parallel_multiple", "live_simple",
                                      "live_multiple", "live_parallel", "live_parallel_multiple", "irrelevance",
                                      "live_irrelevance", "live_relevance"])
def test_differential_against_official_checker(category):
    official = load_official_checker()
    if official is None:
        pytest.skip("bfcl_eval's checker cannot be imported here even with stand-ins for its vendor SDKs")
    ast_checker, decode, is_empty_output, Language = official
    from eval.bfcl import load_category
    rng = random.Random(1)
    items = load_category(category, _bfcl_data_dir())
    items = rng.sample(items, min(60, len(items)))
    agree = total = 0
    for it in items:
        gt = it["ground_truth"]
        if gt is None:
            name = rng.choice(it["function"])["name"] if it["function"] else "f"
            texts = ["", "[]", "I can't help.", f"[{name}(x=1)]", f"{name}()", "None", f"```\n[{name}(a='b')]\n```",
                     f"```python\n[{name}(a=1)]\n```", f"[{name}]", f"{name}('x')"]
        else:
            texts = mutations(gt, it["function"], rng)
        for text in texts:
            try:
                decoded = decode(text)
            except Exception:
                decoded = None
            if gt is None:
                made_call = decoded is not None and not is_empty_output(decoded)
                expected = (not made_call) if "irrelevance" in category else made_call
            else:
                expected = decoded is not None and ast_checker(it["function"], decoded, gt, Language.PYTHON,
                                                               category, "model")["valid"]
            total += 1
            agree += verdict(text, gt or [], it["function"], category)[0] == expected
    assert agree == total, f"{category}: {agree}/{total} verdicts agree"


from data.calls import (MAX_FOLDED_SIZE, MAX_KEY_SIZE, MAX_REASON_CHARS, MAX_TEXT_CHARS, REASON_CODES, CallSyntaxError,
                        PromptFormat, bfcl_trim, build_messages, category_kind, check_calls, decode_bfcl_result,
                        extract_answer, format_calls, ground_truth_from_answers, normalize_string, parse_completion,
                        parse_python_calls, reason_code, render_prompt, system_prompt)
