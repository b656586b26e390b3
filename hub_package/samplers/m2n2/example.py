"""M2N2 on a toy: merge two specialist linear classifiers into one that knows every class.

Numpy and Optuna only, offline, a few seconds. The seeds are two least-squares classifiers of a
synthetic 4-class problem, one fitted on classes 0-1, the other on classes 2-3, so each gets
about half the examples right. Every other trial merges two archive members with split-point
SLERP; the per-example correctness on the fitness set is the trial's score vector. For LLMs
the shape is the same: the seeds are the models of a mergekit config, the merge is mergekit's
``m2n2`` method and the scores come from lm-eval, one per document.

``python example.py images/m2n2_example.png`` also draws the archive (needs matplotlib): which
fitness examples each member solves, and the best member's score and the archive's coverage
trial by trial. That picture is the package's thumbnail.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial
from optuna.trial import Trial
import optunahub


m2n2 = optunahub.load_module("samplers/m2n2")


def make_data(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(0).normal(0.0, 1.2, size=(4, 16))
    x = np.concatenate([rng.normal(c, 1.0, size=(n_per_class, 16)) for c in centres])
    y = np.repeat(np.arange(4), n_per_class)
    return np.hstack([x, np.ones((len(x), 1))]), y  # a bias column


def specialist(x: np.ndarray, y: np.ndarray, classes: list[int]) -> np.ndarray:
    """Least squares onto one-hot targets, fitted on the given classes only."""
    rows = np.isin(y, classes)
    weights: np.ndarray = np.linalg.lstsq(x[rows], np.eye(4)[y[rows]], rcond=None)[0]
    return weights.ravel()


def split_slerp(a: np.ndarray, b: np.ndarray, mix_ratio: float, split_point: float) -> np.ndarray:
    """M2N2's crossover: t = mix_ratio before the split, 1 - mix_ratio after, one angle."""
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    omega = math.acos(min(1.0, max(-1.0, cos)))
    t = np.where(np.arange(a.size) < math.floor(split_point * a.size), mix_ratio, 1 - mix_ratio)
    child: np.ndarray
    if math.sin(omega) <= 1e-6:
        child = (1 - t) * a + t * b
    else:
        child = (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / math.sin(omega)
    return child


def accuracy(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1.0 per correctly classified example, else 0.0: the score vector."""
    predictions = np.argmax(x @ weights.reshape(x.shape[1], 4), axis=1)
    return np.asarray(predictions == y, dtype=float)


rng = np.random.default_rng(42)
x_fit, y_fit = make_data(100, rng)  # the fitness examples (400)
x_test, y_test = make_data(250, rng)
seeds = [specialist(x_fit, y_fit, [0, 1]), specialist(x_fit, y_fit, [2, 3])]
models: dict[int, np.ndarray] = {}  # trial number -> weights (a real run keeps archive members)

sampler = m2n2.M2N2Sampler(archive_size=10, n_seeds=len(seeds), seed=0)


def objective(trial: Trial) -> float:
    mix_ratio = trial.suggest_float("mix_ratio", 0.0, 1.0)
    split_point = trial.suggest_float("split_point", 0.0, 1.0)
    parents = sampler.parents(trial)
    if parents is None:
        weights = seeds[sampler.seed_index(trial)]
    else:
        weights = split_slerp(models[parents[0]], models[parents[1]], mix_ratio, split_point)
    models[trial.number] = weights
    scores = accuracy(weights, x_fit, y_fit)
    sampler.set_scores(trial, scores)
    return float(scores.mean())


history: list[tuple[int, float, float]] = []  # (trial, best member's mean score, coverage)


def record(study: optuna.Study, trial: FrozenTrial) -> None:
    archive = sampler.archive(study)
    best = archive.best()
    if best is not None:
        history.append((trial.number, float(archive.mean_scores.max()), archive.coverage))


def plot(path: str, archive: Any) -> None:
    """The thumbnail: who solves what in the archive, and the best score trial by trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-archive.mean_scores, kind="stable")
    seed_rows = [accuracy(weights, x_fit, y_fit) for weights in seeds]
    rows = np.vstack([archive.scores[order], archive.scores.max(axis=0), *seed_rows])
    labels = [f"trial {archive.members[i]}" for i in order] + ["any member"]
    labels += [f"seed {i}" for i in range(len(seeds))]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.5, 1]}, layout="constrained"
    )
    left.imshow(rows, aspect="auto", cmap="Greens", vmin=0.0, vmax=1.0, interpolation="none")
    for row in (len(order) - 0.5, len(order) + 0.5):
        left.axhline(row, color="black", linewidth=1.5)
    for boundary in np.flatnonzero(np.diff(y_fit)) + 0.5:
        left.axvline(boundary, color="grey", linewidth=0.8, linestyle=":")
    left.set_yticks(range(len(labels)), labels, fontsize=8)
    left.set_xticks(
        [np.flatnonzero(y_fit == k).mean() for k in range(4)], [f"class {k}" for k in range(4)]
    )
    left.set_xlabel("fitness examples (green: solved)")
    left.set_title(f"Archive after {len(history)} trials: coverage {archive.coverage:.0%}")
    trials, best, coverage = np.array(history).T
    seed_mean = float(np.mean([row.mean() for row in seed_rows]))
    right.plot(trials + 1, coverage, label="archive coverage", color="tab:green")
    right.plot(trials + 1, best, label="best member's score", color="tab:blue")
    right.axhline(seed_mean, color="grey", linestyle="--", linewidth=1, label="a seed's score")
    right.set_xscale("log")
    right.set_xlabel("trials run (log scale)")
    right.set_ylabel("share of fitness examples solved")
    right.set_ylim(0.0, 1.02)
    right.set_title("Merging two specialists")
    right.legend(loc="lower right")
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    study.optimize(objective, n_trials=300, callbacks=[record])

    archive = sampler.archive(study)
    best = archive.best()
    assert best is not None
    for i, weights in enumerate(seeds):
        print(f"seed {i}: test accuracy {accuracy(weights, x_test, y_test).mean():.3f}")
    print(f"archive members (trial numbers): {archive.members}")
    print(f"archive coverage of the fitness set: {archive.coverage:.3f}")
    print(
        f"best member, trial {best}: fitness accuracy {study.trials[best].value:.3f}, "
        f"test accuracy {accuracy(models[best], x_test, y_test).mean():.3f}"
    )
    if len(sys.argv) > 1:
        plot(sys.argv[1], archive)
        print(f"wrote {sys.argv[1]}")
