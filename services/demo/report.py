"""The demo's report: a table on the terminal and a PNG chart over time."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.demo.users import Exchange


@dataclass
class VersionStats:
    """Counts for one model version, trained and held-out questions apart."""

    answers: int = 0
    positive: int = 0
    correct_trained: int = 0
    asked_trained: int = 0
    correct_held_out: int = 0
    asked_held_out: int = 0

    def add(self, exchange: Exchange) -> None:
        self.answers += 1
        self.positive += exchange.positive
        if exchange.question.held_out:
            self.asked_held_out += 1
            self.correct_held_out += exchange.correct
        else:
            self.asked_trained += 1
            self.correct_trained += exchange.correct

    @staticmethod
    def ratio(part: int, whole: int) -> str:
        return f"{part / whole:6.1%} ({part}/{whole})" if whole else "     -"


@dataclass
class DemoReport:
    """What the loop did, from PostgreSQL, the simulated users and the analyzer."""

    versions: dict[str, VersionStats] = field(default_factory=dict)
    timeline: list[tuple[float, str, Exchange]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    registry: list[dict[str, Any]] = field(default_factory=list)
    stored_interactions: int = 0
    stored_feedback: int = 0
    analyzer_requests: float = 0.0
    analyzer_positive: float = 0.0
    elapsed_s: float = 0.0

    def lines(self) -> list[str]:
        out = [f"Flywheel demo report ({self.elapsed_s / 60:.1f} min)", ""]
        out.append(
            f"{'model version':<22}{'answers':>8}  {'positive feedback':<20}"
            f"{'accuracy, trained':<22}{'accuracy, held out':<22}"
        )
        for name, stats in sorted(self.versions.items()):
            held_out = VersionStats.ratio(stats.correct_held_out, stats.asked_held_out)
            out.append(
                f"{name:<22}{stats.answers:>8}  "
                f"{VersionStats.ratio(stats.positive, stats.answers):<20}"
                f"{VersionStats.ratio(stats.correct_trained, stats.asked_trained):<22}"
                f"{held_out:<22}"
            )
        out += ["", "Registry:"]
        for row in self.registry:
            staging = (row.get("scores") or {}).get("staging")
            training = (row.get("scores") or {}).get("training") or {}
            detail = ""
            if staging:
                detail = (
                    f" staging trained {staging['candidate_trained']:.2f} vs "
                    f"{staging['production_trained']:.2f}, held out "
                    f"{staging['candidate_holdout']:.2f} vs "
                    f"{staging['production_holdout']:.2f}"
                )
            if training.get("seconds"):
                detail += f", trained in {training['seconds']:.0f} s"
            out.append(f"  {row['version_id']:<20} {row['state']:<12}{detail}")
        out += ["", "Rollout decisions:"]
        for decision in self.decisions:
            out.append(
                f"  {decision['created_at']:%H:%M:%S} {decision['action']:<12} "
                f"by {decision['source']:<9} {decision['reason']}"
            )
            verdict = decision.get("verdict")
            if verdict:
                low, high = verdict.get("lift_low", 0), verdict.get("lift_high", 0)
                out.append(
                    f"      lift {verdict.get('lift', 0):+.3f}"
                    f" [{low:+.3f}, {high:+.3f}]"
                    f" p={verdict.get('p_value', 1):.4f}"
                    f" srm_p={verdict.get('srm_p_value', 1):.3f}"
                )
                for arm in verdict.get("arms", []):
                    out.append(
                        f"      {arm.get('arm', ''):<10} {arm.get('variant', ''):<18} "
                        f"users {arm.get('units', 0):>4} "
                        f"rated {arm.get('rated', 0):>4} "
                        f"positive {arm.get('positive', 0):>4}"
                    )
        if not self.decisions:
            out.append("  (none)")
        out += [
            "",
            f"Stored in PostgreSQL: {self.stored_interactions} interactions, "
            f"{self.stored_feedback} feedback events; analyzer counted "
            f"{self.analyzer_requests:.0f} requests, {self.analyzer_positive:.0f} "
            "positive ratings.",
        ]
        return out

    def chart(
        self, path: Path, bin_s: float | None = None, min_answers: int = 4
    ) -> Path:
        """Positive-feedback rate and accuracy per version over time, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
        if bin_s is None:
            # About 16 bins over the run, at least 30 s each: a slow run (a busy
            # machine) still gets enough answers in a bin to plot it.
            span_s = max((at_s for at_s, _, _ in self.timeline), default=0.0)
            bin_s = max(30.0, span_s / 16)
        bins: dict[tuple[str, int], VersionStats] = defaultdict(VersionStats)
        for at_s, version, exchange in self.timeline:
            bins[(version, int(at_s // bin_s))].add(exchange)
        last_bin = max((k[1] for k in bins), default=0)
        for index, version in enumerate(sorted(self.versions)):
            color = f"C{index}"
            # One point per bin with enough answers; NaN elsewhere breaks the line,
            # so a pause (or a version not yet serving) shows as a gap, not a dip.
            series = [bins.get((version, b)) for b in range(last_bin + 1)]
            xs = [(b + 0.5) * bin_s / 60 for b in range(last_bin + 1)]
            top.plot(
                xs,
                [
                    _rate(st.positive, st.answers, min_answers)
                    for st in map(_or_empty, series)
                ],
                marker="o",
                color=color,
                label=version,
            )
            for held_out, style in ((False, "-"), (True, "--")):
                bottom.plot(
                    xs,
                    [
                        _rate(st.correct_held_out, st.asked_held_out, min_answers // 2)
                        if held_out
                        else _rate(st.correct_trained, st.asked_trained, min_answers)
                        for st in map(_or_empty, series)
                    ],
                    style,
                    marker=".",
                    color=color,
                    label=f"{version} ({'held out' if held_out else 'trained'})",
                )
        for axis in (top, bottom):
            for at_s, label in self.events:
                axis.axvline(at_s / 60, color="grey", linestyle=":")
                if axis is top:
                    axis.text(
                        at_s / 60, 1.02, label, rotation=90, fontsize=7, va="bottom"
                    )
            axis.set_ylim(0, 1)
            axis.legend(fontsize=7, loc="lower right")
            axis.grid(alpha=0.3)
        top.set_ylabel("positive-feedback rate")
        bottom.set_ylabel("accuracy")
        bottom.set_xlabel("minutes since traffic started")
        figure.suptitle("Flywheel: the loop turning once", y=0.995)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path


def _rate(part: int, whole: int, min_whole: int) -> float:
    """part / whole, or NaN when `whole` is too small to plot."""
    return part / whole if whole >= max(1, min_whole) else float("nan")


def _or_empty(stats: VersionStats | None) -> VersionStats:
    return stats if stats is not None else VersionStats()
