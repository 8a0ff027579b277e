import uuid

from services.trainer.datasets import curate, in_holdout
from services.trainer.staging import ReferenceMatchScorer


def row(
    prompt: str, completion: str, *, source="positive", failed=False, metadata=None
):
    return {
        "source": source,
        "interaction_id": uuid.uuid4(),
        "feedback_id": uuid.uuid4(),
        "request_messages": [{"role": "user", "content": prompt}],
        "completion": completion,
        "failed": failed,
        "metadata": metadata or {},
    }


def test_curation_drops_each_kind_of_bad_row_and_counts_it():
    rows = [
        row("What is the capital of Peru?", "Lima."),
        row("What is the capital of Peru?", "Lima."),
        row("What is the capital of Peru?", "lima"),
        row("What is the capital of Chad?", "", failed=True),
        row(
            "What is the capital of Mali?",
            "Bamako.",
            metadata={"flywheel_split": "eval"},
        ),
        row("What is the capital of Iran?", "Tehran " * 400),
    ]

    train, holdout, dropped = curate(
        rows, exclude=("flywheel_split", "eval"), holdout_share=0.0, max_tokens=64
    )

    assert [e.completion for e in train] == ["Lima."]
    assert holdout == []
    assert dropped == {
        "exact_duplicate": 1,
        "near_duplicate": 1,
        "failed_call": 1,
        "excluded_by_metadata": 1,
        "too_long": 1,
    }


def test_split_is_by_prompt_so_no_prompt_sits_on_both_sides():
    rows = [
        row(f"What is the capital of country {n}?", f"City {n} {k}.")
        for n in range(200)
        for k in range(2)
    ]

    train, holdout, _ = curate(
        rows, exclude=("k", "v"), holdout_share=0.3, max_tokens=64
    )

    train_prompts = {e.prompt_key() for e in train}
    holdout_prompts = {e.prompt_key() for e in holdout}
    assert not train_prompts & holdout_prompts
    assert 0.2 < len(holdout_prompts) / 200 < 0.4
    assert in_holdout("x", 0.3) == in_holdout("x", 0.3)


async def test_reference_match_needs_the_answer_bearing_words():
    scorer = ReferenceMatchScorer()
    prompt = [{"role": "user", "content": "What is the capital of Peru?"}]
    references = ["The capital of Peru is Lima."]

    right = await scorer.score(prompt, "Lima is the capital of Peru.", references)
    wrong = await scorer.score(prompt, "The capital of Peru is Cusco.", references)

    assert (right, wrong) == (1.0, 0.0)
