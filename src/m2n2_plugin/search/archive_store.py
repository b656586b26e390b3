"""Archive members in an Optuna artifact store: workers on several machines, no shared folder.

Without ``search.archive_store`` every child in the archive is a safetensors file in the one
output folder all workers share. With it, the study's storage and the store are all that the
workers share: each has its own output folder, whose ``archive/`` folder becomes a bounded
cache of members (same file names, same clean-up by ``workers.sync_files``).

* Upload (:meth:`ArchiveStore.upload`): a child that the fold admits (``Run.admit``, exact with
  any number of workers) is saved into the cache as before, then uploaded as an artifact of its
  trial (``optuna.artifacts.upload_artifact``), its id and sha256 in the trial's user attr
  ``m2n2.artifact`` -- all before the objective returns, so every COMPLETE member has its
  object, as it had its file.
* Upload while scoring (:class:`EarlyUpload`, ``search.upload_while_scoring``): the child is
  saved and uploaded in a second thread as its scoring starts; kept, the trial waits for what
  is left of it; not kept, the object is removed. Same guarantees, the upload overlapped.
* Fetch (:meth:`ArchiveStore.local_member`): a parent not in the cache is downloaded, checked
  against its sha256 and kept; past ``cache_size`` members the least recently used copy is
  deleted (it can be fetched again).
* Remove (:meth:`ArchiveStore.sync`): an object goes exactly when ``workers.sync_files`` would
  delete its file: its trial is behind the fold, not a member, no running trial's parent
  (:func:`m2n2_plugin.search.workers.needed_members`). That covers evicted members and whatever a
  killed worker uploaded for a trial that was then failed. Each removal is recorded in the
  study (system attr ``m2n2.store_removed:<trial>``), so a restarted worker does not redo it.

The store itself -- a URL opened as an Optuna artifact store, one trial's upload into it -- is
:mod:`m2n2_plugin.search.member_store`.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.search.member_store import CHUNK
from m2n2_plugin.search.member_store import UPLOADING_ATTR
from m2n2_plugin.search.member_store import MemberStore
from m2n2_plugin.search.member_store import TrialUpload
from m2n2_plugin.search.member_store import UploadStopped
from m2n2_plugin.search.member_store import artifact_store
from m2n2_plugin.search.member_store import first_line
from m2n2_plugin.search.member_store import sha256_file
from m2n2_plugin.search.member_store import trial_objects
from m2n2_plugin.search.workers import MemberEvicted
from m2n2_plugin.search.workers import member_file

#: Study user attr: the store this study's members live in (absent: files in output_dir).
STUDY_ATTR = "m2n2.archive_store"
#: Trial user attr of an uploaded member: ``{"id": artifact id, "sha256": hex digest}``.
TRIAL_ATTR = "m2n2.artifact"
#: Trial user attr: seconds and bytes of store traffic in this trial, and cache hits/misses.
TRAFFIC_ATTR = "m2n2.store_traffic"
#: Study system attr per trial whose objects were removed (value: their artifact ids).
REMOVED_PREFIX = "m2n2.store_removed:"
_MEMBER_NAME = re.compile(r"trial_(?P<number>\d+)\.safetensors")


def check_study(study: optuna.Study, store: ArchiveStore | None) -> None:
    """A study and a worker must agree on where the members live, or trials fail later.

    Without a store, a study whose members are in one is refused (its weights are not in any
    output folder); with one, a study with trials whose members are files is refused, and a
    new study records the store's URL (shown on optuna-dashboard's study page). A worker
    without a store writes nothing here, as before stores existed.
    """
    used = study.user_attrs.get(STUDY_ATTR)
    if store is not None:
        store.claim(study, used)
    elif used is not None:
        raise M2N2Error(
            f"the study {study.study_name!r} keeps its archive members in the archive store "
            f"{used}; set search.archive_store to resume it"
        )


@dataclass
class StoreTraffic:
    """One trial's store traffic (the trial's ``m2n2.store_traffic`` user attr)."""

    #: Seconds the trial waited for its child's upload (with ``upload_while_scoring``, only
    #: what scoring did not already cover).
    upload_s: float = 0.0
    fetch_s: float = 0.0
    uploaded_bytes: int = 0
    fetched_bytes: int = 0
    hits: int = 0
    misses: int = 0
    #: ``upload_while_scoring``: seconds the background save and upload took in all.
    background_s: float = 0.0
    #: ``upload_while_scoring``: 1 when the child was not kept and its upload was dropped.
    dropped: int = 0


class ArchiveStore:
    """One worker's view of the store: uploads, the local cache (LRU), removals.

    Held by the run (``RunState.store``); its memory -- the cache's order, which trials behind
    the fold still have objects -- is this process's and is rebuilt from the folder and the
    study at start.
    """

    def __init__(self, store: MemberStore, out: Path, cache_size: int) -> None:
        self.store = store
        self.out = out
        self.cache_size = cache_size
        self.traffic = StoreTraffic()
        #: Cached members, least recently used first.
        self.lru: OrderedDict[int, None] = OrderedDict()
        #: Trials behind the fold (below ``scanned``) whose objects were not removed yet.
        self.live: dict[int, list[str]] | None = None
        self.scanned = 0

    @property
    def url(self) -> str:
        return self.store.url

    @classmethod
    def open(cls, url: str, base_dir: Path, out: Path, cache_size: int) -> ArchiveStore:
        """Open and contact the store: one M2N2Error line if it cannot be used."""
        store = artifact_store(url, base_dir)
        try:
            store.check()
        except Exception as exc:
            raise M2N2Error(f"cannot reach the archive store {url}: {first_line(exc)}") from exc
        return cls(store, out, cache_size)

    # ------------------------------------------------------------------ the study's mode
    def claim(self, study: optuna.Study, used: str | None) -> None:
        """Record the store in a new study; refuse a study whose members are files.

        ``used``: the study's :data:`STUDY_ATTR` (see :func:`check_study`).
        """
        if used is None and study.get_trials(deepcopy=False):
            raise M2N2Error(
                f"the study {study.study_name!r} keeps its archive members as files in an "
                "output folder, not in an archive store; remove search.archive_store to resume "
                "it, or start a new study"
            )
        if used is None:
            study.set_user_attr(STUDY_ATTR, self.url)

    # ------------------------------------------------------------------ one trial
    def begin_trial(self) -> None:
        self.traffic = StoreTraffic()

    def record(self, trial: optuna.Trial) -> None:
        """Write this trial's traffic so far to its user attrs."""
        trial.set_user_attr(TRAFFIC_ATTR, {k: round(v, 4) for k, v in vars(self.traffic).items()})

    def upload(self, trial: optuna.Trial, path: Path, displaced: int | None = None) -> None:
        """Upload the child just saved at ``path`` (in the cache) as its trial's artifact.

        The child stays in this worker's cache (it is the likeliest next parent here); if the
        cache is then over ``cache_size``, the copy of ``displaced`` -- the member whose slot
        the child takes -- goes first: it leaves the archive when the fold passes this trial,
        while the least recently used copy is usually a member that would be fetched again.
        """
        t0 = time.perf_counter()
        meta = self.transfer(trial, path)
        self.kept(trial, meta, path, displaced, time.perf_counter() - t0)

    def transfer(
        self, trial: optuna.Trial, path: Path, stop: threading.Event | None = None
    ) -> dict[str, str]:
        """Upload ``path`` as ``trial``'s artifact; returns its :data:`TRIAL_ATTR` record.

        ``stop``: once set, the transfer ends at its next read (:class:`EarlyUpload`).
        """
        store = TrialUpload(self.store, trial, stop)
        # The sha256 is computed in a second thread while the file is uploaded (both read it
        # from the page cache; hashlib and the transfer release the GIL): hashed first, its
        # ~0.9 s per 538 MB on a 2-core CPU would be added to every upload.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="m2n2-sha256") as pool:
            hashing = pool.submit(sha256_file, path)
            try:
                artifact_id = upload_artifact(
                    artifact_store=store, file_path=str(path), study_or_trial=trial
                )
            except UploadStopped:
                raise
            except Exception as exc:
                raise M2N2Error(
                    f"trial {trial.number}: cannot upload its weights to the archive store "
                    f"{self.url}: {first_line(exc)}"
                ) from exc
            return {"id": artifact_id, "sha256": hashing.result()}

    def kept(
        self,
        trial: optuna.Trial,
        meta: dict[str, str],
        path: Path,
        displaced: int | None,
        waited_s: float,
    ) -> None:
        """The child at ``path`` is uploaded and kept: record it, cache it, evict if over."""
        trial.set_user_attr(TRIAL_ATTR, meta)
        self.traffic.upload_s += waited_s
        self.traffic.uploaded_bytes += path.stat().st_size
        self.lru[trial.number] = None
        self.lru.move_to_end(trial.number)
        self.evict(protect={trial.number}, first=displaced)

    def upload_early(self, trial: optuna.Trial, save: Callable[[Path], None]) -> EarlyUpload:
        """Save and upload the child in the background while it is scored (see
        :class:`EarlyUpload`); ``save(path)`` writes the child's file."""
        return EarlyUpload(self, trial, save)

    def local_member(
        self, number: int, attrs: dict[str, Any], evicted: Callable[[], bool]
    ) -> Path:
        """Member ``number``'s weights on this machine: from the cache, else fetched.

        ``evicted()``: whether the member has left the archive since it was drawn (then a
        missing object is the race ``MemberEvicted`` describes, not damage).
        """
        path = member_file(self.out, number)
        if number in self.lru and path.is_file():
            self.lru.move_to_end(number)
            self.traffic.hits += 1
            return path
        meta = attrs.get(TRIAL_ATTR)
        if not isinstance(meta, dict):
            raise M2N2Error(
                f"archive member trial {number} has no artifact in the archive store "
                f"{self.url} (its trial has no {TRIAL_ATTR!r} attr): the study and the store "
                "disagree"
            )
        t0 = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temp name is the one workers.sync_files knows (".tmp-trial_N-..."): a fetch cut
        # short by a kill is cleaned up like a write cut short.
        tmp = path.parent / f".tmp-{path.stem}-{uuid.uuid4().hex}.safetensors"
        try:
            digest = self.download(meta["id"], tmp)
        except ArtifactNotFound as exc:
            tmp.unlink(missing_ok=True)
            if evicted():
                raise MemberEvicted(
                    f"archive member trial {number} left the archive before its weights "
                    "were read (another worker evicted it); this trial fails, the run goes on"
                ) from exc
            raise self.missing(number, meta["id"]) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if digest != meta["sha256"]:
            tmp.unlink(missing_ok=True)
            raise M2N2Error(
                f"archive member trial {number}: its artifact {meta['id']} in the archive "
                f"store {self.url} is damaged (sha256 {digest[:12]}..., expected "
                f"{meta['sha256'][:12]}...); restore that object or start a new study"
            )
        os.replace(tmp, path)
        self.traffic.fetch_s += time.perf_counter() - t0
        self.traffic.fetched_bytes += path.stat().st_size
        self.traffic.misses += 1
        self.lru[number] = None
        self.lru.move_to_end(number)
        self.evict(protect={number})
        return path

    def download(self, artifact_id: str, dest: Path) -> str:
        """Copy an object to ``dest``; returns its sha256 (hashed as it streams).

        Each chunk is hashed in a second thread while the next one is read and this one
        written (hashlib, reads and writes release the GIL): one thread doing all three
        took 1.7-2.3 s per 538 MB from a folder store on a 2-core CPU, against 0.8-1.4 s
        pipelined (copy alone 0.5 s, sha256 alone 0.5 s).
        """
        digest = hashlib.sha256()
        try:
            reader = self.store.open_reader(artifact_id)
        except ArtifactNotFound:
            raise
        except Exception as exc:
            raise M2N2Error(
                f"cannot read {artifact_id} from the archive store {self.url}: {first_line(exc)}"
            ) from exc
        try:
            with (
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="m2n2-sha256") as pool,
                dest.open("wb") as fh,
            ):
                hashed = None
                while chunk := reader.read(CHUNK):
                    if hashed is not None:
                        hashed.result()  # the digest takes chunks in order, one at a time
                    hashed = pool.submit(digest.update, chunk)
                    fh.write(chunk)
                if hashed is not None:
                    hashed.result()
        finally:
            reader.close()
        return digest.hexdigest()

    def missing(self, number: int, artifact_id: str) -> M2N2Error:
        return M2N2Error(
            f"archive member trial {number}: its artifact {artifact_id} is missing from the "
            f"archive store {self.url}; restore that object or start a new study"
        )

    def evict(self, protect: set[int], first: int | None = None) -> None:
        """Delete the least recently used copies past ``cache_size`` (never ``protect``);
        ``first``, when cached, before any other (see :meth:`upload`)."""
        for number in [n for n in self.lru if not member_file(self.out, n).is_file()]:
            del self.lru[number]  # deleted by sync_files: it left the archive
        order = list(self.lru)
        if first in self.lru:
            order.remove(first)
            order.insert(0, first)
        for number in order:
            if len(self.lru) <= self.cache_size:
                break
            if number in protect:
                continue
            member_file(self.out, number).unlink(missing_ok=True)
            del self.lru[number]

    # ------------------------------------------------------------------ between trials
    def check_members(self, members: list[int], attrs_of: Callable[[int], dict[str, Any]]) -> None:
        """At start: every child member has its object; cached copies are whole.

        A copy in this worker's cache whose sha256 is not its member's is deleted (it will be
        fetched again); an object missing from the store is one line.
        """
        folder = self.out / "archive"
        cached = (
            sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        )
        matches = [(_MEMBER_NAME.fullmatch(p.name), p) for p in cached]
        found = {int(m["number"]): p for m, p in matches if m is not None}
        for number in members:
            attrs = attrs_of(number)
            if "m2n2.seed" in attrs:  # read where the mergekit config says
                continue
            meta = attrs.get(TRIAL_ATTR)
            if not isinstance(meta, dict):
                raise self.missing(number, "(none recorded)")
            if number in found and sha256_file(found[number]) != meta["sha256"]:
                found.pop(number).unlink()
            # Checked even when this worker holds a good copy: the other workers need it.
            try:
                there = self.store.exists(meta["id"])
            except Exception as exc:
                raise M2N2Error(
                    f"cannot reach the archive store {self.url}: {first_line(exc)}"
                ) from exc
            if not there:
                raise self.missing(number, meta["id"])
        for number in sorted(found, key=lambda n: found[n].stat().st_mtime):
            self.lru[number] = None
        self.evict(protect=set())

    def sync(self, study: optuna.Study, position: int, keep: set[int]) -> None:
        """Remove the objects of trials behind the fold (``position``) that are not in ``keep``.

        ``keep`` is :func:`m2n2_plugin.search.workers.needed_members`, the rule that deletes files.
        """
        storage, study_id = study._storage, study._study_id
        if self.live is None:  # once per run: what earlier runs left
            removed = {
                int(k[len(REMOVED_PREFIX) :])
                for k in storage.get_study_system_attrs(study_id)
                if k.startswith(REMOVED_PREFIX)
            }
            self.live = {}
            for frozen in study.get_trials(deepcopy=False):
                if frozen.number < position and frozen.number not in removed:
                    self.note(study, frozen)
            self.scanned = position
        while self.scanned < position:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.scanned)
            self.note(study, storage.get_trial(trial_id))
            self.scanned += 1
        for number in sorted(n for n in self.live if n < position and n not in keep):
            ids = self.live.pop(number)
            for artifact_id in ids:
                try:
                    self.store.remove(artifact_id)
                except ArtifactNotFound:
                    pass  # removed by another worker, or never written (a killed upload)
                except Exception as exc:
                    raise M2N2Error(
                        f"cannot remove trial {number}'s artifact {artifact_id} from the "
                        f"archive store {self.url}: {first_line(exc)}"
                    ) from exc
            storage.set_study_system_attr(study_id, f"{REMOVED_PREFIX}{number}", ids)

    def note(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        """Remember a finished trial's artifacts (any it has) until they are removed."""
        assert self.live is not None
        ids = trial_objects(frozen, study._storage)
        if ids:
            self.live[frozen.number] = ids


class EarlyUpload:
    """A child saved and uploaded while it is still being scored (``upload_while_scoring``).

    Whether a child is kept is known only once it is scored; uploaded then, its whole upload
    is added to the trial. Started as scoring starts, it overlaps it: on a GPU the CPU, the
    disk and the network are idle while the model is scored. The trial still ends only once
    its object is in the store (:meth:`keep`) or gone (:meth:`drop`), so every COMPLETE
    member has its object, as with :meth:`ArchiveStore.upload`. The price: a child that is
    not kept was saved and (partly) uploaded for nothing. Its artifact stays listed in the
    trial's artifacts (``upload_artifact`` records it before writing), like an evicted
    member's.
    """

    def __init__(self, archive: ArchiveStore, trial: optuna.Trial, save: Callable[[Path], None]):
        self.archive = archive
        self.trial = trial
        self.save = save
        self.stop = threading.Event()
        # The temp name is the one workers.sync_files cleans up after a kill.
        folder = archive.out / "archive"
        self.tmp = folder / f".tmp-trial_{trial.number}-{uuid.uuid4().hex}.safetensors"
        self.meta: dict[str, str] | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.done = False
        self.thread = threading.Thread(target=self._run, name="m2n2-upload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.save(self.tmp)
            if not self.stop.is_set():
                self.meta = self.archive.transfer(self.trial, self.tmp, self.stop)
        except BaseException as exc:  # handed to keep(), or dropped with the child
            self.error = exc
        finally:
            self.seconds = time.perf_counter() - t0

    def keep(self, path: Path, displaced: int | None) -> None:
        """The child is kept: wait for its upload, then move its file into the cache.

        Raises what the save or the upload raised (the caller turns an OSError of the save
        into its one line); the child is then dropped."""
        t0 = time.perf_counter()
        self.thread.join()
        waited = time.perf_counter() - t0
        if self.error is not None or self.meta is None:
            error = self.error or M2N2Error(f"trial {self.trial.number}: upload stopped")
            self.drop()
            raise error
        os.replace(self.tmp, path)
        self.done = True
        self.archive.traffic.background_s += self.seconds
        self.archive.kept(self.trial, self.meta, path, displaced, waited)

    def drop(self) -> None:
        """The child is not kept (or its trial failed): stop, and remove what was written."""
        if self.done:
            return
        self.done = True
        self.stop.set()
        self.thread.join()
        self.tmp.unlink(missing_ok=True)
        traffic = self.archive.traffic
        traffic.background_s += self.seconds
        traffic.dropped += 1
        self.archive.record(self.trial)
        # The one object this trial's upload wrote, whole or in part (TrialUpload).
        started = self.trial.user_attrs.get(UPLOADING_ATTR)
        for artifact_id in [started] if started else []:
            try:
                self.archive.store.remove(artifact_id)
            except ArtifactNotFound:
                pass  # never written: stopped before its first byte
            except Exception as exc:
                raise M2N2Error(
                    f"trial {self.trial.number}: cannot remove its unkept upload "
                    f"{artifact_id} from the archive store {self.archive.url}: "
                    f"{first_line(exc)}"
                ) from exc
