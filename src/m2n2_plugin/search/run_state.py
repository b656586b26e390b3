"""What one ``m2n2 evolve`` run holds and keeps between processes.

The trial lives in :mod:`m2n2_plugin.search.trial`, the loop in :mod:`m2n2_plugin.search.evolve`;
this module holds what does not change from one trial to the next: the output folder, the
Optuna study (its storage, opened by every worker, and the fingerprint that lets a rerun resume
it), the archive members' weights files, the resident model and its merge scratch, and the
outputs handed to :mod:`m2n2_plugin.report` at the end (:class:`RunState`, the base of
:class:`~m2n2_plugin.search.trial.Run`).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import optuna
import torch

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge.checkpoint import checkpoint_shapes
from m2n2_plugin.merge.layout import Architecture
from m2n2_plugin.merge.models import Seed
from m2n2_plugin.merge.resident import MergeScratch
from m2n2_plugin.merge.resident_model import load_checkpoint_into_model
from m2n2_plugin.merge.split_space import SplitSpace
from m2n2_plugin.report.family_tree import crossover
from m2n2_plugin.report.family_tree import split_text
from m2n2_plugin.report.outputs import Settings
from m2n2_plugin.report.outputs import write_outputs
from m2n2_plugin.report.ranking import archive_figures
from m2n2_plugin.search.config import EvolveConfig
from m2n2_plugin.search.documents import DocSet
from m2n2_plugin.search.fitness import LmEvalFitness
from m2n2_plugin.search.weights import FitnessWeights
from m2n2_plugin.search.workers import MemberEvicted
from m2n2_plugin.search.workers import member_file
from m2n2_plugin.search.workers import needed_members
from m2n2_plugin.search.workers import sync_files

if TYPE_CHECKING:
    from m2n2_plugin.search.archive_store import ArchiveStore

#: lm-eval's per-sample log of the best model's held-out documents, in the output folder.
HELDOUT_SAMPLES = "heldout_samples.jsonl"


def write_error(path: Path, exc: OSError) -> M2N2Error:
    """The one line for a write that failed (no space left, a quota, a read-only mount).

    Writes are atomic (a temp file renamed into place), so what was there before is intact
    and the study does not count the trial: freeing space and rerunning resumes the run.
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    return M2N2Error(
        f"cannot write {path} ({reason}); nothing already written was changed: free space "
        "(or fix the folder) and rerun the same command to resume"
    )


@dataclass
class TrialTiming:
    """Seconds spent per phase of one trial (also stored in the trial's user attrs)."""

    merge: float = 0.0
    load: float = 0.0
    evaluate: float = 0.0
    save: float = 0.0
    sampler: float = 0.0
    # Waiting for the trials numbered below this one to finish (several workers; Run.admit).
    wait: float = 0.0


