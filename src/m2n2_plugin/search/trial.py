"""One trial of ``m2n2 evolve``: one child, merged, scored, and kept if the archive takes it.

::

    sampler picks parents A, B (archive trial numbers), mix_ratio, split_point
      -> the m2n2 merge, tensor by tensor, straight into ONE resident model
         (:mod:`m2n2_plugin.merge.resident`: parents read lazily from their files, no parent or
         child state dict in memory)
      -> lm-eval scores every fitness document on that model (chunk by chunk, stopping as soon
         as the child provably cannot enter the archive: early rejection)
      -> sampler.set_scores(); the child's file is written only if it enters the archive.

What the run holds from one trial to the next is :class:`~m2n2_plugin.search.run_state.RunState`;
:class:`Run` adds the trial to it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
import optuna

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge.kernel import split_point_names
from m2n2_plugin.report.family_tree import SPLIT_POINT_ATTR
from m2n2_plugin.search.run_state import RunState
from m2n2_plugin.search.run_state import TrialTiming
from m2n2_plugin.search.run_state import write_error
from m2n2_plugin.search.workers import fold_up_to
from m2n2_plugin.search.workers import member_file

if TYPE_CHECKING:
    from m2n2_plugin.search.archive_store import EarlyUpload


def checked_scores(number: int, scores: Any, n: int) -> np.ndarray:
    """The fitness's scores for ``n`` documents as a vector, or a one-line M2N2Error.

    The sampler checks them too, but only once the whole vector is in (and learns the length
    from the first trial); early rejection feeds chunks to the archive's rule before that.
    """
    try:
        vector = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise M2N2Error(f"trial {number}: the fitness scores are not numbers ({exc})") from exc
    if vector.shape != (n,):
        raise M2N2Error(
            f"trial {number}: the fitness gave {vector.shape} scores for {n} fitness documents "
            "(one score per document expected)"
        )
    bad = np.flatnonzero(~(np.isfinite(vector) & (vector >= 0.0) & (vector <= 1.0)))
    if bad.size:
        raise M2N2Error(
            f"trial {number}: invalid fitness scores: scores must be finite and lie in [0, 1], "
            f"got {vector[bad[0]]} at index {bad[0]}"
        )
    return vector


class Run(RunState):
    """One ``m2n2 evolve`` process: its state (:class:`RunState`) and the trial."""

    # ----------------------------------------------------------------- one trial
    def objective(self, trial: optuna.Trial) -> float:
        from m2n2_plugin.merge.resident import merge_into_model
        from m2n2_plugin.merge.resident import save_child

        timing = TrialTiming()
        if self.store is not None:
            self.store.begin_trial()
        t0 = time.perf_counter()
        seed_index = self.sampler.seed_index(trial)
        parents = None if seed_index is not None else self.sampler.parents(trial)
        if parents is not None:
            mix_ratio = trial.suggest_float("mix_ratio", 0.0, 1.0)
            names = split_point_names(self.cfg.search.split_points)
            split_point = [trial.suggest_float(name, 0.0, 1.0) for name in names]
            if self.split_space is not None:
                # The draw is a place among the tensors that differ; the merge (and the
                # child's recipe) takes the model-wide split point.
                split_point = [self.split_space.split_point(p) for p in split_point]
                trial.set_user_attr(SPLIT_POINT_ATTR, split_point)
        timing.sampler += time.perf_counter() - t0

        # The child is merged tensor by tensor straight into the resident model, its parents
        # read lazily from their files (resident.py); a seed is read into it the same way.
        t0 = time.perf_counter()
        child = None
        if seed_index is not None:
            seed = self.seeds[seed_index]
            trial.set_user_attr("m2n2.seed", seed_index)
            trial.set_user_attr("m2n2.model", seed.name)
            self.load_seed(seed_index)
            timing.load = time.perf_counter() - t0
        else:
            a, b = parents
            trial.set_user_attr("m2n2.parents", [a, b])
            child = merge_into_model(
                self.model,
                self.member_path(a),
                self.member_path(b),
                mix_ratio=mix_ratio,
                split_point=split_point,
                granularity=self.cfg.search.granularity,
                dtype=self.merge_dtype,
                out_dtype=self.out_dtype,
                arch=self.arch,
                scratch=self.scratch,
            )
            timing.merge = time.perf_counter() - t0
            if self.store is not None:  # the parents' fetches: kept, whatever comes next
                self.store.record(trial)

        # search.upload_while_scoring: the child's save and upload run while it is scored.
        pending = None
        if child is not None and self.store is not None and self.cfg.search.upload_while_scoring:
            resident = child
            pending = self.store.upload_early(trial, lambda p: save_child(self.model, resident, p))
        try:
            # Early rejection for children, and for seeds past the first archive_size: those
            # find the archive full and enter only through the replacement rule, as a child does.
            early = parents is not None or seed_index >= self.cfg.search.archive_size
            t0 = time.perf_counter()
            try:
                if early and self.cfg.search.early_rejection:
                    scores = self.score_or_reject(trial)
                else:
                    scores = self.fitness.score(self.lm, self.fitness_docs)
            finally:
                timing.evaluate = time.perf_counter() - t0
                self.timings[trial.number] = timing
            t0 = time.perf_counter()
            # Scores first: they are validated there, so bad scores never lead to a saved file
            # (and they count only once the trial is COMPLETE).
            self.record_scores(trial, scores)
            timing.sampler += time.perf_counter() - t0
            if parents is not None:
                self.keep_child(trial, child, scores, timing, pending)
        except BaseException:
            if pending is not None:  # a failed or pruned trial keeps no child
                pending.drop()
            raise
        trial.set_user_attr("m2n2.docs_evaluated", len(scores))
        trial.set_user_attr("m2n2.timing", {k: round(v, 4) for k, v in vars(timing).items()})
        return float(scores.mean())

    def keep_child(
        self,
        trial: optuna.Trial,
        child: Any,
        scores: np.ndarray,
        timing: TrialTiming,
        pending: EarlyUpload | None,
    ) -> None:
        """Keep the child's weights only if the fold takes it in (exact with any number of
        workers); a child that is not kept never touches the disk (or, uploaded while it was
        scored, is removed again). The file -- and with a store, its object -- is in place
        before the trial is COMPLETE, so every member the fold admits has one."""
        from m2n2_plugin.merge.resident import save_child

        t0 = time.perf_counter()
        keep, displaced = self.admit(trial, scores)
        timing.wait = time.perf_counter() - t0
        if not keep or child is None:
            if pending is not None:
                pending.drop()
            return
        path = member_file(self.out, trial.number)
        t0 = time.perf_counter()
        try:
            if pending is not None:  # saved and uploaded already, or finishing
                pending.keep(path, displaced)
            else:
                save_child(self.model, child, path)
        except OSError as exc:  # a full disk, a quota: the file was not written
            raise write_error(path, exc) from exc
        timing.save = time.perf_counter() - t0
        if self.store is not None:  # before COMPLETE, like the file (archive_store.py)
            if pending is None:
                self.store.upload(trial, path, displaced)
            self.store.record(trial)

    def record_scores(self, trial: optuna.Trial, scores: np.ndarray) -> None:
        """Hand the scores to the sampler; a bad vector is a one-line error, not a traceback."""
        checked = checked_scores(trial.number, scores, len(self.fitness_docs))
        try:
            self.sampler.set_scores(trial, checked)
        except ValueError as exc:  # e.g. another length than the study's earlier trials
            raise M2N2Error(f"trial {trial.number}: invalid fitness scores: {exc}") from exc

    def admit(self, trial: optuna.Trial, scores: np.ndarray) -> tuple[bool, int | None]:
        """Whether the archive will take this child in when the fold reaches it, and the
        member it then displaces (None: it takes an empty slot, or is not taken).

        The fold applies trial ``n`` to the archive that all trials numbered below ``n`` left.
        With several workers some of them may still run, and one that finishes later can
        change that archive: deciding now could skip the file of a child the fold then admits
        (its parents' files would be missing later) or write one it never needs. So wait until
        every trial below ``n`` has finished -- the fold then stops exactly at ``n``, which is
        RUNNING -- and ask that archive. One worker never waits; N workers wait for at most
        N - 1 trials.
        """
        arch = self.fold_up_to(trial)
        slot = arch.entry_slot(scores)
        return (False, None) if slot is None else (True, arch.slots[slot])

    def fold_up_to(self, trial: optuna.Trial) -> Any:
        """The archive this trial will be folded into (:func:`workers.fold_up_to`)."""
        return fold_up_to(
            self.study,
            self.sampler,
            trial.number,
            heartbeat=bool(self.cfg.search.heartbeat_interval),
        )

    def score_or_reject(self, trial: optuna.Trial) -> np.ndarray:
        """Score a child chunk by chunk; prune it as soon as it provably cannot enter.

        The archive's rule is monotone for alpha in [0, 1]: solving one more document can only
        raise the child's shared fitness and lower every member's. So if the child would be
        dropped even when it solves every document not yet scored, it will be dropped anyway
        (:func:`m2n2_plugin.hub.can_enter`), and the archive is exactly what it would have been
        had the child been scored in full.

        Order: documents neither parent solves go first (a child mostly inherits its parents'
        failures, so that is where it is proven hopeless soonest), ties broken by how few
        archive members solve them. The benchmark (benchmarks/bench_early_rejection.py) found
        this order saves more than "rarest in the archive first".
        """
        from m2n2_plugin.hub import can_enter

        n = len(self.fitness_docs)
        arch = self.sampler.archive(self.study)
        slot_scores = arch.slot_scores
        rows = dict(zip(arch.members, arch.scores, strict=True))
        parents = self.sampler.parents(trial) or ()  # a seed has none
        parents_solve = sum((rows.get(p, np.zeros(n)) for p in parents), np.zeros(n))
        load = slot_scores.sum(axis=0)
        if arch.capacity is not None:  # worth most first: capacity / load, descending
            load = -arch.capacity / (load + 1.0)
        order = np.lexsort((load, parents_solve))
        batch = self.cfg.fitness.batch_size
        chunk = self.cfg.search.rejection_chunk or max(
            batch if isinstance(batch, int) else 8, -(-n // 8)
        )
        scores = np.zeros(n)
        evaluated = np.zeros(n, dtype=bool)
        for start in range(0, n, chunk):
            positions = np.sort(order[start : start + chunk])
            chunk_scores = self.fitness.score(self.lm, self.fitness_docs.subset(positions))
            scores[positions] = checked_scores(trial.number, chunk_scores, len(positions))
            evaluated[positions] = True
            done = int(evaluated.sum())
            alpha, capacity = self.cfg.search.alpha, arch.capacity
            if done < n and not can_enter(slot_scores, scores, evaluated, alpha, capacity):
                if arch.position < trial.number:
                    # Several workers: trials below this one were still running when `arch`
                    # was read. Decide on the archive this trial is folded into, or the
                    # rejection would not be exact (waiting is short: see Run.admit).
                    arch = self.fold_up_to(trial)
                    slot_scores = arch.slot_scores
                    if can_enter(slot_scores, scores, evaluated, alpha, capacity):
                        continue
                trial.set_user_attr("m2n2.docs_evaluated", done)
                trial.report(float(scores[evaluated].mean()), step=done)
                raise optuna.TrialPruned(f"cannot enter the archive ({done}/{n} documents)")
        return scores
