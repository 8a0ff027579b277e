import uuid

from services.trainer.datasets import (
    approx_tokens,
    curate,
    in_holdout,
    tokenizer_counter,
)
from services.trainer.staging import ReferenceMatchScorer

EXCLUDE = ("flywheel_split", "eval")


def row(
    prompt: str,
    completion: str,
    *,
    source="positive",
    failed=False,
    metadata=None,
    model_answer=None,
):
    return {
        "source": source,
        "interaction_id": uuid.uuid4(),
        "feedback_id": uuid.uuid4(),
        "request_messages": [{"role": "user", "content": prompt}],
        "completion": completion,
        "failed": failed,
        "metadata": metadata or {},
        "model_answer": model_answer,
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

    curated = curate(rows, exclude=EXCLUDE, holdout_share=0.0, max_tokens=64)

    assert [e.completion for e in curated.train] == ["Lima."]
    assert curated.holdout == []
    assert curated.dropped == {
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

    curated = curate(rows, exclude=("k", "v"), holdout_share=0.3, max_tokens=64)

    train_prompts = {e.prompt_key() for e in curated.train}
    holdout_prompts = {e.prompt_key() for e in curated.holdout}
    assert not train_prompts & holdout_prompts
    assert 0.2 < len(holdout_prompts) / 200 < 0.4
    assert in_holdout("x", 0.3) == in_holdout("x", 0.3)


def test_correction_makes_a_pair_against_the_answer_it_corrected():
    correction = row(
        "What is the capital of Peru?",
        "Lima.",
        source="correction",
        model_answer="Cusco.",
    )

    curated = curate([correction], exclude=EXCLUDE, holdout_share=0.0, max_tokens=64)

    [pair] = curated.pairs_train
    assert (pair.preferred, pair.rejected) == ("Lima.", "Cusco.")
    assert pair.interaction_id == pair.rejected_interaction_id
    assert pair.feedback_id == correction["feedback_id"]
    assert [e.completion for e in curated.train] == ["Lima."]
    assert pair.preference_row() == {
        "input": {
            "messages": [{"role": "user", "content": "What is the capital of Peru?"}]
        },
        "preferred_output": [{"role": "assistant", "content": "Lima."}],
        "non_preferred_output": [{"role": "assistant", "content": "Cusco."}],
    }


def test_negative_answer_pairs_with_a_preferred_answer_to_the_same_prompt():
    good = row("What is the capital of Chad?", "N'Djamena.")
    bad = row("What is the capital of Chad?", "Abuja.", source="negative")
    lonely = row("What is the capital of Togo?", "Accra.", source="negative")

    curated = curate(
        [bad, lonely, good], exclude=EXCLUDE, holdout_share=0.0, max_tokens=64
    )

    [pair] = curated.pairs_train
    assert (pair.preferred, pair.rejected) == ("N'Djamena.", "Abuja.")
    assert pair.interaction_id == good["interaction_id"]
    assert pair.rejected_interaction_id == bad["interaction_id"]
    assert pair.rejected_feedback_id == bad["feedback_id"]
    assert [e.completion for e in curated.train] == ["N'Djamena."]
    assert curated.dropped == {"negative_without_preferred": 1}


def test_correction_equal_to_the_model_answer_makes_no_pair():
    same = row("Capital of Peru?", "Lima.", source="correction", model_answer="lima")

    curated = curate([same], exclude=EXCLUDE, holdout_share=0.0, max_tokens=64)

    assert curated.pairs_train == []
    assert curated.dropped == {"pair_same_answer": 1}


def test_personal_data_is_masked_again_and_counted():
    leaky = row(
        "Mail me at jane.doe@example.com, what is the capital of Peru?",
        "Lima. Call +44 20 7946 0958 for more.",
    )

    curated = curate([leaky], exclude=EXCLUDE, holdout_share=0.0, max_tokens=256)

    [example] = curated.train
    assert "jane.doe" not in example.prompt[0]["content"]
    assert "[EMAIL]" in example.prompt[0]["content"]
    assert example.completion == "Lima. Call [PHONE] for more."
    assert curated.masked == {"prompt": 1, "completion": 1}


def word_tokenizer():
    """A real (tiny) tokenizer: one token per word, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    )
    return tokenizer


def test_tokenizer_counter_counts_real_tokens_not_characters():
    count = tokenizer_counter(word_tokenizer())
    # Long words: few tokens, many characters.
    messages = [
        {"role": "user", "content": "Antidisestablishmentarianism " * 10},
        {"role": "assistant", "content": "Pneumonoultramicroscopic"},
    ]

    tokens = count(messages)

    # Each turn renders "<role> words": '<', 'role', '>' then one token a word.
    assert tokens == 3 + 10 + 3 + 1
    assert approx_tokens(messages) > 2 * tokens


def test_over_long_examples_are_dropped_by_the_given_token_counter():
    rows = [row("Q?", "word " * 30), row("R?", "short")]
    count = tokenizer_counter(word_tokenizer())

    by_tokens = curate(
        rows, exclude=EXCLUDE, holdout_share=0.0, max_tokens=20, count_tokens=count
    )

    assert [e.completion for e in by_tokens.train] == ["short"]
    assert by_tokens.dropped == {"too_long": 1}


async def test_reference_match_needs_the_answer_bearing_words():
    scorer = ReferenceMatchScorer()
    prompt = [{"role": "user", "content": "What is the capital of Peru?"}]
    references = ["The capital of Peru is Lima."]

    right = await scorer.score(prompt, "Lima is the capital of Peru.", references)
    wrong = await scorer.score(prompt, "The capital of Peru is Cusco.", references)

    assert (right, wrong) == (1.0, 0.0)
