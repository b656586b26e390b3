"""``search.tracking``: every trial of ``m2n2 evolve`` in MLflow or W&B, plus M2N2's best.

Optuna's own callbacks do the per-trial part (``optuna_integration.MLflowCallback``: one MLflow
run per trial with its value and params; ``WeightsAndBiasesCallback``: one W&B run, a step per
trial). They know nothing of the archive, so this module adds what they do not cover:

* per trial: ``coverage``, ``archive_best``, ``archive_mean``, ``archive_members``,
  ``in_archive``, ``docs_evaluated`` (metrics) and the parents (``parent_a`` / ``parent_b``,
  or ``seed``) -- the mix ratio and split point are the trial's params, logged by the callback;
* at the end: the archive's best member, its fitness, coverage and held-out scores, and the
  plots (an MLflow run named ``m2n2 best``; the W&B run's summary and images).

Always on, whatever the tracking: the study's ``m2n2.best`` user attr and the dashboard plots
(:mod:`m2n2_plugin.report.dashboard`). The whole of it is one object, :class:`Tracker`, that the
evolve loop asks for its callbacks and calls once at the end.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import optuna

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.report import dashboard
from m2n2_plugin.report.extras import importable
from m2n2_plugin.report.ranking import archive_figures

Callback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]

#: The modules each tracking needs, and the pip command that installs them.
NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "mlflow": (("mlflow", "optuna_integration"), "pip install mlflow optuna-integration"),
    "wandb": (("wandb", "optuna_integration"), "pip install wandb optuna-integration"),
}
#: The name the objective value is logged under (both trackers).
METRIC = "mean_score"


def require(kind: str | None) -> None:
    """Fail in one line, before anything is written, if the asked-for tracker is missing.

    ``kind``: ``search.tracking`` (``mlflow``, ``wandb`` or None).
    """
    if kind is None:
        return
    modules, pip = NEEDS[kind]
    missing = [m for m in modules if not importable(m)]
    if missing:
        raise M2N2Error(
            f"search.tracking: {kind} needs the {' and '.join(missing)} package(s): {pip}"
        )


def trial_metrics(archive: Any, trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    """What M2N2 adds to a trial's value: the archive after it, and how far it was scored."""
    metrics = {
        **archive_figures(archive),
        "archive_members": float(len(archive.members)),
        "in_archive": float(trial.number in archive.members),
    }
    docs = trial.user_attrs.get("m2n2.docs_evaluated")
    if docs is not None:
        metrics["docs_evaluated"] = float(docs)
    return metrics


def trial_lineage(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """Who a trial's model came from: its two parents' trial numbers, or the seed's name."""
    attrs = trial.user_attrs
    if "m2n2.parents" in attrs:
        a, b = attrs["m2n2.parents"]
        return {"parent_a": int(a), "parent_b": int(b)}
    if "m2n2.model" in attrs:
        return {"seed": attrs["m2n2.model"]}
    return {}


def _metric_key(text: str) -> str:
    """A metric name MLflow and W&B both accept (letters, digits, ``_ - . /``)."""
    return re.sub(r"[^A-Za-z0-9_./-]+", "_", text).strip("_")


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The end-of-run numbers: best fitness, coverage, held-out scores of best and seeds."""
    metrics = {
        "best_fitness": float(summary["best_fitness"]),
        "coverage": float(summary["coverage"]),
        "merges_in_lineage": float(summary.get("n_merges_in_lineage", 0)),
    }
    for i, (who, scores) in enumerate(summary.get("heldout", {}).items()):
        prefix = "heldout" if i == 0 else _metric_key(f"heldout_{who}")
        for task, value in scores.items():
            metrics[f"{prefix}/{_metric_key(task)}"] = float(value)
    return metrics


def _quiet_deprecation() -> None:
    """Silence optuna-integration's deprecation of its MLflow / W&B callbacks (since 4.9.0,
    removal announced for 6.0.0; the extras bound it below 6). Users cannot act on it: the
    warning would only add noise to every run. The rest of this module uses the trackers' own
    APIs, which is also the way out once the callbacks are gone."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    warnings.filterwarnings("ignore", message=".*has been deprecated in v4.9.0.*")


