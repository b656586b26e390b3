"""``m2n2 evolve``: seeds from a mergekit config, fitness from lm-eval, search by M2N2Sampler.

One trial = one child::

    sampler picks parents A, B (archive trial numbers), mix_ratio, split_point
      -> the m2n2 merge (in memory, no disk round-trip)
      -> the child's tensors are copied into ONE resident model
      -> lm-eval scores every fitness document on that model
      -> sampler.set_scores(); the child's file is written only if it enters the archive.

The Optuna study (SQLite in the output folder by default) is the state: rerunning the same
command resumes it. Archive members that are children live in ``<out>/archive/`` as
safetensors (written atomically, deleted when evicted); seeds stay where they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from m2n2_plugin.config import EvolveConfig
from m2n2_plugin.config import load_config
from m2n2_plugin.config import load_yaml
from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.fitness import DocSet
from m2n2_plugin.fitness import LmEvalFitness
from m2n2_plugin.fitness import resolve_doc_ids
from m2n2_plugin.models import Seed
from m2n2_plugin.models import check_compatible
from m2n2_plugin.models import read_tensors
from m2n2_plugin.models import save_tensors_atomic
from m2n2_plugin.models import seeds_from_mergekit

LOG = logging.getLogger("m2n2")

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def member_file(out: Path, number: int) -> Path:
    """Where the archive member made by trial ``number`` is stored."""
    return out / "archive" / f"trial_{number:06d}.safetensors"


@dataclass
class TrialTiming:
    """Seconds spent per phase of one trial (also stored in the trial's user attrs)."""

    merge: float = 0.0
    load: float = 0.0
    evaluate: float = 0.0
    save: float = 0.0
    sampler: float = 0.0


@dataclass
class Run:
    """Everything one ``m2n2 evolve`` process holds: config, seeds, study, resident model."""

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
    _seed_cache: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    _tied: set[str] = field(default_factory=set)

    # ----------------------------------------------------------------- archive helpers
    def trial_attrs(self, number: int) -> dict[str, Any]:
        storage = self.study._storage
        tid = storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        return storage.get_trial(tid).user_attrs

    def member_tensors(self, number: int) -> dict[str, torch.Tensor]:
        """The tensors of archive member ``number`` (a seed's own files, or our copy)."""
        attrs = self.trial_attrs(number)
        if "m2n2.seed" in attrs:
            return self.seed_tensors(int(attrs["m2n2.seed"]))
        path = member_file(self.out, number)
        if not path.is_file():
            raise M2N2Error(
                f"archive member trial {number} has no file {path}: the output folder and the "
                "study disagree (was the folder edited, or another storage used?)"
            )
        return read_tensors(path)

    def seed_tensors(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._seed_cache:
            tensors = read_tensors(self.seeds[index].path)
            if self.merge_dtype is not None:
                tensors = {k: v.to(self.merge_dtype) for k, v in tensors.items()}
            # Seeds are read often (every child of a seed); keep the two most recent.
            if len(self._seed_cache) >= 2:
                self._seed_cache.pop(next(iter(self._seed_cache)))
            self._seed_cache[index] = tensors
        return self._seed_cache[index]

    def load_into_model(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a state dict into the resident evaluation model, in place."""
        params = self.model.state_dict()
        with torch.no_grad():
            for name, value in tensors.items():
                if name not in params:
                    raise M2N2Error(f"tensor {name!r} does not belong to the model")
                params[name].copy_(value)
        missing = set(params) - set(tensors) - self._tied
        if missing:
            raise M2N2Error(f"the merged model lacks tensor {sorted(missing)[0]!r}")

    # ----------------------------------------------------------------- one trial
    def objective(self, trial: optuna.Trial) -> float:
        from m2n2_plugin.merge_method import m2n2_merge_state_dicts

        timing = TrialTiming()
        t0 = time.perf_counter()
        seed_index = self.sampler.seed_index(trial)
        parents = None if seed_index is not None else self.sampler.parents(trial)
        if parents is not None:
            mix_ratio = trial.suggest_float("mix_ratio", 0.0, 1.0)
            split_point = trial.suggest_float("split_point", 0.0, 1.0)
        timing.sampler += time.perf_counter() - t0

        t0 = time.perf_counter()
        if seed_index is not None:
            seed = self.seeds[seed_index]
            trial.set_user_attr("m2n2.seed", seed_index)
            trial.set_user_attr("m2n2.model", seed.name)
            tensors = self.seed_tensors(seed_index)
        else:
            a, b = parents
            trial.set_user_attr("m2n2.parents", [a, b])
            tensors = m2n2_merge_state_dicts(
                self.member_tensors(a),
                self.member_tensors(b),
                mix_ratio=mix_ratio,
                split_point=split_point,
                config=self.model.config,
                granularity=self.cfg.search.granularity,
            )
            if self.out_dtype is not None:
                tensors = {k: v.to(self.out_dtype) for k, v in tensors.items()}
        timing.merge = time.perf_counter() - t0

        t0 = time.perf_counter()
        self.load_into_model(tensors)
        timing.load = time.perf_counter() - t0

        t0 = time.perf_counter()
        try:
            if parents is not None and self.cfg.search.early_rejection:
                scores = self.score_or_reject(trial)
            else:
                scores = self.fitness.score(self.lm, self.fitness_docs)
        finally:
            timing.evaluate = time.perf_counter() - t0
            self.timings[trial.number] = timing

        if parents is not None:
            t0 = time.perf_counter()
            # Keep the child's weights only if it enters the archive (exact with one worker;
            # see Archive.entry_slot). A child that is not kept never touches the disk.
            slot = self.sampler.archive(self.study).entry_slot(scores)
            timing.sampler += time.perf_counter() - t0
            if slot is not None:
                t0 = time.perf_counter()
                save_tensors_atomic(tensors, member_file(self.out, trial.number))
                timing.save = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.sampler.set_scores(trial, scores)
        timing.sampler += time.perf_counter() - t0
        trial.set_user_attr("m2n2.docs_evaluated", len(scores))
        trial.set_user_attr("m2n2.timing", {k: round(v, 4) for k, v in vars(timing).items()})
        return float(scores.mean())

    def score_or_reject(self, trial: optuna.Trial) -> np.ndarray:
        """Score a child chunk by chunk; prune it as soon as it provably cannot enter.

        The archive's rule is monotone for alpha in [0, 1]: solving one more document can only
        raise the child's shared fitness and lower every member's. So if the child would be
        dropped even when it solves every document not yet scored, it will be dropped anyway
        (:func:`m2n2_plugin.hub.can_enter`), and the archive is exactly what it would have been
        had the child been scored in full. Documents the archive solves least go first: they
        are the ones a child must win to enter.
        """
        from m2n2_plugin.hub import can_enter

        n = len(self.fitness_docs)
        arch = self.sampler.archive(self.study)
        slot_scores = arch.slot_scores
        order = np.argsort(slot_scores.sum(axis=0), kind="stable")
        batch = self.cfg.fitness.batch_size
        chunk = self.cfg.search.rejection_chunk or max(
            batch if isinstance(batch, int) else 8, -(-n // 8)
        )
        scores = np.zeros(n)
        evaluated = np.zeros(n, dtype=bool)
        for start in range(0, n, chunk):
            positions = np.sort(order[start : start + chunk])
            scores[positions] = self.fitness.score(self.lm, self.fitness_docs.subset(positions))
            evaluated[positions] = True
            done = int(evaluated.sum())
            if done < n and not can_enter(slot_scores, scores, evaluated, self.cfg.search.alpha):
                trial.set_user_attr("m2n2.docs_evaluated", done)
                trial.report(float(scores[evaluated].mean()), step=done)
                raise optuna.TrialPruned(f"cannot enter the archive ({done}/{n} documents)")
        return scores

    # ----------------------------------------------------------------- bookkeeping
    def sync_files(self) -> Any:
        """Delete files of trials that left (or never entered) the archive; return it.

        Only trials the fold has passed are touched, so a file another worker has just
        written for a trial not yet folded is never deleted.
        """
        arch = self.sampler.archive(self.study)
        keep = set(arch.members)
        folder = self.out / "archive"
        if folder.is_dir():
            for f in folder.glob("trial_*.safetensors"):
                number = int(f.stem.split("_")[1])
                if number < arch.position and number not in keep:
                    f.unlink(missing_ok=True)
        return arch


def _fingerprint(cfg: EvolveConfig, seeds: list[Seed], fitness: DocSet) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    # Settings that do not change the archive may differ between a run and its resumption.
    search = cfg.search.model_dump(
        exclude={"n_trials", "storage", "heartbeat_interval", "early_rejection", "rejection_chunk"}
    )
    return {
        "seeds": [str(s.path) for s in seeds],
        "tasks": cfg.fitness.tasks,
        "metric": cfg.fitness.metric,
        "filter": cfg.fitness.filter,
        "fitness_docs": hashlib.sha1(json.dumps(fitness.ids).encode()).hexdigest(),
        "search": search,
    }


def _open_study(cfg: EvolveConfig, out: Path, sampler: Any) -> optuna.Study:
    url = cfg.search.storage or f"sqlite:///{out / 'study.db'}"
    try:
        storage = optuna.storages.RDBStorage(
            url,
            heartbeat_interval=cfg.search.heartbeat_interval,
            grace_period=None
            if cfg.search.heartbeat_interval is None
            else 2 * cfg.search.heartbeat_interval,
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
        )
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


def prepare(cfg: EvolveConfig, output_dir: str | Path | None = None) -> Run:
    """Validate everything that can be checked before the first trial, then open the study."""
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    from m2n2_plugin.hub import M2N2Sampler

    out = Path(output_dir or cfg.output_dir or "m2n2-out")
    if not out.is_absolute():
        out = (Path.cwd() / out) if output_dir else cfg.resolve(str(out))

    # Seeds: an existing mergekit config, used as-is.
    if isinstance(cfg.mergekit_config, str):
        mk_path = cfg.resolve(cfg.mergekit_config)
        mk_data = load_yaml(mk_path, "mergekit_config")
        mk_dir = mk_path.resolve().parent
    else:
        mk_data, mk_dir = cfg.mergekit_config, cfg.base_dir
    if not isinstance(mk_data, dict):
        raise M2N2Error("mergekit_config must be a mergekit YAML mapping")
    seeds, carried = seeds_from_mergekit(mk_data, mk_dir)
    if len(seeds) > cfg.search.archive_size:
        raise M2N2Error(
            f"the mergekit config names {len(seeds)} models but archive_size is "
            f"{cfg.search.archive_size}"
        )
    check_compatible(seeds)

    # Fitness: tasks loaded once; documents resolved to explicit ids.
    fc = cfg.fitness
    if fc.num_threads is not None:
        torch.set_num_threads(fc.num_threads)
    fitness = LmEvalFitness(
        fc.tasks,
        metric=fc.metric,
        filter=fc.filter,
        include_path=str(cfg.resolve(fc.include_path)) if fc.include_path else None,
        include_defaults=fc.include_defaults,
        num_fewshot=fc.num_fewshot,
        gen_kwargs=fc.gen_kwargs,
        apply_chat_template=fc.apply_chat_template,
        system_instruction=fc.system_instruction,
        fewshot_as_multiturn=fc.fewshot_as_multiturn,
    )
    fit_ids = resolve_doc_ids(fc.fitness_docs, fc.tasks, fitness.sizes, "fitness")
    if not fit_ids:
        raise M2N2Error("the fitness set is empty")
    ends = {t: (max(ids) + 1 if ids else 0) for t, ids in fit_ids.items()}
    held_ids = resolve_doc_ids(fc.heldout_docs, fc.tasks, fitness.sizes, "heldout", start=ends)
    for task, ids in held_ids.items():
        overlap = set(ids) & set(fit_ids.get(task, []))
        if overlap:
            raise M2N2Error(
                f"held-out document {min(overlap)} of task {task!r} is also a fitness document"
            )
    fitness_docs, heldout_docs = DocSet(fit_ids), DocSet(held_ids)

    # The output folder and the study.
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise M2N2Error(f"output folder {str(out)!r} is not writable ({exc.strerror})") from exc
    sampler = M2N2Sampler(
        archive_size=cfg.search.archive_size,
        alpha=cfg.search.alpha,
        use_attraction=cfg.search.use_attraction,
        use_split_point=cfg.search.use_split_point,
        n_seeds=len(seeds),
        seed=cfg.search.seed,
    )
    study = _open_study(cfg, out, sampler)
    fp = _fingerprint(cfg, seeds, fitness_docs)
    old = study.user_attrs.get("m2n2.fingerprint")
    if old is None:
        study.set_user_attr("m2n2.fingerprint", fp)
        study.set_user_attr("m2n2.fitness_labels", fitness_docs.labels())
        study.set_user_attr("m2n2.generation_settings", fitness.generation_settings())
        study.set_user_attr("m2n2.seeds", [[s.name, str(s.path)] for s in seeds])
    elif old != fp:
        changed = next(k for k in fp if fp[k] != old.get(k))
        raise M2N2Error(
            f"{out} holds a study with a different {changed!r}; use another output_dir "
            "(or the same config) to resume"
        )

    # The resident evaluation model: built once, its tensors replaced for every trial.
    dtype_name = fc.dtype or carried.get("out_dtype") or carried.get("dtype") or "float32"
    eval_dtype = DTYPES[dtype_name]
    tok_src = carried.get("tokenizer_source")
    tok_path = tok_src if tok_src not in (None, "base", "union") else None
    tok_path = tok_path or carried.get("base_model") or str(seeds[0].path)
    hf_config = AutoConfig.from_pretrained(seeds[0].path)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=eval_dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=fc.batch_size, device=fc.device)
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
        merge_dtype=DTYPES.get(carried.get("dtype", "")),
        out_dtype=DTYPES.get(carried.get("out_dtype") or carried.get("dtype", "")),
    )
    # Tensors the model has but the files lack are tied to another (e.g. lm_head = embeddings).
    run._tied = set(model.state_dict()) - set(check_compatible(seeds[:1]))
    return run


def _count_done(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def evolve(
    config: EvolveConfig | str | Path,
    output_dir: str | Path | None = None,
    n_trials: int | None = None,
    progress: bool = True,
    on_trial: Callable[[Run, optuna.trial.FrozenTrial], None] | None = None,
) -> Run:
    """Run (or resume) an M2N2 evolution; returns the :class:`Run` after writing the outputs.

    ``n_trials`` overrides ``search.n_trials``: the study's total number of finished trials,
    so rerunning after an interruption runs only what is missing.
    """
    from tqdm.auto import tqdm

    from m2n2_plugin.report import write_outputs

    cfg = config if isinstance(config, EvolveConfig) else load_config(config)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = prepare(cfg, output_dir)
    total = n_trials or cfg.search.n_trials
    done = _count_done(run.study)
    log_path = run.out / "trials.log"
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
        means = arch.mean_scores if len(arch) else np.zeros(1)
        coverage = arch.coverage
        attrs = frozen.user_attrs
        if "m2n2.seed" in attrs:
            what = f"seed {attrs['m2n2.model']}"
        elif "m2n2.parents" in attrs:
            a, b = attrs["m2n2.parents"]
            p = frozen.params
            what = (
                f"child of {a} x {b} (mix_ratio={p['mix_ratio']:.3f}, "
                f"split_point={p['split_point']:.3f})"
            )
        else:
            what = "trial"
        if frozen.state == optuna.trial.TrialState.PRUNED:
            n_docs = attrs.get("m2n2.docs_evaluated", "?")
            value = f"rejected early after {n_docs}/{len(run.fitness_docs)} documents"
        elif frozen.value is None:
            value = "failed"
        else:
            value = f"mean score {frozen.value:.4f}"
        status = "in archive" if frozen.number in arch.members else "not kept"
        line = f"trial {frozen.number}: {what}: {value}, {status}"
        with log_path.open("a") as fh:
            fh.write(line + "\n")
        record = {
            "trial": frozen.number,
            "value": frozen.value,
            "archive_best": float(means.max()),
            "archive_mean": float(means.mean()),
            "coverage": coverage,
            "members": arch.members,
        }
        with (run.out / "history.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(best=f"{means.max():.3f}", coverage=f"{coverage:.3f}")
        if progress:
            bar.write(line)
        if on_trial is not None:
            on_trial(run, frozen)

    remaining = max(0, total - done)
    try:
        if remaining:
            run.study.optimize(run.objective, n_trials=remaining, callbacks=[after], catch=())
    finally:
        bar.close()
    run.sync_files()
    write_outputs(run)
    return run
