"""kill -9 an `m2n2 evolve` worker mid-trial, run again: the study resumes and nothing is lost.

One worker per phase is started (all at once, each with its own output folder) and killed
with SIGKILL the moment it reaches its phase in trial 4 or later, when the archive already
holds a child: while it merges, while it evaluates, while it writes an archive member (half
of the temp file on disk), and after it wrote the member but before the trial completed.
Then the same command runs again (in this process): Optuna's heartbeat marks the dead trial
FAIL, what it left on disk is removed, the archive is exactly what it was, every member's file
is intact, and the study goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
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

PHASES = ("merge", "evaluate", "save", "saved")
FROM_TRIAL = 4  # trials 0-2 are the seeds, trial 3 the first child: it fills the empty slot
ARCHIVE_SIZE = 4
HEARTBEAT = 1  # seconds; a dead trial is stale after 2 * HEARTBEAT


def _config(workspace: Path, phase: str) -> Path:
    return write_config(
        workspace,
        f"crash-{phase}",
        fitness__heldout_docs=None,
        search={
            "n_trials": 40,
            "archive_size": ARCHIVE_SIZE,
            "seed": 1,
            "heartbeat_interval": HEARTBEAT,
        },
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("crash"))


@pytest.fixture(scope="module")
def killed(workspace: Path) -> dict[str, dict]:
    """Run one worker per phase at once; SIGKILL each as it reaches its phase."""
    procs, logs = {}, {}
    for phase in PHASES:
        sig = workspace / f"crash-{phase}.signal"
        logs[phase] = (workspace / f"crash-{phase}.log").open("w")
        cmd = worker_cmd(
            *("--pause-at", phase, "--from-trial", str(FROM_TRIAL), "--signal", str(sig)),
            *("--", "evolve", str(_config(workspace, phase)), "--no-progress"),
        )
        procs[phase] = subprocess.Popen(
            cmd, env=worker_env(), cwd=workspace, stdout=logs[phase], stderr=subprocess.STDOUT
        )
    result: dict[str, dict] = {}
    deadline = time.monotonic() + 300
    try:
        while len(result) < len(PHASES):
            for phase, proc in procs.items():
                sig = workspace / f"crash-{phase}.signal"
                if phase in result:
                    continue
                if sig.exists():
                    info = json.loads(sig.read_text())
                    os.kill(proc.pid, signal.SIGKILL)
                    assert proc.wait(timeout=30) == -signal.SIGKILL
                    result[phase] = {**info, "killed_at": time.monotonic()}
                elif proc.poll() is not None:
                    log = (workspace / f"crash-{phase}.log").read_text()[-3000:]
                    pytest.fail(f"the {phase} worker exited ({proc.returncode}) unkilled:\n{log}")
            assert time.monotonic() < deadline, f"no worker reached {set(PHASES) - set(result)}"
            time.sleep(0.05)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for log in logs.values():
            log.close()
    return result


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _done(study: optuna.Study) -> int:
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


@pytest.mark.parametrize("phase", PHASES)
def test_kill_9_mid_trial_then_resume(phase: str, killed: dict, workspace: Path) -> None:
    from m2n2_plugin.hub import M2N2Sampler

    from m2n2_plugin.search.evolve import evolve
    from m2n2_plugin.search.workers import member_file

    info = killed[phase]
    dead = info["trial"]
    assert info["phase"] == phase and dead >= FROM_TRIAL
    out = workspace / f"out-crash-{phase}"
    storage = f"sqlite:///{out / 'study.db'}"

    # What the kill left: the dead trial RUNNING, the archive folded up to it.
    study = optuna.load_study(study_name="m2n2", storage=storage)
    assert study.trials[dead].state == TrialState.RUNNING
    before = M2N2Sampler(archive_size=ARCHIVE_SIZE).archive(study)
    assert before.position == dead
    children = [m for m in before.members if m >= 3]
    assert children, "no child in the archive at the kill: nothing to lose"
    digests = {m: _sha1(member_file(out, m)) for m in children}
    left = sorted(p.name for p in (out / "archive").iterdir())
    if phase == "save":  # a half-written temp file of the dead trial
        assert [n for n in left if n.startswith(f".tmp-trial_{dead:06d}-")], left
    if phase == "saved":  # a complete file of a trial that never completed
        assert member_file(out, dead).name in left
    done = _done(study)

    # Run again once the dead trial's heartbeat is stale; first with no trial to run.
    time.sleep(max(0.0, info["killed_at"] + 2 * HEARTBEAT + 1.5 - time.monotonic()))
    cfg = _config(workspace, phase)
    run = evolve(cfg, n_trials=done, progress=False)
    assert run.study.trials[dead].state == TrialState.FAIL
    arch = check_study_and_files(out, run.study, ARCHIVE_SIZE)
    assert arch.slots == before.slots  # nothing lost, nothing added
    assert {m: _sha1(member_file(out, m)) for m in children} == digests
    assert (out / "best" / "model.safetensors").is_file()
    assert not list(out.glob(".best-*"))

    # ... and the study goes on from there.
    run = evolve(cfg, n_trials=done + 3, progress=False)
    assert _done(run.study) == done + 3
    check_study_and_files(out, run.study, ARCHIVE_SIZE)


def test_worker_dead_before_its_first_heartbeat(workspace: Path) -> None:
    """A worker killed between creating its trial and the heartbeat thread's first write leaves
    a RUNNING trial with no heartbeat row, which Optuna's stale check never fails; the fold
    would wait on it forever. It is failed once older than the grace period, and the run goes
    on. A trial with no heartbeat yet that started just now, and one whose heartbeat is fresh,
    are left alone until they are stale."""
    from datetime import datetime
    from datetime import timedelta

    from m2n2_plugin.search.evolve import evolve
    from m2n2_plugin.search.workers import fail_dead_trials

    cfg = _config(workspace, "noheartbeat")
    out = workspace / "out-crash-noheartbeat"
    evolve(cfg, n_trials=FROM_TRIAL, progress=False)
    url = f"sqlite:///{out / 'study.db'}"
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT)
    study = optuna.load_study(study_name="m2n2", storage=storage)

    def running(age_s: float) -> int:
        template = optuna.trial.FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.now() - timedelta(seconds=age_s),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=-1,
        )
        return storage.create_new_trial(study._study_id, template_trial=template)

    dead, young, beating = running(60), running(0), running(60)
    storage.record_heartbeat(beating)
    number = {tid: storage.get_trial(tid).number for tid in (dead, young, beating)}
    fail_dead_trials(study)
    states = {tid: storage.get_trial(tid).state for tid in number}
    assert states[dead] == TrialState.FAIL
    assert states[young] == states[beating] == TrialState.RUNNING

    # The next run gets past all three: `young` ages without a heartbeat, `beating` goes stale.
    proc = subprocess.run(
        worker_cmd("--", "evolve", str(cfg), "-n", str(FROM_TRIAL + 3), "--no-progress"),
        env=worker_env(),
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="m2n2", storage=url)
    assert {study.trials[n].state for n in number.values()} == {TrialState.FAIL}
    assert _done(study) == FROM_TRIAL + 3
    check_study_and_files(out, study, ARCHIVE_SIZE)
