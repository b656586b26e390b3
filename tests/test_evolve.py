"""`m2n2 evolve` end to end on tiny generated models and local lm-eval tasks (offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from evolve_workspace import MC_TASK
from evolve_workspace import build_workspace
from evolve_workspace import rebuild_lineage
from evolve_workspace import worker_env
from evolve_workspace import write_config
from evolve_workspace import write_gsm_task

from m2n2_plugin.errors import M2N2Error


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny workspace plus a GSM8k-format task (``tiny_gsm``) beside ``tiny_mc``."""
    root = build_workspace(tmp_path_factory.mktemp("evolve"))
    write_gsm_task(root / "tasks")
    return root


def test_loop_archive_invariants_and_outputs(workspace: Path) -> None:
    from m2n2_plugin.search.evolve import evolve
    from m2n2_plugin.search.workers import member_file

    run = evolve(write_config(workspace, "main", search__n_trials=14), progress=False)
    arch = run.sampler.archive(run.study)
    assert 1 <= len(arch.members) <= 4
    assert len(set(arch.members)) == len(arch.members)
    assert arch.scores.shape == (len(arch.members), 30)
    # Files exist exactly for the children in the archive (seeds stay in their own folders).
    seeds = {t.number for t in run.study.trials if "m2n2.seed" in t.user_attrs}
    assert seeds == {0, 1, 2}
    children = [m for m in arch.members if m not in seeds]
    on_disk = sorted(
        int(p.stem.split("_")[1]) for p in (run.out / "archive").glob("*.safetensors")
    )
    assert on_disk == sorted(children)
    for m in children:
        assert member_file(run.out, m).is_file()
    # Every child names its parents, and its mean score is what the sampler holds.
    for t in run.study.trials:
        if t.number not in seeds:
            assert set(t.params) == {"mix_ratio", "split_point"}
            assert len(t.user_attrs["m2n2.parents"]) == 2
    best = run.out / "best"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "lineage.yml"):
        assert (best / name).is_file(), name
    card = (best / "README.md").read_text()
    assert "m0" in card and "m1" in card and "Held-out" in card
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["best_trial"] in arch.members
    assert (run.out / "plots" / "fitness.png").stat().st_size > 1000
    assert (run.out / "plots" / "coverage.png").stat().st_size > 1000
    log = (run.out / "trials.log").read_text().splitlines()
    assert len(log) == 14 and log[3].startswith("trial 3: child of")


def test_resume_continues_the_same_study(workspace: Path) -> None:
    from m2n2_plugin.search.evolve import evolve

    cfg = write_config(workspace, "resume", search__n_trials=6)
    first = evolve(cfg, progress=False)
    before = [(t.number, t.params, t.value) for t in first.study.trials]
    again = evolve(cfg, n_trials=9, progress=False)
    after = [(t.number, t.params, t.value) for t in again.study.trials]
    assert len(after) == 9
    assert after[:6] == before
    assert again.study.study_name == first.study.study_name
    # A different fitness set is refused rather than silently mixed into the old study.
    changed = write_config(workspace, "resume", fitness__fitness_docs=20, search__n_trials=6)
    with pytest.raises(M2N2Error, match="different"):
        evolve(changed, progress=False)


def test_lineage_yaml_rebuilds_the_best_model(workspace: Path, tmp_path: Path) -> None:
    from m2n2_plugin.search.evolve import evolve

    # Search seed 0 over 14 trials: the best member is a child (trial 11, a grandchild of
    # the seeds), so the lineage has merges to rebuild. Were it a seed, there would be nothing
    # to test: fail, and pick another seed or trial count.
    run = evolve(write_config(workspace, "lineage", search__n_trials=14), progress=False)
    docs = rebuild_lineage(run.out, tmp_path)
    assert all(d["merge_method"] == "m2n2" for d in docs)


