"""State in storage: encodings, resuming in a new process, workers on one SQLite file, loading."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
import importlib
import importlib.util
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile

from m2n2_toy import load_m2n2
from m2n2_toy import refold
from m2n2_toy import REGISTRY_ROOT
from m2n2_toy import sqlite_storage
from m2n2_toy import toy_objective
from m2n2_toy import ToyFailure
import numpy as np
import optuna
from optuna.trial import TrialState
import pytest


m2n2 = load_m2n2()
state_module = importlib.import_module(m2n2.__name__ + "._state")
TOY = str(Path(__file__).resolve().parent / "m2n2_toy.py")
ENV = {**os.environ, "GIT_PYTHON_REFRESH": "quiet"}


@pytest.mark.parametrize(
    "scores",
    [
        np.array([0.0, 1.0, 1.0, 0.0, 1.0]),
        np.array([0.25, 1.0, 0.0, 1.0 / 3.0]),
        (np.arange(600_000) % 3 == 0).astype(float),  # bits, 100 KB packed: chunked
        np.linspace(0.0, 1.0, 10_001),  # float64, 107 KB of base64: chunked
    ],
)
def test_score_encoding_round_trip(scores: np.ndarray) -> None:
    attrs = state_module.encode_scores(scores)
    assert all(len(json.dumps(value)) < 65_535 for value in attrs.values())  # MySQL TEXT
    decoded = state_module.decode_scores(attrs)
    assert decoded.dtype == np.float64
    np.testing.assert_array_equal(decoded, scores)
    if np.all((scores == 0) | (scores == 1)):
        assert attrs["m2n2:scores"].startswith("bits:")


@pytest.fixture
def db_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder for SQLite files, in RAM where there is one (SQLite's fsyncs dominate)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="m2n2-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def worker(path: Path, study: str, n_trials: int, seed: int, archive_size: int) -> list[str]:
    return [sys.executable, TOY, str(path), study, str(n_trials), str(seed), str(archive_size)]


def test_resume_in_a_new_process_continues_the_same_run(db_dir: Path) -> None:
    path = db_dir / "resume.db"
    first = m2n2.M2N2Sampler(archive_size=4, seed=3)
    study = optuna.create_study(
        study_name="resume", storage=sqlite_storage(str(path)), sampler=first
    )
    study.optimize(
        toy_objective(first, fail_every=7, prune_every=11), n_trials=12, catch=(ToyFailure,)
    )
    subprocess.run(worker(path, "resume", 12, 3, 4), check=True, env=ENV)  # 12 more
    resumed = optuna.load_study(study_name="resume", storage=sqlite_storage(str(path)))

    sampler = m2n2.M2N2Sampler(archive_size=4, seed=3)
    straight = optuna.create_study(sampler=sampler)
    objective = toy_objective(sampler, fail_every=7, prune_every=11)
    straight.optimize(objective, n_trials=24, catch=(ToyFailure,))

    def plans(study: optuna.Study) -> list[object]:
        return [t.system_attrs["m2n2:plan"] for t in study.trials]

    assert plans(resumed) == plans(straight)
    assert [t.state for t in resumed.trials] == [t.state for t in straight.trials]
    archive = m2n2.M2N2Sampler(archive_size=4, seed=3).archive(resumed)
    assert archive.slots == sampler.archive(straight).slots


def test_three_workers_on_one_sqlite_file(db_dir: Path) -> None:
    path, archive_size = db_dir / "workers.db", 4
    optuna.create_study(study_name="workers", storage=sqlite_storage(str(path)))
    procs = [
        subprocess.Popen(worker(path, "workers", 15, 0, archive_size), env=ENV) for _ in range(3)
    ]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0, 0]

    study = optuna.load_study(study_name="workers", storage=sqlite_storage(str(path)))
    trials = study.trials
    assert len(trials) == 45 and all(t.state.is_finished() for t in trials)
    archive = m2n2.M2N2Sampler(archive_size=archive_size).archive(study)
    slots, n_folded = refold(m2n2, trials, archive_size)

    assert len(archive.members) <= archive_size
    assert len(set(archive.members)) == len(archive.members)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert archive.n_folded == n_folded == len(complete)  # each completed trial folded once
    assert archive.position == len(trials)
    assert archive.slots == slots  # the same as one re-fold in trial-number order
    # Each seed COMPLETE exactly once (a failed seed is issued again, never twice at once).
    seeds = {t.number: (t.state.name, t.system_attrs["m2n2:plan"]["seed"]) for t in trials}
    done_seeds = Counter(
        t.system_attrs["m2n2:plan"]["seed"]
        for t in complete
        if t.system_attrs["m2n2:plan"]["role"] == "seed"
    )
    assert done_seeds == Counter({0: 1, 1: 1}), seeds
    # Every child's parents were members of the archive folded up to some position at or
    # before its own number (the finished prefix its worker saw).
    prefixes = [set(refold(m2n2, trials[:n], archive_size)[0]) for n in range(len(trials))]
    for trial in trials:
        plan = trial.system_attrs["m2n2:plan"]
        if plan["role"] == "child":
            parents = set(plan["parents"])
            assert any(parents <= members for members in prefixes[: trial.number + 1]), plan


def _load_in_subprocess(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


SMOKE = """
import optuna, optunahub
optuna.logging.set_verbosity(optuna.logging.WARNING)
module = {load}
sampler = module.M2N2Sampler(archive_size=3, seed=0)
study = optuna.create_study(sampler=sampler)
def objective(trial):
    trial.suggest_float("mix_ratio", 0, 1)
    sampler.set_scores(trial, [trial.number % 2, 1.0])
    return 0.0
