"""The evolutionary merge users run today: CMA-ES over per-layer-group task-arithmetic weights.

The genome is mergekit's evolve genome (``mergekit.evo.genome.ModelGenome``): one weight per
specialist per group of layers for a ``task_arithmetic`` merge against the base model, turned
into a mergekit config by mergekit's own ``genotype_merge_config``. What is taken from
mergekit-evolve and what is not:

* its initial genotype (every weight 1 / n_models = 0.5) and CMA-ES step size (sigma0 = 1/6);
* weights kept non-negative (``allow_negative_weights: false``), ``normalize`` off (its default
  for task arithmetic);
* layer groups: mergekit's default ``layer_granularity: 0`` is ONE group for the whole model
  (two weights in all); its documentation's example uses 8. SmolLM2-135M has 30 layers, which
  8 does not divide, so ``--granularity 6`` (5 groups, 10 weights) is the default here;
* Optuna's ``CmaEsSampler`` needs bounds: [0, 1] per weight (mergekit's only makes weights
  non-negative). With them Optuna's own defaults are mergekit-evolve's start: the centre of the
  range (0.5) and a sixth of its width (sigma0 = 1/6);
* the merge is written in float32, like every other merge of this example (mergekit-evolve
  writes bfloat16).

Each trial is merged by mergekit's ``run_merge`` into a folder in /dev/shm, loaded into the one
resident model, and scored by the same ``LmEvalFitness`` on the same fitness documents as
``m2n2 evolve``; the objective is the mean score. There is no early rejection: every trial
costs all fitness documents. ``run.py --cma`` runs it until it has evaluated as many documents
as the M2N2 run it is compared with (``budget``), in an Optuna study that resumes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

#: The weights' range. Optuna's CMA-ES starts at its centre with sigma0 a sixth of its width:
#: for [0, 1] that is mergekit-evolve's x0 (1 / n_models for two models) and sigma0 (1/6).
UPPER = 1.0


def m2n2_documents(run: Path) -> list[dict[str, Any]]:
    """Per finished trial of an ``m2n2 evolve`` run: documents it scored (an early-rejected
    child counts the documents scored before it was dropped), the cumulative count and the
    archive's best mean after it (history.jsonl)."""
    import optuna

    study = optuna.load_study(study_name="m2n2", storage=f"sqlite:///{run / 'study.db'}")
    n = len(study.user_attrs["m2n2.fitness_labels"])
    history = {}
    for line in (run / "history.jsonl").read_text().splitlines():
        record = json.loads(line)
        history[record["trial"]] = record["archive_best"]
    rows, total = [], 0
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == optuna.trial.TrialState.PRUNED:
            docs = int(t.user_attrs["m2n2.docs_evaluated"])
        elif t.state == optuna.trial.TrialState.COMPLETE:
            docs = n
        else:
            continue
        total += docs
        rows.append({"trial": t.number, "docs": docs, "total": total, "best": history[t.number]})
    return rows


class CmaBaseline:
    """CMA-ES on mergekit's genome, scored by ``scorer`` (scoring.Scorer)."""

    def __init__(
        self,
        specialists: list[Path],
        base: Path,
        scorer: Any,
        out: Path,
        granularity: int = 6,
        seed: int = 0,
    ) -> None:
        import optuna
        from mergekit.common import ModelReference
        from mergekit.evo.genome import ModelGenome
        from mergekit.evo.genome import ModelGenomeDefinition

        self.genome = ModelGenome(
            ModelGenomeDefinition(
                models=[ModelReference.parse(str(p)) for p in specialists],
                merge_method="task_arithmetic",
                base_model=ModelReference.parse(str(base)),
                layer_granularity=granularity,
            )
        )
        x0 = self.genome.initial_genotype().numpy()
        if not np.allclose(x0, UPPER / 2):
            raise ValueError("mergekit's initial genotype is not the centre of [0, UPPER]")
        self.shape = x0.shape
        self.names = [f"w{i}" for i in range(x0.size)]
        self.scorer, self.out = scorer, out
        out.mkdir(parents=True, exist_ok=True)
        sampler = optuna.samplers.CmaEsSampler(seed=seed)
        self.study = optuna.create_study(
            study_name="cma",
            storage=f"sqlite:///{out / 'study.db'}",
            sampler=sampler,
            direction="maximize",
            load_if_exists=True,
        )
        if not self.study.trials:
            # Optuna samples a study's first trial independently (at random): make it the
            # start, as mergekit-evolve's first evaluation is.
            self.study.enqueue_trial(dict(zip(self.names, map(float, x0.ravel()), strict=True)))

    def config(self, weights: np.ndarray) -> Any:
        """mergekit's config for a genotype, in float32."""
        config = self.genome.genotype_merge_config(weights.reshape(self.shape))
        return config.model_copy(update={"dtype": "float32"})

    def merge(self, weights: np.ndarray, folder: Path) -> None:
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        run_merge(self.config(weights), str(folder), MergeOptions(quiet=True))

    def objective(self, trial: Any) -> float:
        from m2n2_plugin.merge.resident_model import load_checkpoint_into_model

        weights = np.array([trial.suggest_float(n, 0.0, UPPER) for n in self.names])
        start = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="cma-", dir="/dev/shm"))
        try:
            self.merge(weights, folder)
            load_checkpoint_into_model(self.scorer.model, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        merged = time.perf_counter()
        docs = self.scorer.docs["fitness"]
        scores = self.scorer.fitness.score(self.scorer.lm, docs)
        trial.set_user_attr("docs", len(docs))
        trial.set_user_attr("merge_s", merged - start)
        trial.set_user_attr("score_s", time.perf_counter() - merged)
        return float(np.mean(scores))

    def run(self, budget: int, on_trial: Any = None) -> list[dict[str, Any]]:
        """Trials until ``budget`` documents are evaluated; per trial the documents so far
        and the best mean so far. ``on_trial()`` is called after each trial."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        n = len(self.scorer.docs["fitness"])

        def done() -> list[Any]:
            # A trial interrupted (Ctrl-C, a kill) is FAIL or left RUNNING: its documents were
            # not all scored and CMA-ES ignores it, so it neither counts nor enters the curve.
            return self.study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])

        while len(done()) * n < budget:
            self.study.optimize(self.objective, n_trials=1)
            t = self.study.trials[-1]
            print(
                f"cma trial {t.number}: {t.value:.3f} (best {self.study.best_value:.3f}, "
                f"{len(done()) * n}/{budget} documents)",
                flush=True,
            )
            if on_trial is not None:
                on_trial()
        rows, best = [], -1.0
        for i, t in enumerate(done(), start=1):
            best = max(best, t.value)
            rows.append({"trial": t.number, "docs": n, "total": i * n, "best": best})
        return rows

    def best_model(self) -> Path:
        """The best trial's merge, written once to ``out/best``."""
        best = self.out / "best"
        if not (best / "model.safetensors").is_file():
            t = self.study.best_trial
            weights = np.array([t.params[n] for n in self.names])
            tmp = self.out / ".best-tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.merge(weights, tmp)
            (tmp / "genotype.json").write_text(
                json.dumps({"trial": t.number, "fitness": t.value, "weights": weights.tolist()})
            )
            tmp.rename(best)
        return best
