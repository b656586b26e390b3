"""Helpers for the tests: load the package, a toy objective, an independent re-fold, a worker.

Run as a script it is one worker process:
``python m2n2_toy.py STORAGE_URL STUDY_NAME N_TRIALS SEED ARCHIVE_SIZE``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import functools
import importlib
import os
from pathlib import Path
import sys
import time
import types
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial
from optuna.trial import Trial
from optuna.trial import TrialState


REGISTRY_ROOT = Path(__file__).resolve().parents[3]
N_EXAMPLES = 12


@functools.cache
def load_m2n2() -> types.ModuleType:
    """The package as OptunaHub loads it (``optunahub.load_local_module``), once a process."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import optunahub

    return optunahub.load_local_module("samplers/m2n2", registry_root=str(REGISTRY_ROOT))


class ToyFailure(Exception):
    pass


def toy_objective(
    sampler: Any,
    fail_every: int | None = None,
    prune_every: int | None = None,
    sleep: float = 0.0,
    n_examples: int = N_EXAMPLES,
) -> Callable[[Trial], float]:
    """Scores drawn from the trial's number and plan, so the run depends on every decision.

    Trials numbered ``k * fail_every + 3`` raise and ``k * prune_every + 5`` are pruned, both
    after reporting scores (which the archive must then ignore).
    """

    def objective(trial: Trial) -> float:
        parents = sampler.parents(trial)
        seed = sampler.seed_index(trial)
        mix_ratio = trial.suggest_float("mix_ratio", 0.0, 1.0)
        trial.suggest_float("split_point", 0.0, 1.0)
        key = [1, seed] if parents is None else [2, *parents]
        rng = np.random.default_rng([trial.number, *key])
        scores = (rng.random(n_examples) < 0.2 + 0.6 * mix_ratio).astype(float)
        sampler.set_scores(trial, scores)
        if sleep:
            time.sleep(sleep * (1.0 + rng.random()))
        if fail_every and trial.number % fail_every == 3:
            raise ToyFailure(f"trial {trial.number} fails on purpose")
        if prune_every and trial.number % prune_every == 5:
            raise optuna.TrialPruned()
        return float(scores.mean())

    return objective


def refold(
    m2n2: types.ModuleType,
    trials: Sequence[FrozenTrial],
    archive_size: int,
    alpha: float = 1.0,
    capacity: np.ndarray | None = None,
) -> tuple[list[int | None], int]:
    """The archive's slots and fold count, recomputed from the trials with nothing cached."""
    decode_scores = importlib.import_module(m2n2.__name__ + "._state").decode_scores
    slots: list[int | None] = [None] * archive_size
    rows: dict[int, np.ndarray] = {}
    n_folded = 0
    n_examples = None
    for trial in sorted(trials, key=lambda t: t.number):
        if not trial.state.is_finished():
            break
        if trial.state != TrialState.COMPLETE:
            continue
        scores = decode_scores(trial.system_attrs)
        if scores is None:
            continue
        n_examples = n_examples or scores.size
        n_folded += 1
        matrix = np.array([rows[n] if n is not None else np.zeros(n_examples) for n in slots])
        plan = trial.system_attrs["m2n2:plan"]
        if plan["role"] == "seed" and None in slots:
            slot = slots.index(None)
        else:
            slot = m2n2.replace_index(matrix, scores, alpha, capacity)
        if slot is not None:
            slots[slot] = trial.number
            rows[trial.number] = scores
    return slots, n_folded


def _chi_square_limit(dof: int) -> float:
    """The 0.999 quantile of chi-square(dof), Wilson-Hilferty (numpy only, no scipy)."""
    z = 3.090232
    return float(dof * (1.0 - 2.0 / (9.0 * dof) + z * np.sqrt(2.0 / (9.0 * dof))) ** 3)


def assert_frequencies(counts: np.ndarray, probabilities: np.ndarray) -> None:
    """Counts match the probabilities: zero where p = 0, chi-square within its 0.999 quantile."""
    counts = np.asarray(counts, dtype=float).ravel()
    probabilities = np.asarray(probabilities, dtype=float).ravel()
    assert np.all(counts[probabilities == 0.0] == 0)
    live = probabilities > 0.0
    expected = probabilities[live] * counts.sum()
    statistic = float((((counts[live] - expected) ** 2) / expected).sum())
    assert statistic < _chi_square_limit(int(live.sum()) - 1), statistic


def sqlite_storage(path: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(
        f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 60}}
    )


def main(argv: Sequence[str]) -> None:
    path, study_name, n_trials, seed, archive_size = argv
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    m2n2 = load_m2n2()
    sampler = m2n2.M2N2Sampler(archive_size=int(archive_size), seed=int(seed))
    study = optuna.load_study(study_name=study_name, storage=sqlite_storage(path), sampler=sampler)
    objective = toy_objective(sampler, fail_every=7, prune_every=11, sleep=0.005)
    study.optimize(objective, n_trials=int(n_trials), catch=(ToyFailure,))


if __name__ == "__main__":
    main(sys.argv[1:])
