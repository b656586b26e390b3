"""Several ``m2n2 evolve`` workers on one study: admission, file sync, dead trials, outputs.

Any number of processes may run ``m2n2 evolve`` on one storage and output folder. What keeps
them consistent lives here: a child waits until every lower-numbered trial has finished before
it asks whether the archive takes it (:func:`fold_up_to`), so a file is written exactly for the
children the fold admits; files of members that left the archive are deleted once no running
trial can read them (:func:`sync_files`); trials of killed workers are failed
(:func:`fail_dead_trials`); and the outputs are written by one worker at a time
(:func:`write_outputs_locked`).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna

from m2n2_plugin.errors import M2N2Error

LOG = logging.getLogger("m2n2")

#: Seconds a child waits for lower-numbered trials (Run.admit) before a warning is logged.
ADMIT_WARNING_S = 60.0
#: ``trial_000012.safetensors`` (a member's file) and ``.tmp-trial_000012-*.safetensors`` (the
#: temp file of a write in progress, or left by a killed one: models.save_tensors_atomic).
_ARCHIVE_FILE = re.compile(r"(?P<temp>\.tmp-)?trial_(?P<number>\d+)(?(temp)-.+)\.safetensors")


class MemberEvicted(M2N2Error):
    """A parent's file was deleted because it left the archive before this trial read it.

    With several workers another one may evict a member (and delete its file) between the
    moment a trial draws it as a parent and the moment it reads it; ``sync_files`` keeps the
    parents of running trials, so this is a rare race. The trial fails and the run goes on.
    """


def member_file(out: Path, number: int) -> Path:
    """Where the archive member made by trial ``number`` is stored."""
    return out / "archive" / f"trial_{number:06d}.safetensors"


def fold_up_to(study: optuna.Study, sampler: Any, number: int, *, heartbeat: bool) -> Any:
    """The archive this trial will be folded into: wait until every lower trial is done.

    Polls the storage; dead workers' trials are failed by heartbeat meanwhile (a warning
    is logged after ``ADMIT_WARNING_S`` seconds, e.g. when the heartbeat is off).
    """
    pause, start, warned = 0.005, time.monotonic(), False
    while True:
        arch = sampler.archive(study)
        if arch.position >= number:
            return arch
        fail_dead_trials(study)  # no-op without a heartbeat
        waited = time.monotonic() - start
        if waited > ADMIT_WARNING_S and not warned:
            warned = True
            how = (
                "it is marked FAIL once its heartbeat is stale"
                if heartbeat
                else "mark it FAIL (or set search.heartbeat_interval)"
            )
            LOG.warning(
                f"trial {number} has waited {waited:.0f} s for trial {arch.position} "
                "to finish before it can tell whether to keep its weights; if the worker "
                f"running trial {arch.position} died, {how}"
            )
        time.sleep(pause)
        pause = min(2 * pause, 0.5)


def sync_files(study: optuna.Study, sampler: Any, out: Path) -> Any:
    """Delete files of trials that left (or never entered) the archive; return it.

    Only trials the fold has passed are touched: every trial below ``position`` has
    finished, so no worker is writing their files, while a file (or ``.tmp-`` file) being
    written for a running trial is never deleted. That also removes what a killed worker
    left once its trial is failed: the file of a child saved just before the kill, and
    the temp file of a write cut short. An evicted member that a running trial drew as a
    parent keeps its file until that trial has finished.
    """
    arch = sampler.archive(study)
    keep = needed_members(study, sampler, arch)
    folder = out / "archive"
    if folder.is_dir():
        for f in folder.iterdir():
            match = _ARCHIVE_FILE.fullmatch(f.name)
            if match is None:
                continue
            number = int(match["number"])
            temp = match["temp"] is not None
            if number < arch.position and (temp or number not in keep):
                f.unlink(missing_ok=True)
    return arch


def needed_members(study: optuna.Study, sampler: Any, arch: Any) -> set[int]:
    """Trials whose weights must stay: the archive's members and running trials' parents.

    The one rule behind deleting a member's file (:func:`sync_files`) and removing its object
    from an artifact store (``archive_store.ArchiveStore.sync``): of the trials the fold has
    passed, only these are kept.
    """
    return set(arch.members) | _running_parents(study, sampler, arch.position)


def _running_parents(study: optuna.Study, sampler: Any, position: int) -> set[int]:
    """Parents drawn by the trials the fold has not passed: they may still read them.

    A trial without a plan yet will draw from an archive folded at least up to
    ``position``, where members evicted before ``position`` are gone.
    """
    storage, study_id = study._storage, study._study_id
    parents: set[int] = set()
    number = position
    while True:
        try:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        except KeyError:
            return parents
        frozen = storage.get_trial(trial_id)
        if not frozen.state.is_finished():
            try:
                parents.update(sampler.parents(frozen) or ())
            except ValueError:  # not planned yet
                pass
        number += 1


def fail_dead_trials(study: optuna.Study) -> None:
    """Mark the trials of dead workers FAIL: Optuna's stale-heartbeat check, and one more case.

    Optuna only fails a RUNNING trial whose heartbeat row has gone stale. A worker killed in
    the moment between creating its trial (``study.ask``) and its heartbeat thread's first
    write leaves a RUNNING trial with no row at all; Optuna never fails it, and every other
    worker's fold would wait on it forever. Such a trial is failed once it started more than
    the grace period ago: a live worker writes its first heartbeat within milliseconds. Start
    times are the workers' clocks, so workers on several machines need clocks that agree to
    well within the grace period (twice ``search.heartbeat_interval``).
    """
    from optuna.storages._rdb.models import TrialHeartbeatModel
    from sqlalchemy import select

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    rdb = getattr(study._storage, "_backend", study._storage)  # under Optuna's cache layer
    if not isinstance(rdb, optuna.storages.RDBStorage) or rdb.heartbeat_interval is None:
        return
    grace = timedelta(seconds=rdb.grace_period or 2 * rdb.heartbeat_interval)
    now = datetime.now()
    old = {
        t._trial_id: t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if t.datetime_start is not None and now - t.datetime_start > grace
    }
    if not old:
        return
    query = select(TrialHeartbeatModel.trial_id).where(TrialHeartbeatModel.trial_id.in_(old))
    with rdb.engine.connect() as conn:
        beating = set(conn.execute(query).scalars())
    for trial_id in old.keys() - beating:
        try:
            study._storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # it finished (or another worker failed it) meanwhile
        else:
            LOG.warning(
                f"trial {old[trial_id].number} never sent a heartbeat and started "
                f"{(now - old[trial_id].datetime_start).total_seconds():.0f} s ago: "
                "marked FAIL (its worker died)"
            )


def write_outputs_locked(out: Path, write: Callable[[], Any]) -> None:
    """``write()`` (the report), one worker at a time, retried if an eviction races its reads.

    Workers sharing an output folder finish at different times and each writes the outputs.
    An exclusive ``flock`` on ``<out>/.outputs.lock`` serialises them (the kernel drops it
    when its holder dies, so a kill -9 never leaves it held); the holder first removes what a
    killed writer left (``.best-tmp-*``, ``.best-old``). Another worker may still evict the
    best member and delete its file mid-write: then the outputs are written again.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (one worker per output folder)
        fcntl = None  # type: ignore[assignment]
    with (out / ".outputs.lock").open("a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        for left in [*out.glob(".best-tmp-*"), out / ".best-old"]:
            shutil.rmtree(left, ignore_errors=True)
        for attempt in range(3):
            try:
                write()
                return
            except MemberEvicted:
                if attempt == 2:
                    raise
