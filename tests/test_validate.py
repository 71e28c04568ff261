"""The canonical record and its AST validation: types, safe repairs, rejects, schema dialects."""
import codecs
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.validate import DataError, RecordError, load_records, normalize_tool, python_type, validate_calls, validate_record

WEATHER = {"name": "get_weather", "description": "Weather for a city.",
           "parameters": {"type": "object", "required": ["city"], "properties": {
               "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
               "scale": {"type": "number"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
               "tags": {"type": "array", "items": {"type": "integer"}},
               "where": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]}}}}
TIME = {"name": "get_time", "description": "Local time.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def rec(answers, tools=(WEATHER,), category=None, rid="r1", query="weather in Paris?"):
    from data.validate import infer_category
    tools = [json.loads(json.dumps(t)) for t in tools]
    answers = json.loads(json.dumps(answers))
    return {"id": rid, "messages": [{"role": "user", "content": query}], "tools": tools, "answers": answers,
            "category": category or infer_category(tools, answers)}


def call(**args):
    return [{"name": "get_weather", "arguments": {"city": "Paris", **args}}]


# ----------------------------------------------------------------------------- AST validation

@pytest.mark.parametrize("args", [{}, {"days": 3}, {"metric": False}, {"scale": 2}, {"scale": 2.5},
                                  {"unit": "celsius"}, {"tags": [1, 2]}, {"where": {"lat": 1.5, "extra": "x"}}])
def test_valid_calls_pass_unchanged(args):
    r = rec(call(**args))
    assert validate_record(r) == []
    assert r["answers"] == call(**args)


@pytest.mark.parametrize("args, fixed, repair", [
    ({"days": "3"}, {"days": 3}, "int-from-string"),
    ({"days": 3.0}, {"days": 3}, "int-from-float"),
    ({"scale": "2.5"}, {"scale": 2.5}, "number-from-string"),
    ({"metric": "True"}, {"metric": True}, "bool-from-string"),
    ({"unit": "Celsius"}, {"unit": "celsius"}, "enum-case"),
    ({"tags": "[1, 2]"}, {"tags": [1, 2]}, "array-from-json-string"),
    ({"tags": ["1", 2]}, {"tags": [1, 2]}, "int-from-string"),
    ({"where": '{"lat": 2}'}, {"where": {"lat": 2}}, "object-from-json-string"),
    ({"days": None}, {}, "drop-null-optional"),
])
def test_safe_repairs_are_applied_and_recorded(args, fixed, repair):
    r = rec(call(**args))
    repairs = validate_record(r)
    assert r["answers"] == call(**fixed)
    assert [x.split(":")[0] for x in repairs] == [repair]
    assert validate_record(r) == []  # repaired records are clean


def test_number_for_string_is_repaired():
    r = rec([{"name": "get_weather", "arguments": {"city": 75001}}])
    assert validate_record(r) == ["string-from-number:get_weather.city"]
    assert r["answers"][0]["arguments"]["city"] == "75001"


@pytest.mark.parametrize("answers, reason", [
    ([{"name": "get_wether", "arguments": {"city": "Paris"}}], "ast:unknown-function"),
    ([{"name": "get_weather", "arguments": {}}], "ast:missing-required"),
    (call(country="FR"), "ast:unknown-param"),
    (call(days="three"), "ast:type"),
    (call(days=True), "ast:type"),  # a bool is not an integer
    (call(scale="fast"), "ast:type"),
    (call(metric="yes"), "ast:type"),
    (call(unit="kelvin"), "ast:enum"),
    (call(tags=[1, "x"]), "ast:type"),
    (call(where={"lon": 1}), "ast:missing-required"),
    (call(where={"lat": "north"}), "ast:type"),
    ([{"name": "get_weather", "arguments": "{not json"}], "ast:not-a-call"),
    (["get_weather(city='Paris')"], "ast:not-a-call"),
    ([{"name": "get_weather", "arguments": {"city": None}}], "ast:type"),  # null for a required parameter
])
def test_invalid_calls_are_rejected_with_a_reason(answers, reason):
    with pytest.raises(RecordError) as e:
        validate_record(rec(answers, category="simple"))
    assert e.value.reason == reason
    assert e.value.detail  # says what exactly


def test_category_must_fit_the_answer():
    with pytest.raises(RecordError, match="ast:category"):
        validate_record(rec(call(), category="irrelevance"))
    with pytest.raises(RecordError, match="ast:category"):
        validate_record(rec(call() + call(days=2), category="simple"))
    assert validate_record(rec([], category="irrelevance")) == []


def test_bfcl_dialect_schemas_are_read():
    tool = {"name": "f", "parameters": {"type": "dict", "required": ["x"], "properties": {
        "x": {"type": "float"}, "y": {"type": "tuple", "items": {"type": "integer"}}, "z": {"type": "any"},
        "d": {"type": "dict", "properties": {"k": {"type": "integer"}}}}}}
    calls = [{"name": "f", "arguments": {"x": 1, "y": [1, 2], "z": "anything", "d": {"k": 3}}}]
    assert validate_calls(calls, [tool])[1] == []
    with pytest.raises(RecordError, match="ast:type"):
        validate_calls([{"name": "f", "arguments": {"x": "a"}}], [tool])
    norm = normalize_tool(tool)["parameters"]
    assert norm["type"] == "object" and norm["properties"]["x"]["type"] == "number"
    assert norm["properties"]["y"]["type"] == "array" and norm["properties"]["d"]["type"] == "object"
    assert "type" not in norm["properties"]["z"]


@pytest.mark.parametrize("annotation, schema, optional", [
    ("str", {"type": "string"}, False), ("int, optional", {"type": "integer"}, True),
    ("List[int]", {"type": "array", "items": {"type": "integer"}}, False), ("Dict[str, Any]", {"type": "object"},
                                                                          False),
    ("Optional[float]", {"type": "number"}, True), ("Tuple[int, int]", {"type": "array"}, False),
    ("Callable", {}, False), ("bool, optional", {"type": "boolean"}, True)])
def test_python_type_annotations(annotation, schema, optional):
    assert python_type(annotation) == (schema, optional)


@settings(max_examples=60, deadline=None)
@given(days=st.integers(-10**6, 10**6), scale=st.floats(allow_nan=False, allow_infinity=False),
       city=st.text(max_size=20), as_string=st.booleans())
def test_repair_is_idempotent_and_value_preserving(days, scale, city, as_string):
    args = {"city": city, "days": str(days) if as_string else days, "scale": scale}
    r = rec(call(**args))
    validate_record(r)
    assert r["answers"][0]["arguments"] == {"city": city, "days": days, "scale": scale}
    assert validate_record(r) == []


def test_load_records_errors_name_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    good = rec(call())
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answers": "nope"}) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: record:answers"):
        load_records(path)
    path.write_bytes(b"\xff\n")
    with pytest.raises(ValueError, match=":1: not UTF-8"):
        load_records(path)


