"""``m2n2 evolve``: seeds from a mergekit config, fitness from lm-eval, search by M2N2Sampler.

One trial = one child::

    sampler picks parents A, B (archive trial numbers), mix_ratio, split_point
      -> the m2n2 merge, tensor by tensor, straight into ONE resident model (resident.py:
         parents read lazily from their files, no parent or child state dict in memory)
      -> lm-eval scores every fitness document on that model
      -> sampler.set_scores(); the child's file is written only if it enters the archive.

The Optuna study (SQLite in the output folder by default) is the state: rerunning the same
command resumes it. Archive members that are children live in ``<out>/archive/`` as
safetensors (written atomically, deleted when evicted); seeds stay where they are. What a run
holds between trials (the study, the members' files, the outputs) is :mod:`m2n2_plugin.run_state`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from m2n2_plugin import tracking
from m2n2_plugin.config import EvolveConfig
from m2n2_plugin.config import load_config
from m2n2_plugin.config import load_yaml
from m2n2_plugin.config import with_device
from m2n2_plugin.devices import resolve_device
from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.fitness import benchmark_warning
from m2n2_plugin.fitness import hflm_model_args
from m2n2_plugin.fitness import load_fitness
from m2n2_plugin.layout import Architecture
from m2n2_plugin.models import check_compatible
from m2n2_plugin.models import check_tokenizers
from m2n2_plugin.models import config_merge_seed
from m2n2_plugin.models import seeds_from_mergekit
from m2n2_plugin.models import write_config_merge
from m2n2_plugin.run_state import DONE_STATES
from m2n2_plugin.run_state import RunState
from m2n2_plugin.run_state import TrialTiming
from m2n2_plugin.run_state import count_done
from m2n2_plugin.run_state import fingerprint
from m2n2_plugin.run_state import open_study
from m2n2_plugin.run_state import output_folder
from m2n2_plugin.run_state import write_error
from m2n2_plugin.weights import FINGERPRINT_KEY
from m2n2_plugin.weights import STUDY_ATTR
from m2n2_plugin.weights import FitnessWeights
from m2n2_plugin.weights import resume_hint
from m2n2_plugin.workers import MemberEvicted
from m2n2_plugin.workers import fail_dead_trials
from m2n2_plugin.workers import fold_up_to
from m2n2_plugin.workers import member_file
from m2n2_plugin.workers import write_outputs_locked

LOG = logging.getLogger("m2n2")

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


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
        from m2n2_plugin.resident import merge_into_model
        from m2n2_plugin.resident import save_child

        timing = TrialTiming()
        t0 = time.perf_counter()
        seed_index = self.sampler.seed_index(trial)
        parents = None if seed_index is not None else self.sampler.parents(trial)
        if parents is not None:
            mix_ratio = trial.suggest_float("mix_ratio", 0.0, 1.0)
            split_point = trial.suggest_float("split_point", 0.0, 1.0)
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
            )
            timing.merge = time.perf_counter() - t0

        t0 = time.perf_counter()
        # Early rejection for children, and for seeds past the first archive_size: those find
        # the archive full and enter only through the replacement rule, as a child does.
        early = parents is not None or seed_index >= self.cfg.search.archive_size
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
            t0 = time.perf_counter()
            # Keep the child's weights only if the fold takes it in (exact with any number of
            # workers); a child that is not kept never touches the disk. The file is in place
            # before the trial is COMPLETE, so every member the fold admits has one.
            keep = self.admit(trial, scores)
            timing.wait = time.perf_counter() - t0
            if keep and child is not None:
                t0 = time.perf_counter()
                path = member_file(self.out, trial.number)
                try:
                    save_child(self.model, child, path)
                except OSError as exc:  # a full disk, a quota: the file was not written
                    raise write_error(path, exc) from exc
                timing.save = time.perf_counter() - t0
        trial.set_user_attr("m2n2.docs_evaluated", len(scores))
        trial.set_user_attr("m2n2.timing", {k: round(v, 4) for k, v in vars(timing).items()})
        return float(scores.mean())

    def record_scores(self, trial: optuna.Trial, scores: np.ndarray) -> None:
        """Hand the scores to the sampler; a bad vector is a one-line error, not a traceback."""
        checked = checked_scores(trial.number, scores, len(self.fitness_docs))
        try:
            self.sampler.set_scores(trial, checked)
        except ValueError as exc:  # e.g. another length than the study's earlier trials
            raise M2N2Error(f"trial {trial.number}: invalid fitness scores: {exc}") from exc

    def admit(self, trial: optuna.Trial, scores: np.ndarray) -> bool:
        """Whether the archive will take this child in when the fold reaches it.

        The fold applies trial ``n`` to the archive that all trials numbered below ``n`` left.
        With several workers some of them may still run, and one that finishes later can
        change that archive: deciding now could skip the file of a child the fold then admits
        (its parents' files would be missing later) or write one it never needs. So wait until
        every trial below ``n`` has finished -- the fold then stops exactly at ``n``, which is
        RUNNING -- and ask that archive. One worker never waits; N workers wait for at most
        N - 1 trials.
        """
        return self.fold_up_to(trial).entry_slot(scores) is not None

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


def _prepare_or_clean(cfg: EvolveConfig, output_dir: str | Path | None) -> Run:
    """``prepare``; if it fails after creating the output folder, remove that folder again.

    A failed first start (e.g. a storage that cannot be reached) must not leave an empty
    folder behind. Only an empty folder this call created is removed (``rmdir`` refuses any
    other), so a folder another worker has started to use is left alone. A study created
    before the failure holds no trial and takes the corrected config (see ``prepare``).
    """
    out = output_folder(cfg, output_dir)
    fresh = not out.exists()
    try:
        return prepare(cfg, output_dir)
    except BaseException:
        if fresh:
            try:
                out.rmdir()
            except OSError:
                pass
        raise


class _OneLineErrors(logging.Filter):
    """Drop Optuna's "Trial N failed" traceback for an M2N2Error: the CLI prints its one line.

    A trial that fails on bad input (invalid scores, a broken task) stops the run with
    ``m2n2: error: ...``; Optuna would first log the same error with a full traceback, then
    "Trial N failed with value None." (both records are dropped).
    """

    def __init__(self) -> None:
        super().__init__()
        self._next: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, M2N2Error) and not isinstance(exc, MemberEvicted):
            number = record.getMessage().split()[1]
            self._next = f"Trial {number} failed with value"
            return False
        if self._next is not None and record.getMessage().startswith(self._next):
            self._next = None
            return False
        return True


def prepare(cfg: EvolveConfig, output_dir: str | Path | None = None) -> Run:
    """Validate everything that can be checked before the first trial, then open the study."""
    from transformers import AutoConfig
    from transformers import AutoTokenizer

    from m2n2_plugin.hub import M2N2Sampler
    from m2n2_plugin.resident import build_resident_model

    # First, before anything is read or written: a device this machine does not have.
    device = resolve_device(cfg.fitness.device)
    model_args = hflm_model_args(cfg.fitness.model_args)
    out = output_folder(cfg, output_dir)

    # Seeds: an existing mergekit config, used as-is.
    if isinstance(cfg.mergekit_config, str):
        mk_path = cfg.resolve(cfg.mergekit_config)
        mk_data = load_yaml(mk_path, "mergekit_config")
        mk_dir = mk_path.resolve().parent
    else:
        mk_data, mk_dir = cfg.mergekit_config, cfg.base_dir
    if not isinstance(mk_data, dict):
        raise M2N2Error("mergekit_config must be a mergekit YAML mapping")
    # Any number of seeds: past archive_size they compete for the slots (the sampler's
    # Seeds section), so the search, not the user, decides which fine-tunes stay.
    seeds, carried = seeds_from_mergekit(mk_data, mk_dir)
    check_compatible(seeds)
    check_tokenizers(seeds)
    if cfg.search.seed_config_merge:  # merged below, into the output folder
        seeds.append(config_merge_seed(mk_data, mk_dir, out))

    # Fitness: tasks loaded once; documents resolved to explicit ids.
    fc = cfg.fitness
    if fc.num_threads is not None:
        torch.set_num_threads(fc.num_threads)
    fitness, fitness_docs, heldout_docs = load_fitness(cfg)
    weights = FitnessWeights.from_config(fc.weighting, fc.task_weights, fitness_docs, fitness)

    # The output folder and the study.
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per worker: they start together
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise M2N2Error(f"output folder {str(out)!r} is not writable ({exc.strerror})") from exc
    if cfg.search.seed_config_merge:  # before the study: a merge that fails leaves nothing
        try:
            write_config_merge(seeds[-1], str(device))
        except OSError as exc:
            raise write_error(Path(exc.filename or seeds[-1].path), exc) from exc
        check_compatible([seeds[0], seeds[-1]])
        check_tokenizers([seeds[0], seeds[-1]])
    sampler = M2N2Sampler(
        archive_size=cfg.search.archive_size,
        alpha=cfg.search.alpha,
        use_attraction=cfg.search.use_attraction,
        use_split_point=cfg.search.use_split_point,
        n_seeds=len(seeds),
        seed=cfg.search.seed,
        capacity=weights.capacity,
    )
    study = open_study(cfg, out, sampler)
    fp = fingerprint(cfg, seeds, fitness_docs)
    if weights.capacity is not None:  # absent when uniform: as in studies made before it
        fp[FINGERPRINT_KEY] = weights.fingerprint()
    old = study.user_attrs.get("m2n2.fingerprint")
    # A study without trials (a start that failed after creating it) takes the new config.
    if old is None or not study.get_trials(deepcopy=False):
        study.set_user_attr("m2n2.fingerprint", fp)
        study.set_user_attr("m2n2.fitness_labels", fitness_docs.labels())
        study.set_user_attr("m2n2.generation_settings", fitness.generation_settings())
        study.set_user_attr("m2n2.seeds", [[s.name, str(s.path)] for s in seeds])
        study.set_user_attr(STUDY_ATTR, weights.to_json())
        # Said once at start (below) and carried into the model card (report.Settings).
        warning = benchmark_warning({t: fitness.task(t) for t in fitness_docs.ids})
        study.set_user_attr("m2n2.benchmark_warning", warning)
        if warning:
            LOG.warning("m2n2: warning: %s", warning)
    elif old != fp:
        changed = next((k for k in fp if fp[k] != old.get(k)), FINGERPRINT_KEY)
        hint = resume_hint(old.get(changed), fp.get(changed)) if changed == FINGERPRINT_KEY else ""
        raise M2N2Error(
            f"{out} holds a study with a different {changed!r}; use another output_dir "
            f"(or the same config) to resume{hint}"
        )

    # The resident evaluation model: built once, its tensors replaced for every trial.
    dtype_name = fc.dtype or carried.get("out_dtype") or carried.get("dtype") or "float32"
    eval_dtype = DTYPES[dtype_name]
    tok_src = carried.get("tokenizer_source")
    tok_path = tok_src if tok_src not in (None, "base", "union") else None
    tok_path = tok_path or carried.get("base_model") or str(seeds[0].path)
    hf_config = AutoConfig.from_pretrained(seeds[0].path)
    merge_dtype = DTYPES.get(carried.get("dtype", ""))
    # On the device, no random init, holding the first seed (evaluated first anyway).
    model = build_resident_model(
        hf_config, seeds[0].path, dtype=eval_dtype, device=device, weights_dtype=merge_dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    from lm_eval.models.huggingface import HFLM

    # HFLM keeps a model object where it is (it reads ``model.device``): hence the build above.
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=fc.batch_size,
        device=str(device),
        **model_args,
    )
    run = Run(
        cfg=cfg,
        out=out,
        seeds=seeds,
        carried=carried,
        fitness=fitness,
        fitness_docs=fitness_docs,
        heldout_docs=heldout_docs,
        study=study,
        sampler=sampler,
        model=lm.model,
        tokenizer=tokenizer,
        lm=lm,
        merge_dtype=merge_dtype,
        out_dtype=DTYPES.get(carried.get("out_dtype") or carried.get("dtype", "")),
        arch=Architecture.for_config(hf_config),
        fitness_weights=weights,
    )
    return run


def evolve(
    config: EvolveConfig | str | Path,
    output_dir: str | Path | None = None,
    n_trials: int | None = None,
    progress: bool = True,
    on_trial: Callable[[Run, optuna.trial.FrozenTrial], None] | None = None,
    device: str | None = None,
) -> Run:
    """Run (or resume) an M2N2 evolution; returns the :class:`Run` after writing the outputs.

    ``n_trials`` overrides ``search.n_trials``: the study's total number of finished trials,
    so rerunning after an interruption runs only what is missing. ``device`` overrides
    ``fitness.device`` (``m2n2 evolve --device``): workers of one study on one machine can
    each take their own GPU; the device is not part of the study's fingerprint.
    """
    from tqdm.auto import tqdm

    cfg = config if isinstance(config, EvolveConfig) else load_config(config)
    if device is not None:
        cfg = with_device(cfg, device)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optimize_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _OneLineErrors) for f in optimize_log.filters):
        optimize_log.addFilter(_OneLineErrors())
    tracking.require(cfg)  # a missing MLflow / W&B package: one line, before anything is written
    run = _prepare_or_clean(cfg, output_dir)
    # What a killed worker left: its trial is failed once the heartbeat is stale, then the
    # child file it saved and any temp file are deleted; live workers' files are kept.
    fail_dead_trials(run.study)
    run.sync_files()
    run.check_member_files()
    tracker = tracking.start(cfg, run.study, run.out, lambda: run.sampler.archive(run.study))
    total = n_trials or cfg.search.n_trials
    done = count_done(run.study)
    bar = tqdm(
        total=total,
        initial=min(done, total),
        desc="m2n2",
        unit="trial",
        disable=not progress,
        dynamic_ncols=True,
    )

    def after(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        arch = run.sync_files()
        line, record = run.log_trial(frozen, arch)
        bar.update(1)
        bar.set_postfix(best=f"{record['archive_best']:.3f}", coverage=f"{record['coverage']:.3f}")
        if progress:
            bar.write(line)
        if on_trial is not None:
            on_trial(run, frozen)

    remaining = max(0, total - done)
    # ``total`` is the study's budget, shared by every worker: each stops once the study has
    # that many finished trials (trials already running elsewhere still finish).
    budget = optuna.study.MaxTrialsCallback(total, states=DONE_STATES)
    try:
        if remaining:
            run.study.optimize(
                run.objective,
                n_trials=remaining,
                callbacks=[after, *tracker.callbacks, budget],
                catch=(MemberEvicted,),
            )
    finally:
        bar.close()
    run.sync_files()
    try:
        write_outputs_locked(run.out, run.write_outputs)
    except OSError as exc:  # best/ is written beside the old one, then swapped in
        raise write_error(Path(exc.filename or run.out), exc) from exc
    tracker.finish()  # M2N2's best into the study, dashboard plots, tracking summary
    return run
