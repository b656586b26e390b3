"""Bad input: configs, fitness, scores and environment. Each gives `m2n2: error: <one line>` that
names the problem and a non-zero exit; nothing already written is lost and no half-written output
is left. Also the security promises: YAML is loaded safely, and a run writes only inside its
output folder (and the storage it names).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import yaml
from evolve_workspace import build_workspace
from evolve_workspace import config_dict
from evolve_workspace import file_digests
from evolve_workspace import worker_env
from evolve_workspace import write_config

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_workspace(tmp_path_factory.mktemp("bad"))
    # A model folder with only a pickled checkpoint: never unpickled, refused.
    (root / "pickled").mkdir()
    shutil.copy(root / "m0" / "config.json", root / "pickled" / "config.json")
    torch.save({"w": torch.zeros(2)}, root / "pickled" / "pytorch_model.bin")
    (root / "a_file").write_text("not a folder\n")
    # Damaged seeds: weights cut short, a config.json that is not JSON.
    shutil.copytree(root / "m1", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    shutil.copytree(root / "m1", root / "bad-json")
    (root / "bad-json" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"')
    return root


def run_cli(config: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    """`m2n2 evolve CONFIG` in this process: the exit code and stderr's one line."""
    from m2n2_plugin.cli import main

    code = main(["evolve", str(config), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("m2n2: error: "), err
    return code, err[0]


def mergekit(*models: str, **extra: Any) -> dict[str, Any]:
    return {"merge_method": "slerp", "models": [{"model": m} for m in models], **extra}


def raw(text: str) -> Callable[[Path, str], Path]:
    """A config file with exactly this text (output_dir out-<name>)."""

    def write(root: Path, name: str) -> Path:
        path = root / f"{name}.yml"
        path.write_text(text.replace("OUT", f"out-{name}"))
        return path

    return write


def raw_mergekit(text: str) -> Callable[[Path, str], Path]:
    """A valid config whose mergekit config file holds this text."""

    def write(root: Path, name: str) -> Path:
        (root / f"{name}-seeds.yml").write_text(text)
        return write_config(root, name, mergekit_config=f"{name}-seeds.yml")

    return write


def without(section: str, key: str) -> Callable[[Path, str], Path]:
    def write(root: Path, name: str) -> Path:
        cfg = config_dict(name)
        del cfg[section][key]
        (root / f"{name}.yml").write_text(yaml.safe_dump(cfg))
        return root / f"{name}.yml"

    return write


def read_only_parent(root: Path, name: str) -> Path:
    folder = root / "read-only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o500)
    return write_config(root, name, output_dir=str(folder / "out"))


# --------------------------------------------------------------------------- before any trial

PWNED = "PWNED-by-yaml"
BEFORE_ANY_TRIAL: list[tuple[str, Any, str]] = [
    # config files
    ("malformed-yaml", raw("fitness: [unclosed\n"), "is not valid YAML (line 2)"),
    ("not-a-mapping", raw("- mergekit_config\n- fitness\n"), "must be a YAML mapping"),
    (
        "yaml-python-tag",
        raw(f'mergekit_config: !!python/object/apply:os.system ["touch {PWNED}"]\n'),
        "is not valid YAML (line 1)",
    ),
    ("unknown-key", {"search__archive_sise": 3}, "unknown key 'search.archive_sise'"),
    ("unknown-top-key", {"fitnes": {}}, "unknown key 'fitnes'"),
    ("missing-key", without("fitness", "metric"), "fitness.metric: Field required"),
    ("wrong-type-int", {"search__n_trials": "many"}, "search.n_trials: Input should be a valid"),
    ("wrong-type-float", {"search__alpha": "high"}, "search.alpha: Input should be a valid"),
    ("wrong-type-list", {"fitness__tasks": {"a": 1}}, "fitness.tasks: Input should be a valid"),
    ("wrong-choice", {"fitness__dtype": "float8"}, "fitness.dtype: Input should be"),
    (
        "archive-size-1",
        {"search__archive_size": 1},
        "search.archive_size: Input should be greater than or equal",
    ),
    # fitness weights (more seeds than archive slots is no error: they compete)
    ("weighting-unknown", {"fitness__weighting": "per_doc"}, "fitness.weighting: Input should be"),
    (
        "task-weight-zero",
        {"fitness__task_weights": {"tiny_mc": 0}},
        "fitness.task_weights.tiny_mc: Input should be greater than 0",
    ),
    (
        "task-weight-negative",
        {"fitness__task_weights": {"tiny_mc": -1.5}},
        "fitness.task_weights.tiny_mc: Input should be greater than 0",
    ),
    (
        "task-weight-nan",
        {"fitness__task_weights": {"tiny_mc": float("nan")}},
        "fitness.task_weights.tiny_mc: Input should be a finite number",
    ),
    (
        "task-weight-not-a-number",
        {"fitness__task_weights": {"tiny_mc": "heavy"}},
        "fitness.task_weights.tiny_mc: Input should be a valid number",
    ),
    (
        "task-weight-unknown-task",
        {"fitness__task_weights": {"tiny_mc": 1, "gsm8k": 2}},
        "fitness.task_weights: Value error, names task 'gsm8k', which is not in fitness.tasks",
    ),
    ("task-weights-not-a-mapping", {"fitness__task_weights": [1, 2]}, "fitness.task_weights: "),
    # in range for the type, absurd as a setting: refused before anything is allocated
    (
        "archive-size-absurd",
        {"search__archive_size": 1_000_000_000},
        "search.archive_size: Input should be less than or equal to 1000",
    ),
    (
        "alpha-nan",
        {"search__alpha": float("nan")},
        "search.alpha: Input should be a finite number",
    ),
    (
        "alpha-negative",
        {"search__alpha": -1},
        "search.alpha: Input should be greater than or equal",
    ),
    ("alpha-absurd", {"search__alpha": 1e9}, "search.alpha: Input should be less than or equal"),
    ("batch-size-zero", {"fitness__batch_size": 0}, "fitness.batch_size: Input should be greater"),
    ("threads-absurd", {"fitness__num_threads": 10**6}, "fitness.num_threads: Input should be"),
    # the seed models
    ("missing-model", {"mergekit_config": mergekit("m0", "nowhere")}, "model 'nowhere' not found"),
    ("missing-mergekit-file", {"mergekit_config": "no-such.yml"}, "mergekit_config"),
    ("malformed-mergekit-yaml", raw_mergekit("models: [\n"), "is not valid YAML"),
    (
        "mergekit-python-tag",
        raw_mergekit(f'models: !!python/object/apply:os.system ["touch {PWNED}"]\n'),
        "is not valid YAML",
    ),
    ("mergekit-no-models", {"mergekit_config": {"merge_method": "slerp"}}, "not a valid mergekit"),
    ("mergekit-wrong-type", {"mergekit_config": mergekit() | {"models": "m0"}}, "not a valid"),
    ("architectures", {"mergekit_config": mergekit("m0", "gpt2")}, "different architectures"),
    ("shapes", {"mergekit_config": mergekit("m0", "wide")}, "different shapes"),
    ("tokenizers", {"mergekit_config": mergekit("m0", "permuted")}, "different tokenizers"),
    ("pickle-only", {"mergekit_config": mergekit("m0", "pickled")}, "has no safetensors weights"),
    (
        "seed-truncated",
        {"mergekit_config": mergekit("m0", "truncated")},
        "model 'truncated': ",  # + the file's path and "is damaged (...)": checked below
    ),
    (
        "seed-config-not-json",
        {"mergekit_config": mergekit("m0", "bad-json")},
        "model 'bad-json': ",
    ),
    # fitness
    ("unknown-task", {"fitness__tasks": ["no_such_task"]}, "unknown lm-eval task 'no_such_task'"),
    ("metric-not-in-task", {"fitness__metric": "f1"}, "no per-document metric 'f1'"),
    (
        "corpus-level-metric",
        {
            "fitness": {
                "include_path": "custom_tasks",
                "tasks": ["tiny_bleu"],
                "metric": "bleu",
                "fitness_docs": 4,
            }
        },
        "no per-document metric 'bleu': lm-eval aggregates it",
    ),
    ("unknown-filter", {"fitness__filter": "no-such-filter"}, "no filter 'no-such-filter'"),
    ("empty-fitness-list", {"fitness__fitness_docs": []}, "the fitness set is empty"),
    ("empty-fitness-zero", {"fitness__fitness_docs": 0}, "the fitness set is empty"),
    ("missing-document", {"fitness__fitness_docs": [0, 999]}, "document id 999 does not exist"),
    (
        "heldout-overlaps",
        {"fitness__fitness_docs": [0, 1], "fitness__heldout_docs": [1]},
        "held-out document 1 of task 'tiny_mc' is also a fitness document",
    ),
    ("include-path", {"fitness__include_path": "no-such-dir"}, "is not a folder"),
    (
        "docs-for-unknown-task",
        {"fitness__fitness_docs": {"tiny_mc": [0], "other": [1]}},
        "names task 'other', which is not in fitness.tasks",
    ),
    # environment
    (
        "storage-unreachable",
        {"search__storage": "postgresql+psycopg2://m2n2@127.0.0.1:1/none"},
        "cannot open the Optuna storage 'postgresql+psycopg2://m2n2@127.0.0.1:1/none'",
    ),
    ("storage-bad-url", {"search__storage": "nosuchdb://x/y"}, "cannot open the Optuna storage"),
    ("output-under-a-file", {"output_dir": "a_file/out"}, "is not writable"),
    ("output-read-only", read_only_parent, "is not writable"),
]


@pytest.mark.parametrize(
    ("name", "make", "message"), BEFORE_ANY_TRIAL, ids=[c[0] for c in BEFORE_ANY_TRIAL]
)
def test_bad_input_before_any_trial(
    name: str, make: Any, message: str, workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if name == "output-read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    config = make(workspace, name) if callable(make) else write_config(workspace, name, **make)
    before = sorted(p.name for p in workspace.iterdir())
    code, line = run_cli(config, capsys)
    assert code == 2
    assert message in line, line
    if name == "seed-truncated":
        assert f"{workspace / 'truncated' / 'model.safetensors'} is damaged (" in line, line
    if name == "seed-config-not-json":
        assert f"{workspace / 'bad-json' / 'config.json'} is not valid JSON" in line, line
    # Nothing half-written: no output folder, nothing new beside the config.
    assert not (workspace / f"out-{name}").exists()
    assert sorted(p.name for p in workspace.iterdir()) == before
    assert not list(workspace.rglob(PWNED))  # the YAML tag ran nothing


def test_there_are_at_least_twenty_cases() -> None:
    assert len(BEFORE_ANY_TRIAL) >= 20


# --------------------------------------------------------------------------- during a trial


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("tiny_out_of_range", "scored 2.0: per-document scores must lie in [0, 1]"),
        ("tiny_not_a_number", "scored nan: per-document scores must lie in [0, 1]"),
    ],
)
def test_task_code_gives_bad_scores(
    task: str, message: str, workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A task whose own code scores out of [0, 1]: the first trial stops the run."""
    name = f"task-{task}"
    fitness = {"include_path": "custom_tasks", "tasks": [task], "metric": "acc", "fitness_docs": 5}
    code, line = run_cli(write_config(workspace, name, fitness=fitness), capsys)
    assert code == 2 and message in line, line
    out = workspace / f"out-{name}"
    # The study records the failed trial; no model file, no outputs, no temp files.
    assert sorted(p.name for p in out.iterdir()) == ["study.db"]
    study = optuna.load_study(study_name="m2n2", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]


def test_console_script_prints_one_line_for_a_failing_trial(workspace: Path) -> None:
    """The real `m2n2` process: Optuna's own failure log (a traceback) is not printed."""
    fitness = {
        "include_path": "custom_tasks",
        "tasks": ["tiny_not_a_number"],
        "metric": "acc",
        "fitness_docs": 5,
    }
    config = write_config(workspace, "console", fitness=fitness)
    proc = subprocess.run(
        [sys.executable, "-m", "m2n2_plugin.cli", "evolve", str(config), "--no-progress"],
        capture_output=True,
        text=True,
        env=worker_env(),
        cwd=workspace,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "m2n2: error: tiny_not_a_number document 0 scored nan: per-document scores must lie "
        "in [0, 1] (pick a metric such as exact_match or acc)"
    ]


@pytest.fixture(scope="module")
def finished_run(workspace: Path) -> Path:
    """A small finished run whose outputs the bad resumptions below must leave untouched."""
    from m2n2_plugin.search.evolve import evolve

    config = write_config(workspace, "kept", search__n_trials=8)
    run = evolve(config, progress=False)
    assert any(m >= 3 for m in run.sampler.archive(run.study).members)  # a child file exists
    return config


# The first new trial is a child: early rejection scores it in chunks, each checked.
BAD_SCORES = [
    ("nan", lambda n: np.full(n, np.nan), "must be finite and lie in [0, 1], got nan at index 0"),
    ("above-one", lambda n: np.full(n, 1.5), "must be finite and lie in [0, 1], got 1.5 at"),
    ("negative", lambda n: -np.ones(n), "must be finite and lie in [0, 1], got -1.0 at index 0"),
    ("too-short", lambda n: np.ones(n - 1), "one score per document expected"),
    ("two-d", lambda n: np.ones((n, 2)), "one score per document expected"),
    ("not-numbers", lambda n: ["x"] * n, "the fitness scores are not numbers"),
]


@pytest.mark.parametrize(("kind", "make", "message"), BAD_SCORES, ids=[b[0] for b in BAD_SCORES])
def test_bad_scores_stop_a_resumed_run_and_keep_its_outputs(
    kind: str,
    make: Callable[[int], np.ndarray],
    message: str,
    finished_run: Path,
    workspace: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from m2n2_plugin.hub import M2N2Sampler

    from m2n2_plugin.search.fitness import LmEvalFitness

    out = workspace / "out-kept"
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="m2n2", storage=storage)
    complete = [(t.number, t.value) for t in study.trials if t.state.name == "COMPLETE"]
    slots = M2N2Sampler(archive_size=4).archive(study).slots
    digests = {k: v for k, v in file_digests(out).items() if k != "study.db"}

    monkeypatch.setattr(LmEvalFitness, "score", lambda self, lm, docs: make(len(docs)))
    code, line = run_cli(finished_run, capsys, "-n", "20")
    assert code == 2 and message in line, line

    study = optuna.load_study(study_name="m2n2", storage=storage)
    assert [(t.number, t.value) for t in study.trials if t.state.name == "COMPLETE"] == complete
    assert study.trials[-1].state == optuna.trial.TrialState.FAIL
    assert M2N2Sampler(archive_size=4).archive(study).slots == slots
    # Every file (archive members, best model, logs, plots) is exactly as it was.
    assert {k: v for k, v in file_digests(out).items() if k != "study.db"} == digests


def test_a_changed_config_is_refused_and_the_run_kept(
    finished_run: Path, workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = workspace / "out-kept"
    digests = file_digests(out)
    changed = write_config(workspace, "kept", fitness__fitness_docs=20, search__n_trials=8)
    code, line = run_cli(changed, capsys)
    assert code == 2 and "holds a study with a different 'fitness_docs'" in line, line
    assert file_digests(out) == digests
    write_config(workspace, "kept", search__n_trials=8)  # as it was, for the other tests


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_archive_member_is_named_on_resume(
    damage: str, finished_run: Path, workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A member's file cut short or deleted between two runs: the resumed run names it and
    says what to do, before any trial, and changes nothing."""
    out = workspace / "out-kept"
    member = sorted((out / "archive").glob("trial_*.safetensors"))[-1]
    number = int(member.stem.split("_")[1])
    saved = member.read_bytes()
    try:
        if damage == "truncated":
            member.write_bytes(saved[: len(saved) // 2])
        else:
            member.unlink()
        digests = file_digests(out)
        code, line = run_cli(finished_run, capsys, "-n", "20")
        assert code == 2, line
        assert f"archive member trial {number}: {member} is " in line, line
        assert "restore that file" in line and "another output_dir" in line, line
        assert file_digests(out) == digests
    finally:
        member.write_bytes(saved)


def evolve_cli(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real ``m2n2 evolve`` process on ``config``."""
    cmd = [sys.executable, "-m", "m2n2_plugin.cli", "evolve", str(config), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), cwd=cwd)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    return proc.returncode == 0


@pytest.mark.slow
def test_a_full_disk_while_a_child_is_written_is_one_line(workspace: Path, tmp_path: Path) -> None:
    """The output folder on a real filesystem too small for a child's weights: the trial that
    writes it stops the run with one line (no Optuna traceback), exit 2; the study and the
    files already written are intact, and the run resumes once there is space."""
    out = tmp_path / "small-disk"
    if not _mount_tmpfs(out, "64k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        storage = f"sqlite:///{tmp_path / 'study.db'}"
        config = write_config(
            workspace,
            "full-disk",
            output_dir=str(out),
            search__storage=storage,
            search__n_trials=5,
        )
        proc = evolve_cli(config, workspace)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr  # no traceback before the line
        assert lines[0].startswith("m2n2: error: cannot write ") and "No space left" in lines[0]
        assert "rerun the same command to resume" in lines[0], lines[0]
        assert not list(out.rglob(".tmp-*")) and not list(out.rglob("trial_*"))
        study = optuna.load_study(study_name="m2n2", storage=storage)
        assert study.trials[-1].state == optuna.trial.TrialState.FAIL
        done = [t.number for t in study.trials if t.state.is_finished() and t.value is not None]
    finally:
        subprocess.run(["umount", str(out)], check=False)
    # Space again (the folder's own disk): the same command resumes and finishes.
    proc = evolve_cli(config, workspace)
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="m2n2", storage=storage)
    assert [t.number for t in study.trials if t.number in done and t.value is not None] == done


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ([0.5, float("nan")], "scores must be finite, got nan at index 1"),
        ([0.5, 2.0], "scores must lie in [0, 1], got 2.0 at index 1"),
        ([1.0, 0.0, 1.0], "scores has 3 values, but this study's score vectors have 2"),
        ([], "scores must hold at least one example"),
        ([[1.0, 0.0]], "scores must be 1-D"),
        (["a", "b"], "scores must be numbers"),
    ],
)
def test_plain_optuna_objective_with_bad_scores(scores: list, message: str) -> None:
    """Through a plain Optuna objective: the trial fails with the reason, the archive is as
    before."""
    from m2n2_plugin.hub import M2N2Sampler

    sampler = M2N2Sampler(archive_size=3, n_seeds=2, seed=0)
    study = optuna.create_study(sampler=sampler)

    def good(trial: optuna.Trial) -> float:
        sampler.set_scores(trial, [float(trial.number % 2), 1.0])
        return 0.5

    study.optimize(good, n_trials=4)
    slots = sampler.archive(study).slots

    def bad(trial: optuna.Trial) -> float:
        sampler.set_scores(trial, scores)
        return 0.0

    with pytest.raises(ValueError, match=re.escape(message)):
        study.optimize(bad, n_trials=1)
    assert study.trials[-1].state == optuna.trial.TrialState.FAIL
    assert sampler.archive(study).slots == slots
    study.optimize(good, n_trials=1)  # and the study goes on
    assert sampler.archive(study).n_folded == 5


# --------------------------------------------------------------------------- security


def test_a_run_writes_only_inside_its_output_folder(workspace: Path) -> None:
    """Names from the config (study name, task, models) never become paths outside it."""
    from m2n2_plugin.search.evolve import evolve

    config = write_config(
        workspace,
        "confined",
        output_dir="out-confined",
        search={"n_trials": 5, "archive_size": 4, "study_name": "../../../escape/study"},
    )
    before = file_digests(workspace)
    evolve(config, progress=False)
    after = file_digests(workspace)
    changed = {k for k in after if before.get(k) != after[k]} | (set(before) - set(after))
    assert changed and all(k.startswith("out-confined/") for k in changed), sorted(changed)
    assert not (workspace.parent / "escape").exists()
    summary = json.loads((workspace / "out-confined" / "summary.json").read_text())
    assert summary["output_dir"] == str(workspace / "out-confined")
