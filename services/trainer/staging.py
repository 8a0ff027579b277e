"""Staging: the candidate and production answer the same prompts and are scored.

The default scorer is reference match: an answer scores 1 when it contains every word
of the reference answer that the prompt did not already contain (the words that carry
the answer: "Lima" in "The capital of Peru is Lima."), else 0. Another scorer (an LLM
judge, say) plugs in through the `Scorer` protocol.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from openai import AsyncOpenAI, OpenAIError

from services.trainer.datasets import Example
from services.trainer.store import ModelVersion

logger = logging.getLogger(__name__)

STOPWORDS = frozenset(
    {
        "a",
        "an",
        "the",
        "is",
        "are",
        "was",
        "were",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "and",
        "or",
        "it",
        "its",
        "this",
        "that",
        "be",
        "by",
        "with",
        "as",
    }
)


class Scorer(Protocol):
    """Scores one answer against the references for its prompt, in [0, 1]."""

    async def score(
        self, prompt: list[dict[str, Any]], answer: str, references: list[str]
    ) -> float: ...


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS}


class ReferenceMatchScorer:
    """1.0 when the answer holds every answer-bearing word of some reference."""

    async def score(
        self, prompt: list[dict[str, Any]], answer: str, references: list[str]
    ) -> float:
        prompt_words = _words(" ".join(str(m.get("content", "")) for m in prompt))
        answer_words = _words(answer)
        for reference in references:
            needed = _words(reference) - prompt_words
            if needed and needed <= answer_words:
                return 1.0
        return 0.0


@dataclass(frozen=True)
class StagingResult:
    """Scores of both models on trained and held-out prompts, and the gate's verdict."""

    candidate_trained: float
    production_trained: float
    candidate_holdout: float
    production_holdout: float
    prompts_trained: int
    prompts_holdout: int
    passed: bool
    reason: str

    def as_scores(self) -> dict[str, Any]:
        return {"staging": self.__dict__}


def group_by_prompt(
    examples: Sequence[Example],
) -> dict[str, tuple[list[dict[str, Any]], list[str]]]:
    grouped: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}
    references: dict[str, list[str]] = defaultdict(list)
    for example in examples:
        key = example.prompt_key()
        grouped.setdefault(key, (example.prompt, references[key]))
        references[key].append(example.completion)
    return grouped


async def answer(
    client: AsyncOpenAI,
    version: ModelVersion,
    prompt: list[dict[str, Any]],
    max_tokens: int,
) -> str:
    response = await client.chat.completions.create(
        model=version.adapter or version.base_model,
        messages=prompt,  # type: ignore[arg-type]  # plain dicts in OpenAI's shape
        max_tokens=max_tokens,
        temperature=0,
    )
    return response.choices[0].message.content or ""


async def mean_score(
    version: ModelVersion,
    prompts: list[tuple[list[dict[str, Any]], list[str]]],
    scorer: Scorer,
    max_tokens: int,
    api_key: str = "unused",
) -> float:
    """The mean score of `version`'s greedy answers to `prompts`."""
    if not prompts:
        return 0.0
    total = 0.0
    async with AsyncOpenAI(
        base_url=version.upstream_url, api_key=api_key, timeout=60, max_retries=2
    ) as client:
        for prompt, references in prompts:
            text = await answer(client, version, prompt, max_tokens)
            total += await scorer.score(prompt, text, references)
    return total / len(prompts)


async def evaluate(
    candidate: ModelVersion,
    production: ModelVersion,
    train: Sequence[Example],
    holdout: Sequence[Example],
    *,
    max_prompts: int,
    max_holdout_regression: float,
    min_trained_gain: float,
    max_tokens: int,
    scorer: Scorer | None = None,
    seed: int = 0,
    api_keys: dict[str, str] | None = None,
) -> StagingResult:
    """Both models answer sampled trained and held-out prompts; apply the gate."""
    scorer = scorer or ReferenceMatchScorer()
    rng = random.Random(seed)  # noqa: S311 - a reproducible sample, not a secret
    trained = list(group_by_prompt(train).values())
    held = list(group_by_prompt(holdout).values())
    trained = rng.sample(trained, min(max_prompts, len(trained)))
    held = rng.sample(held, min(max_prompts, len(held)))
    # The key each upstream wants (by base URL); a local server wants none.
    keys = api_keys or {}
    cand_key = keys.get(candidate.upstream_url, "unused")
    prod_key = keys.get(production.upstream_url, "unused")
    try:
        scores = await asyncio.gather(
            mean_score(candidate, trained, scorer, max_tokens, cand_key),
            mean_score(production, trained, scorer, max_tokens, prod_key),
            mean_score(candidate, held, scorer, max_tokens, cand_key),
            mean_score(production, held, scorer, max_tokens, prod_key),
        )
    except OpenAIError as error:
        return StagingResult(
            0,
            0,
            0,
            0,
            len(trained),
            len(held),
            False,
            f"staging calls failed: {error!r}",
        )
    cand_trained, prod_trained, cand_held, prod_held = scores
    learned = cand_trained > prod_trained + min_trained_gain
    kept = not held or cand_held >= prod_held - max_holdout_regression
    if learned and kept:
        reason = (
            "candidate learned its training prompts and held its ground on the rest"
        )
    elif not learned:
        reason = (
            f"no gain on trained prompts ({cand_trained:.2f} vs {prod_trained:.2f})"
        )
    else:
        reason = f"regressed on held-out prompts ({cand_held:.2f} vs {prod_held:.2f})"
    return StagingResult(
        candidate_trained=cand_trained,
        production_trained=prod_trained,
        candidate_holdout=cand_held,
        production_holdout=prod_held,
        prompts_trained=len(trained),
        prompts_holdout=len(held),
        passed=learned and kept,
        reason=reason,
    )
