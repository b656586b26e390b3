"""What optuna-dashboard shows of an ``m2n2 evolve`` study: M2N2's real best, and its plots.

Optuna's ``study.best_trial`` is the trial with the highest objective value ever seen: for
M2N2 the mean fitness score of a seed or child. The archive keeps models for the niches they
cover, not for that mean, so that trial may have been evicted (its weights deleted) -- the run's
real best is the best *archive member*. So the study carries it in user attrs, which the
dashboard lists on the study page:

* ``m2n2.best``: ``{"trial", "mean_fitness", "coverage", "members", "fold_position"}`` of the
  archive, updated after every trial; at the end of the run also ``"heldout"`` (the best
  member's held-out mean per task) and ``"heldout_seeds"``;
* ``m2n2.objective``: one sentence on what a trial's value is (the convention below).

Objective-value convention: a trial's value is the mean per-document fitness score of that
trial's model (a seed or a child) on the fitness documents; a child rejected early is PRUNED
(no value; its intermediate value is its mean over the documents scored so far).

Where ``optuna-dashboard`` (and plotly) are installed, :func:`publish` also saves the run's
plots into the study with the dashboard's own API (``save_plotly_graph_object``,
``save_note``): ``optuna-dashboard sqlite:///<out>/study.db`` then shows them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import optuna

from m2n2_plugin.report import family_tree
from m2n2_plugin.report.extras import importable
from m2n2_plugin.report.plots import trial_kinds
from m2n2_plugin.report.ranking import best_member
from m2n2_plugin.report.ranking import fitness_means

#: What a trial's objective value is (stored as the ``m2n2.objective`` study user attr).
OBJECTIVE = (
    "trial value = mean per-document fitness score of that trial's model (seed or child); "
    "Optuna's best trial is the highest value ever seen and may have left the archive: "
    "M2N2's best is the archive member in m2n2.best"
)
#: The objective's name in Optuna (``study.metric_names``; the dashboard labels its axes so).
METRIC_NAME = "mean fitness score"
#: Graph object ids in the study (saving again under the same id replaces the plot).
GRAPH_IDS = ("m2n2-fitness", "m2n2-coverage", "m2n2-lineage")


def available() -> bool:
    """Whether optuna-dashboard and plotly are importable (the ``[dashboard]`` extra)."""
    return all(importable(m) for m in ("optuna_dashboard", "plotly"))


def describe_objective(study: optuna.Study) -> None:
    """Name the objective and state the convention in the study (once per study)."""
    if study.user_attrs.get("m2n2.objective") != OBJECTIVE:
        study.set_user_attr("m2n2.objective", OBJECTIVE)
    if study.metric_names != [METRIC_NAME]:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2: noise on every run
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAME])


def best_record(archive: Any) -> dict[str, Any] | None:
    """The archive's best member as a JSON-able record (None while the archive is empty)."""
    best = best_member(archive)  # weighted by the study's task weights, as best/ is
    if best is None:
        return None
    return {
        "trial": int(best),
        "mean_fitness": float(fitness_means(archive).max()),
        "coverage": float(archive.coverage),
        "members": len(archive.members),
        "fold_position": int(archive.position),
    }


class BestRecorder:
    """Optuna callback: keep ``m2n2.best`` equal to the archive's best member.

    Written only when it changes. With several workers the one whose archive is folded
    furthest wins (``fold_position``), so a slower worker never writes an older best back.
    """

    def __init__(self, archive: Callable[[], Any]) -> None:
        self._archive = archive

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        record = best_record(self._archive())
        if record is not None:
            store_best(study, record)


def store_best(study: optuna.Study, record: Mapping[str, Any]) -> None:
    """Set ``m2n2.best`` unless the stored one is as new and the same, or newer."""
    old = study.user_attrs.get("m2n2.best") or {}
    if old.get("fold_position", -1) > record["fold_position"]:
        return
    if {**old, **record} == old:
        return
    study.set_user_attr("m2n2.best", dict(record))


def record_final(
    study: optuna.Study, archive: Any, heldout: Mapping[str, Mapping[str, float]]
) -> dict[str, Any] | None:
    """``m2n2.best`` with the held-out scores of the best member and of each seed."""
    record = best_record(archive)
    if record is None:
        return None
    scores = list(heldout.items())
    record["heldout"] = dict(scores[0][1]) if scores else {}
    record["heldout_seeds"] = {who: dict(v) for who, v in scores[1:]}
    study.set_user_attr("m2n2.best", record)
    return record