def test_load_records_errors_are_data_errors_with_file_and_line(tmp_path):
    good = json.dumps(rec(call())) + "\n"
    path = tmp_path / "c.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + good.encode())
    assert load_records(path)[0]["id"] == "r1"  # a byte-order mark is skipped
    cases = {"garbage": (b"\x00\x9f\x92binary", ":1: not UTF-8"), "truncated": ((good + good[:30]).encode(), ":2: not valid JSON"),
             "deep": (b"[" * 100_000 + b"]" * 100_000, ":1: JSON nested too deeply"),
             "big-int": (b'{"id": ' + b"1" * 5000 + b"}", ":1: a number with too many digits"),
             "nested": ((good[:-2] + ', "x": ' + "[" * 300 + "]" * 300 + "}").encode(), ":1: record:too-deep"),
             "empty": (b"\n\n", "holds no records")}
    for name, (data, message) in cases.items():
        path.write_bytes(data)
        with pytest.raises(DataError, match=re.escape(message)) as e:
            load_records(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), name
    for missing in (tmp_path, tmp_path / "nope.jsonl"):
        with pytest.raises(DataError, match=f"cannot read {re.escape(str(missing))}"):
            load_records(missing)


@pytest.mark.parametrize("schema, value, fixed", [
    ({"type": "integer"}, "12345678901234567890", 12345678901234567890),   # no detour through float
    ({"type": "number"}, "-12345678901234567890", -12345678901234567890), ({"type": "number"}, "2.5", 2.5)])
def test_numeric_string_repairs_are_exact(schema, value, fixed):
    tool = {"name": "f", "parameters": {"type": "object", "properties": {"x": schema}, "required": ["x"]}}
    calls, repairs = validate_calls([{"name": "f", "arguments": {"x": value}}], [tool])
    assert calls[0]["arguments"]["x"] == fixed and type(calls[0]["arguments"]["x"]) is type(fixed) and repairs


@pytest.mark.parametrize("value", ["1" * 101, "1e400", "-1e999", "nan", "1" * 5000])
def test_numeric_strings_too_long_or_not_finite_are_not_repaired(value):
    tool = {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}}
    with pytest.raises(RecordError, match="ast:type"):
        validate_calls([{"name": "f", "arguments": {"x": value}}], [tool])
