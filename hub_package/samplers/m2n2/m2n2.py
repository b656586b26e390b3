"""M2N2Sampler: Model Merging of Natural Niches (arXiv 2508.16204) as an Optuna sampler.

The sampler does not merge or evaluate anything. Per trial it decides a *plan* -- evaluate seed
``s``, or merge archive members A and B with ``mix_ratio`` and ``split_point`` -- and after the
objective reports the child's per-example scores (:meth:`M2N2Sampler.set_scores`) the archive
takes the child in by resource competition (:func:`.niches.replace_index`).

The archive is a fold over the study's trials kept in its storage (:mod:`.fold`): nothing in
this object is the source of truth, so a new process on the same storage resumes and workers on
one RDB storage share one archive.
"""

from __future__ import annotations

import time
from typing import Any
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.samplers import BaseSampler
from optuna.samplers import RandomSampler
from optuna.trial import FrozenTrial
from optuna.trial import Trial
from optuna.trial import TrialState

from ._state import encode_scores
from ._state import FoldState
from ._state import N_EXAMPLES_KEY
from ._state import own_plan
from ._state import PLAN_KEY
from ._state import SCORES_KEY
from .archive import Archive
from .archive import validate_capacity
from .archive import validate_scores
from .fold import ArchiveFold
from .niches import draw_parents
from .niches import example_weights
from .niches import shared_fitness


if TYPE_CHECKING:
    from collections.abc import Sequence

    from numpy.typing import ArrayLike
    from numpy.typing import NDArray
    from optuna.distributions import BaseDistribution
    from optuna.storages import BaseStorage
    from optuna.study import Study


_logger = optuna.logging.get_logger("optuna.m2n2")

MIX_RATIO = "mix_ratio"
SPLIT_POINT = "split_point"
#: The most split points per child (``split_points``).
MAX_SPLIT_POINTS = 4


def split_point_names(k: int) -> list[str]:
    """The parameter names of ``k`` split points: ``split_point``, ``split_point_2``, ..."""
    return [SPLIT_POINT] + [f"{SPLIT_POINT}_{i}" for i in range(2, k + 1)]


#: A trial whose predecessor has no plan yet waits at most this long for it (seconds).
_PLAN_TIMEOUT = 30.0


