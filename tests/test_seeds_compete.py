"""More seeds than archive slots, and fitness task weights, through `m2n2 evolve` (issue 20).

The workspace adds to the tiny one (tests/evolve_workspace.py) two more random Llamas and a
"mute" copy of ``m0`` (its output layer zeroed: every choice is equally likely, so lm-eval picks
the first). Six seeds, four slots. The tasks put the right answer at a fixed place:

* ``tiny_late`` (40 documents): never the first choice -- the mute seed solves none of them;
* ``tiny_first`` (8 documents): always the first choice -- the mute seed solves all of them.

So on ``tiny_late`` alone the mute seed (the sixth) is provably dropped and rejected early,
and with both tasks it is the small task's specialist, whose fate depends on the weighting.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from evolve_workspace import HUB_TESTS
from evolve_workspace import MC_TASK
from evolve_workspace import build_model
from evolve_workspace import build_workspace
from evolve_workspace import check_study_and_files
from evolve_workspace import file_digests
from optuna.trial import TrialState
from test_workers import postgres_url  # noqa: F401  (the fixture: a fresh PostgreSQL database)

from m2n2_plugin.example import write_jsonl

SEEDS = ["m0", "m1", "m2", "m3", "m4", "mute"]
ARCHIVE_SIZE = 4
N_TRIALS = 14


def _task(tasks: Path, name: str, n: int, first: bool, seed: int) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(3))
        choices = [word, word[::-1], word[1:] + word[0], "".join(sorted(word))]
        rows.append(
            {
                "question": f"pick {word}",
                "choices": choices,
                "label": 0 if first else 1 + rng.randrange(3),
            }
        )
    write_jsonl(tasks / f"{name}.jsonl", rows)
    (tasks / f"{name}.yaml").write_text(
        MC_TASK.format(name=name, data=tasks / f"{name}.jsonl", extra="")
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import load_file
    from safetensors.torch import save_file

    from m2n2_plugin.example import build_tokenizer

    root = build_workspace(tmp_path_factory.mktemp("seeds"))
    tok = build_tokenizer()
    for i, name in ((3, "m3"), (4, "m4")):
        build_model(len(tok), seed=110 + i, hidden=32).save_pretrained(
            root / name, safe_serialization=True
        )
        tok.save_pretrained(root / name)
    mute = root / "mute"
    build_model(len(tok), seed=100, hidden=32).save_pretrained(mute, safe_serialization=True)
    tok.save_pretrained(mute)
    weights = load_file(str(mute / "model.safetensors"))
    weights["lm_head.weight"].zero_()
    save_file(weights, str(mute / "model.safetensors"), metadata={"format": "pt"})
    _task(root / "tasks", "tiny_late", 40, first=False, seed=1)
    _task(root / "tasks", "tiny_first", 8, first=True, seed=2)
    (root / "seeds6.yml").write_text(
        yaml.safe_dump(
            {
                "merge_method": "slerp",
                "base_model": "m0",
                "models": [{"model": m} for m in SEEDS],
                "parameters": {"t": 0.5},
                "dtype": "float32",
            }
        )
    )
    return root


def _config(root: Path, name: str, **fitness: Any) -> Path:
    search = fitness.pop("search", {})
    cfg = {
        "mergekit_config": "seeds6.yml",
        "fitness": {
            "include_path": "tasks",
            "tasks": ["tiny_late"],
            "metric": "acc",
            "fitness_docs": 40,
            "batch_size": 16,
            "num_threads": 1,
            **fitness,
        },
        "search": {
            "n_trials": N_TRIALS,
            "archive_size": ARCHIVE_SIZE,
            "seed": 0,
            "heartbeat_interval": None,
            "rejection_chunk": 4,
            **search,
        },
        "output_dir": f"out-{name}",
    }
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _independent_refold(
    trials: list[optuna.trial.FrozenTrial], capacity: np.ndarray | None = None
) -> list[list[int]]:
    """The members after every trial, recomputed from the trials' stored per-example scores
    with the hub package's pure functions (nothing of the sampler's fold or cache)."""
    sys.path.insert(0, str(HUB_TESTS))
    try:
        from m2n2_toy import refold
    finally:
        sys.path.remove(str(HUB_TESTS))
    import m2n2_plugin.hub as hub

    return [
        [n for n in refold(hub, trials[: k + 1], ARCHIVE_SIZE, 1.0, capacity)[0] if n is not None]
        for k in range(len(trials))
    ]


@pytest.fixture(scope="module")
def straight(workspace: Path) -> Any:
    from m2n2_plugin.search.evolve import evolve

    before = {name: file_digests(workspace / name) for name in SEEDS}
    run = evolve(_config(workspace, "six"), progress=False)
    return run, before


def test_every_seed_is_evaluated_and_competes(workspace: Path, straight: Any) -> None:
    run, before = straight
    trials = run.study.trials
    assert len(trials) == N_TRIALS
    # Seeds first, in the mergekit config's order, one per trial; children after.
    assert [t.user_attrs.get("m2n2.seed") for t in trials[:6]] == list(range(6))
    assert all("m2n2.parents" in t.user_attrs for t in trials[6:])
    # The mute seed solves no tiny_late document: it is provably dropped, and early
    # rejection stops it before the last document; it is not issued again.
    mute = trials[5]
    assert mute.state == TrialState.PRUNED, mute.state
    assert mute.user_attrs["m2n2.docs_evaluated"] < 40
    assert [t.state for t in trials[:5]] == [TrialState.COMPLETE] * 5
    # The archive and its files agree with an independent re-fold, after every trial.
    arch = check_study_and_files(run.out, run.study, ARCHIVE_SIZE)
    history = [json.loads(line) for line in (run.out / "history.jsonl").read_text().splitlines()]
    assert [h["members"] for h in history] == _independent_refold(trials)
    # Resource competition, not the order: some seed left the archive (or never entered).
    assert set(range(6)) - set(arch.members)
    # Seeds are the user's files: none was touched, evicted or not.
    assert {name: file_digests(workspace / name) for name in SEEDS} == before
    log = (run.out / "trials.log").read_text().splitlines()
    assert log[5].startswith("trial 5: seed mute: rejected early after"), log[5]


def test_early_rejection_of_seeds_is_exact(workspace: Path, straight: Any) -> None:
    from m2n2_plugin.search.evolve import evolve

    run, _ = straight
    full = evolve(
        _config(workspace, "six-full", search={"early_rejection": False}), progress=False
    )
    assert [t.params for t in full.study.trials] == [t.params for t in run.study.trials]
    assert full.sampler.archive(full.study).slots == run.sampler.archive(run.study).slots
    # Evaluated in full, the mute seed scores 0 everywhere and the fold drops it.
    assert full.study.trials[5].value == 0.0
    assert 5 not in _independent_refold(full.study.trials)[5]


def test_resume_in_the_middle_of_the_seeds(workspace: Path, straight: Any) -> None:
    from m2n2_plugin.search.evolve import evolve

    run, _ = straight
    cfg = _config(workspace, "six-resumed")
    evolve(cfg, n_trials=5, progress=False)  # seeds 0-4; the mute seed comes after resuming
    resumed = evolve(cfg, progress=False)
    trials = resumed.study.trials
    assert [t.params for t in trials] == [t.params for t in run.study.trials]
    assert [t.state for t in trials] == [t.state for t in run.study.trials]
    assert resumed.sampler.archive(resumed.study).slots == run.sampler.archive(run.study).slots
    check_study_and_files(resumed.out, resumed.study, ARCHIVE_SIZE)


def _stored_capacity(study: optuna.Study) -> np.ndarray | None:
    """The capacity the sampler stored with the study (None: every example weighs 1)."""
    from m2n2_plugin.hub._state import decode_scores

    return decode_scores(study._storage.get_study_system_attrs(study._study_id), "m2n2:capacity")


def _two_tasks(workspace: Path, name: str, **fitness: Any) -> Path:
    return _config(
        workspace,
        name,
        tasks=["tiny_late", "tiny_first"],
        fitness_docs={"tiny_late": list(range(40)), "tiny_first": list(range(8))},
        search={"n_trials": 6},  # the seeds only: where the weighting decides who stays
        **fitness,
    )


def test_equal_task_weights_on_tasks_of_40_and_8_documents(workspace: Path) -> None:
    from m2n2_plugin.search.evolve import evolve

    per_task = evolve(_two_tasks(workspace, "tasks-equal"), progress=False)
    per_doc = evolve(
        _two_tasks(workspace, "tasks-per-doc", weighting="per_document"), progress=False
    )
    # The capacity the sampler got, stored with the study: mean 1, the small task's
    # documents weigh 5x each (1/8 against 1/40 of a task weight each).
    capacity = _stored_capacity(per_task.study)
    assert capacity == pytest.approx([0.6] * 40 + [3.0] * 8, rel=1e-15)
    assert capacity[-1] / capacity[0] == pytest.approx(5.0, rel=1e-15)
    assert _stored_capacity(per_doc.study) is None
    logged = per_task.study.user_attrs["m2n2.fitness_weights"]
    assert logged["weighting"] == "per_task"
    assert logged["task_weights"] == {"tiny_late": 1.0, "tiny_first": 1.0}
    assert logged["n_docs"] == {"tiny_late": 40, "tiny_first": 8}
    card = (per_task.out / "best" / "README.md").read_text()
    assert "Fitness weights: weighting per_task: tiny_late weight 1 over 40 documents" in card
    # Same seeds, same scores: the two runs differ only in the weights.
    values = [t.value for t in per_task.study.trials]
    assert values[:5] == [t.value for t in per_doc.study.trials][:5]
    # An observable consequence: the mute seed solves only the 8 small-task documents. With
    # equal task weights that niche is worth as much as the big task and it takes a slot;
    # counted per document it is too small, and it is dropped.
    trials = per_task.study.trials
    mute = trials[5]
    assert (
        per_task.sampler.archive(per_task.study).members
        == _independent_refold(trials, capacity)[-1]
    )
    assert (
        per_doc.sampler.archive(per_doc.study).members
        == _independent_refold(per_doc.study.trials)[-1]
    )
    assert mute.state == TrialState.COMPLETE and mute.value == 8 / 48
    assert mute.number in per_task.sampler.archive(per_task.study).members
    # The best model is picked by the same weights: the task-balanced mean.
    arch = per_task.sampler.archive(per_task.study)
    balanced = arch.scores @ capacity / capacity.sum()
    summary = json.loads((per_task.out / "summary.json").read_text())
    assert summary["best_trial"] == arch.members[int(np.argmax(balanced))]
    assert summary["best_fitness"] == pytest.approx(balanced.max())
    # The history (progress bar, trackers, plot) shows the same weighted best, not the plain one.
    history = (per_task.out / "history.jsonl").read_text().splitlines()
    last = json.loads(history[-1])
    assert last["archive_best"] == pytest.approx(balanced.max())
    assert last["archive_mean"] == pytest.approx(balanced.mean())
    # Here that is the mute seed: all of the small task is half the balanced score (0.5),
    # more than any random seed gets; by the plain mean (8/48) it is the weakest member.
    assert summary["best_trial"] == mute.number
    assert per_task.study.user_attrs["m2n2.best"]["trial"] == mute.number  # the dashboard's
    assert arch.best() != mute.number
    dropped = per_doc.study.trials[5]
    assert dropped.state == TrialState.PRUNED  # rejected early: it cannot enter
    assert dropped.number not in per_doc.sampler.archive(per_doc.study).members


def test_resume_with_other_task_weights_is_refused(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from m2n2_plugin.cli import main

    cfg = _two_tasks(workspace, "tasks-resume")
    assert main(["evolve", str(cfg), "--no-progress", "-n", "2"]) == 0
    capsys.readouterr()
    changed = _two_tasks(
        workspace, "tasks-resume", task_weights={"tiny_late": 2.0, "tiny_first": 1.0}
    )
    assert main(["evolve", str(changed), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a study with a different 'task_weights'" in err[0], err
    per_doc = _two_tasks(workspace, "tasks-resume", weighting="per_document")
    assert main(["evolve", str(per_doc), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different 'task_weights'" in err[0], err
    assert "this config's: every document the same" in err[0], err
    # The same weights resume.
    cfg = _two_tasks(workspace, "tasks-resume")
    assert main(["evolve", str(cfg), "--no-progress", "-n", "3"]) == 0
    capsys.readouterr()
    # A study that weighs every document the same (as every study made before
    # fitness.weighting) is not resumed with the new default; the line says how to resume it.
    old_style = _two_tasks(workspace, "tasks-old", weighting="per_document")
    assert main(["evolve", str(old_style), "--no-progress", "-n", "1"]) == 0
    capsys.readouterr()
    new_default = _two_tasks(workspace, "tasks-old")
    assert main(["evolve", str(new_default), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resume it with fitness.weighting: per_document" in err[0], err


def test_single_task_weights_change_nothing(workspace: Path) -> None:
    """One task: every weighting gives every document the same weight, so no capacity is
    stored and the run is the run of a config without these keys, bit for bit."""
    from m2n2_plugin.search.evolve import evolve

    plain = evolve(_config(workspace, "one-plain", search={"n_trials": 8}), progress=False)
    weighted = evolve(
        _config(
            workspace,
            "one-weighted",
            weighting="per_task",
            task_weights={"tiny_late": 3.5},
            search={"n_trials": 8},
        ),
        progress=False,
    )
    assert _stored_capacity(weighted.study) is None
    a, b = plain.study.trials, weighted.study.trials
    assert [(t.params, t.value, t.state) for t in a] == [(t.params, t.value, t.state) for t in b]
    assert [t.system_attrs["m2n2:scores"] for t in a if t.state == TrialState.COMPLETE] == [
        t.system_attrs["m2n2:scores"] for t in b if t.state == TrialState.COMPLETE
    ]
    assert (
        plain.sampler.archive(plain.study).slots == weighted.sampler.archive(weighted.study).slots
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_workers_with_more_seeds_than_slots(
    kind: str, workspace: Path, request: pytest.FixtureRequest
) -> None:
    """Three `m2n2 evolve` processes on one storage: six seeds, four slots, early rejection.

    Every seed is issued once (the mute one is rejected early by whichever worker gets it),
    the archive and its files are the re-fold's, and no seed folder is touched.
    """
    import subprocess

    from evolve_workspace import worker_cmd
    from evolve_workspace import worker_env
    from m2n2_plugin.hub import M2N2Sampler

    if kind == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{workspace / 'workers-six.db'}"
    name = f"six-workers-{kind}"
    cfg = _config(
        workspace, name, search={"n_trials": 12, "storage": url, "heartbeat_interval": 5}
    )
    before = {model: file_digests(workspace / model) for model in SEEDS}
    barrier = workspace / f"barrier-{name}"
    procs = [
        subprocess.Popen(
            worker_cmd("--barrier", str(barrier), "3", "--", "evolve", str(cfg)),
            env=worker_env(),
            cwd=workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        pytest.fail("a worker failed:\n" + "\n---\n".join(o[-3000:] for o in outputs))
    study = optuna.load_study(study_name="m2n2", storage=url)
    trials = study.trials
    assert not [t for t in trials if t.state == TrialState.FAIL], outputs
    seeds = [t.user_attrs["m2n2.seed"] for t in trials if "m2n2.seed" in t.user_attrs]
    assert sorted(seeds) == list(range(6))  # each seed once, none lost, none twice
    # The mute seed is dropped: rejected early, or (when it started before the archive was
    # full, so nothing could be proven yet) scored in full and not kept.
    mute = next(t for t in trials if t.user_attrs.get("m2n2.seed") == 5)
    assert mute.state == TrialState.PRUNED or (mute.value == 0.0 and mute.number > 0)
    assert mute.number not in M2N2Sampler(archive_size=ARCHIVE_SIZE).archive(study).members
    check_study_and_files(workspace / f"out-{name}", study, ARCHIVE_SIZE)
    assert {model: file_digests(workspace / model) for model in SEEDS} == before
