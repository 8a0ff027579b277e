"""OpenAI fine-tuning files: export (chat and preference formats) and a validator.

The validator applies the format rules OpenAI documents for fine-tuning files and
reports every violation with its line number (1-based; 0 for the file as a whole):

- every line is one JSON object (`not_json`, `not_an_object`);
- chat format: a non-empty `messages` list (`missing_messages`); each message an
  object with a known `role` (`unknown_role`) and `content` (`missing_content`),
  no other keys (`unknown_key`); system messages only at the start, then a user
  message first (`message_order`); the last message from the assistant
  (`last_not_assistant`); `weight` only on assistant messages
  (`weight_not_on_assistant`) and only 0 or 1 (`weight_not_binary`);
- preference format (DPO): `input.messages` ending with a user message
  (`missing_input`, plus the message rules above), `preferred_output` and
  `non_preferred_output` each one assistant message with text content
  (`bad_output`), no other top-level keys (`unknown_key`);
- an example within the token limit (`too_many_tokens`), and a file of at least
  ten examples (`too_few_examples`, line 0).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from services.trainer.datasets import TokenCounter, approx_tokens

if TYPE_CHECKING:
    from services.trainer.datasets import Dataset

Format = Literal["chat", "preference"]

ROLES = frozenset({"system", "user", "assistant", "tool", "function"})
MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "weight", "function_call", "tool_calls", "tool_call_id"}
)
PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
INPUT_KEYS = frozenset({"messages", "tools", "parallel_tool_calls"})
MIN_EXAMPLES = 10
# The longest example the current fine-tunable models take; a setting for others.
DEFAULT_MAX_TOKENS = 65_536


@dataclass(frozen=True)
class Violation:
    """One broken rule: where (line, 0 for the whole file), which rule, what."""

    line: int
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.rule}: {self.detail}"


def export_dataset(dataset: Dataset, folder: Path) -> None:
    """train/holdout.jsonl (chat) and preference_train/holdout.jsonl (DPO)."""
    folder.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, Iterable[dict[str, Any]]]] = [
        ("train.jsonl", (e.chat_row() for e in dataset.train)),
        ("holdout.jsonl", (e.chat_row() for e in dataset.holdout)),
        ("preference_train.jsonl", (p.preference_row() for p in dataset.pairs_train)),
        (
            "preference_holdout.jsonl",
            (p.preference_row() for p in dataset.pairs_holdout),
        ),
    ]
    for name, rows in files:
        write_jsonl(folder / name, rows)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _check_message(
    line: int, index: int, message: Any, found: list[Violation]
) -> str | None:
    """Violations of one message's own rules; its role when it has a valid one."""
    where = f"message {index}"
    if not isinstance(message, dict):
        found.append(Violation(line, "not_an_object", f"{where} is not an object"))
        return None
    for key in sorted(set(message) - MESSAGE_KEYS):
        found.append(Violation(line, "unknown_key", f"{where} has key {key!r}"))
    role = message.get("role")
    if role not in ROLES:
        found.append(Violation(line, "unknown_role", f"{where} has role {role!r}"))
        role = None
    content = message.get("content")
    calls = message.get("function_call") or message.get("tool_calls")
    if not isinstance(content, str) and not (content is None and calls):
        found.append(Violation(line, "missing_content", f"{where} has no text content"))
    if "weight" in message:
        if role != "assistant":
            found.append(
                Violation(
                    line, "weight_not_on_assistant", f"{where} ({role}) has a weight"
                )
            )
        if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
            found.append(
                Violation(
                    line,
                    "weight_not_binary",
                    f"{where} has weight {message['weight']!r}, expected 0 or 1",
                )
            )
    return role if isinstance(role, str) else None


def _check_order(line: int, roles: list[str | None], found: list[Violation]) -> None:
    rest = roles
    while rest and rest[0] == "system":
        rest = rest[1:]
    if "system" in rest:
        found.append(
            Violation(line, "message_order", "a system message after the start")
        )
    if rest and rest[0] is not None and rest[0] != "user":
        found.append(
            Violation(
                line, "message_order", f"the first non-system message is {rest[0]!r}"
            )
        )


