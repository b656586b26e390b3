"""Does an M2N2 trial cost the same at trial 10,000 as at trial 100?

Runs a study of ``--trials`` trials with a trivial objective (random 0/1 scores over
``--examples`` examples) on each storage and times two windows of ``--window`` trials: one from
trial 100 and the last one. Two figures per trial:

* sampler: the sampler's own work -- ``before_trial`` (fold the trials that finished, draw the
  plan, store it), ``sample_independent`` for ``mix_ratio`` and ``split_point``, and
  ``set_scores`` (validate, encode, store);
* whole trial: completion to completion, i.e. Optuna's ``ask`` + the objective + ``tell``.

The ratio late/early of the sampler's time is the figure of merit (target <= 1.2).

    python benchmarks/bench_sampler.py                   # both storages, 10,000 trials
    python benchmarks/bench_sampler.py --storage memory --trials 2000

SQLite lives in /dev/shm when it exists (what is measured is the sampler, not fsync).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.study import Study
from optuna.trial import FrozenTrial
from optuna.trial import Trial

try:
    from m2n2_plugin.hub import M2N2Sampler
except ImportError:  # the plugin is not installed: load the Optuna Hub package from the tree
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import optunahub

    _root = Path(__file__).resolve().parents[1] / "hub_package"
    M2N2Sampler = optunahub.load_local_module(
        "samplers/m2n2", registry_root=str(_root)
    ).M2N2Sampler


class TimedSampler(M2N2Sampler):  # type: ignore[misc,valid-type]
    """M2N2Sampler that adds up the wall time of its own methods per trial number."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: dict[int, float] = defaultdict(float)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        start = time.perf_counter()
        super().before_trial(study, trial)
        self.seconds[trial.number] += time.perf_counter() - start

    def sample_independent(self, study: Study, trial: FrozenTrial, name: str, dist: Any) -> Any:
        start = time.perf_counter()
        value = super().sample_independent(study, trial, name, dist)
        self.seconds[trial.number] += time.perf_counter() - start
        return value

    def set_scores(self, trial: Trial, scores: Any) -> None:
        start = time.perf_counter()
        super().set_scores(trial, scores)
        self.seconds[trial.number] += time.perf_counter() - start


class Run:
    """A study and its timed sampler; ``extend(n)`` runs n more trials and keeps the times."""

    def __init__(self, study: Study, sampler: TimedSampler, n_examples: int, seed: int) -> None:
        self.study, self.sampler = study, sampler
        self.whole: dict[int, float] = {}
        self._n_examples, self._seed = n_examples, seed

    @classmethod
    def create(cls, storage: Any, n_examples: int, seed: int, name: str | None = None) -> Run:
        sampler = TimedSampler(archive_size=20, seed=seed)
        study = optuna.create_study(
            storage=storage, sampler=sampler, direction="maximize", study_name=name
        )
        return cls(study, sampler, n_examples, seed)

    def objective(self, trial: Trial) -> float:
        self.sampler.parents(trial)
        trial.suggest_float("mix_ratio", 0.0, 1.0)
        trial.suggest_float("split_point", 0.0, 1.0)
        rng = np.random.default_rng([self._seed, trial.number])
        scores = rng.random(self._n_examples) < 0.5
        self.sampler.set_scores(trial, scores)
        return float(scores.mean())

    def extend(self, n_trials: int) -> None:
        last = [time.perf_counter()]

        def callback(study: Study, trial: FrozenTrial) -> None:
            now = time.perf_counter()
            self.whole[trial.number], last[0] = now - last[0], now
            if trial.number and trial.number % 1000 == 0:
                print(f"  ... {trial.number} trials", file=sys.stderr, flush=True)

        self.study.optimize(self.objective, n_trials=n_trials, callbacks=[callback])

    def window(self, start: int, size: int) -> tuple[list[float], list[float]]:
        numbers = range(start, start + size)
        return [self.sampler.seconds[n] for n in numbers], [self.whole[n] for n in numbers]

    def check(self, n_trials: int) -> None:
        archive = self.sampler.archive(self.study)
        assert archive.n_folded == n_trials and len(archive.members) == 20


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.median(values)


def report(
    name: str, early: tuple[list[float], list[float]], late: tuple[list[float], list[float]]
) -> None:
    print(f"\n{name}")
    print("                    early mean / median     late mean / median    ratio mean / median")
    for label, before, after in (
        ("sampler (ms)    ", early[0], late[0]),
        ("whole trial (ms)", early[1], late[1]),
    ):
        (b_mean, b_median), (a_mean, a_median) = summary(before), summary(after)
        print(
            f"  {label}  {b_mean * 1e3:8.3f} / {b_median * 1e3:8.3f}"
            f"     {a_mean * 1e3:8.3f} / {a_median * 1e3:8.3f}"
            f"     {a_mean / b_mean:6.2f} / {a_median / b_median:6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--storage", choices=["memory", "sqlite", "both"], default="both")
    parser.add_argument(
        "--sqlite-fill",
        choices=["copy", "run"],
        default="copy",
        help="how the SQLite study reaches the late window: copy the in-memory study's "
        "trials (and fold state) with optuna.copy_study, or run every trial on SQLite",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n, w, warm = args.trials, args.window, 10
    if n < 100 + 2 * w + warm:
        parser.error("--trials must be at least 100 + 2 * --window + 10")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

    with tempfile.TemporaryDirectory(dir=shm) as folder:
        url = f"sqlite:///{folder}/bench.db"
        if args.storage in ("memory", "both") or args.sqlite_fill == "copy":
            start = time.perf_counter()
            memory = Run.create(None, args.examples, args.seed, name="memory")
            memory.extend(n - w - warm)
            if args.storage != "memory" and args.sqlite_fill == "copy":
                fill = time.perf_counter()
                optuna.copy_study(
                    from_study_name="memory",
                    from_storage=memory.study._storage,
                    to_storage=url,
                    to_study_name="late",
                )
                print(
                    f"  (copied {n - w - warm} trials to SQLite in "
                    f"{time.perf_counter() - fill:.0f} s)"
                )
            memory.extend(w + warm)
            memory.check(n)
            if args.storage != "sqlite":
                report(
                    f"InMemoryStorage, {n} trials ({time.perf_counter() - start:.0f} s)",
                    memory.window(100, w),
                    memory.window(n - w, w),
                )
        if args.storage in ("sqlite", "both"):
            start = time.perf_counter()
            if args.sqlite_fill == "run":
                full = Run.create(url, args.examples, args.seed, name="full")
                full.extend(n)
                full.check(n)
                early, late = full.window(100, w), full.window(n - w, w)
                how = "every trial run on SQLite"
            else:
                fresh = Run.create(url, args.examples, args.seed, name="early")
                fresh.extend(100 + w)
                early = fresh.window(100, w)
                sampler = TimedSampler(archive_size=20, seed=args.seed)
                study = optuna.load_study(study_name="late", storage=url, sampler=sampler)
                late_run = Run(study, sampler, args.examples, args.seed)
                late_run.extend(w + warm)  # the first `warm` trials fill the sampler's memo
                late_run.check(n)
                late = late_run.window(n - w, w)
                how = f"trials up to {n - w - warm} copied from the in-memory run"
            report(
                f"SQLite in {folder}, {n} trials, {how} ({time.perf_counter() - start:.0f} s)",
                early,
                late,
            )


if __name__ == "__main__":
    main()
