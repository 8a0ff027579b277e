"""Dataset curation: supervised examples and preference pairs from rated interactions.

A dataset is a reproducible snapshot: the query window, a content hash over its rows,
the counts each cleaning rule dropped (and how many kept rows had personal data
masked), and for every row the interaction and feedback ids it came from, so a model
version traces back to the user signals that shaped it.

Supervised rows come from positively rated answers and from corrections (the user's
answer replaces the model's). Preference pairs (for DPO) set a preferred answer
against a rejected one for the same prompt: a correction against the model answer it
corrected, or a negatively rated answer against a preferred answer to the same prompt.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from services.common.sealing import Keyring, content_nulls, content_select, open_content
from services.gateway.pii import mask_text

logger = logging.getLogger(__name__)

# Counts the tokens of a conversation (prompt messages plus the assistant answer).
TokenCounter = Callable[[list[dict[str, Any]]], int]

# Feedback counts only against an interaction of its own project (joins USING
# project_id too): a project cannot shape another's model by naming its ids.
# A positive rating: thumbs up, an implicit copy, or a score of at least 0.5; a
# negative one: thumbs down, a regenerate, or a score below 0.5. The content columns
# come as stored (maybe sealed) and are opened by `open_candidates`.
CANDIDATES_SQL = f"""
WITH ratings AS (
    SELECT interaction_id, project_id,
           bool_or(kind IN ('thumbs', 'copy') AND value > 0
                   OR kind = 'score' AND value >= 0.5) AS any_positive,
           bool_or(kind IN ('thumbs', 'regenerate') AND value < 0
                   OR kind = 'score' AND value < 0.5) AS any_negative,
           (array_agg(event_id ORDER BY created_at DESC))[1] AS feedback_id
    FROM feedback
    WHERE kind IN ('thumbs', 'score', 'copy', 'regenerate')
    GROUP BY interaction_id, project_id
)
SELECT CASE WHEN r.any_positive THEN 'positive' ELSE 'negative' END AS source,
       i.interaction_id, r.feedback_id, i.error IS NOT NULL AS failed, i.metadata,
       {content_select("interactions", "i", "i_")},
       {content_nulls("feedback", "f_")}
FROM interactions i JOIN ratings r USING (interaction_id, project_id)
WHERE i.route = $1 AND i.finished_at <= $2 AND r.any_positive <> r.any_negative
UNION ALL
SELECT 'correction', i.interaction_id, f.event_id, false, i.metadata,
       {content_select("interactions", "i", "i_")},
       {content_select("feedback", "f", "f_")}
FROM feedback f JOIN interactions i USING (interaction_id, project_id)
WHERE i.route = $1 AND i.finished_at <= $2 AND f.kind = 'correction'
  AND (f.text <> '' OR f.text_sealed IS NOT NULL)
"""  # noqa: S608 - built from constants only

NEW_RATED_SQL = """
SELECT count(DISTINCT f.interaction_id)
FROM feedback f JOIN interactions i USING (interaction_id, project_id)
WHERE i.route = $1 AND f.stored_at > $2
"""


@dataclass(frozen=True)
class Example:
    """One supervised row: the prompt messages and the answer to learn."""

    prompt: list[dict[str, Any]]
    completion: str
    source: str
    interaction_id: uuid.UUID
    feedback_id: uuid.UUID | None

    def prompt_key(self) -> str:
        return orjson.dumps(self.prompt, option=orjson.OPT_SORT_KEYS).decode()

    def messages(self) -> list[dict[str, Any]]:
        return [*self.prompt, {"role": "assistant", "content": self.completion}]

    def chat_row(self) -> dict[str, Any]:
        """The row in OpenAI's chat fine-tuning format."""
        return {"messages": self.messages()}


@dataclass(frozen=True)
class PreferencePair:
    """A preferred and a rejected answer to the same prompt, with their signals."""

    prompt: list[dict[str, Any]]
    preferred: str
    rejected: str
    source: str
    interaction_id: uuid.UUID
    feedback_id: uuid.UUID | None
    rejected_interaction_id: uuid.UUID
    rejected_feedback_id: uuid.UUID | None

    def prompt_key(self) -> str:
        return orjson.dumps(self.prompt, option=orjson.OPT_SORT_KEYS).decode()

    def preference_row(self) -> dict[str, Any]:
        """The row in OpenAI's preference (DPO) fine-tuning format."""
        return {
            "input": {"messages": self.prompt},
            "preferred_output": [{"role": "assistant", "content": self.preferred}],
            "non_preferred_output": [{"role": "assistant", "content": self.rejected}],
        }


