import random
from datetime import datetime

from services.demo.questions import Question, is_correct, pick_questions
from services.demo.report import DemoReport, VersionStats
from services.demo.users import Exchange


def exchange(at_s: float, correct: bool, held_out: bool) -> Exchange:
    question = Question("Peru", "Lima", held_out)
    return Exchange(
        at_s,
        "id",
        "user-1",
        question,
        "Lima" if correct else "Cusco",
        correct,
        correct,
        False,
    )


def test_report_counts_each_version_and_draws_a_chart(tmp_path):
    rng = random.Random(1)
    report = DemoReport(events=[(120.0, "canary"), (200.0, "promoted")], elapsed_s=300)
    for n in range(300):
        at_s = n
        version = "bot-v1" if n < 150 or n % 2 else "bot-v2"
        correct = rng.random() < (0.4 if version == "bot-v1" else 0.8)
        item = exchange(at_s, correct, held_out=n % 4 == 0)
        report.versions.setdefault(version, VersionStats()).add(item)
        report.timeline.append((at_s, version, item))
    report.decisions = [
        {
            "created_at": datetime(2026, 1, 1),
            "action": "promoted",
            "source": "analyzer",
            "reason": "mSPRT",
            "verdict": {"lift": 0.4, "arms": [{"arm": "control"}]},
        }
    ]

    path = report.chart(tmp_path / "chart.png")
    text = "\n".join(report.lines())

    assert path.stat().st_size > 20_000
    assert report.versions["bot-v1"].answers + report.versions["bot-v2"].answers == 300
    assert "bot-v2" in text and "promoted" in text and "lift +0.400" in text


def test_questions_are_reproducible_and_answers_are_matched_leniently():
    first = pick_questions(10, 3, seed=5)

    assert first == pick_questions(10, 3, seed=5)
    assert sum(q.held_out for q in first) == 3
    bogota = Question("Colombia", "Bogotá", False)
    assert is_correct(bogota, "The capital of Colombia is Bogota.")
    assert not is_correct(bogota, "The capital of Colombia is Medellín.")
