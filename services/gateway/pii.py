"""Masking of personal data and secrets in text before it leaves the gateway.

Each detector is a regular expression that finds candidates plus, where the shape
alone is ambiguous, a validator (Luhn for cards, mod-97 for IBANs, `ipaddress` for
IPv6, digit-count and layout rules for phone numbers). Detectors run in a fixed
order, most specific first, so that an IBAN is not half-eaten as a phone number.

NOTE: this is a best-effort filter for the usual shapes, not a guarantee: names,
postal addresses and free-form identifiers pass unmasked. Boundaries use ASCII
classes on purpose, so that a number glued to CJK text (`電話090-1234-5678`) is
still found while one glued to Latin letters (`build12345678`) is not.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
IP_ADDRESS = "[IP]"
CARD = "[CARD]"
IBAN = "[IBAN]"
SECRET = "[SECRET]"  # noqa: S105 - a label, not a password

_SECRET_RE = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"sk-[A-Za-z0-9_-]{20,}"  # OpenAI and Anthropic style keys (sk-, sk-proj-, ...)
    r"|gh[pousr]_[A-Za-z0-9]{30,}"  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,}"
    r"|AKIA[0-9A-Z]{16}"  # AWS access key ids
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWTs
    r")"
)
_LATIN = "A-Za-z0-9\u00c0-\u024f"
_EMAIL_RE = re.compile(
    rf"(?<![{_LATIN}._%+-])[{_LATIN}._%+-]+@[{_LATIN}-]+(?:\.[{_LATIN}-]+)*"
    r"\.[A-Za-z]{2,24}(?![A-Za-z0-9])"
)
_IBAN_RE = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])"
)
_CARD_RE = re.compile(r"(?<![A-Za-z0-9.,-])[0-9](?:[ -]?[0-9]){12,18}(?![A-Za-z0-9])")
_IPV6_RE = re.compile(
    r"(?<![A-Za-z0-9:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![A-Za-z0-9:])"
)
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_RE = re.compile(rf"(?<![A-Za-z0-9.]){_OCTET}(?:\.{_OCTET}){{3}}(?![0-9]|\.[0-9])")
_PHONE_RE = re.compile(
    r"(?<![A-Za-z0-9+.,/-])(?:\+|00)?\(?[0-9][0-9 ().-]{5,20}[0-9]"
    r"(?![A-Za-z0-9]|[.,-][0-9])"
)
_DATE_RE = re.compile(
    r"^(?:[0-9]{4}[-/. ][0-9]{1,2}[-/. ][0-9]{1,2}"
    r"|[0-9]{1,2}[-/. ][0-9]{1,2}[-/. ][0-9]{2,4})$"
)
_DIGIT_GROUPS_RE = re.compile(r"[0-9]+")


def luhn_valid(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum payment cards carry."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """Whether `candidate` (spaces allowed) is an IBAN with a valid mod-97 check."""
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in rearranged)
    return int(number) % 97 == 1


def _mask_iban(match: re.Match[str]) -> str:
    # The pattern is greedy and may swallow an uppercase word after the IBAN, so
    # shorter prefixes ending at a space are tried too.
    text = match.group(0)
    cut = len(text)
    while cut > 0:
        if iban_valid(text[:cut]):
            return IBAN + text[cut:]
        cut = text.rfind(" ", 0, cut)
    return text


# How card numbers are grouped when written with separators: 4-4-4-4 (and up to
# a group of three) for most networks, 4-6-5 or 4-6-4 for Amex and Diners.
_CARD_LAYOUT_RE = re.compile(
    r"^(?:[0-9]{4}(?:[ -][0-9]{4}){3}(?:[ -]?[0-9]{3})?"
    r"|[0-9]{4}[ -][0-9]{6}[ -][0-9]{4,5})$"
)


def looks_like_card(candidate: str) -> bool:
    """Whether digits, maybe grouped, are a card number: issuer, layout, Luhn."""
    digits = re.sub(r"[ -]", "", candidate)
    if not 13 <= len(digits) <= 19 or digits[0] not in "23456":
        return False
    if digits != candidate and not _CARD_LAYOUT_RE.match(candidate):
        return False
    return luhn_valid(digits)


def _mask_card(match: re.Match[str]) -> str:
    return CARD if looks_like_card(match.group(0)) else match.group(0)


def _mask_ipv6(match: re.Match[str]) -> str:
    text = match.group(0)
    # Two real groups and a decimal digit at least: `::1` is not personal data, and
    # `a::b` (a C++ scope) or `dead::beef` are words far more often than addresses.
    if sum(1 for group in text.split(":") if group) < 2 or not re.search("[0-9]", text):
        return text
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return text
    return IP_ADDRESS


def looks_like_phone(candidate: str) -> bool:
    """Whether a run of digits and separators is laid out like a phone number."""
    text = candidate.strip(" .-")
    digits = "".join(_DIGIT_GROUPS_RE.findall(text))
    groups = _DIGIT_GROUPS_RE.findall(text)
    international = text.startswith(("+", "00"))
    if not 7 <= len(digits) <= 15 or _DATE_RE.match(text):
        return False
    if international:
        return len(digits) >= 8
    if "(" in text:
        return len(groups) >= 2 and len(digits) >= 7
    if len(groups) == 2:
        # National numbers written as trunk prefix + subscriber (`0171 1234567`).
        return groups[0].startswith("0") and len(digits) >= 9
    if len(groups) < 2 or any(len(group) < 2 for group in groups):
        return False
    # `12 345 678` or `1.234.567` are thousands separators, not a phone number.
    return not all(len(group) == 3 for group in groups[1:])


def _mask_phone(match: re.Match[str]) -> str:
    text = match.group(0)
    stripped = text.rstrip(" .-(")
    if not looks_like_phone(stripped):
        return text
    return PHONE + text[len(stripped) :]


_DETECTORS: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (_SECRET_RE, lambda _match: SECRET),
    (_EMAIL_RE, lambda _match: EMAIL),
    (_IBAN_RE, _mask_iban),
    (_CARD_RE, _mask_card),
    (_IPV6_RE, _mask_ipv6),
    (_IPV4_RE, lambda _match: IP_ADDRESS),
    (_PHONE_RE, _mask_phone),
)


def mask_text(text: str) -> str:
    """`text` with emails, phones, IPs, cards, IBANs and secrets replaced by labels."""
    for pattern, replace in _DETECTORS:
        text = pattern.sub(replace, text)
    return text


def mask_value(value: Any) -> Any:
    """Mask every string inside a JSON-like value (dicts, lists, strings)."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {key: mask_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_value(item) for item in value]
    return value
