"""Parsing OpenAI chat requests and shaping the answers."""

from __future__ import annotations

import pytest

from services.inference.errors import InvalidRequestError
from services.inference.protocol import (
    chat_messages,
    chunk_body,
    flatten_content,
    parse_request,
)


def test_request_with_content_parts_and_developer_role_is_normalised() -> None:
    request = parse_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "unknown_field": True,
        }
    )

    assert chat_messages(request) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_tool_role_is_refused_naming_the_message() -> None:
    request = parse_request(
        {"model": "m", "messages": [{"role": "tool", "content": "x"}]}
    )

    with pytest.raises(InvalidRequestError) as caught:
        chat_messages(request)

    assert caught.value.param == "messages.0.role"


def test_more_than_four_stop_sequences_are_refused() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_request({"model": "m", "messages": [], "stop": ["a"] * 5})

    assert caught.value.status_code == 400


def test_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidRequestError):
        parse_request(["model"])


def test_single_stop_string_becomes_a_tuple() -> None:
    request = parse_request(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": "\n"}
    )

    assert request.stop_sequences() == ("\n",)


def test_usage_chunk_has_no_choices() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}

    body = chunk_body(
        completion_id="c",
        created=0,
        model="m",
        delta=None,
        include_usage=True,
        usage=usage,
    )

    assert body["choices"] == []
    assert body["usage"] == usage


def test_flatten_content_keeps_only_text() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "image_url"}, {"text": "b"}]

    assert flatten_content(parts) == "ab"
    assert flatten_content(None) == ""
