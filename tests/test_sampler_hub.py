"""The plugin ships the Optuna Hub package as ``m2n2_plugin.hub``: one copy, both ways in."""

from __future__ import annotations

import os
from pathlib import Path

import m2n2_plugin.hub as hub
import numpy as np
import optuna

HUB_PACKAGE = Path(__file__).resolve().parents[1] / "hub_package" / "samplers" / "m2n2"


def test_public_api() -> None:
    from m2n2_plugin.hub import Archive
    from m2n2_plugin.hub import M2N2Sampler
    from m2n2_plugin.hub import attraction
    from m2n2_plugin.hub import replace_index
    from m2n2_plugin.hub import shared_fitness

    assert {"M2N2Sampler", "Archive", "shared_fitness", "attraction", "replace_index"} <= set(
        hub.__all__
    )
    assert callable(M2N2Sampler) and callable(Archive)
    scores = np.array([[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(shared_fitness(scores), [1.0, 0.0])
    np.testing.assert_allclose(attraction(scores, 1), [1.0, 0.0])
    assert replace_index(scores, [0.0, 1.0]) == 1


def test_same_source_as_the_hub_package() -> None:
    for name in ("__init__.py", "archive.py", "m2n2.py", "niches.py", "_state.py"):
        shipped = Path(hub.__file__).parent / name
        assert shipped.read_bytes() == (HUB_PACKAGE / name).read_bytes(), name


def test_plugin_and_optunahub_copies_share_a_study() -> None:
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import optunahub

    loaded = optunahub.load_local_module(
        "samplers/m2n2", registry_root=str(HUB_PACKAGE.parents[1])
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = hub.M2N2Sampler(archive_size=3, seed=0)
    study = optuna.create_study(sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("mix_ratio", 0.0, 1.0)
        scores = np.random.default_rng(trial.number).random(6) < 0.5
        sampler.set_scores(trial, scores)
        return float(scores.mean())

    study.optimize(objective, n_trials=10)
    mine = sampler.archive(study)
    theirs = loaded.M2N2Sampler(archive_size=3).archive(study)
    assert mine.slots == theirs.slots and mine.n_folded == theirs.n_folded == 10
    np.testing.assert_array_equal(mine.scores, theirs.scores)