@dataclass
class Curated:
    """What curation kept, split by prompt, and what each rule dropped or masked."""

    train: list[Example] = field(default_factory=list)
    holdout: list[Example] = field(default_factory=list)
    pairs_train: list[PreferencePair] = field(default_factory=list)
    pairs_holdout: list[PreferencePair] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    masked: Counter[str] = field(default_factory=Counter)

    def counts(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "holdout": len(self.holdout),
            "pairs_train": len(self.pairs_train),
            "pairs_holdout": len(self.pairs_holdout),
        }


@dataclass
class Dataset(Curated):
    """A curated, stored snapshot."""

    dataset_id: str = ""
    route: str = ""
    window_end: datetime | None = None

    def content_sha256(self) -> str:
        digest = hashlib.sha256()
        parts: list[tuple[str, list[Any]]] = [
            ("train", [e.chat_row() for e in self.train]),
            ("holdout", [e.chat_row() for e in self.holdout]),
            ("pairs_train", [p.preference_row() for p in self.pairs_train]),
            ("pairs_holdout", [p.preference_row() for p in self.pairs_holdout]),
        ]
        for split, rows in parts:
            for row in rows:
                digest.update(split.encode())
                digest.update(orjson.dumps(row, option=orjson.OPT_SORT_KEYS))
        return digest.hexdigest()


def open_candidates(
    records: list[dict[str, Any]], keyring: Keyring
) -> list[dict[str, Any]]:
    """CANDIDATES_SQL's rows with their content opened, in the shape `curate` reads.

    A rating's completion is the model's answer; a correction's is the user's text,
    with the model's answer beside it (`model_answer`). A correction whose sealed
    text opens empty is left out, as the query leaves out a plaintext empty one.
    """
    rows: list[dict[str, Any]] = []
    for record in records:
        interaction = open_content(keyring, "interactions", record, prefix="i_")
        row = {
            "source": record["source"],
            "interaction_id": record["interaction_id"],
            "feedback_id": record["feedback_id"],
            "failed": record["failed"],
            "metadata": record["metadata"],
            "request_messages": interaction["request_messages"],
            "completion": interaction["response_text"],
            "model_answer": None,
        }
        if record["source"] == "correction":
            correction = open_content(keyring, "feedback", record, prefix="f_")
            if not correction["text"]:
                continue
            row["completion"] = correction["text"]
            row["model_answer"] = interaction["response_text"]
        rows.append(row)
    return rows


