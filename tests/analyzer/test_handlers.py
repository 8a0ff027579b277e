"""The analyzer's pure processing: parsing, counting, joining, folding observations."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from services.analyzer import handlers
from services.analyzer.errors import InvalidEventError
from services.common.events import (
    ChatMessage,
    ErrorInfo,
    Feedback,
    FeedbackKind,
    Interaction,
    Usage,
    encode,
)
from services.common.routing import Route, RoutingTable, Variant


def interaction(**fields: object) -> Interaction:
    now = datetime.now(UTC)
    defaults: dict[str, object] = {
        "project_id": "p",
        "route": "bot",
        "variant": "v1",
        "request_messages": [ChatMessage(role="user", content="hi")],
        "usage": Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
        "cost_usd": 0.01,
        "latency_s": 1.5,
        "started_at": now,
        "finished_at": now,
    }
    return Interaction.model_validate({**defaults, **fields})


def feedback(kind: FeedbackKind, value: float | None, **fields: object) -> Feedback:
    return Feedback(
        interaction_id=uuid.uuid4(), project_id="p", kind=kind, value=value, **fields
    )


def test_parse_interaction_reads_the_wire_format() -> None:
    event = interaction()

    assert handlers.parse_interaction(encode(event)) == event


@pytest.mark.parametrize("raw", [None, b"not json", b'{"route": "x"}'])
def test_parse_interaction_rejects_garbage_as_invalid(raw: bytes | None) -> None:
    with pytest.raises(InvalidEventError) as caught:
        handlers.parse_interaction(raw)

    assert caught.value.reason == "invalid"


def test_parse_feedback_rejects_a_newer_schema_version() -> None:
    raw = encode(feedback(FeedbackKind.THUMBS, 1.0, schema_version=99))

    with pytest.raises(InvalidEventError) as caught:
        handlers.parse_feedback(raw)

    assert caught.value.reason == "unsupported_schema_version"


def test_interaction_counts_cover_latency_tokens_cost_and_errors() -> None:
    event = interaction(
        error=ErrorInfo(type="upstream", message="x"), time_to_first_token_s=0.2
    )

    counts = handlers.interaction_counts(event)

    assert counts == {
        "requests": 1,
        "errors": 1,
        "latency_sum_s": 1.5,
        "latency_count": 1,
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "cost_usd": 0.01,
        "ttft_sum_s": 0.2,
        "ttft_count": 1,
    }


@pytest.mark.parametrize(
    ("kind", "value", "rated", "positive", "corrections"),
    [
        (FeedbackKind.THUMBS, 1.0, 1, 1, 0),
        (FeedbackKind.THUMBS, -1.0, 1, 0, 0),
        (FeedbackKind.SCORE, 0.7, 1, 1, 0),
        (FeedbackKind.REGENERATE, -1.0, 1, 0, 0),
        (FeedbackKind.COMMENT, None, 0, 0, 0),
        (FeedbackKind.CORRECTION, None, 0, 0, 1),
    ],
)
def test_feedback_counts_follow_is_positive(
    kind: FeedbackKind, value: float | None, rated: int, positive: int, corrections: int
) -> None:
    counts = handlers.feedback_counts(feedback(kind, value))

    assert counts == {
        "feedback": 1,
        "rated": rated,
        "positive": positive,
        "corrections": corrections,
    }


def test_add_counts_returns_a_new_dict() -> None:
    current = {"requests": 2.0}

    merged = handlers.add_counts(current, {"requests": 1, "errors": 1})

    assert merged == {"requests": 3, "errors": 1}
    assert current == {"requests": 2.0}


def test_kpi_keys_round_trip_even_with_separators_in_names() -> None:
    key = handlers.kpi_key("a|b", 'v"1', "control", 3)

    assert handlers.split_kpi_key(key) == ("a|b", 'v"1', "control", 3)


def test_a_join_entry_remembers_feedback_and_its_first_rating() -> None:
    entry = handlers.join_entry(interaction(arm="control"), partition=2, now_s=10.0)
    comment = feedback(FeedbackKind.COMMENT, None)
    thumbs = feedback(FeedbackKind.THUMBS, 1.0)

    after_comment = handlers.with_feedback(entry, comment)
    after_thumbs = handlers.with_feedback(after_comment, thumbs)

    assert after_comment["rated"] is False
    assert after_thumbs["rated"] is True
    assert after_thumbs["feedback_ids"] == [str(comment.event_id), str(thumbs.event_id)]
    assert entry["feedback_ids"] == []


def test_expired_keys_only_takes_old_entries_of_the_partition() -> None:
    items = [
        ("old-here", {"partition": 1, "seen_at": 5.0}),
        ("new-here", {"partition": 1, "seen_at": 50.0}),
        ("old-elsewhere", {"partition": 2, "seen_at": 5.0}),
    ]

    assert handlers.expired_keys(items, partition=1, cutoff_s=10.0) == ["old-here"]


def test_observations_fold_into_per_arm_totals() -> None:
    request = handlers.request_observation(
        interaction(arm="treatment", experiment_id="e", latency_s=2.0)
    )
    failed = handlers.request_observation(
        interaction(
            arm="treatment",
            experiment_id="e",
            latency_s=4.0,
            error=ErrorInfo(type="t", message="m"),
        )
    )
    entry = handlers.join_entry(
        interaction(arm="treatment", experiment_id="e"), partition=0, now_s=0.0
    )
    rating = handlers.rating_observation(entry, positive=True)

    value = None
    for observation in (request, failed, rating):
        value = handlers.apply_observation(value, observation, partition=3)
    assert value is not None
    totals = handlers.arm_totals(value, "treatment")

    assert value["partition"] == 3
    assert (totals.requests, totals.errors, totals.rated, totals.positive) == (
        2,
        1,
        1,
        1,
    )
    assert totals.mean_latency_s == pytest.approx(3.0)
    assert totals.latency_variance_s2 == pytest.approx(1.0)
    assert handlers.arm_totals(value, "control").requests == 0


def experiment_table(version: int, experiment_id: str) -> RoutingTable:
    route = Route(
        name="bot",
        experiment_id=experiment_id,
        variants=(
            Variant("cand", "http://127.0.0.1:1", "m", 500, arm="treatment"),
            Variant("base", "http://127.0.0.1:1", "m", 9_500, arm="control"),
        ),
    )
    return RoutingTable(version=version, routes={"bot": route})


def test_planned_split_comes_from_the_variant_weights() -> None:
    live, planned = handlers.planned_split(experiment_table(2, "e"), "bot", "e")

    assert live is True
    assert planned == {"treatment": 500, "control": 9_500}


def test_an_experiment_no_longer_in_the_table_is_not_live() -> None:
    assert handlers.planned_split(experiment_table(2, "other"), "bot", "e") == (
        False,
        None,
    )
    assert handlers.planned_split(experiment_table(2, "e"), "nope", "e") == (
        False,
        None,
    )


def test_before_the_first_table_the_split_is_unknown() -> None:
    assert handlers.planned_split(RoutingTable(version=0), "bot", "e") == (True, None)