study.optimize(objective, n_trials=5)
print(module.__file__, sampler.archive(study).n_folded)
"""


def test_load_local_module_offline() -> None:
    load = f'optunahub.load_local_module("samplers/m2n2", registry_root={str(REGISTRY_ROOT)!r})'
    out = _load_in_subprocess(SMOKE.format(load=load), ENV)
    assert out.endswith(" 5") and out.startswith(str(REGISTRY_ROOT))


def _seeded_cache(cache: Path) -> tuple[Path, dict[str, str]]:
    """An OptunaHub cache holding this package where ``load_module("samplers/m2n2")`` looks
    first, and the environment that points optunahub at it (no network, no analytics)."""
    package = cache / "github.com/optuna/optunahub-registry/main/package/samplers/m2n2"
    shutil.copytree(
        REGISTRY_ROOT / "samplers/m2n2",
        package,
        ignore=shutil.ignore_patterns("__pycache__", "tests", "images"),
    )
    return package, {**ENV, "OPTUNAHUB_CACHE_HOME": str(cache), "OPTUNAHUB_NO_ANALYTICS": "1"}


def test_load_module_from_seeded_cache(tmp_path: Path) -> None:
    package, env = _seeded_cache(tmp_path)
    out = _load_in_subprocess(SMOKE.format(load='optunahub.load_module("samplers/m2n2")'), env)
    assert out.startswith(str(package)) and out.endswith(" 5")


def test_example_runs_as_users_run_it(tmp_path: Path) -> None:
    """example.py loads the package with ``optunahub.load_module`` (here from a seeded cache)
    and, given a file name, draws the README's thumbnail."""
    _, env = _seeded_cache(tmp_path / "cache")
    example = REGISTRY_ROOT / "samplers/m2n2/example.py"
    args = [sys.executable, str(example)]
    picture = tmp_path / "m2n2_example.png"
    if importlib.util.find_spec("matplotlib") is not None:
        args.append(str(picture))
    done = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert float(lines["archive coverage of the fitness set"]) > 0.9
    best = lines[next(key for key in lines if key.startswith("best member"))]
    assert float(best.rsplit("test accuracy ", 1)[1]) > 0.85  # the seeds: about 0.5
    if len(args) == 3:
        assert picture.read_bytes().startswith(b"\x89PNG")
