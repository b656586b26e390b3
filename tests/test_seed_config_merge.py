"""``search.seed_config_merge``: the mergekit config's own merge as one more seed (issue 19).

The tiny workspace (tests/evolve_workspace.py) with a task-arithmetic config of its models:
the extra seed must be exactly what ``mergekit-yaml`` makes of that config, a rerun must resume
on it without merging again, a changed config must be refused, ``lineage.yml`` must rebuild a
child of it from the original models, and a config mergekit cannot merge must give one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from evolve_workspace import build_workspace
from evolve_workspace import worker_env
from evolve_workspace import write_config
from safetensors.torch import load_file

from m2n2_plugin.errors import M2N2Error

TA_CONFIG = """merge_method: task_arithmetic
base_model: m0
models:
  - model: m1
    parameters: {weight: 0.7}
  - model: m2
    parameters: {weight: 0.5}
dtype: float32
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_workspace(tmp_path_factory.mktemp("config_merge"))
    (root / "ta.yml").write_text(TA_CONFIG)
    return root


@pytest.fixture(scope="module")
def mergekit_yaml_merge(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the real ``mergekit-yaml`` makes of ta.yml. The models are named by absolute path:
    mergekit-yaml offline takes a relative name for a Hub id (DESIGN: its model card)."""
    folder = tmp_path_factory.mktemp("mergekit_yaml")
    config = folder / "ta.yml"
    config.write_text(TA_CONFIG.replace("model: m", f"model: {workspace}/m"))
    cli = Path(sys.executable).with_name("mergekit-yaml")
    proc = subprocess.run(
        [str(cli), str(config), str(folder / "merged")], env=worker_env(), capture_output=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return folder / "merged"


def _config(workspace: Path, name: str, n_trials: int, **overrides: object) -> Path:
    return write_config(
        workspace,
        name,
        mergekit_config="ta.yml",
        search={
            "n_trials": n_trials,
            "archive_size": 4,
            "seed": 0,
            "heartbeat_interval": None,
            "seed_config_merge": True,
        },
        **overrides,
    )


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_the_extra_seed_is_the_configs_merge_and_a_rerun_resumes_on_it(
    workspace: Path, mergekit_yaml_merge: Path
) -> None:
    from m2n2_plugin.search.evolve import evolve

    run = evolve(_config(workspace, "refine", n_trials=8), progress=False)
    merged = run.out / "config_merge"
    # The seeds: the config's models, then its merge, bit for bit mergekit-yaml's.
    assert [s.name for s in run.seeds] == ["m1", "m2", "mergekit_config merge (task_arithmetic)"]
    assert run.seeds[-1].path == merged
    ours, theirs = _tensors(merged), _tensors(mergekit_yaml_merge)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    # It is scored as a seed (trial 2), and a child of it exists or the archive kept it.
    trials = run.study.get_trials(deepcopy=False)
    seed_trial = next(t for t in trials if t.user_attrs.get("m2n2.seed") == 2)
    assert seed_trial.user_attrs["m2n2.model"] == "mergekit_config merge (task_arithmetic)"
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["best_fitness"] >= seed_trial.value
    # Held-out scores of every seed, the merge included, in the report.
    assert "seed mergekit_config merge (task_arithmetic)" in summary["heldout"]

    # Resume: the merge is reused (not written again) and the study goes on.
    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    run = evolve(_config(workspace, "refine", n_trials=12), progress=False)
    assert (merged / "model.safetensors").stat().st_mtime_ns == stamp
    done = run.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert len(run.study.trials) == 12 and len(done) >= 3

    # Another config's merge in the same output folder: refused, nothing changed.
    (workspace / "ta.yml").write_text(TA_CONFIG.replace("0.7", "0.9"))
    try:
        with pytest.raises(M2N2Error, match="holds the merge of another mergekit config"):
            evolve(_config(workspace, "refine", n_trials=14), progress=False)
    finally:
        (workspace / "ta.yml").write_text(TA_CONFIG)
    assert (merged / "model.safetensors").stat().st_mtime_ns == stamp
    assert len(optuna.load_study(study_name="m2n2", storage=run.study._storage).trials) == 12


def test_lineage_rebuilds_a_child_of_the_merge_from_the_original_models(
    workspace: Path, tmp_path: Path
) -> None:
    from m2n2_plugin.merge.resident import merge_into_model
    from m2n2_plugin.report.outputs import Settings
    from m2n2_plugin.report.outputs import lineage_docs
    from m2n2_plugin.search.evolve import evolve

    run = evolve(_config(workspace, "lineage", n_trials=10), progress=False)
    trials = {t.number: t for t in run.study.get_trials(deepcopy=False)}
    # A child of the merge (seed trial 2) and another seed: both parents' folders stay, so
    # the run's own merge can be redone whether or not the child was kept.
    number = next(
        n
        for n, t in trials.items()
        if 2 in t.user_attrs.get("m2n2.parents", ()) and max(t.user_attrs["m2n2.parents"]) <= 2
    )
    settings = Settings("m2n2", 4, ["tiny_mc"], "acc", "element", 30, carried=run.carried)
    docs = lineage_docs(trials, run.seeds, settings, number)
    # The first stage is the config itself, on the original models (never the run's folder).
    assert docs[0]["name"] == "config_merge" and docs[0]["merge_method"] == "task_arithmetic"
    text = yaml.safe_dump_all(docs, sort_keys=False)
    assert "config_merge/" not in text and str(workspace / "m1") in text
    lineage = tmp_path / "lineage.yml"
    lineage.write_text(text)
    cli = Path(sys.executable).with_name("mergekit-multi")
    proc = subprocess.run(
        [str(cli), str(lineage), "--intermediate-dir", str(tmp_path / "work")]
        + ["--out-path", str(tmp_path / "rebuilt")],
        capture_output=True,
        text=True,
        env=worker_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rebuilt = _tensors(tmp_path / "rebuilt")
    a, b = trials[number].user_attrs["m2n2.parents"]
    merge_into_model(
        run.model,
        run.member_path(a),
        run.member_path(b),
        mix_ratio=trials[number].params["mix_ratio"],
        split_point=trials[number].params["split_point"],
        granularity="element",
        dtype=run.merge_dtype,
        out_dtype=run.out_dtype,
        arch=run.arch,
    )
    child = run.model.state_dict()
    assert rebuilt.keys() == child.keys()
    for name, tensor in rebuilt.items():
        assert torch.equal(tensor, child[name]), name


def test_a_config_mergekit_cannot_merge_is_one_line_and_leaves_nothing(workspace: Path) -> None:
    # seeds.yml is slerp of three models: valid as a list of seeds, but slerp merges two.
    config = write_config(workspace, "three", search__seed_config_merge=True)
    before = sorted(p.name for p in workspace.iterdir())
    cmd = [sys.executable, "-m", "m2n2_plugin.cli", "evolve", str(config), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), cwd=workspace)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("m2n2: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "search.seed_config_merge: mergekit cannot merge the config" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (workspace / "out-three").exists()
    assert sorted(p.name for p in workspace.iterdir()) == before


def test_base_model_as_one_more_seed(workspace: Path) -> None:
    """search.seed_base_model: the config's base_model is a seed after its models (and before
    the config's own merge); the lineage names it by its folder; without a base_model: one
    line."""
    from m2n2_plugin.search.evolve import evolve

    cfg = _config(workspace, "with_base", 8, search__seed_base_model=True)
    run = evolve(cfg, progress=False)
    names = [s.name for s in run.seeds]
    assert names == ["m1", "m2", "base_model (m0)", "mergekit_config merge (task_arithmetic)"]
    assert run.seeds[2].path == (workspace / "m0").resolve()
    seed_trials = {
        t.user_attrs["m2n2.seed"]: t for t in run.study.trials if "m2n2.seed" in t.user_attrs
    }
    assert sorted(seed_trials) == [0, 1, 2, 3]
    assert seed_trials[2].user_attrs["m2n2.model"] == "base_model (m0)"
    # The base model was evaluated as the model it is: its score equals m0's as a plain seed.
    plain = evolve(
        write_config(workspace, "m0_alone", mergekit_config="seeds.yml", search__n_trials=3),
        progress=False,
    )
    assert seed_trials[2].value == plain.study.trials[0].value
    # A base_model that is already one of the models is not added twice.
    again = write_config(
        workspace, "base_listed", search__seed_base_model=True, search__n_trials=3
    )
    assert [s.name for s in evolve(again, progress=False).seeds] == ["m0", "m1", "m2"]
    # A config without a base_model cannot have it as a seed.
    (workspace / "linear.yml").write_text(
        "merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 0.5}\n"
        "  - model: m2\n    parameters: {weight: 0.5}\ndtype: float32\n"
    )
    none = write_config(
        workspace,
        "no_base",
        mergekit_config="linear.yml",
        search__seed_base_model=True,
        search__n_trials=3,
    )
    with pytest.raises(M2N2Error, match="needs a mergekit config with a base_model"):
        evolve(none, progress=False)
