"""rl/reward.py: binary reward = format gate AND checker verdict, with a reason; graded variant for ablations."""
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from data.calls import REASON_CODES, reason_code
from rl.reward import reward

TOOLS = [{"name": "convert_currency", "description": "Convert money.",
          "parameters": {"type": "object", "required": ["base_currency", "target_currency", "amount"], "properties": {
              "base_currency": {"type": "string"}, "target_currency": {"type": "string"},
              "amount": {"type": "number"}, "round": {"type": "boolean", "default": True}}}},
         {"name": "get_time", "description": "Time in a city.",
          "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}]
RECORD = {"id": "r1", "messages": [{"role": "user", "content": "20000 JPY in USD?"}], "tools": TOOLS,
          "answers": [{"name": "convert_currency", "arguments": {"base_currency": "JPY", "target_currency": "USD",
                                                               "amount": 20000}}], "category": "simple"}
RIGHT = "[convert_currency(base_currency='JPY', target_currency='USD', amount=20000)]"


def think(answer, thought="The user wants JPY to USD."):
    return f"<think>{thought}</think>\n<answer>{answer}</answer>"


def test_right_answer_gets_one():
    assert reward(think(RIGHT), RECORD) == (1.0, "")
    # the prefill "<think>" is part of the text the reward sees
    prefill, completion = "<think>", "JPY to USD.</think><answer>" + RIGHT + "</answer><|im_end|>"
    assert reward(prefill + completion, RECORD) == (1.0, "")
    assert reward(think("[convert_currency(base_currency='jpy', target_currency='usd', amount=20000.0, round=True)]"),
                  RECORD)[0] == 1.0


def test_wrong_answers_get_zero_with_reason():
    cases = {
        RIGHT: "format:no_think",
        "<think>x</think>": "format:no_answer",
        think(RIGHT) + " and more": "format:extra_text",
        think("[convert_currency(base_currency='JPY'"): "format:parse_error",
        think("[get_time(city='Tokyo')]"): "wrong_function",
        think("[convert_currency(base_currency='JPY', amount=20000)]"): "missing_param",
        think("[convert_currency(base_currency='JPY', target_currency='USD', amount=20000, fee=1)]"): "unexpected_param",
        think("[convert_currency(base_currency='JPY', target_currency='USD', amount='20000')]"): "wrong_type",
        think("[convert_currency(base_currency='JPY', target_currency='EUR', amount=20000)]"): "wrong_value",
        think(RIGHT[:-1] + ", " + RIGHT[1:]): "wrong_count",
    }
    for text, code in cases.items():
        value, reason = reward(text, RECORD)
        assert value == 0.0 and reason_code(reason) == code, (text, reason)
        assert reason_code(reason) in REASON_CODES


def test_plain_json_hermes_formats():
    assert reward(RIGHT, RECORD, answer_format="plain")[0] == 1.0
    js = '[{"name": "convert_currency", "arguments": {"base_currency": "JPY", "target_currency": "USD", "amount": 20000}}]'
    assert reward(js, RECORD, answer_format="json")[0] == 1.0
    assert reward(f"<tool_call>{js[1:-1]}</tool_call>", RECORD, answer_format="hermes")[0] == 1.0
    assert reward(think(RIGHT), RECORD, answer_format="plain")[0] == 0.0


def test_irrelevance_record():
    record = dict(RECORD, answers=[], category="irrelevance")
    assert reward(think("None of the functions can tell the weather."), record) == (1.0, "")
    assert reward(think("[]"), record) == (1.0, "")
    assert reason_code(reward(think(RIGHT), record)[1]) == "irrelevance:made_call"
    assert reward("No function fits.", record)[1] == "format:no_think"   # the think format is still required
    # a record with no answers counts as irrelevance whatever its category says
    assert reward(think("[]"), dict(RECORD, answers=[]))[0] == 1.0


def test_bfcl_item_with_ground_truth():
    item = {"function": TOOLS, "category": "live_parallel",
            "ground_truth": [{"get_time": {"city": ["Tokyo"]}}, {"get_time": {"city": ["Paris", "Paris, France"]}}]}
    assert reward(think("[get_time(city='paris'), get_time(city='Tokyo')]"), item)[0] == 1.0
    assert reward(think("[get_time(city='Tokyo')]"), item)[1].startswith("wrong_count")


def test_graded_mode():
    right = reward(think(RIGHT), RECORD, mode="graded")
    assert right == (1.0, "")
    wrong_value = reward(think("[convert_currency(base_currency='JPY', target_currency='EUR', amount=20000)]"),
                         RECORD, mode="graded")[0]
    wrong_name = reward(think("[get_time(city='Tokyo')]"), RECORD, mode="graded")[0]
    no_think = reward(RIGHT, RECORD, mode="graded")[0]
    assert no_think == 0.0 and 0.1 <= wrong_name < wrong_value < 1.0
    # 0.1 format + 0.3 name + 0.6 * 3 of 4 parameters right (round omitted is right)
    assert abs(wrong_value - (0.1 + 0.3 + 0.6 * 3 / 4)) < 1e-9


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.sampled_from(["think", "plain", "json", "hermes"]), st.sampled_from(["binary", "graded"]))
def test_reward_never_raises(text, fmt, mode):
    for candidate in (text, think(text), "<think>" + text):
        value, reason = reward(candidate, RECORD, answer_format=fmt, mode=mode)
        assert 0.0 <= value <= 1.0 and (value == 1.0) == (reason == "")
        if mode == "binary":
            assert value in (0.0, 1.0)


def test_adversarial_no_side_effect():
    marker = "/tmp/_reward_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    for payload in (f"__import__('os').system('touch {marker}')", f"[convert_currency(amount=__import__('os').system('touch {marker}'))]",
                    f"[convert_currency(amount=(lambda: __import__('os').system('touch {marker}'))())]",
                    "[convert_currency(amount=" + "[" * 10_000 + ")]", "\x00" * 1000, "x" * 1_000_000):
        assert reward(think(payload), RECORD)[0] == 0.0
        assert reward(payload, RECORD, answer_format="plain")[0] == 0.0
    assert not os.path.exists(marker)