class _MLflow:
    """MLflowCallback (one run per trial) plus the archive's numbers in the same run."""

    def __init__(self, uri: str | None, study: optuna.Study, archive: Callable[[], Any]) -> None:
        import mlflow
        from optuna_integration.mlflow import MLflowCallback

        self._mlflow = mlflow
        self._archive = archive
        try:  # open the store now: a bad URI is one line before the first trial, not after
            if uri is not None:
                mlflow.set_tracking_uri(uri)
            self.experiment_id = mlflow.set_experiment(study.study_name).experiment_id
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            where = uri or mlflow.get_tracking_uri()
            raise M2N2Error(f"search.tracking: MLflow cannot use {where!r}: {first}") from exc
        with warnings.catch_warnings():  # see _quiet_deprecation
            _quiet_deprecation()
            self._callback = MLflowCallback(tracking_uri=uri, metric_name=METRIC)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        from mlflow.entities import Metric
        from mlflow.entities import Param

        self._callback(study, trial)
        run = self._mlflow.last_active_run()
        if run is None:
            return
        now = int(time.time() * 1000)
        metrics = trial_metrics(self._archive(), trial)
        self._mlflow.MlflowClient().log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in trial_lineage(trial).items()],
        )

    def finish(self, summary: dict[str, Any], out: Path) -> None:
        mlflow = self._mlflow
        with mlflow.start_run(experiment_id=self.experiment_id, run_name="m2n2 best"):
            mlflow.set_tags({"m2n2.role": "best", "m2n2.output_dir": str(out)})
            mlflow.log_params({"best_trial": summary["best_trial"]})
            mlflow.log_metrics(final_metrics(summary))
            for path in (out / "summary.json", out / "best" / "README.md"):
                if path.is_file():
                    mlflow.log_artifact(str(path))
            if (out / "plots").is_dir():
                mlflow.log_artifacts(str(out / "plots"), artifact_path="plots")


class _WandB:
    """WeightsAndBiasesCallback (a step per trial) plus the archive's numbers at that step."""

    def __init__(self, study: optuna.Study, out: Path, archive: Callable[[], Any]) -> None:
        from optuna_integration.wandb import WeightsAndBiasesCallback

        self._archive = archive
        kwargs: dict[str, Any] = {"project": os.environ.get("WANDB_PROJECT") or study.study_name}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(out)  # beside the study, not in the working directory
        try:
            with warnings.catch_warnings():  # see _quiet_deprecation
                _quiet_deprecation()
                self._callback = WeightsAndBiasesCallback(metric_name=METRIC, wandb_kwargs=kwargs)
        except Exception as exc:  # not logged in and not offline, a bad project name...
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise M2N2Error(f"search.tracking: W&B cannot start a run: {first}") from exc

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        import wandb

        self._callback(study, trial)
        extra: dict[str, Any] = trial_metrics(self._archive(), trial)
        extra.update(trial_lineage(trial))
        wandb.log(extra, step=trial.number)

    def finish(self, summary: dict[str, Any], out: Path) -> None:
        import wandb

        run = wandb.run
        if run is None:
            return
        run.summary.update({"best_trial": summary["best_trial"], **final_metrics(summary)})
        images = {
            f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted((out / "plots").glob("*.png"))
        }
        if images:
            run.log(images)
        run.finish()


@dataclass
class Tracker:
    """The evolve loop's view of all of it: callbacks per trial, one call at the end."""

    study: optuna.Study
    out: Path
    archive: Callable[[], Any]
    callbacks: list[Callback] = field(default_factory=list)
    backend: _MLflow | _WandB | None = None

    def finish(self) -> None:
        """After the outputs are written: the final best (with held-out scores) into the
        study, the dashboard plots where optuna-dashboard is installed, the tracker's
        summary."""
        from m2n2_plugin.report.outputs import read_history

        path = self.out / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        heldout = summary.get("heldout", {})
        archive = self.archive()
        dashboard.record_final(self.study, archive, heldout)
        if dashboard.available():
            dashboard.publish(self.study, read_history(self.out), archive, heldout)
        if self.backend is not None and "best_trial" in summary:
            self.backend.finish(summary, self.out)


def start(
    kind: str | None,
    uri: str | None,
    study: optuna.Study,
    out: Path,
    archive: Callable[[], Any],
) -> Tracker:
    """The tracker of a run whose study is open (call :func:`require` before anything else).

    ``kind`` and ``uri``: ``search.tracking`` and the MLflow tracking URI (None: MLflow's
    own default); ``archive()`` returns the sampler's archive as the fold has it now.
    """
    dashboard.describe_objective(study)
    tracker = Tracker(study, out, archive, callbacks=[dashboard.BestRecorder(archive)])
    if kind == "mlflow":
        tracker.backend = _MLflow(uri, study, archive)
    elif kind == "wandb":
        tracker.backend = _WandB(study, out, archive)
    if tracker.backend is not None:
        tracker.callbacks.append(tracker.backend)
    return tracker