def normalize(text: str) -> str:
    """Lowercase, punctuation and runs of whitespace removed: for near-duplicates."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def approx_tokens(messages: list[dict[str, Any]]) -> int:
    """About four characters a token plus four a message: the fallback counter.

    Close enough for English text with a BPE tokenizer to drop the over-long
    outliers when no tokenizer is at hand (see `tokenizer_counter`).
    """
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    return chars // 4 + 4 * len(messages)


def tokenizer_counter(tokenizer: Any) -> TokenCounter:
    """A counter that renders the chat template and counts the real token ids."""

    def count(messages: list[dict[str, Any]]) -> int:
        chat = [
            {"role": m["role"], "content": m.get("content") or ""} for m in messages
        ]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def in_holdout(prompt_key: str, share: float) -> bool:
    """Stable split by prompt: the same prompt always falls on the same side."""
    value = int.from_bytes(hashlib.sha256(prompt_key.encode()).digest()[:4], "big")
    return value / 2**32 < share


def _masked(text: str, masked: Counter[str], what: str) -> str:
    # The gateway masked the request already; what came straight from Kafka (or a
    # user's correction) may still hold personal data: scan everything again.
    cleaned = mask_text(text)
    if cleaned != text:
        masked[what] += 1
    return cleaned


class _Curator:
    """One pass of cleaning over candidate rows (see `curate`)."""

    def __init__(
        self, exclude: tuple[str, str], max_tokens: int, count_tokens: TokenCounter
    ) -> None:
        self.exclude = exclude
        self.max_tokens = max_tokens
        self.count_tokens = count_tokens
        self.result = Curated()
        self.examples: list[Example] = []
        self.pairs: list[PreferencePair] = []
        self.negatives: list[Example] = []
        self.seen_exact: set[tuple[str, str]] = set()
        self.seen_near: set[tuple[str, str]] = set()
        self.seen_pairs: set[tuple[str, str, str]] = set()

    def add(self, row: dict[str, Any]) -> None:
        dropped, masked = self.result.dropped, self.result.masked
        exclude_key, exclude_value = self.exclude
        if (row.get("metadata") or {}).get(exclude_key) == exclude_value:
            dropped["excluded_by_metadata"] += 1
            return
        if row["failed"] or not (row["completion"] or "").strip():
            dropped["failed_call"] += 1
            return
        prompt = [
            {
                "role": m["role"],
                "content": _masked(str(m.get("content") or ""), masked, "prompt"),
            }
            for m in row["request_messages"]
        ]
        example = Example(
            prompt=prompt,
            completion=_masked(row["completion"].strip(), masked, "completion"),
            source=row["source"],
            interaction_id=row["interaction_id"],
            feedback_id=row["feedback_id"],
        )
        if example.source == "negative":
            self.negatives.append(example)
            return
        model_answer = (row.get("model_answer") or "").strip()
        if example.source == "correction" and model_answer:
            rejected = _masked(model_answer, masked, "rejected")
            self.add_pair(example, rejected, example.interaction_id, None)
        self.add_example(example)

    def add_example(self, example: Example) -> None:
        dropped = self.result.dropped
        key = example.prompt_key()
        if (key, example.completion) in self.seen_exact:
            dropped["exact_duplicate"] += 1
            return
        self.seen_exact.add((key, example.completion))
        near = (normalize(key), normalize(example.completion))
        if near in self.seen_near:
            dropped["near_duplicate"] += 1
            return
        self.seen_near.add(near)
        if self.count_tokens(example.messages()) > self.max_tokens:
            dropped["too_long"] += 1
            return
        self.examples.append(example)

    def add_pair(
        self,
        preferred: Example,
        rejected: str,
        rejected_interaction: uuid.UUID,
        rejected_feedback: uuid.UUID | None,
    ) -> None:
        dropped = self.result.dropped
        key = preferred.prompt_key()
        if normalize(rejected) == normalize(preferred.completion):
            dropped["pair_same_answer"] += 1
            return
        identity = (
            normalize(key),
            normalize(preferred.completion),
            normalize(rejected),
        )
        if identity in self.seen_pairs:
            dropped["pair_duplicate"] += 1
            return
        self.seen_pairs.add(identity)
        longest = max(preferred.completion, rejected, key=len)
        messages = [*preferred.prompt, {"role": "assistant", "content": longest}]
        if self.count_tokens(messages) > self.max_tokens:
            dropped["pair_too_long"] += 1
            return
        self.pairs.append(
            PreferencePair(
                prompt=preferred.prompt,
                preferred=preferred.completion,
                rejected=rejected,
                source=f"{preferred.source}_vs_rejected",
                interaction_id=preferred.interaction_id,
                feedback_id=preferred.feedback_id,
                rejected_interaction_id=rejected_interaction,
                rejected_feedback_id=rejected_feedback,
            )
        )

    def pair_negatives(self) -> None:
        """Set each negatively rated answer against a kept answer to its prompt."""
        preferred_by_prompt: dict[str, Example] = {}
        for example in self.examples:
            preferred_by_prompt.setdefault(example.prompt_key(), example)
        for negative in self.negatives:
            preferred = preferred_by_prompt.get(negative.prompt_key())
            if preferred is None:
                self.result.dropped["negative_without_preferred"] += 1
                continue
            self.add_pair(
                preferred,
                negative.completion,
                negative.interaction_id,
                negative.feedback_id,
            )


def curate(
    rows: list[dict[str, Any]],
    *,
    exclude: tuple[str, str],
    holdout_share: float,
    max_tokens: int,
    count_tokens: TokenCounter = approx_tokens,
) -> Curated:
    """Clean candidate rows, pair preferences, split by prompt. Pure: no database.

    Rules in order, each counted in `dropped`: excluded by metadata (an evaluation
    set), failed call, exact duplicate, near duplicate, too long (by `count_tokens`);
    pairs: same answer on both sides, duplicate pair, too long; negatives with no
    preferred answer to the same prompt. Personal data is masked, never dropped.
    """
    curator = _Curator(exclude, max_tokens, count_tokens)
    for row in rows:
        curator.add(row)
    curator.pair_negatives()
    result = curator.result
    for example in curator.examples:
        held = in_holdout(example.prompt_key(), holdout_share)
        (result.holdout if held else result.train).append(example)
    for pair in curator.pairs:
        held = in_holdout(pair.prompt_key(), holdout_share)
        (result.pairs_holdout if held else result.pairs_train).append(pair)
    return result
