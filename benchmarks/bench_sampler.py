"""Does an M2N2 trial cost the same at trial 10,000 as at trial 100?

A trivial objective (random 0/1 scores over ``--examples`` examples) on each storage. One study
is filled to ``--trials`` trials; then ``--window`` trials from trial 100 of a fresh study and
the last ``--window`` trials of the full one are run interleaved in chunks of 10, so that the
load of a shared machine hits both windows alike. Per trial:

* sampler: the sampler's own work -- ``before_trial`` (fold the trials that finished, draw the
  plan, store it), ``sample_independent`` for ``mix_ratio`` and ``split_point``, and
  ``set_scores`` (validate, encode, store) -- and the storage calls it makes;
* whole trial: completion to completion, i.e. Optuna's ``ask`` + the objective + ``tell``.

The late/early ratio of the sampler's time is the figure of merit (target <= 1.2); medians are
the robust figure on a busy machine.

    python benchmarks/bench_sampler.py                       # both storages, 10,000 trials
    python benchmarks/bench_sampler.py --sqlite-fill run     # every SQLite trial run for real
    python benchmarks/bench_sampler.py --storage memory --trials 2000

With ``--sqlite-fill copy`` (default) the SQLite study gets its first trials with
``optuna.copy_study`` from the in-memory run (the same rows: trials, params, system attrs, the
fold state), which halves the time. SQLite lives in /dev/shm when there is one: the figure is
the sampler's work, not the disk's fsync.

Measured (2-core shared VM, Python 3.11, Optuna 5.0.0, SQLite on tmpfs, window 200, medians):
    InMemoryStorage  sampler 0.277 -> 0.278 ms (x1.01)   whole trial 0.421 -> 0.427 ms (x1.01)
    SQLite, copy     sampler 12.50 -> 12.73 ms (x1.02)   whole trial 41.9 -> 47.0 ms (x1.12)
    SQLite, run      sampler 9.32 -> 9.12 ms (x0.98)     whole trial 36.8 -> 45.9 ms (x1.25)
The sampler makes the same 6 storage calls per trial at trial 100 and 10,000. The whole-trial
growth on SQLite is outside the sampler, in Optuna's own per-trial work: numbering a new trial
runs a SQL COUNT over the study's earlier trials (``TrialModel.count_past_trials``) and each ask
filters every cached trial for WAITING ones (``_CachedStorage.get_all_trials``, ~0.6 ms at
10,000); with InMemoryStorage the whole trial stays flat.

The hub clean-up (one function per concept in niches.py, capacity) against the tree before it,
both samplers in one process with their trials interleaved in chunks of 10 (the machine at load
~4 on 2 cores, so absolute times are ~4x the above): sampler median 1.31 -> 1.27 ms at trial
100 and 1.25 -> 1.21 ms at trial 5,000; the same 6 storage calls per trial.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
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

WARM_UP = 10  # trials a new sampler object runs before a late window (fills its memo)
CHUNK = 10
STORAGE_CALLS = (
    "get_trial",
    "get_trial_id_from_study_id_trial_number",
    "get_study_system_attrs",
    "set_study_system_attr",
    "set_trial_system_attr",
    "get_all_trials",
)


class TimedSampler(M2N2Sampler):  # type: ignore[misc,valid-type]
    """M2N2Sampler that adds up the wall time and storage calls of its methods per trial."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: dict[int, float] = defaultdict(float)
        self.calls: dict[int, Counter[str]] = defaultdict(Counter)
        self._current: int | None = None

    def count_calls(self, storage: Any) -> None:
        """Wrap the storage's methods to count the calls made inside the sampler."""
        for name in STORAGE_CALLS:
            original = getattr(storage, name)

            def wrapped(*args: Any, _name: str = name, _f: Any = original, **kw: Any) -> Any:
                if self._current is not None:
                    self.calls[self._current][_name] += 1
                return _f(*args, **kw)

            setattr(storage, name, wrapped)

    def _timed(self, number: int, method: Any, *args: Any) -> Any:
        self._current = number
        start = time.perf_counter()
        try:
            return method(*args)
        finally:
            self.seconds[number] += time.perf_counter() - start
            self._current = None

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._timed(trial.number, super().before_trial, study, trial)

    def sample_independent(self, study: Study, trial: FrozenTrial, name: str, dist: Any) -> Any:
        return self._timed(trial.number, super().sample_independent, study, trial, name, dist)

    def set_scores(self, trial: Trial, scores: Any) -> None:
        self._timed(trial.number, super().set_scores, trial, scores)


