"""The M2N2 archive as a fold over the study's trials, kept in the study's storage.

The archive is a deterministic *fold* over the study's trials in trial
number order: each COMPLETE trial with scores is applied once (a seed to the first empty slot,
everything else, and a seed that finds no empty slot, by the replacement rule); FAIL and PRUNED
trials and COMPLETE trials without scores change no slot (a PRUNED seed is marked done: it was
rejected early and is not issued again); the fold stops at the first trial that has not
finished. So with one worker
the archive that trial ``n`` sees is exactly the official steady-state algorithm after ``n``
steps, and with several workers it is the finished prefix of the study. The fold's result is
cached in the study's system attrs; since the fold is deterministic every worker that advances
it writes a correct state, and a stale write only makes the next reader re-apply a few trials.
Nothing in a sampler object is the source of truth: a new process on the same storage resumes,
and workers on one RDB storage share one archive. A trial reads O(workers) trials, never the
whole history. See ``_state.py`` for the storage keys.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import numpy as np
import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from ._state import CAPACITY_KEY
from ._state import decode_scores
from ._state import encode_scores
from ._state import FOLD_KEY
from ._state import FoldState
from ._state import own_plan
from .archive import describe_capacity
from .archive import entry_slot


if TYPE_CHECKING:
    from numpy.typing import NDArray
    from optuna.storages import BaseStorage
    from optuna.study import Study


_logger = optuna.logging.get_logger("optuna.m2n2")

#: Warn once when the fold lags this many trials behind (a RUNNING trial of a dead worker).
LAG_WARNING = 100


@dataclasses.dataclass
class StudyCache:
    """Per-study memo of immutable things: finished trials' score vectors and own plans."""

    rows: dict[int, NDArray[np.float64]] = dataclasses.field(default_factory=dict)
    plans: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    warned: set[str] = dataclasses.field(default_factory=set)
    n_examples: int | None = None
    #: The study's stored capacity was found equal to this sampler's.
    capacity_checked: bool = False
    #: The last fold state seen or written: (its stored JSON, the state, its score matrix).
    #: Reused while the study's stored fold state equals that JSON; never mutated.
    fold: tuple[Any, FoldState, NDArray[np.float64]] | None = None
    #: (score matrix, its example weights, its shared fitness) for the last matrix parents
    #: were drawn from (the matrix is read-only, so identity means the same archive).
    weights: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]] | None = None


