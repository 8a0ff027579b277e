"""StopScanner: what text is safe to stream while stop strings may still match."""

from __future__ import annotations

from services.inference.model import StopScanner


def feed(scanner: StopScanner, texts: list[str]) -> list[str]:
    return [scanner.update(text) for text in texts]


def test_text_without_stop_strings_streams_as_it_grows() -> None:
    scanner = StopScanner(stop=())

    pieces = feed(scanner, ["The", "The cap", "The capital"])

    assert pieces == ["The", " cap", "ital"]
    assert scanner.finish("The capital.") == "."


def test_possible_start_of_stop_string_is_held_back_then_released() -> None:
    scanner = StopScanner(stop=("END",))

    pieces = feed(scanner, ["Hello E", "Hello EN", "Hello ENs"])

    assert pieces == ["Hello ", "", "ENs"]
    assert not scanner.stopped


def test_stop_string_cuts_text_and_stops() -> None:
    scanner = StopScanner(stop=("\n\n", "END"))

    pieces = feed(scanner, ["Paris", "Paris.E", "Paris.END more"])

    assert "".join(pieces) == "Paris."
    assert scanner.stopped
    assert scanner.update("Paris.END more and more") == ""
    assert scanner.finish("Paris.END more and more") == ""


def test_incomplete_character_is_held_back() -> None:
    scanner = StopScanner(stop=())

    pieces = feed(scanner, ["Kouil\ufffd", "Kouilé"])

    assert pieces == ["Kouil", "é"]
