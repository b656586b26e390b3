"""Where users look: optuna-dashboard, MLflow, W&B, the Hub's model card, the lineage picture.

Every component here is the real package, offline: the dashboard's own getters read back what
``m2n2 evolve`` saved into the study, MLflow writes a file store in a temp folder and its client
reads it back, W&B runs in offline mode and its run file is read back record by record,
``huggingface_hub.ModelCard.load`` parses the written card.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from evolve_workspace import build_workspace
from evolve_workspace import worker_env
from evolve_workspace import write_config
from optuna.distributions import FloatDistribution

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.report import family_tree
from m2n2_plugin.search.config import parse_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("tools"))


def synthetic_trials(
    n_trials: int,
    archive_size: int,
    seed: int,
    newest: bool = False,
    seed_names: tuple[str, str] = ("seed-0", "seed-1"),
) -> dict[int, Any]:
    """Real Optuna trials shaped like an M2N2 run's: two seeds, then children of archive
    members (a toy steady-state archive that keeps the highest means; ``newest``: that keeps
    the newest members instead, so every child enters and the lineage deepens with every
    trial, as a long run's does)."""
    rng = random.Random(seed)
    dist = {"mix_ratio": FloatDistribution(0, 1), "split_point": FloatDistribution(0, 1)}
    trials: dict[int, Any] = {}
    archive: list[int] = []
    for i in range(2):
        trials[i] = optuna.trial.create_trial(
            value=0.3 + 0.1 * i, user_attrs={"m2n2.seed": i, "m2n2.model": seed_names[i]}
        )
        archive.append(i)
    for n in range(2, n_trials):
        a, b = rng.sample(archive, 2)
        value = min(1.0, max(trials[a].value, trials[b].value) + rng.uniform(-0.05, 0.04))
        trials[n] = optuna.trial.create_trial(
            value=value,
            params={"mix_ratio": rng.random(), "split_point": rng.random()},
            distributions=dist,
            user_attrs={"m2n2.parents": [a, b]},
        )
        if newest:
            archive = [*archive, n][-archive_size:]
        elif len(archive) < archive_size:
            archive.append(n)
        else:
            worst = min(range(len(archive)), key=lambda k: trials[archive[k]].value)
            if value > trials[archive[worst]].value:
                archive[worst] = n
    return trials


def test_family_tree_of_about_fifty_trials(tmp_path: Path) -> None:
    import matplotlib.image

    trials = synthetic_trials(n_trials=100, archive_size=8, seed=3)
    best = max(trials, key=lambda n: trials[n].value)
    nodes = family_tree.ancestry(trials, best)
    assert 40 <= len(nodes) <= 70, len(nodes)
    assert {n for n, node in nodes.items() if node.parents is None} == {0, 1}
    for n, node in nodes.items():
        if node.parents is not None:
            a, b = node.parents
            assert node.generation == 1 + max(nodes[a].generation, nodes[b].generation)
            assert node.mix_ratio == trials[n].params["mix_ratio"]
    pos = family_tree.layout(nodes)
    assert len(set(pos.values())) == len(nodes)  # no two nodes on one spot
    assert all(pos[n][1] == -node.generation for n, node in nodes.items())
    path = tmp_path / "plots" / "lineage.png"
    family_tree.save_png(nodes, best, path, f"synthetic family tree of trial {best}")
    height, width, _ = matplotlib.image.imread(path).shape
    # Tall (one row per generation) and narrow enough to read without zooming out.
    assert 500 <= width <= 2000 and height > width
    fig = family_tree.plotly_figure(nodes, best, "synthetic")
    assert len(fig.data[2].x) == len(nodes)


def overlapping_labels(fig: Any) -> list[tuple[str, str]]:
    """Pairs of texts in ``fig`` whose drawn boxes overlap, as the renderer places them.

    A text's box is its rounded background patch where it has one (node and merge labels),
    else its glyphs (the generation ticks).
    """
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    [ax] = fig.axes
    boxes = []
    for text in [*ax.texts, *ax.get_yticklabels()]:
        patch = text.get_bbox_patch()
        box = (patch or text).get_window_extent(renderer)
        boxes.append((box, text.get_text().replace("\n", " ")))
    boxes.sort(key=lambda b: b[0].y0)
    pairs = []
    for i, (box, label) in enumerate(boxes):
        for other, other_label in boxes[i + 1 :]:
            if other.y0 >= box.y1:
                break  # sorted by bottom edge: nothing further up reaches this box
            if other.x0 < box.x1 and box.x0 < other.x1:
                pairs.append((label, other_label))
    return pairs


@pytest.mark.parametrize("n_trials", [40, 200])
def test_lineage_labels_never_overlap_however_deep(n_trials: int) -> None:
    """Every node and merge label of a deep family tree lies clear of every other.

    200 trials whose every child enters the archive give a lineage of ~130 generations, past
    the picture's height cap: squeezing the layers there put each merge label over the node
    above it. Long seed paths (as a mergekit config names local models) test the columns.
    """
    import matplotlib.pyplot as plt

    names = ("models/seed3/shift-specialist", "models/seed3/reverse-specialist")
    trials = synthetic_trials(n_trials, archive_size=4, seed=1, newest=True, seed_names=names)
    best = max(trials)
    nodes = family_tree.ancestry(trials, best)
    depth = max(node.generation for node in nodes.values())
    assert depth >= (100 if n_trials == 200 else 20), depth
    fig, dpi = family_tree.draw(nodes, best, f"deep synthetic tree of trial {best}")
    try:
        width, height = fig.get_size_inches()
        assert max(width, height) <= family_tree.MAX_INCHES
        # The resolution makes up for any shrinking: as many pixels per layer as at full size.
        assert dpi * height / (depth + 1) >= 0.95 * family_tree.DPI * family_tree.LAYER_INCHES
        labels = [t for t in fig.axes[0].texts if t.get_text().startswith("w=")]
        assert len(labels) == len(nodes) - 2  # one merge label per child
        assert overlapping_labels(fig) == []
    finally:
        plt.close(fig)


def test_card_settings_refuse_counts_per_task_that_miss_the_total() -> None:
    """A card whose per-task counts disagree with its totals would contradict itself."""
    from m2n2_plugin.report.outputs import Settings
    from m2n2_plugin.report.outputs import doc_counts

    counts = {"shift": 60, "reverse": 60}
    ok = Settings("s", 8, list(counts), "acc", "element", 120, fitness_counts=counts)
    assert doc_counts(ok.fitness_counts, ok.n_fitness_docs) == "shift: 60, reverse: 60; 120 in all"
    assert doc_counts({}, 200) == "200 in all"
    with pytest.raises(M2N2Error, match=r"held-out documents per task .* add up to 100, not 200"):
        Settings(
            "s", 8, ["shift"], "acc", "element", 60, ["shift"], 200, heldout_counts={"shift": 100}
        )


def test_tracking_config_keys_are_checked() -> None:
    base = {
        "mergekit_config": "seeds.yml",
        "fitness": {"tasks": ["t"], "metric": "acc", "fitness_docs": 3},
    }
    with pytest.raises(M2N2Error, match=r"search\.tracking: Input should be 'mlflow' or"):
        parse_config({**base, "search": {"tracking": "neptune"}}, Path("."))
    with pytest.raises(M2N2Error, match=r"search\.tracking_uri: .*only used with tracking: mlf"):
        parse_config({**base, "search": {"tracking_uri": "mlruns"}}, Path("."))
    cfg = parse_config({**base, "search": {"tracking": "mlflow", "tracking_uri": "x"}}, Path("/c"))
    assert cfg.tracking_uri() == "/c/x"  # a plain path is relative to the config file


def test_missing_tracking_package_is_one_line_before_anything_is_written(
    workspace: Path,
) -> None:
    cfg = write_config(workspace, "nomlflow", search__tracking="mlflow")
    # ``sys.modules[name] = None`` is Python's own way to make a module unimportable.
    code = (
        "import sys; sys.modules['mlflow'] = None; from m2n2_plugin.cli import main; "
        f"sys.exit(main(['evolve', {str(cfg)!r}, '--no-progress']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=worker_env()
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "m2n2: error: search.tracking: mlflow needs the mlflow package(s): "
        "pip install mlflow optuna-integration"
    ]
    assert not (workspace / "out-nomlflow").exists()


def test_evolve_tells_dashboard_mlflow_and_the_hub(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("optuna_dashboard")
    pytest.importorskip("plotly")
    pytest.importorskip("optuna_integration")
    mlflow = pytest.importorskip("mlflow")
    from huggingface_hub import ModelCard
    from optuna_dashboard import get_note
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    from m2n2_plugin.search.evolve import evolve

    # MLflow 3 refuses its file store unless asked for it (it prefers a database).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlruns = tmp_path / "mlruns"
    cfg = write_config(
        workspace,
        "tools",
        search__n_trials=12,
        search__tracking="mlflow",
        search__tracking_uri=str(mlruns),
    )
    run = evolve(cfg, progress=False)
    study, arch = run.study, run.sampler.archive(run.study)
    summary = json.loads((run.out / "summary.json").read_text())
    best = arch.best()
    assert summary["best_trial"] == best

    # The study says what M2N2's best is (Optuna's best_trial may have left the archive).
    record = study.user_attrs["m2n2.best"]
    assert record["trial"] == best
    assert record["mean_fitness"] == pytest.approx(float(arch.mean_scores.max()))
    assert record["coverage"] == pytest.approx(arch.coverage)
    assert record["heldout"] == summary["heldout"]["M2N2 best"]
    assert "may have left the archive" in study.user_attrs["m2n2.objective"]
    assert study.metric_names == ["mean fitness score"]

    # optuna-dashboard reads the plots and the note back from the study's system attrs.
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    graphs = get_plotly_graph_objects(system_attrs)
    assert set(graphs) == {"m2n2-fitness", "m2n2-coverage", "m2n2-lineage"}
    fitness = json.loads(graphs["m2n2-fitness"])
    names = [t["name"] for t in fitness["data"]]
    assert names[1:4] == ["archive best", "archive mean", "coverage"]
    # A child rejected early has no score (as in trials.log): its own trace, not a point.
    pruned = [t.number for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert names[4] == f"rejected early ({len(pruned)}): no score"
    assert fitness["data"][4]["x"] == pruned
    assert sorted(fitness["data"][0]["x"] + pruned) == list(range(12))
    lineage = json.loads(graphs["m2n2-lineage"])
    assert f"#{best}" in lineage["data"][2]["text"]
    assert f"Best archive member: trial {best}**" in get_note(study)
    # ... and so does the dashboard's own web API (its WSGI app, called in-process).
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    environ: dict[str, Any] = {"PATH_INFO": f"/api/studies/{study._study_id}"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(wsgi(study._storage)(environ, lambda s, h, *a: status.append(s)))
    assert status == ["200 OK"]
    page = json.loads(body)
    assert {g["id"] for g in page["plotly_graph_objects"]} == set(graphs)
    assert page["objective_names"] == ["mean fitness score"]

    # MLflow: one run per trial (the optuna-integration callback) with M2N2's numbers, and
    # a run with the archive's best and the held-out scores.
    client = mlflow.MlflowClient(str(mlruns))
    experiment = client.get_experiment_by_name(study.study_name)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {str(n) for n in range(12)} | {"m2n2 best"}
    for t in study.trials:
        data = runs[str(t.number)].data
        assert {"coverage", "archive_best", "in_archive"} <= set(data.metrics)
        if t.value is not None:
            assert data.metrics["mean_score"] == pytest.approx(t.value)
        if "m2n2.parents" in t.user_attrs:
            a, b = t.user_attrs["m2n2.parents"]
            assert (data.params["parent_a"], data.params["parent_b"]) == (str(a), str(b))
            assert float(data.params["mix_ratio"]) == pytest.approx(t.params["mix_ratio"])
            assert float(data.params["split_point"]) == pytest.approx(t.params["split_point"])
        else:
            assert data.params["seed"] == t.user_attrs["m2n2.model"]
    last = runs["11"].data.metrics
    assert last["coverage"] == pytest.approx(arch.coverage)
    assert last["archive_best"] == pytest.approx(float(arch.mean_scores.max()))
    final = runs["m2n2 best"].data
    assert final.params["best_trial"] == str(best)
    assert final.metrics["heldout/tiny_mc"] == pytest.approx(record["heldout"]["tiny_mc"])
    artifacts = {a.path for a in client.list_artifacts(runs["m2n2 best"].info.run_id, "plots")}
    assert artifacts == {"plots/fitness.png", "plots/coverage.png", "plots/lineage.png"}

    # The model card's metadata, as the Hub parses it.
    card = ModelCard.load(run.out / "best" / "README.md")
    assert card.data.base_model == ["m0", "m1", "m2"]  # as named in seeds.yml
    assert card.data.tags == ["merge", "mergekit", "m2n2"]
    assert card.data.base_model_relation == "merge"
    [result] = card.data.eval_results
    assert (result.dataset_type, result.metric_type) == ("tiny_mc", "acc")
    assert result.metric_value == pytest.approx(record["heldout"]["tiny_mc"])
    assert "| model | tiny_mc | mean |" in card.text and "## Lineage" in card.text
    merges = [n for n in family_tree.ancestry(dict(enumerate(study.trials)), best).values()]
    merges = [n for n in merges if n.parents is not None]
    assert len(merges) == summary["n_merges_in_lineage"]
    trials = {t.number: t for t in study.trials}

    def parent(number: int) -> str:  # a seed by its name in seeds.yml, a child by number
        name = trials[number].user_attrs.get("m2n2.model")
        return str(number) if name is None else f"`{name}` (seed, trial {number})"

    for node in merges:  # the lineage in prose: one table row per merge
        a, b = node.parents
        assert f"| {node.number} | {parent(a)} | {parent(b)} | " in card.text

    # The lineage picture, in plots/ and beside the card.
    for path in (run.out / "plots" / "lineage.png", run.out / "best" / "lineage.png"):
        assert path.stat().st_size > 5000


def _wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (a LevelDB-style log of protobuf ``Record`` messages:
    32 KiB blocks, 7-byte chunk headers -- checksum, length, type -- after a 7-byte file
    header). wandb 0.31 has no Python reader of its own any more."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, buf, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def test_evolve_logs_to_wandb_offline(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("optuna_integration")
    from m2n2_plugin.search.evolve import evolve

    for key in ("WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = write_config(workspace, "wandb", search__n_trials=8, search__tracking="wandb")
    run = evolve(cfg, progress=False)
    import wandb

    # run.finish() returns before wandb's service has written everything to the run file
    # (seen under load); teardown waits for it, as the exit of an ``m2n2 evolve`` process does.
    wandb.teardown()
    [run_file] = (run.out / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    steps: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = r.history.item
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            steps.setdefault(row["_step"], {}).update(row)
    assert set(range(8)) <= set(steps)
    for t in run.study.trials:
        row = steps[t.number]
        assert row["mean_score"] == pytest.approx(t.value)
        assert {"coverage", "archive_best", "in_archive"} <= set(row)
        if "m2n2.parents" in t.user_attrs:
            assert [row["parent_a"], row["parent_b"]] == t.user_attrs["m2n2.parents"]
            assert row["mix_ratio"] == pytest.approx(t.params["mix_ratio"])
            assert row["split_point"] == pytest.approx(t.params["split_point"])
    summary_keys = {
        u.key
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for u in r.summary.update
    }
    assert {"best_trial", "best_fitness", "heldout/tiny_mc"} <= summary_keys
    assert os.path.isdir(run_file.parent / "files" / "media" / "images" / "plots")