def _note(record: Mapping[str, Any], heldout: Mapping[str, Mapping[str, float]]) -> str:
    lines = [
        "# M2N2",
        "",
        f"**Best archive member: trial {record['trial']}** -- mean fitness "
        f"{record['mean_fitness']:.4f}, archive coverage {record['coverage']:.4f} "
        f"({record['members']} members).",
        "",
        "Objective values: a trial's value is the mean per-document fitness score of its model "
        "(seed or child). The dashboard's *Best Trial* is the highest value ever seen; M2N2 "
        "keeps models for the niches they cover, so that trial may have left the archive (its "
        "weights deleted). The run's best is the archive member above (study user attr "
        "`m2n2.best`); a PRUNED trial is a child rejected early.",
        "",
        "Plots: `m2n2-fitness` (per trial: child score, archive best, mean, coverage; the "
        "children rejected early, which have no score, in a strip below), "
        "`m2n2-coverage` (archive x fitness documents), `m2n2-lineage` (the best member's "
        "family tree: w = mix ratio, s = split point).",
    ]
    if heldout:
        tasks = list(next(iter(heldout.values())))
        lines += ["", "## Held-out scores", "", "| model | " + " | ".join(tasks) + " |"]
        lines.append("|---|" + "---|" * len(tasks))
        for who, v in heldout.items():
            lines.append(f"| {who} | " + " | ".join(f"{v[t]:.4f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def figures(
    history: list[dict[str, Any]], archive: Any, trials: Mapping[int, Any], title: str
) -> dict[str, Any]:
    """The plotly figures by graph id: fitness curves, archive coverage, lineage."""
    import plotly.graph_objects as go

    x = [r["trial"] for r in history]
    # As plots/fitness.png: a child rejected early has no fitness score (its stored value is
    # a partial mean), so it is drawn in a strip of its own under the curves.
    kinds = trial_kinds(history, trials)
    fitness = go.Figure()
    fitness.add_trace(
        go.Scatter(
            x=kinds.scored,
            y=kinds.values,
            mode="markers",
            marker={"size": 5, "opacity": 0.5},
            name="trial mean score",
        )
    )
    for key, name, dash in (
        ("archive_best", "archive best", None),
        ("archive_mean", "archive mean", None),
        ("coverage", "coverage", "dash"),
    ):
        fitness.add_trace(
            go.Scatter(
                x=x, y=[r[key] for r in history], mode="lines", name=name, line={"dash": dash}
            )
        )
    fitness.add_trace(
        go.Scatter(
            x=kinds.rejected,
            y=[0] * len(kinds.rejected),
            yaxis="y2",
            mode="markers",
            marker={"symbol": "line-ns-open", "size": 12, "color": "#7f7f7f"},
            name=f"rejected early ({len(kinds.rejected)}): no score",
        )
    )
    fitness.update_layout(
        title=f"{title}: fitness over trials",
        xaxis_title="trial",
        yaxis={"title": "fitness (mean per-document score)", "domain": [0.15, 1.0]},
        yaxis2={"domain": [0.0, 0.08], "visible": False, "range": [-1, 1]},
    )
    out = {"m2n2-fitness": fitness}
    if len(archive.members):
        coverage = go.Figure(
            go.Heatmap(
                z=archive.scores,
                y=[f"trial {m}" for m in archive.members],
                colorscale="Greens",
                zmin=0,
                zmax=1,
            )
        )
        coverage.update_layout(
            title=f"{title}: archive per-document scores (coverage {archive.coverage:.3f})",
            xaxis_title="fitness document",
            yaxis={"type": "category"},
        )
        out["m2n2-coverage"] = coverage
        best = best_member(archive)
        tree = family_tree.ancestry(trials, best)
        out["m2n2-lineage"] = family_tree.plotly_figure(
            tree, best, f"{title}: family tree of trial {best}"
        )
    return out


def publish(
    study: optuna.Study,
    history: list[dict[str, Any]],
    archive: Any,
    heldout: Mapping[str, Mapping[str, float]],
) -> list[str]:
    """Save the plots and a note into the study for optuna-dashboard; returns the graph ids.

    Call only when :func:`available`. Saving again replaces the plots (fixed ids) and the
    note (the dashboard keeps its versions), so a resumed run or a second worker updates them.
    """
    from optuna_dashboard import save_note
    from optuna_dashboard import save_plotly_graph_object

    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    saved = []
    for graph_id, fig in figures(history, archive, trials, study.study_name).items():
        save_plotly_graph_object(study, fig, graph_object_id=graph_id)
        saved.append(graph_id)
    record = best_record(archive)
    if record is not None:
        save_note(study, _note(record, heldout))
    return saved