class Run:
    """A study and its timed sampler; ``extend(n)`` runs n more trials and keeps the times."""

    def __init__(self, study: Study, sampler: TimedSampler, n_examples: int, seed: int) -> None:
        self.study, self.sampler = study, sampler
        self.whole: dict[int, float] = {}
        self._n_examples, self._seed = n_examples, seed
        sampler.count_calls(study._storage)

    @classmethod
    def create(cls, storage: Any, name: str, n_examples: int, seed: int) -> Run:
        sampler = TimedSampler(archive_size=20, seed=seed)
        study = optuna.create_study(
            storage=storage, sampler=sampler, direction="maximize", study_name=name
        )
        return cls(study, sampler, n_examples, seed)

    @classmethod
    def load(cls, storage: Any, name: str, n_examples: int, seed: int) -> Run:
        sampler = TimedSampler(archive_size=20, seed=seed)
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
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

    def window(self, start: int, size: int) -> dict[str, Any]:
        numbers = range(start, start + size)
        calls: Counter[str] = Counter()
        for n in numbers:
            calls.update(self.sampler.calls[n])
        return {
            "sampler": [self.sampler.seconds[n] for n in numbers],
            "whole": [self.whole[n] for n in numbers],
            "calls": {name: count / size for name, count in sorted(calls.items())},
        }

    def check(self) -> None:
        n_trials = len(self.study.trials)
        archive = self.sampler.archive(self.study)
        assert archive.n_folded == n_trials and len(archive.members) == 20


def interleaved(early: Run, late: Run, window: int) -> None:
    """Run the two windows in alternating chunks: machine load drifts hit both alike."""
    early.extend(100)
    late.extend(WARM_UP)
    for _ in range(window // CHUNK):
        early.extend(CHUNK)
        late.extend(CHUNK)


def report(name: str, early: dict[str, Any], late: dict[str, Any]) -> None:
    print(f"\n{name}")
    print("                    early mean / median     late mean / median    ratio mean / median")
    for key, label in (("sampler", "sampler (ms)    "), ("whole", "whole trial (ms)")):
        e_mean, e_median = statistics.fmean(early[key]), statistics.median(early[key])
        l_mean, l_median = statistics.fmean(late[key]), statistics.median(late[key])
        print(
            f"  {label}  {e_mean * 1e3:8.3f} / {e_median * 1e3:8.3f}"
            f"     {l_mean * 1e3:8.3f} / {l_median * 1e3:8.3f}"
            f"     {l_mean / e_mean:6.2f} / {l_median / e_median:6.2f}"
        )
    print(f"  sampler's storage calls per trial, early: {early['calls']}")
    print(f"                                      late: {late['calls']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--storage", choices=["memory", "sqlite", "both"], default="both")
    parser.add_argument("--sqlite-fill", choices=["copy", "run"], default="copy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n, w = args.trials, args.window - args.window % CHUNK
    if n < 100 + 2 * w + WARM_UP:
        parser.error("--trials must be at least 100 + 2 * --window + 10")
    fill = n - w - WARM_UP  # trials in the big study before its warm-up and window
    kw = {"n_examples": args.examples, "seed": args.seed}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

    with tempfile.TemporaryDirectory(dir=shm) as folder:
        url = f"sqlite:///{folder}/bench.db"
        memory = None
        if args.storage != "sqlite" or args.sqlite_fill == "copy":
            start = time.perf_counter()
            memory = Run.create(optuna.storages.InMemoryStorage(), "late", **kw)
            memory.extend(fill)
            print(f"  (in-memory fill of {fill} trials: {time.perf_counter() - start:.0f} s)")
        if args.storage != "memory":
            start = time.perf_counter()
            if args.sqlite_fill == "copy":
                assert memory is not None
                optuna.copy_study(
                    from_study_name="late",
                    from_storage=memory.study._storage,
                    to_storage=url,
                    to_study_name="late",
                )
                how = f"trials 0-{fill - 1} copied from the in-memory study"
                late = Run.load(url, "late", **kw)
            else:
                late = Run.create(url, "late", **kw)
                late.extend(fill)
                how = "every trial run on SQLite"
            print(f"  (SQLite fill of {fill} trials: {time.perf_counter() - start:.0f} s)")
        if args.storage != "sqlite":
            assert memory is not None
            early = Run.create(optuna.storages.InMemoryStorage(), "early", **kw)
            interleaved(early, memory, w)
            memory.check()
            report(
                f"InMemoryStorage, trial 100 vs trial {n}",
                early.window(100, w),
                memory.window(n - w, w),
            )
        if args.storage != "memory":
            early = Run.create(url, "early", **kw)
            interleaved(early, late, w)
            late.check()
            report(
                f"SQLite in {folder}, trial 100 vs trial {n}; {how}",
                early.window(100, w),
                late.window(n - w, w),
            )


if __name__ == "__main__":
    main()
