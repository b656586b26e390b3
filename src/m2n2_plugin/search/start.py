"""The start of ``m2n2 evolve``: check everything that can be checked, then open the run.

Seeds (a mergekit config), fitness (lm-eval tasks and documents), the output folder, the Optuna
study (created, or resumed when its fingerprint matches) and the resident evaluation model,
in that order: a bad input fails in one line before anything is written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge.checkpoint import checkpoint_shapes
from m2n2_plugin.merge.layout import Architecture
from m2n2_plugin.merge.layout import Parent
from m2n2_plugin.merge.layout import plan_pair
from m2n2_plugin.merge.models import Seed
from m2n2_plugin.merge.models import check_compatible
from m2n2_plugin.merge.models import check_tokenizers
from m2n2_plugin.merge.models import config_merge_seed
from m2n2_plugin.merge.models import seeds_from_mergekit
from m2n2_plugin.merge.models import shared_tensors
from m2n2_plugin.merge.models import write_config_merge
from m2n2_plugin.merge.split_space import SplitSpace
from m2n2_plugin.search.archive_store import check_study
from m2n2_plugin.search.config import EvolveConfig
from m2n2_plugin.search.config import load_yaml
from m2n2_plugin.search.devices import resolve_device
from m2n2_plugin.search.fitness import benchmark_warning
from m2n2_plugin.search.fitness import hflm_model_args
from m2n2_plugin.search.fitness import load_fitness
from m2n2_plugin.search.run_state import fingerprint
from m2n2_plugin.search.run_state import open_study
from m2n2_plugin.search.run_state import output_folder
from m2n2_plugin.search.run_state import write_error
from m2n2_plugin.search.trial import Run
from m2n2_plugin.search.weights import FINGERPRINT_KEY
from m2n2_plugin.search.weights import STUDY_ATTR
from m2n2_plugin.search.weights import FitnessWeights
from m2n2_plugin.search.weights import resume_hint

LOG = logging.getLogger("m2n2")

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def prepare_or_clean(cfg: EvolveConfig, output_dir: str | Path | None) -> Run:
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


def prepare(cfg: EvolveConfig, output_dir: str | Path | None = None) -> Run:
    """Validate everything that can be checked before the first trial, then open the study."""
    from transformers import AutoConfig
    from transformers import AutoTokenizer

    from m2n2_plugin.hub import M2N2Sampler
    from m2n2_plugin.merge.resident_model import build_resident_model

    # First, before anything is read or written: a device this machine does not have.
    device = resolve_device(cfg.fitness.device)
    model_args = hflm_model_args(cfg.fitness.model_args)
    out = output_folder(cfg, output_dir)
    # An archive store that cannot be reached: one line, before anything is written.
    store = None
    if cfg.search.archive_store is not None:
        from m2n2_plugin.search.archive_store import ArchiveStore

        cache_size = cfg.search.cache_size or cfg.search.archive_size
        store = ArchiveStore.open(cfg.search.archive_store, cfg.base_dir, out, cache_size)

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
    if cfg.search.seed_base_model:
        seeds = with_base_model(seeds, carried)
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
    hf_config = AutoConfig.from_pretrained(seeds[0].path)
    arch = Architecture.for_config(hf_config)
    space = split_space(cfg, seeds, arch)  # before the study: a bad option leaves none
    sampler = M2N2Sampler(
        archive_size=cfg.search.archive_size,
        alpha=cfg.search.alpha,
        use_attraction=cfg.search.use_attraction,
        use_split_point=cfg.search.use_split_point,
        n_seeds=len(seeds),
        seed=cfg.search.seed,
        capacity=weights.capacity,
        split_points=cfg.search.split_points,
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
    check_study(study, store)

    # The resident evaluation model: built once, its tensors replaced for every trial.
    dtype_name = fc.dtype or carried.get("out_dtype") or carried.get("dtype") or "float32"
    eval_dtype = DTYPES[dtype_name]
    tok_src = carried.get("tokenizer_source")
    tok_path = tok_src if tok_src not in (None, "base", "union") else None
    tok_path = tok_path or carried.get("base_model") or str(seeds[0].path)
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
        arch=arch,
        fitness_weights=weights,
        split_space=space,
        store=store,
    )
    return run


def with_base_model(seeds: list[Seed], carried: dict) -> list[Seed]:
    """``search.seed_base_model``: the mergekit config's ``base_model`` as one more seed.

    Children interpolate between archive members, so from fine-tunes of one base (and their
    task-arithmetic merge) they reach task-vector weights that sum to 1 or more per region;
    the base model in the archive lets a region move back towards it (weights below 1), as
    CMA-ES over task-arithmetic weights can.
    """
    base = carried.get("base_model")
    if base is None:
        raise M2N2Error("search.seed_base_model needs a mergekit config with a base_model")
    if any(s.path.resolve() == Path(base).resolve() for s in seeds):
        return seeds  # already a seed
    return [*seeds, Seed(f"base_model ({Path(base).name})", Path(base))]


def split_space(cfg: EvolveConfig, seeds: list[Seed], arch: Architecture) -> SplitSpace | None:
    """Where the run's split points fall (``search.split_over``), made once and passed down;
    None: over every parameter (the draw is the split point)."""
    if cfg.search.split_over == "all":
        return None
    shapes = checkpoint_shapes(seeds[0].path)
    plan = plan_pair(arch, Parent("seed 0", shapes), Parent("seed 0", shapes))
    shared = shared_tensors([s.path for s in seeds])
    moving = [n for n in plan.layout.names if plan.sources_a.get(n) not in shared]
    if not moving:
        raise M2N2Error(
            "search.split_over: differing needs seed models that differ; every tensor is "
            "the same in all of them"
        )
    LOG.info(
        "m2n2: split points fall in the %d of %d tensors in which the seeds differ "
        "(%.1f %% of the parameters)",
        len(moving),
        len(plan.layout.names),
        100.0 * SplitSpace.over(plan.layout, moving).size / plan.layout.total,
    )
    return SplitSpace.over(plan.layout, moving)