@dataclass
class RunState:
    """Everything one ``m2n2 evolve`` process holds: config, seeds, study, resident model.

    What it does with them between trials: find and load archive members, delete files
    nobody needs, write the outputs. :class:`~m2n2_plugin.search.trial.Run` adds the trial.
    """

    cfg: EvolveConfig
    out: Path
    seeds: list[Seed]
    carried: dict[str, Any]
    fitness: LmEvalFitness
    fitness_docs: DocSet
    heldout_docs: DocSet
    study: optuna.Study
    sampler: Any
    model: Any
    tokenizer: Any
    lm: Any
    merge_dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    timings: dict[int, TrialTiming] = field(default_factory=dict)
    #: The read buffers and parent norms every merge of the run reuses (made once, here).
    scratch: MergeScratch = field(default_factory=MergeScratch)
    #: The model's architecture (tensor order, layers), built once by ``prepare``: every
    #: merge of the run plans its pair of parents against it.
    arch: Architecture | None = None
    #: The fitness documents' weights (weights.py); None: every document the same.
    fitness_weights: FitnessWeights | None = None
    #: Where a drawn split point falls (``search.split_over``), made once by ``prepare``.
    split_space: SplitSpace | None = None
    #: ``search.archive_store``: members live in an artifact store, ``<out>/archive`` is this
    #: worker's cache of them (archive_store.py). None: members are files in ``<out>/archive``.
    store: ArchiveStore | None = None

    # ----------------------------------------------------------------- archive helpers
    def trial_attrs(self, number: int) -> dict[str, Any]:
        storage = self.study._storage
        tid = storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        return storage.get_trial(tid).user_attrs

    def member_path(self, number: int, attrs: dict[str, Any] | None = None) -> Path:
        """Where archive member ``number``'s weights are: a seed's folder, or our file."""
        attrs = self.trial_attrs(number) if attrs is None else attrs
        if "m2n2.seed" in attrs:
            return self.seeds[int(attrs["m2n2.seed"])].path
        if self.store is not None:
            arch = self.sampler.archive

            def evicted() -> bool:
                now = arch(self.study)
                return number < now.position and number not in now.members

            return self.store.local_member(number, attrs, evicted)
        path = member_file(self.out, number)
        if not path.is_file():
            arch = self.sampler.archive(self.study)
            if number < arch.position and number not in arch.members:
                raise MemberEvicted(
                    f"archive member trial {number} left the archive before its weights "
                    "were read (another worker evicted it); this trial fails, the run goes on"
                )
            raise M2N2Error(
                f"archive member trial {number} has no file {path}: the output folder and the "
                "study disagree (was the folder edited, or another storage used?)"
            )
        return path

    def check_member_files(self) -> None:
        """At start: every child in the archive still has a whole, readable weights file.

        The study records which trials are members; their weights live only in the output
        folder. A file deleted or truncated between two runs (a full disk, a manual clean-up)
        would otherwise surface trials later as a failed merge, or never, if the member is
        not drawn. Only headers are read: cheap for any archive size.
        """
        if self.store is not None:  # the members' objects, and this worker's cached copies
            self.store.check_members(self.sampler.archive(self.study).members, self.trial_attrs)
            return
        for number in self.sampler.archive(self.study).members:
            if "m2n2.seed" in self.trial_attrs(number):
                continue
            path = member_file(self.out, number)
            try:
                checkpoint_shapes(path)
            except M2N2Error as exc:
                if number not in self.sampler.archive(self.study).members:
                    continue  # another worker evicted it (and deleted its file) meanwhile
                raise M2N2Error(
                    f"archive member trial {number}: {exc}; restore that file (e.g. from a "
                    "backup), or start a new run with another output_dir: the study needs the "
                    "weights of every archive member"
                ) from exc

    def load_seed(self, index: int) -> None:
        """Put seed ``index`` into the resident model, one tensor at a time (``dtype`` applied)."""
        load_checkpoint_into_model(self.model, self.seeds[index].path, dtype=self.merge_dtype)

    def load_member(self, number: int) -> None:
        """Put archive member ``number`` into the resident model (a seed, or our file)."""
        attrs = self.trial_attrs(number)
        if "m2n2.seed" in attrs:
            self.load_seed(int(attrs["m2n2.seed"]))
        else:
            load_checkpoint_into_model(self.model, self.member_path(number, attrs))

    # ----------------------------------------------------------------- bookkeeping
    def sync_files(self) -> Any:
        """Delete archive files nobody needs any more (:func:`workers.sync_files`), and with
        an archive store their objects (:meth:`archive_store.ArchiveStore.sync`)."""
        arch = sync_files(self.study, self.sampler, self.out)
        if self.store is not None:
            keep = needed_members(self.study, self.sampler, arch)
            self.store.sync(self.study, arch.position, keep)
        return arch

    def write_outputs(self) -> dict[str, Any]:
        """The report (:func:`report.write_outputs`) of this run's final archive."""
        trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        settings = Settings(
            study_name=self.study.study_name,
            archive_size=self.cfg.search.archive_size,
            tasks=self.cfg.fitness.tasks,
            metric=self.cfg.fitness.metric,
            granularity=self.cfg.search.granularity,
            n_fitness_docs=len(self.fitness_docs),
            heldout_tasks=list(self.heldout_docs.ids),
            n_heldout_docs=len(self.heldout_docs),
            carried=self.carried,
            fitness_weights=self.fitness_weights.describe() if self.fitness_weights else "",
            warnings=[w for w in [self.study.user_attrs.get("m2n2.benchmark_warning")] if w],
            fitness_counts={task: len(ids) for task, ids in self.fitness_docs.ids.items()},
            heldout_counts={task: len(ids) for task, ids in self.heldout_docs.ids.items()},
        )
        return write_outputs(
            self.out,
            self.sampler.archive(self.study),
            trials,
            self.seeds,
            settings,
            heldout=self.heldout,
            save_model=self.save_member,
        )

    def heldout(self, best: int) -> dict[str, dict[str, float]]:
        """Held-out task means of the best member and of every seed ({} without documents)."""
        if not len(self.heldout_docs):
            return {}
        # lm-eval's per-sample records of the best model's held-out documents: the answers
        # behind its numbers.
        log = self.out / HELDOUT_SAMPLES
        scores = {
            "M2N2 best": self.heldout_scores(
                partial(self.load_member, best), f"trial:{best}", samples_log=log
            )
        }
        for i, s in enumerate(self.seeds):
            scores[f"seed {s.name}"] = self.heldout_scores(partial(self.load_seed, i), f"seed:{i}")
        return scores

    def heldout_scores(
        self, load: Callable[[], None], key: str, samples_log: Path | None = None
    ) -> dict[str, float]:
        """Mean held-out score per task of the model ``load()`` puts in place (cached under
        ``key`` in the study, so a resumed run does not evaluate it again).

        ``samples_log``: also write lm-eval's per-sample records there; a cached score whose
        log is missing, or is another model's, is evaluated again to write it.
        """
        cache = dict(self.study.user_attrs.get("m2n2.heldout", {}))
        logged = self.study.user_attrs.get("m2n2.heldout_samples_of")
        stale_log = samples_log is not None and (not samples_log.is_file() or logged != key)
        if key not in cache or stale_log:
            load()
            scores = self.fitness.score(self.lm, self.heldout_docs, samples_log=samples_log)
            cache[key] = self.heldout_docs.task_means(scores)
            self.study.set_user_attr("m2n2.heldout", cache)
            if samples_log is not None:
                self.study.set_user_attr("m2n2.heldout_samples_of", key)
        return cache[key]

    def log_trial(self, frozen: optuna.trial.FrozenTrial, arch: Any) -> tuple[str, dict[str, Any]]:
        """Append a finished trial to ``trials.log`` and ``history.jsonl``; returns both.

        ``arch`` is the archive after the trial; both files are appended to by every worker,
        so a run's history survives interruptions and resumptions.
        """
        attrs = frozen.user_attrs
        if "m2n2.seed" in attrs:
            what = f"seed {attrs['m2n2.model']}"
        elif "m2n2.parents" in attrs:
            a, b = attrs["m2n2.parents"]
            mix_ratio, split_point = crossover(frozen)
            what = (
                f"child of {a} x {b} (mix_ratio={mix_ratio:.3f}, "
                f"split_point={split_text(split_point, 3)})"
            )
        else:
            what = "trial"
        if frozen.state == optuna.trial.TrialState.PRUNED:
            n_docs = attrs.get("m2n2.docs_evaluated", "?")
            value = f"rejected early after {n_docs}/{len(self.fitness_docs)} documents"
        elif frozen.value is None:
            value = "failed"
        else:
            value = f"mean score {frozen.value:.4f}"
        status = "in archive" if frozen.number in arch.members else "not kept"
        line = f"trial {frozen.number}: {what}: {value}, {status}"
        record = {
            "trial": frozen.number,
            "value": frozen.value,
            **archive_figures(arch),
            "members": arch.members,
        }
        for path, text in (
            (self.out / "trials.log", line),
            (self.out / "history.jsonl", json.dumps(record)),
        ):
            try:
                with path.open("a") as fh:
                    fh.write(text + "\n")
            except OSError as exc:
                raise write_error(path, exc) from exc
        return line, record

    def save_member(self, number: int, folder: Path) -> None:
        """Write archive member ``number`` as a Hugging Face model folder."""
        self.load_member(number)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)


