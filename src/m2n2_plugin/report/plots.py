"""``plots/fitness.png`` and ``plots/coverage.png``: the run over trials, the archive by document.

``fitness.png`` draws a score only where ``trials.log`` gives one. A child rejected early
(Optuna's PRUNED) was scored on part of the fitness documents -- the hardest first -- until it
provably could not enter the archive; Optuna still stores the mean of that part as the trial's
value, but it is no fitness, and drawn among the scores it looked like a child far worse than
its parents. Those trials get a strip of their own under the curves instead, with their count;
failed trials (no score at all) likewise. The legend sits outside the axes so it hides no point.

``coverage.png`` is the archive's score matrix (members x fitness documents) with a colour
key, and a line with the task's name where one task's documents end and the next one's begin
(the score vector holds each task's documents in turn, tasks in the config's order).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import optuna

#: Colour of the task boundaries in ``coverage.png``: red shows on white and on dark green.
BOUNDARY = "#d62728"


@dataclass
class TrialKinds:
    """The trials of ``history.jsonl`` sorted by what their value means."""

    #: Trials with a fitness score (seeds and fully scored children): numbers and means.
    scored: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    #: Children rejected early: no fitness score (their stored value is a partial mean).
    rejected: list[int] = field(default_factory=list)
    #: Trials that failed: no value at all.
    failed: list[int] = field(default_factory=list)


def trial_kinds(rows: Sequence[Mapping[str, Any]], trials: Mapping[int, Any]) -> TrialKinds:
    """Sort ``rows`` (``history.jsonl``) by the state of their trial in ``trials``.

    The state decides, not the row's value: Optuna gives a pruned trial its last reported
    (partial) mean as value, which ``history.jsonl`` repeats.
    """
    kinds = TrialKinds()
    for row in rows:
        number = int(row["trial"])
        trial = trials.get(number)
        if trial is not None and trial.state == optuna.trial.TrialState.PRUNED:
            kinds.rejected.append(number)
        elif row["value"] is None:
            kinds.failed.append(number)
        else:
            kinds.scored.append(number)
            kinds.values.append(float(row["value"]))
    return kinds


def fitness_figure(rows: Sequence[Mapping[str, Any]], trials: Mapping[int, Any]) -> Any:
    """Scores and archive curves over trials, early-rejected and failed trials apart."""
    import matplotlib.pyplot as plt

    kinds = trial_kinds(rows, trials)
    apart = bool(kinds.rejected or kinds.failed)
    fig = plt.figure(figsize=(9, 4.6 if apart else 4), layout="constrained")
    if apart:
        ax, strip = fig.subplots(2, 1, sharex=True, height_ratios=[7, 1])
    else:
        ax, strip = fig.subplots(), None
    handles = [
        ax.scatter(
            kinds.scored, kinds.values, s=8, alpha=0.5, label="trial mean score (seed or child)"
        )
    ]
    if rows:
        x = [r["trial"] for r in rows]
        for key, label, style in (
            ("archive_best", "archive best", "-"),
            ("archive_mean", "archive mean", "-"),
            ("coverage", "coverage", "--"),
        ):
            handles += ax.plot(x, [r[key] for r in rows], style, label=label)
    ax.set_ylabel("fitness (mean per-document score)")
    ax.set_ylim(-0.03, 1.03)  # scores lie in [0, 1]: the whole range, comparable across runs
    title = "M2N2 fitness over trials"
    if strip is not None:
        if kinds.rejected:
            handles += strip.plot(
                kinds.rejected,
                [0] * len(kinds.rejected),
                "|",
                ms=12,
                color="#7f7f7f",
                label=f"rejected early ({len(kinds.rejected)}): no fitness score",
            )
        if kinds.failed:
            handles += strip.plot(
                kinds.failed,
                [0] * len(kinds.failed),
                "x",
                color=BOUNDARY,
                label=f"failed ({len(kinds.failed)}): no score",
            )
        strip.set_yticks([])
        strip.set_ylim(-1, 1)
        strip.set_xlabel("trial")
        ax.tick_params(labelbottom=False)
        title += f" ({len(kinds.rejected)} of {len(rows)} trials rejected early, drawn below)"
    else:
        ax.set_xlabel("trial")
    ax.set_title(title)
    # Outside the axes, right of the curves: a legend inside hid the points under it.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def coverage_figure(archive: Any, fitness_counts: Mapping[str, int], metric: str) -> Any:
    """The archive's per-document scores with a colour key and the tasks' boundaries.

    ``fitness_counts``: documents per task in score-vector order; when they do not add up to
    the archive's columns (or are unknown: empty) no boundary is drawn rather than a wrong one.
    """
    import matplotlib.pyplot as plt

    members = list(archive.members)
    fig, ax = plt.subplots(figsize=(9, 0.35 * max(len(members), 2) + 2.0), layout="constrained")
    ax.set_xlabel("fitness document (position in the score vector)")
    if not members:
        ax.set_title("archive per-document scores (empty archive)")
        return fig
    scores = archive.scores
    image = ax.imshow(
        scores, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest"
    )
    fig.colorbar(image, ax=ax, label=f"per-document score ({metric})", pad=0.01, aspect=15)
    ax.set_yticks(range(len(members)), [f"trial {m}" for m in members])
    cov = float(scores.max(axis=0).mean())
    counts = [(task, int(n)) for task, n in fitness_counts.items() if n]
    if counts and sum(n for _, n in counts) == scores.shape[1]:
        top = ax.secondary_xaxis("top")
        starts = [sum(n for _, n in counts[:i]) for i in range(len(counts))]
        top.set_xticks(
            [start + n / 2 - 0.5 for start, (_, n) in zip(starts, counts, strict=True)],
            [f"{task} ({n})" for task, n in counts],
        )
        top.tick_params(length=0)
        for start in starts[1:]:
            ax.axvline(start - 0.5, color=BOUNDARY, lw=1.8)
    ax.set_title(f"archive per-document scores by task (coverage {cov:.3f})")
    return fig


def save_plots(
    out: Path,
    rows: Sequence[Mapping[str, Any]],
    trials: Mapping[int, Any],
    archive: Any,
    fitness_counts: Mapping[str, int],
    metric: str,
) -> None:
    """Write ``plots/fitness.png`` and ``plots/coverage.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for name, make in (
        ("fitness.png", lambda: fitness_figure(rows, trials)),
        ("coverage.png", lambda: coverage_figure(archive, fitness_counts, metric)),
    ):
        fig = make()
        try:
            fig.savefig(plots / name, dpi=120)
        finally:
            plt.close(fig)
