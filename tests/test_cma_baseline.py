"""The skills example's CMA-ES baseline (examples/skills/cma_baseline.py) on tiny models.

It is what the README's head-to-head compares M2N2 with, so it must be what it says: mergekit's
evolve genome turned into mergekit configs, stopped at the documents budget, and its best model
the merge that scored best.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from evolve_workspace import build_workspace
from evolve_workspace import write_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "skills" / "cma_baseline.py"


def _module():
    spec = importlib.util.spec_from_file_location("cma_baseline", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cma_baseline_merges_the_genome_and_stops_at_the_budget(tmp_path: Path) -> None:
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    from m2n2_plugin.search.config import load_config
    from m2n2_plugin.search.fitness import load_fitness

    cma_baseline = _module()
    root = build_workspace(tmp_path / "ws")
    cfg = load_config(write_config(root, "cma", fitness__fitness_docs=10))
    fitness, fitness_docs, _ = load_fitness(cfg)
    model = AutoModelForCausalLM.from_pretrained(root / "m0").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "m0")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)
    scorer = SimpleNamespace(model=model, lm=lm, fitness=fitness, docs={"fitness": fitness_docs})
    cma = cma_baseline.CmaBaseline(
        [root / "m1", root / "m2"], root / "m0", scorer, tmp_path / "cma", granularity=1
    )
    # mergekit's genome: one weight per model per layer (2 layers here). Optuna's first trial is
    # CMA-ES's mean, the centre of [0, 1]: mergekit-evolve's initial genotype (0.5 each).
    assert cma.shape == (2, 2, 1, 1) and len(cma.names) == 4
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    config = cma.config(weights)
    assert config.merge_method == "task_arithmetic" and config.dtype == "float32"
    per_slice = [
        [s.parameters["weight"] for s in sl.sources if s.parameters] for sl in config.slices
    ]
    assert per_slice == [[0.1, 0.2], [0.3, 0.4]]

    n = len(fitness_docs)
    rows = cma.run(budget=3 * n + 1)  # four trials: the fourth crosses the budget
    assert cma.study.trials[0].params == dict.fromkeys(cma.names, 0.5)
    assert [r["total"] for r in rows] == [n, 2 * n, 3 * n, 4 * n]
    bests = [r["best"] for r in rows]
    assert bests == list(np.maximum.accumulate([t.value for t in cma.study.trials]))
    # The best model is the best trial's merge: scored again, it gives the same mean.
    from m2n2_plugin.merge.resident_model import load_checkpoint_into_model

    load_checkpoint_into_model(model, cma.best_model())
    again = float(np.mean(fitness.score(lm, fitness_docs)))
    assert again == pytest.approx(cma.study.best_value)
    # Resumed: the study is kept and only what the larger budget needs runs.
    rows = cma.run(budget=5 * n)
    assert len(rows) == 5
    # Interrupted mid-scoring (Ctrl-C): that trial is FAIL; resumed, it neither counts towards
    # the budget nor enters the curve, and the run ends with as many complete trials as before.
    real_score = fitness.score

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    fitness.score = interrupted
    with pytest.raises(KeyboardInterrupt):
        cma.run(budget=6 * n)
    fitness.score = real_score
    rows = cma.run(budget=6 * n)
    states = [t.state.name for t in cma.study.trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 6
    assert [r["total"] for r in rows] == [k * n for k in range(1, 7)]
    assert all(r["trial"] != states.index("FAIL") for r in rows)