def test_gsm8k_format_generation_task(workspace: Path) -> None:
    from m2n2_plugin.search.evolve import evolve

    cfg = write_config(
        workspace,
        "gsm",
        fitness={
            "include_path": "tasks",
            "tasks": ["tiny_gsm", "tiny_mc"],
            "metric": "exact_match",
            "filter": "strict-match",
            "fitness_docs": {"tiny_gsm": [0, 1, 2, 3]},
            "gen_kwargs": {"max_gen_toks": 3},
        },
        search={"n_trials": 4, "archive_size": 3, "heartbeat_interval": None},
    )
    # tiny_mc has no exact_match: the metric is checked per task before anything runs.
    with pytest.raises(M2N2Error, match="tiny_mc.*exact_match"):
        evolve(cfg, progress=False)
    cfg = write_config(
        workspace,
        "gsm",
        fitness={
            "include_path": "tasks",
            "tasks": ["tiny_gsm"],
            "metric": "exact_match",
            "filter": "strict-match",
            "fitness_docs": [0, 1, 2, 3],
            "heldout_docs": 2,
            "gen_kwargs": {"max_gen_toks": 3},
        },
        search={"n_trials": 4, "archive_size": 3, "heartbeat_interval": None},
    )
    run = evolve(cfg, progress=False)
    settings = run.study.user_attrs["m2n2.generation_settings"]["tiny_gsm"]
    assert settings["generation_kwargs"]["max_gen_toks"] == 3
    assert settings["filter"] == "strict-match"
    assert len(run.study.trials) == 4


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed `m2n2` console script in a subprocess."""
    exe = shutil.which("m2n2")
    cmd = [exe] if exe else [sys.executable, "-m", "m2n2_plugin.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, env=worker_env())


def test_console_script_reports_a_bad_config_in_one_line(workspace: Path) -> None:
    (workspace / "broken.yml").write_text("fitness: [unclosed\n")
    proc = _cli("evolve", "broken.yml", cwd=workspace)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == "m2n2: error: config file 'broken.yml' is not valid YAML (line 2)"
    )


def test_existing_slerp_and_ties_configs_work_unchanged(workspace: Path) -> None:
    from m2n2_plugin.merge.models import seeds_from_mergekit

    slices = yaml.safe_load(
        """
        slices:
          - sources:
              - model: m0
                layer_range: [0, 2]
              - model: m1
                layer_range: [0, 2]
        merge_method: slerp
        base_model: m0
        parameters:
          t: [0, 0.5, 0.3, 0.7, 1]
        dtype: bfloat16
        """
    )
    seeds, carried = seeds_from_mergekit(slices, workspace)
    assert [s.name for s in seeds] == ["m0", "m1"]
    assert carried["dtype"] == "bfloat16" and carried["base_model"] == str(workspace / "m0")
    ties = yaml.safe_load(
        """
        models:
          - model: m0
            parameters: {density: 0.5, weight: 0.5}
          - model: m1
            parameters: {density: 0.5, weight: 0.5}
        merge_method: ties
        base_model: m2
        parameters: {normalize: true}
        dtype: float16
        tokenizer_source: base
        """
    )
    seeds, carried = seeds_from_mergekit(ties, workspace)
    # The base model of a ties merge is not one of the models being merged: not a seed.
    assert [s.path for s in seeds] == [workspace / "m0", workspace / "m1"]
    assert carried["tokenizer_source"] == "base" and carried["dtype"] == "float16"


def test_early_rejection_keeps_the_archive_identical(workspace: Path) -> None:
    """The same seeded run with and without early rejection: same archive after every trial."""
    from m2n2_plugin.search.evolve import evolve

    def archives(early: bool) -> tuple[list[tuple[int, list, list]], int]:
        seen: list[tuple[int, list, list]] = []

        def record(run, frozen) -> None:  # noqa: ANN001
            arch = run.sampler.archive(run.study)
            seen.append((frozen.number, list(arch.slots), arch.slot_scores.tolist()))

        cfg = write_config(
            workspace,
            f"early-{early}",
            search={
                "n_trials": 16,
                "archive_size": 3,
                "seed": 3,
                "heartbeat_interval": None,
                "early_rejection": early,
                "rejection_chunk": 5,
            },
        )
        run = evolve(cfg, progress=False, on_trial=record)
        docs = sum(t.user_attrs.get("m2n2.docs_evaluated", 0) for t in run.study.trials)
        return seen, docs

    full, docs_full = archives(False)
    early, docs_early = archives(True)
    assert [a[0] for a in full] == list(range(16))
    assert early == full
    assert docs_early < docs_full


def test_pictures_and_card_of_a_two_task_run_with_early_rejection(workspace: Path) -> None:
    """fitness.png draws no score for a child rejected early, coverage.png has a colour key
    and the task boundary, and the card counts each task's documents and names the seeds.

    Two tasks of 20 and 8 fitness documents (5 and 3 held out): the counts per task differ,
    so a card that printed the totals for each task, or a boundary in the wrong place, shows.
    """
    from huggingface_hub import ModelCard
    from matplotlib import pyplot as plt
    from optuna.trial import TrialState

    from m2n2_plugin.report import plots
    from m2n2_plugin.report.outputs import read_history
    from m2n2_plugin.search.evolve import evolve

    data = workspace / "tasks" / "mc.jsonl"
    (workspace / "tasks" / "mc2.yaml").write_text(
        MC_TASK.format(name="tiny_mc2", data=data, extra="")
    )
    fitness = {"tiny_mc": list(range(20)), "tiny_mc2": list(range(8))}
    heldout = {"tiny_mc": list(range(30, 35)), "tiny_mc2": list(range(30, 33))}
    cfg = write_config(
        workspace,
        "pictures",
        fitness__tasks=["tiny_mc", "tiny_mc2"],
        fitness__fitness_docs=fitness,
        fitness__heldout_docs=heldout,
        search={
            "n_trials": 16,
            "archive_size": 3,
            "seed": 3,
            "heartbeat_interval": None,
            "rejection_chunk": 5,
        },
    )
    run = evolve(cfg, progress=False)
    trials = {t.number: t for t in run.study.trials}
    rejected = sorted(n for n, t in trials.items() if t.state == TrialState.PRUNED)
    scored = sorted(n for n, t in trials.items() if t.state == TrialState.COMPLETE)
    assert rejected, "no child was rejected early: nothing to draw apart (change the seed)"
    assert all(trials[n].value is not None for n in rejected)  # Optuna keeps a partial mean
    log = (run.out / "trials.log").read_text().splitlines()
    assert [int(line.split(":")[0].split()[1]) for line in log if "rejected early" in line] == (
        rejected
    )

    # fitness.png: scores only for the trials trials.log gives one; the rejected ones in the
    # strip below; the legend outside the curves.
    fig = plots.fitness_figure(read_history(run.out), trials)
    try:
        ax, strip = fig.axes[:2]
        [points] = ax.collections
        assert sorted(int(x) for x, _ in points.get_offsets()) == scored
        for x, y in points.get_offsets():
            assert y == pytest.approx(trials[int(x)].value)
        [rug] = strip.lines
        assert list(rug.get_xdata()) == rejected
        assert f"rejected early ({len(rejected)})" in rug.get_label()
        fig.draw_without_rendering()
        renderer = fig.canvas.get_renderer()
        legend = ax.get_legend().get_window_extent(renderer)
        assert legend.x0 >= ax.get_window_extent(renderer).x1  # beside the axes, not over
    finally:
        plt.close(fig)
    assert (run.out / "plots" / "fitness.png").stat().st_size > 1000

    # coverage.png: a colour key, and a line where tiny_mc's 20 documents end.
    arch = run.sampler.archive(run.study)
    fig = plots.coverage_figure(arch, {"tiny_mc": 20, "tiny_mc2": 8}, "acc")
    try:
        ax = fig.axes[0]
        [image] = ax.images
        assert image.colorbar is not None
        assert image.colorbar.ax.get_ylabel() == "per-document score (acc)"
        assert [line.get_xdata()[0] for line in ax.lines] == [19.5]
        [top] = ax.child_axes
        assert [t.get_text() for t in top.get_xticklabels()] == ["tiny_mc (20)", "tiny_mc2 (8)"]
    finally:
        plt.close(fig)
    # Counts that do not add up to the documents draw no boundary rather than a wrong one.
    fig = plots.coverage_figure(arch, {"tiny_mc": 20, "tiny_mc2": 7}, "acc")
    try:
        assert not fig.axes[0].lines and not fig.axes[0].child_axes
    finally:
        plt.close(fig)

    # The card: each task's own document counts, and the seeds by their names in seeds.yml.
    card = ModelCard.load(run.out / "best" / "README.md")
    splits = {r.dataset_name: r.dataset_split for r in card.data.eval_results}
    assert splits == {
        "tiny_mc": "held-out documents (5, never used for selection)",
        "tiny_mc2": "held-out documents (3, never used for selection)",
    }
    assert "over the fitness documents (tiny_mc: 20, tiny_mc2: 8; 28 in all)" in card.text
    assert "never used for selection (tiny_mc: 5, tiny_mc2: 3; 8 in all)" in card.text
    seeds = {
        n: t.user_attrs["m2n2.model"] for n, t in trials.items() if "m2n2.seed" in t.user_attrs
    }
    assert sorted(seeds.values()) == ["m0", "m1", "m2"]
    rows = [
        line for line in card.text.splitlines() if line.startswith("| ") and "|---" not in line
    ]
    lineage_rows = [r.split(" | ") for r in rows if r.split(" | ")[0].strip("| ").isdigit()]
    assert lineage_rows, "the best model is a seed: no lineage table to check (change the seed)"
    parents = [cell for row in lineage_rows for cell in row[1:3]]
    for cell in parents:
        assert not (cell.isdigit() and int(cell) in seeds), f"seed named by trial number: {cell}"
    named = [cell for cell in parents if not cell.isdigit()]
    assert named, "no merge in the lineage has a seed parent"
    for cell in named:
        number = int(cell.rsplit("trial ", 1)[1].rstrip(")"))
        assert cell == f"`{seeds[number]}` (seed, trial {number})"
