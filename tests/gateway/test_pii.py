"""Masking personal data and secrets, and leaving ordinary text alone."""

from __future__ import annotations

import pytest

from services.gateway.pii import (
    iban_valid,
    looks_like_phone,
    luhn_valid,
    mask_text,
    mask_value,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Write to jane.doe+news@example.co.uk today", "Write to [EMAIL] today"),
        (
            "Mein Name ist Jürgen, jürgen.müller@beispiel.de",
            "Mein Name ist Jürgen, [EMAIL]",
        ),
        ("メールはtaro@example.jpです", "メールは[EMAIL]です"),
        ("Call +1 (555) 123-4567 or 555-123-4567.", "Call [PHONE] or [PHONE]."),
        (
            "Ruf mich an: 030 12345678 oder 0171 1234567",
            "Ruf mich an: [PHONE] oder [PHONE]",
        ),
        (
            "Appelez le 06 12 34 56 78 ou +33 6 12 34 56 78",
            "Appelez le [PHONE] ou [PHONE]",
        ),
        ("Llámame al +34 612 345 678, gracias", "Llámame al [PHONE], gracias"),
        ("電話番号は090-1234-5678です", "電話番号は[PHONE]です"),
        ("UK office: +44 20 7946 0958", "UK office: [PHONE]"),
        ("Visa 4111 1111 1111 1111 exp 12/27", "Visa [CARD] exp 12/27"),
        ("Amex 3782-822463-10005", "Amex [CARD]"),
        ("IBAN: DE89 3704 0044 0532 0130 00 BITTE", "IBAN: [IBAN] BITTE"),
        ("pay GB82WEST12345698765432 now", "pay [IBAN] now"),
        ("server 192.168.1.20 is down", "server [IP] is down"),
        ("from 2001:db8::8a2e:370:7334 again", "from [IP] again"),
        ("key sk-proj-abcdefghijklmnopqrstuvwx1234", "key [SECRET]"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "token [SECRET]"),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws [SECRET]"),
    ],
)
def test_personal_data_is_masked(text: str, expected: str):
    assert mask_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The meeting is on 2024-01-15 at 10:30:45, or 15.01.2024, or 01/15/2024.",
        "Upgrade from version 1.2.3 to v10.0.19041.1234; Python 3.11.4 works.",
        "Chrome 120.0.6099.109 on Windows 10",
        "We had 1,234,567 users and 12 345 678 views, between 1000-2000 a day.",
        "Order number 123456789 shipped; invoice 2024/0042.",
        "pi is 3.14159265358979 and e is 2.718281828",
        "ISBN 978-3-16-148410-0 is a book",
        "Use std::vector or a::b, and loopback ::1",
        "Der Preis beträgt 1.299,00 € inkl. MwSt.",
        "Le train part à 14h05 du quai 3, voiture 12.",
        "Card-like but wrong: 4111 1111 1111 1112",
        "IBAN-like but wrong: DE89 3704 0044 0532 0130 01",
        "sk-short is not a key, nor is task-1234",
        "Coordinates 48.8566, 2.3522 and a ratio of 16:9",
    ],
)
def test_ordinary_text_is_left_alone(text: str):
    assert mask_text(text) == text


def test_validators_accept_real_numbers_and_refuse_near_misses():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("DE89 3704 0044 0532 0130 00")
    assert not iban_valid("DE89 3704 0044 0532 0130 01")
    assert looks_like_phone("+49 30 12345678")
    assert not looks_like_phone("2024-01-15")
    assert not looks_like_phone("1 234 567")


def test_mask_value_reaches_into_nested_structures():
    value = {"content": [{"type": "text", "text": "I am bob@example.com"}], "n": 2}

    assert mask_value(value) == {
        "content": [{"type": "text", "text": "I am [EMAIL]"}],
        "n": 2,
    }