def _check_messages(line: int, messages: Any, found: list[Violation]) -> list[Any]:
    if not isinstance(messages, list) or not messages:
        found.append(Violation(line, "missing_messages", "no non-empty messages list"))
        return []
    roles = [_check_message(line, i, m, found) for i, m in enumerate(messages)]
    _check_order(line, roles, found)
    return roles


def _check_chat(row: dict[str, Any], line: int, found: list[Violation]) -> list[Any]:
    for key in sorted(set(row) - {"messages", "tools", "parallel_tool_calls"}):
        found.append(Violation(line, "unknown_key", f"top-level key {key!r}"))
    messages = row.get("messages")
    roles = _check_messages(line, messages, found)
    # An unknown last role is reported once, as unknown_role.
    if roles and roles[-1] not in (None, "assistant"):
        found.append(
            Violation(
                line,
                "last_not_assistant",
                f"the last message is {roles[-1]!r}, expected 'assistant'",
            )
        )
    return messages if isinstance(messages, list) else []


def _check_output(row: dict[str, Any], key: str, line: int) -> Violation | None:
    output = row.get(key)
    if (
        isinstance(output, list)
        and len(output) == 1
        and isinstance(output[0], dict)
        and output[0].get("role") == "assistant"
        and isinstance(output[0].get("content"), str)
        and set(output[0]) <= MESSAGE_KEYS - {"weight"}
    ):
        return None
    return Violation(
        line, "bad_output", f"{key} must be one assistant message with text content"
    )


def _check_preference(
    row: dict[str, Any], line: int, found: list[Violation]
) -> list[Any]:
    for key in sorted(set(row) - PREFERENCE_KEYS):
        found.append(Violation(line, "unknown_key", f"top-level key {key!r}"))
    given = row.get("input")
    if not isinstance(given, dict):
        found.append(Violation(line, "missing_input", "no input object"))
        return []
    for key in sorted(set(given) - INPUT_KEYS):
        found.append(Violation(line, "unknown_key", f"input key {key!r}"))
    messages = given.get("messages")
    roles = _check_messages(line, messages, found)
    if roles and roles[-1] not in (None, "user"):
        found.append(
            Violation(
                line, "message_order", "the input's last message must be from the user"
            )
        )
    outputs = [
        _check_output(row, k, line)
        for k in ("preferred_output", "non_preferred_output")
    ]
    found.extend(v for v in outputs if v is not None)
    longest = max(
        (
            o[0]
            for o in (row.get("preferred_output"), row.get("non_preferred_output"))
            if isinstance(o, list) and o and isinstance(o[0], dict)
        ),
        key=lambda m: len(str(m.get("content") or "")),
        default=None,
    )
    listed = messages if isinstance(messages, list) else []
    return [*listed, longest] if longest is not None else listed


def validate_lines(
    lines: Iterable[str],
    kind: Format = "chat",
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    count_tokens: TokenCounter = approx_tokens,
    min_examples: int = MIN_EXAMPLES,
) -> list[Violation]:
    """Every violation in the lines of a JSONL fine-tuning file, in line order."""
    found: list[Violation] = []
    examples = 0
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        examples += 1
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            found.append(Violation(line, "not_json", str(error)))
            continue
        if not isinstance(row, dict):
            found.append(Violation(line, "not_an_object", "the line is not an object"))
            continue
        check = _check_chat if kind == "chat" else _check_preference
        messages = check(row, line, found)
        countable = [m for m in messages if isinstance(m, dict)]
        tokens = count_tokens(countable) if countable else 0
        if tokens > max_tokens:
            found.append(
                Violation(
                    line,
                    "too_many_tokens",
                    f"{tokens} tokens, the limit is {max_tokens}",
                )
            )
    if examples < min_examples:
        found.append(
            Violation(
                0,
                "too_few_examples",
                f"{examples} examples, at least {min_examples} are required",
            )
        )
    return sorted(found, key=lambda v: v.line)


def validate_file(path: Path, kind: Format = "chat", **options: Any) -> list[Violation]:
    """`validate_lines` over a file."""
    with path.open(encoding="utf-8") as lines:
        return validate_lines(lines, kind, **options)