class M2N2Sampler(BaseSampler):
    """Model Merging of Natural Niches: an archive kept by resource competition and attraction.

    Each trial is either a *seed* (the objective evaluates initial model number
    :meth:`seed_index`, e.g. one model of a mergekit config or a random init) or a *child* of
    two archive members (:meth:`parents`) merged with ``trial.suggest_float("mix_ratio", 0, 1)``
    and ``trial.suggest_float("split_point", 0, 1)``. The objective reports the per-example
    scores with :meth:`set_scores`; its return value is not used (return the mean score).

    Args:
        archive_size: number of archive slots ``P`` (the paper: 20).
        alpha: sharing exponent; 1 is M2N2, 0 a plain GA by raw score.
        use_attraction: draw parent B by attraction (False: the paper's ablation, A and B
            i.i.d. by shared fitness).
        use_split_point: draw a split point (False: the ablation, ``split_point`` is 1.0, i.e.
            one ratio for every parameter).
        split_points: split points per child (1, the paper, to 4). With ``k > 1`` a child
            also has ``split_point_2`` .. ``split_point_k`` (suggest them like
            ``split_point``): the ratio alternates between ``mix_ratio`` and
            ``1 - mix_ratio`` from one split to the next (sorted), so one crossover can change
            more than two regions of the model.
        n_seeds: number of initial models, any number (more than ``archive_size`` too). Seeds
            are issued in index order, lowest free index first, one per trial, until each is
            COMPLETE, PRUNED or in flight; then every trial is a child. The first seeds to
            complete fill the empty slots; a seed that finds the archive full competes like a
            child (:func:`.niches.replace_index`). A FAILed seed trial (or a COMPLETE one
            without scores) is issued again; a PRUNED one counts as rejected and is not.
        seed: seed for the per-trial random streams (``default_rng([seed, trial.number])``), so
            one worker with the same seed draws the same plans, resumed or not.
        independent_sampler: samples every parameter other than ``mix_ratio`` and
            ``split_point``; default ``RandomSampler(seed)``.
        poll_interval: longest pause (seconds) between storage polls while a child waits for
            the first seed to finish.
        capacity: per-example weights ``c_j`` (positive, finite, one per fitness example) for
            shared fitness, attraction, replacement and early rejection; None (default) or all
            ones: every example weighs 1. Fixed for the study: stored with it by the first
            trial, and a sampler with another capacity is refused on that study.
    """

    def __init__(
        self,
        archive_size: int = 20,
        alpha: float = 1.0,
        use_attraction: bool = True,
        use_split_point: bool = True,
        n_seeds: int = 2,
        seed: int | None = None,
        *,
        independent_sampler: BaseSampler | None = None,
        poll_interval: float = 1.0,
        capacity: ArrayLike | None = None,
        split_points: int = 1,
    ) -> None:
        if int(archive_size) != archive_size or archive_size < 1:
            raise ValueError(f"archive_size must be a positive integer, got {archive_size!r}")
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if int(n_seeds) != n_seeds or n_seeds < 1:
            raise ValueError(f"n_seeds must be a positive integer, got {n_seeds!r}")
        if int(split_points) != split_points or not 1 <= split_points <= MAX_SPLIT_POINTS:
            raise ValueError(
                f"split_points must be an integer from 1 to {MAX_SPLIT_POINTS}, "
                f"got {split_points!r}"
            )
        if split_points > 1 and not use_split_point:
            raise ValueError("split_points > 1 needs use_split_point=True")
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        self._archive_size = int(archive_size)
        self._alpha = float(alpha)
        self._use_attraction = bool(use_attraction)
        self._use_split_point = bool(use_split_point)
        self._split_names = split_point_names(int(split_points))
        self._n_seeds = int(n_seeds)
        self._seed = seed
        self._independent_sampler = independent_sampler or RandomSampler(seed=seed)
        self._poll_interval = float(poll_interval)
        self._capacity = validate_capacity(capacity)
        #: The archive's fold over the study's trials, and the per-study memo of this process.
        self._archive_fold = ArchiveFold(self._archive_size, self._alpha, self._capacity)

    # ----------------------------------------------------------------- the objective's API

    def parents(self, trial: Trial | FrozenTrial) -> tuple[int, int] | None:
        """Trial numbers ``(A, B)`` of the archive members to merge, or None for a seed trial.

        ``A == B`` only when the archive holds a single member (or, with
        ``use_attraction=False``, when both i.i.d. draws hit the same member).
        """
        plan = self._plan_of(trial)
        if plan["role"] != "child":
            return None
        a, b = plan["parents"]
        return int(a), int(b)

    def seed_index(self, trial: Trial | FrozenTrial) -> int | None:
        """Which initial model (0 .. n_seeds - 1) the trial evaluates, or None for a child."""
        plan = self._plan_of(trial)
        return int(plan["seed"]) if plan["role"] == "seed" else None

    def set_scores(self, trial: Trial, scores: ArrayLike) -> None:
        """Store the trial's per-example scores; call it in the objective before returning.

        Raises:
            ValueError: ``scores`` is not a non-empty 1-D vector of finite numbers in [0, 1],
                or its length differs from the study's earlier score vectors.
        """
        if not isinstance(trial, Trial):
            raise TypeError(f"set_scores needs the running optuna.Trial, got {type(trial)}")
        vector = validate_scores(scores)
        if self._capacity is not None and vector.size != self._capacity.size:
            raise ValueError(
                f"scores has {vector.size} values, but the sampler's capacity has "
                f"{self._capacity.size} (one weight per fitness example)"
            )
        storage, study_id = trial.study._storage, trial.study._study_id
        with self._archive_fold.lock:
            n_examples = self._archive_fold.cache(trial.study).n_examples
        if n_examples is None:
            n_examples = storage.get_study_system_attrs(study_id).get(N_EXAMPLES_KEY)
            if n_examples is None:
                storage.set_study_system_attr(study_id, N_EXAMPLES_KEY, int(vector.size))
                n_examples = int(vector.size)
            with self._archive_fold.lock:  # fixed for the study once set
                self._archive_fold.cache(trial.study).n_examples = n_examples
        if vector.size != n_examples:
            raise ValueError(
                f"scores has {vector.size} values, but this study's score vectors have "
                f"{n_examples} (one per fitness example, the same examples for every trial)"
            )
        for key, value in encode_scores(vector).items():
            storage.set_trial_system_attr(trial._trial_id, key, value)

    def archive(self, study: Study) -> Archive:
        """The archive after folding every finished trial up to the first unfinished one."""
        state, matrix = self._archive_fold.advance(study)
        rows = [slot for slot, number in enumerate(state.slots) if number is not None]
        scores = matrix[rows].copy()
        scores.setflags(write=False)
        return Archive(
            members=[int(number) for number in state.slots if number is not None],
            scores=scores,
            slots=list(state.slots),
            n_folded=state.n_folded,
            position=state.position,
            alpha=self._alpha,
            capacity=self._capacity,
        )

    # ----------------------------------------------------------------- the sampler interface

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        if param_name != MIX_RATIO and param_name not in self._split_names:
            return self._independent_sampler.sample_independent(
                study, trial, param_name, param_distribution
            )
        if param_distribution != FloatDistribution(0.0, 1.0):
            raise ValueError(
                f"{param_name} is M2N2's; suggest it as trial.suggest_float({param_name!r}, "
                f"0.0, 1.0), got {param_distribution}"
            )
        return float(self._ensure_plan(study, trial)[param_name])

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._independent_sampler.before_trial(study, trial)
        try:
            if isinstance(trial.system_attrs.get(SCORES_KEY), str):
                # A retried trial inherits the failed one's attrs; its scores are not ours.
                study._storage.set_trial_system_attr(trial._trial_id, SCORES_KEY, None)
            self._make_plan(study, trial)
        except BaseException:
            # A trial left RUNNING would stop the fold for every worker: fail it.
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            raise

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        with self._archive_fold.lock:
            self._archive_fold.cache(study).plans.pop(trial._trial_id, None)
        self._independent_sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._independent_sampler.reseed_rng()

    # ----------------------------------------------------------------- plans

    def _rng(self, number: int) -> np.random.Generator:
        if self._seed is None:
            return np.random.default_rng()
        return np.random.default_rng([self._seed, number])

    def _make_plan(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        """Decide the trial's role and draws once, and store them in the trial's system attrs.

        Draw order from the trial's stream: A, B (children only), mix_ratio, split_point, and
        then any further split points.
        """
        storage = study._storage
        state, matrix = self._archive_fold.advance(study, trial.number)
        seed = self._free_seed(study, state, trial.number)
        rng = self._rng(trial.number)
        plan: dict[str, Any] = {"trial": trial.number, "role": "seed", "seed": seed}
        if seed is None:
            plan["role"] = "child"
            if not state.filled.any():
                # Tell later trials this one is no seed before waiting for one to finish.
                storage.set_trial_system_attr(trial._trial_id, PLAN_KEY, plan | {"parents": None})
                state, matrix = self._wait_for_member(study, trial.number)
            with self._archive_fold.lock:
                memo = self._archive_fold.cache(study).weights
            if memo is not None and memo[0] is matrix:
                _, weights, fitness = memo  # the archive did not change since the last draw
            else:
                weights = example_weights(matrix, self._alpha, self._capacity)
                fitness = shared_fitness(matrix, self._alpha, self._capacity)
                with self._archive_fold.lock:
                    self._archive_fold.cache(study).weights = (matrix, weights, fitness)
            a, b = draw_parents(
                matrix,
                rng,
                self._alpha,
                self._capacity,
                filled=state.filled,
                use_attraction=self._use_attraction,
                weights=weights,
                fitness=fitness,
            )
            plan["parents"] = [state.slots[a], state.slots[b]]
        else:
            plan["parents"] = None
        plan[MIX_RATIO] = float(rng.random())
        plan[SPLIT_POINT] = float(rng.random()) if self._use_split_point else 1.0
        for name in self._split_names[1:]:
            plan[name] = float(rng.random())
        storage.set_trial_system_attr(trial._trial_id, PLAN_KEY, plan)
        with self._archive_fold.lock:
            self._archive_fold.cache(study).plans[trial._trial_id] = plan
        return plan

    def _ensure_plan(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        with self._archive_fold.lock:
            plan = self._archive_fold.cache(study).plans.get(trial._trial_id)
        if plan is None:
            fresh = study._storage.get_trial(trial._trial_id)
            plan = own_plan(fresh.system_attrs, fresh.number)
            if plan is None:  # a trial created without before_trial (storage-level tests)
                plan = self._make_plan(study, fresh)
        return plan

    def _plan_of(self, trial: Trial | FrozenTrial) -> dict[str, Any]:
        if isinstance(trial, Trial):
            with self._archive_fold.lock:
                plan = self._archive_fold.cache(trial.study).plans.get(trial._trial_id)
            if plan is None:
                attrs = trial.study._storage.get_trial(trial._trial_id).system_attrs
                plan = own_plan(attrs, trial.number)
        elif isinstance(trial, FrozenTrial):
            plan = own_plan(trial.system_attrs, trial.number)
        else:
            raise TypeError(f"expected an optuna.Trial or FrozenTrial, got {type(trial)}")
        if plan is None or (plan["role"] == "child" and plan.get("parents") is None):
            raise ValueError(
                f"trial {trial.number} has no M2N2 plan: it did not start in a study whose "
                "sampler is an M2N2Sampler"
            )
        return plan

    def _free_seed(self, study: Study, state: FoldState, number: int) -> int | None:
        """The lowest seed index neither folded as COMPLETE nor held by an unfolded trial.

        Only the un-folded tail (trial numbers from the fold position up to ``number``) is
        read, in order, so two trials never take the same seed: a trial waits for the plan of
        a RUNNING predecessor that has none yet (it is being planned right now).
        """
        taken = {s for s in state.seeds if s < self._n_seeds}
        if len(taken) == self._n_seeds:
            return None
        storage, study_id = study._storage, study._study_id
        for k in range(state.position, number):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, k)
            trial = storage.get_trial(trial_id)
            if trial.state not in (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED):
                continue  # FAIL: its seed is free again; WAITING: not planned
            plan = own_plan(trial.system_attrs, k)
            if plan is None and trial.state == TrialState.RUNNING:
                plan = self._await_plan(storage, trial_id, k)
            if plan is not None and plan["role"] == "seed":
                taken.add(int(plan["seed"]))
        free = [s for s in range(self._n_seeds) if s not in taken]
        return free[0] if free else None

    def _await_plan(
        self, storage: BaseStorage, trial_id: int, number: int
    ) -> dict[str, Any] | None:
        deadline = time.monotonic() + _PLAN_TIMEOUT
        pause = 0.005
        while time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(2 * pause, 0.1)
            trial = storage.get_trial(trial_id)
            plan = own_plan(trial.system_attrs, number)
            if plan is not None or trial.state != TrialState.RUNNING:
                return plan
        _logger.warning(
            f"Trial {number} is RUNNING without an M2N2 plan after {_PLAN_TIMEOUT:.0f} s; "
            "treating it as a child."
        )
        return None

    def _wait_for_member(self, study: Study, number: int) -> tuple[FoldState, NDArray[np.float64]]:
        """Poll until a seed has entered the archive: a child needs at least one parent."""
        pause = 0.01
        while True:
            state, matrix = self._archive_fold.advance(study)
            if state.filled.any():
                return state, matrix
            self._archive_fold.warn_once(
                study,
                "wait",
                f"Trial {number} is a child but no seed has finished yet; it waits for one "
                f"(trials from {state.position} on). With ask-and-tell, tell the seed trials "
                "before asking for more; a seed trial whose worker died stays RUNNING until it "
                "is marked FAIL (RDBStorage heartbeat_interval).",
            )
            time.sleep(pause)
            pause = min(2 * pause, self._poll_interval)
