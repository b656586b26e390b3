"""Several workers on one study: `m2n2 evolve` processes and plain Optuna studies, on PostgreSQL
(a real local server: .ci/postgres.sh exports M2N2_TEST_POSTGRES_URL) and on SQLite.

After the run: the archive has at most archive-size members, none twice, equal to a re-fold of
the trials in number order (each COMPLETE trial folded once); every member's model file exists
and no file is left for evicted members, failed trials or cut-short writes.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

import optuna
import pytest
from evolve_workspace import build_workspace
from evolve_workspace import check_study_and_files
from evolve_workspace import worker_cmd
from evolve_workspace import worker_env
from evolve_workspace import write_config
from optuna.trial import TrialState

pytestmark = pytest.mark.slow  # subprocesses: see pyproject's markers

N_WORKERS = 3
ARCHIVE_SIZE = 3  # as many slots as seeds: from the first child on, every child competes


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("workers"))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the test PostgreSQL server, dropped afterwards."""
    base = os.environ.get("M2N2_TEST_POSTGRES_URL")
    if not base:
        reason = "M2N2_TEST_POSTGRES_URL is not set (start a server: eval $(bash .ci/postgres.sh))"
        if os.environ.get("M2N2_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    import sqlalchemy

    name = f"m2n2_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    url = sqlalchemy.engine.make_url(base).set(database=name).render_as_string(False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def _storage_url(kind: str, request: pytest.FixtureRequest, folder: Path) -> str:
    if kind == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{folder / 'study.db'}"


def _overlapping(study: optuna.Study) -> int:
    """Pairs of trials that ran at the same time (one process runs one trial at a time)."""
    spans = [
        (t.datetime_start, t.datetime_complete)
        for t in study.get_trials(deepcopy=False)
        if t.datetime_start and t.datetime_complete
    ]
    return sum(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in combinations(spans, 2))


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_evolve_workers_share_one_archive(
    kind: str, workspace: Path, request: pytest.FixtureRequest
) -> None:
    """N `m2n2 evolve` processes, one config, one storage, one output folder."""
    name = f"workers-{kind}"
    out = workspace / f"out-{name}"
    url = _storage_url(kind, request, out)
    n_trials = 12
    cfg = write_config(
        workspace,
        name,
        fitness__heldout_docs=None,  # no held-out scoring in the outputs: faster
        search={
            "n_trials": n_trials,
            "archive_size": ARCHIVE_SIZE,
            "seed": 0,
            "storage": url,
            "heartbeat_interval": 5,
        },
    )
    barrier = workspace / f"barrier-{name}"
    procs = [
        subprocess.Popen(
            worker_cmd("--barrier", str(barrier), str(N_WORKERS), "--", "evolve", str(cfg)),
            env=worker_env(),
            cwd=workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(N_WORKERS)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    if any(p.returncode for p in procs):
        pytest.fail("a worker failed:\n" + "\n---\n".join(o[-3000:] for o in outputs))

    study = optuna.load_study(study_name="m2n2", storage=url)
    trials = study.trials
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # The budget is the study's: workers stop at n_trials, give or take trials in flight.
    assert n_trials <= len(done) <= n_trials + N_WORKERS - 1
    assert not [t for t in trials if t.state == TrialState.FAIL], outputs
    assert _overlapping(study) > 0, "the workers never ran trials at the same time"
    arch = check_study_and_files(out, study, ARCHIVE_SIZE)
    assert any(m >= 3 for m in arch.members), "no child entered: nothing was tested"
    # Every trial was logged once, by the worker that ran it.
    logged = [int(line.split(":")[0].split()[1]) for line in (out / "trials.log").open()]
    assert sorted(logged) == [t.number for t in trials]
    # The outputs were written (by each worker in turn) and name a member of the archive.
    summary = (out / "summary.json").read_text()
    assert f'"best_trial": {arch.best()}' in summary
    assert not list(out.glob(".best-*")) and (out / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_plain_optuna_workers_share_one_archive(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """N processes of a plain Optuna study with M2N2Sampler (toy objective that also fails
    and prunes trials)."""
    url = _storage_url(kind, request, tmp_path)
    optuna.create_study(study_name="plain", storage=url)
    n_each, archive_size = 12, 4
    procs = [
        subprocess.Popen(
            worker_cmd("plain", url, "plain", str(n_each), str(archive_size)), env=worker_env()
        )
        for _ in range(N_WORKERS)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0] * N_WORKERS
    study = optuna.load_study(study_name="plain", storage=url)
    assert len(study.trials) == N_WORKERS * n_each
    assert _overlapping(study) > 0
    from evolve_workspace import refold
    from m2n2_plugin.hub import M2N2Sampler

    trials = study.trials
    arch = M2N2Sampler(archive_size=archive_size).archive(study)
    slots, n_folded = refold(trials, archive_size)
    assert arch.slots == slots and len(set(arch.members)) == len(arch.members) <= archive_size
    assert arch.n_folded == n_folded == sum(t.state == TrialState.COMPLETE for t in trials)
    assert arch.position == len(trials)