class ArchiveFold:
    """Folds a study's finished trials into the archive and keeps this process's memo of it.

    Holds no state of its own that matters: the fold state lives in the study's system attrs
    (:data:`FOLD_KEY`), so any process on the storage can advance it. ``lock`` guards the
    per-study memos (:class:`StudyCache`), which the sampler shares for its plans.
    """

    def __init__(self, archive_size: int, alpha: float, capacity: NDArray[np.float64] | None):
        self._archive_size = archive_size
        self._alpha = alpha
        self._capacity = capacity
        self.lock = threading.Lock()
        self._caches: WeakKeyDictionary[BaseStorage, dict[int, StudyCache]] = WeakKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["lock"], state["_caches"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()
        self._caches = WeakKeyDictionary()

    def cache(self, study: Study) -> StudyCache:
        """Memo for one study (callers hold ``self.lock`` around mutations)."""
        per_storage = self._caches.get(study._storage)
        if per_storage is None:
            per_storage = self._caches.setdefault(study._storage, {})
        cache = per_storage.get(study._study_id)
        if cache is None:
            cache = per_storage.setdefault(study._study_id, StudyCache())
        return cache

    def warn_once(self, study: Study, key: str, message: str) -> None:
        with self.lock:
            warned = self.cache(study).warned
            if key in warned:
                return
            warned.add(key)
        _logger.warning(message)

    def advance(
        self, study: Study, current: int | None = None
    ) -> tuple[FoldState, NDArray[np.float64]]:
        """Read the fold state, fold the trials that finished since, store it if it moved.

        Returns the state and its ``archive_size x N`` score matrix (empty slots: zero rows).
        """
        storage, study_id = study._storage, study._study_id
        attrs = storage.get_study_system_attrs(study_id)
        stored = attrs.get(FOLD_KEY)
        with self.lock:
            memo = self.cache(study).fold
            capacity_checked = self.cache(study).capacity_checked
        if not capacity_checked:
            self._check_capacity(study, attrs)
        if memo is not None and (memo[0] is stored or memo[0] == stored):
            # The stored state is the one this process decoded or wrote last: reuse its
            # decoded form (copied, as the fold below changes it in place).
            state, matrix = memo[1].copy(), memo[2]
        else:
            if stored is None:
                state = FoldState(self._archive_size, self._alpha)
            else:
                state = FoldState.from_json(stored)
            if (state.archive_size, state.alpha) != (self._archive_size, self._alpha):
                raise ValueError(
                    f"this study's M2N2 archive was built with archive_size="
                    f"{state.archive_size}, alpha={state.alpha}; create the sampler with the "
                    "same values"
                )
            matrix = self._matrix(study, state)
        start = state.position
        while current is None or state.position < current:  # the current trial is unfinished
            try:
                trial_id = storage.get_trial_id_from_study_id_trial_number(
                    study_id, state.position
                )
            except KeyError:
                break
            trial = storage.get_trial(trial_id)
            if not trial.state.is_finished():
                if current is not None and current - state.position >= LAG_WARNING:
                    self.warn_once(
                        study,
                        "lag",
                        f"The M2N2 archive is stuck behind trial {state.position}, which is "
                        f"{trial.state.name}; if its worker died, mark it FAIL (RDBStorage "
                        "heartbeat_interval and grace_period do this automatically).",
                    )
                break
            if trial.state == TrialState.COMPLETE:
                matrix = self._fold(study, state, matrix, trial)
            elif trial.state == TrialState.PRUNED:
                self._note_pruned_seed(state, trial)
            state.position += 1
        if state.position > start:
            stored = state.to_json()
            storage.set_study_system_attr(study_id, FOLD_KEY, stored)
            with self.lock:
                rows = self.cache(study).rows
                if len(rows) > 2 * self._archive_size:
                    members = set(state.slots)
                    for number in [n for n in rows if n not in members]:
                        del rows[number]
        matrix.setflags(write=False)  # shared with the memo: the fold copies before writing
        with self.lock:
            self.cache(study).fold = (stored, state, matrix)
        return state, matrix

    def _check_capacity(self, study: Study, attrs: dict[str, Any]) -> None:
        """Store this sampler's capacity with a study that has none and no archive yet;
        otherwise refuse a capacity other than the study's (absent: all ones)."""
        stored = decode_scores(attrs, CAPACITY_KEY)
        if stored is None and self._capacity is not None and attrs.get(FOLD_KEY) is None:
            storage, study_id = study._storage, study._study_id
            for key, value in encode_scores(self._capacity, CAPACITY_KEY).items():
                storage.set_study_system_attr(study_id, key, value)
            stored = self._capacity
        mine = self._capacity
        if stored is None or mine is None:
            same = stored is None and mine is None
        else:
            same = bool(np.array_equal(stored, mine))
        if not same:
            raise ValueError(
                f"this study's M2N2 archive was built with capacity {describe_capacity(stored)}"
                f"; create the sampler with the same capacity, not {describe_capacity(mine)}"
            )
        with self.lock:
            self.cache(study).capacity_checked = True

    def _fold(
        self,
        study: Study,
        state: FoldState,
        matrix: NDArray[np.float64],
        trial: FrozenTrial,
    ) -> NDArray[np.float64]:
        """Apply one COMPLETE trial to the archive (in place); returns the score matrix."""
        scores = decode_scores(trial.system_attrs)
        if scores is None:
            self.warn_once(
                study,
                "no scores",
                f"Trial {trial.number} is COMPLETE without scores, so the M2N2 archive skips "
                "it (call sampler.set_scores(trial, scores) in the objective). Warned once.",
            )
            return matrix
        if state.n_examples is None:
            state.n_examples = int(scores.size)
            matrix = np.zeros((self._archive_size, scores.size))
        elif scores.size != state.n_examples:
            self.warn_once(
                study,
                f"length {trial.number}",
                f"Trial {trial.number} has {scores.size} scores, the archive {state.n_examples}"
                "; the archive skips it.",
            )
            return matrix
        plan = own_plan(trial.system_attrs, trial.number)
        seed = plan["seed"] if plan is not None and plan["role"] == "seed" else None
        slot = entry_slot(
            matrix, state.filled, scores, seed is not None, self._alpha, self._capacity
        )
        state.n_folded += 1
        if seed is not None and seed not in state.seeds:
            state.seeds.append(int(seed))
        if slot is not None:
            state.slots[slot] = trial.number
            matrix = matrix.copy()  # the old matrix may be shared (memo, other threads)
            matrix[slot] = scores
            scores.setflags(write=False)
            with self.lock:
                self.cache(study).rows[trial.number] = scores
        return matrix

    @staticmethod
    def _note_pruned_seed(state: FoldState, trial: FrozenTrial) -> None:
        """A PRUNED seed trial was evaluated and rejected (early rejection: it could not
        enter the full archive), so its seed is not issued again; it changes no slot."""
        plan = own_plan(trial.system_attrs, trial.number)
        if plan is not None and plan["role"] == "seed" and plan["seed"] not in state.seeds:
            state.seeds.append(int(plan["seed"]))

    def _matrix(self, study: Study, state: FoldState) -> NDArray[np.float64]:
        matrix = np.zeros((self._archive_size, state.n_examples or 0))
        for slot, number in enumerate(state.slots):
            if number is not None:
                matrix[slot] = self._member_scores(study, number)
        return matrix

    def _member_scores(self, study: Study, number: int) -> NDArray[np.float64]:
        with self.lock:
            row = self.cache(study).rows.get(number)
        if row is None:
            storage = study._storage
            trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
            row = decode_scores(storage.get_trial(trial_id).system_attrs)
            if row is None:
                raise RuntimeError(f"archive member trial {number} has no scores in storage")
            row.setflags(write=False)
            with self.lock:
                self.cache(study).rows[number] = row
        return row