#: Search options that came after the fingerprint, with their defaults (see fingerprint()).
LATER_DEFAULTS: dict[str, Any] = {"split_over": "all", "split_points": 1}


def fingerprint(cfg: EvolveConfig, seeds: list[Seed], fitness: DocSet) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    # Settings that do not change the archive may differ between a run and its resumption.
    search = cfg.search.model_dump(
        exclude={
            "n_trials",
            "storage",
            "heartbeat_interval",
            "early_rejection",
            "rejection_chunk",
            "tracking",
            "tracking_uri",
            "seed_config_merge",  # the seeds say it (the merge is one, with its recipe)
            "seed_base_model",  # the seeds say it
            "archive_store",  # where members live, not what they are (archive_store.py)
            "cache_size",
            "upload_while_scoring",
        }
    )
    # Options added later are left out at their defaults: studies made before them resume.
    for key, default in LATER_DEFAULTS.items():
        if search.get(key) == default:
            search.pop(key)
    return {
        "seeds": [s.identity for s in seeds],
        "tasks": cfg.fitness.tasks,
        "metric": cfg.fitness.metric,
        "filter": cfg.fitness.filter,
        "fitness_docs": hashlib.sha1(json.dumps(fitness.ids).encode()).hexdigest(),
        "search": search,
    }


