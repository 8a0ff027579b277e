"""The validator catches each of OpenAI's fine-tuning format rules, by line."""

import json

import pytest

from services.trainer.openai_format import validate_lines

USER = {"role": "user", "content": "What is the capital of Peru?"}
ANSWER = {"role": "assistant", "content": "Lima."}
GOOD_CHAT = {"messages": [{"role": "system", "content": "Be brief."}, USER, ANSWER]}
GOOD_PAIR = {
    "input": {"messages": [USER]},
    "preferred_output": [ANSWER],
    "non_preferred_output": [{"role": "assistant", "content": "Cusco."}],
}


def lines_with(bad: object, good: dict, *, at: int = 4) -> list[str]:
    """Ten good lines with `bad` (a row, or raw text) on line `at`."""
    lines = [json.dumps(good) for _ in range(10)]
    lines[at - 1] = bad if isinstance(bad, str) else json.dumps(bad)
    return lines


def rules(violations) -> list[tuple[int, str]]:
    return [(v.line, v.rule) for v in violations]


def test_good_chat_and_preference_files_pass():
    assert validate_lines(lines_with(GOOD_CHAT, GOOD_CHAT)) == []
    assert validate_lines(lines_with(GOOD_PAIR, GOOD_PAIR), "preference") == []


@pytest.mark.parametrize(
    ("bad", "rule"),
    [
        ("{not json", "not_json"),
        ("[1, 2]", "not_an_object"),
        ({"messages": "What is the capital of Peru?"}, "missing_messages"),
        ({"messages": []}, "missing_messages"),
        ({"messages": [USER, {"role": "robot", "content": "Lima."}]}, "unknown_role"),
        ({"messages": [USER, {"role": "assistant"}]}, "missing_content"),
        ({"messages": [USER, {**ANSWER, "score": 1}]}, "unknown_key"),
        ({"messages": [USER, ANSWER], "extra": 1}, "unknown_key"),
        ({"messages": [ANSWER, USER, ANSWER]}, "message_order"),
        (
            {"messages": [USER, {"role": "system", "content": "late"}, ANSWER]},
            "message_order",
        ),
        ({"messages": [USER, ANSWER, USER]}, "last_not_assistant"),
        ({"messages": [{**USER, "weight": 1}, ANSWER]}, "weight_not_on_assistant"),
        ({"messages": [USER, {**ANSWER, "weight": 0.5}]}, "weight_not_binary"),
        ({"messages": [USER, {**ANSWER, "weight": True}]}, "weight_not_binary"),
    ],
)
def test_each_chat_rule_is_reported_on_its_line(bad, rule):
    violations = validate_lines(lines_with(bad, GOOD_CHAT, at=4))

    assert rules(violations) == [(4, rule)], violations


def test_weight_zero_and_one_on_assistant_messages_are_fine():
    row = {"messages": [USER, {**ANSWER, "weight": 0}, USER, {**ANSWER, "weight": 1}]}

    assert validate_lines(lines_with(row, GOOD_CHAT)) == []


def test_assistant_tool_call_without_content_is_fine():
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}
    tool = {"role": "tool", "content": "Lima", "tool_call_id": "c1"}
    row = {"messages": [USER, call, tool, ANSWER]}

    assert validate_lines(lines_with(row, GOOD_CHAT)) == []


@pytest.mark.parametrize(
    ("bad", "rule"),
    [
        ({**GOOD_PAIR, "input": "hi"}, "missing_input"),
        ({**GOOD_PAIR, "input": {"messages": []}}, "missing_messages"),
        ({**GOOD_PAIR, "input": {"messages": [USER, ANSWER]}}, "message_order"),
        ({**GOOD_PAIR, "input": {"messages": [USER], "x": 1}}, "unknown_key"),
        ({**GOOD_PAIR, "preferred_output": [ANSWER, ANSWER]}, "bad_output"),
        ({**GOOD_PAIR, "preferred_output": [USER]}, "bad_output"),
        ({**GOOD_PAIR, "non_preferred_output": "Cusco."}, "bad_output"),
        ({**GOOD_PAIR, "non_preferred_output": [{"role": "assistant"}]}, "bad_output"),
        ({**GOOD_PAIR, "rejected": "Cusco."}, "unknown_key"),
    ],
)
def test_each_preference_rule_is_reported_on_its_line(bad, rule):
    violations = validate_lines(lines_with(bad, GOOD_PAIR, at=7), "preference")

    assert rules(violations) == [(7, rule)], violations


def test_example_over_the_token_limit_is_reported():
    long = {"messages": [USER, {"role": "assistant", "content": "word " * 400}]}

    violations = validate_lines(lines_with(long, GOOD_CHAT, at=2), max_tokens=100)

    assert rules(violations) == [(2, "too_many_tokens")]


def test_file_with_fewer_than_ten_examples_is_reported_as_line_zero():
    violations = validate_lines([json.dumps(GOOD_CHAT)] * 9)

    assert rules(violations) == [(0, "too_few_examples")]


def test_every_violation_of_every_line_is_reported():
    lines = lines_with({"messages": [USER]}, GOOD_CHAT, at=3)
    lines[7] = json.dumps({"messages": [{"role": "bot", "content": 1}]})

    violations = validate_lines(lines)

    assert rules(violations) == [
        (3, "last_not_assistant"),
        (8, "unknown_role"),
        (8, "missing_content"),
    ]