def rdb_storage(url: str, heartbeat_interval: int | None) -> optuna.storages.RDBStorage:
    """``RDBStorage(url)``, retried while another worker creates the same tables.

    Optuna creates its schema when a storage is first opened; workers that start together on
    a new database race to do it, and all but one fail on a duplicate table, type or alembic
    row (optuna/optuna#1092). A retry finds the schema made. Any other error (a server that
    cannot be reached, a bad URL) is raised at once.
    """
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import ProgrammingError

    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                # heartbeat_interval is "experimental" in Optuna: noise on every start.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=None if heartbeat_interval is None else 2 * heartbeat_interval,
                    engine_kwargs={"connect_args": {"timeout": 60}}
                    if url.startswith("sqlite")
                    else None,
                )
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            racing = not isinstance(exc, OperationalError) or "already exists" in str(exc)
            if not racing or attempt == 5:
                raise
            time.sleep(0.1 * (attempt + 1) + 0.1 * random.random())
    raise AssertionError("unreachable")


def open_study(cfg: EvolveConfig, out: Path, sampler: Any) -> optuna.Study:
    url = cfg.search.storage or f"sqlite:///{out / 'study.db'}"
    try:
        storage = rdb_storage(url, cfg.search.heartbeat_interval)
        return optuna.create_study(
            storage=storage,
            study_name=cfg.search.study_name,
            sampler=sampler,
            direction="maximize",
            load_if_exists=True,
        )
    except M2N2Error:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise M2N2Error(f"cannot open the Optuna storage {url!r}: {first}") from exc


def output_folder(cfg: EvolveConfig, output_dir: str | Path | None = None) -> Path:
    """The run's output folder: ``output_dir`` (relative to the working directory), else the
    config's ``output_dir`` (relative to the config file)."""
    out = Path(output_dir or cfg.output_dir or "m2n2-out")
    if not out.is_absolute():
        out = (Path.cwd() / out) if output_dir else cfg.resolve(str(out))
    return out


DONE_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def count_done(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE_STATES))
