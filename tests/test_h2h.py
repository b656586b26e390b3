"""The head-to-head harness (examples/skills/h2h.py): its statistics on made-up numbers with
known answers, and a miniature of a whole head to head on tiny models (2 seeds per method)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from evolve_workspace import MC_TASK
from evolve_workspace import build_workspace
from evolve_workspace import worker_env

H2H = Path(__file__).resolve().parents[1] / "examples" / "skills" / "h2h.py"


def _h2h():
    spec = importlib.util.spec_from_file_location("h2h", H2H)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


h2h = _h2h()


def test_a12_known_values() -> None:
    assert h2h.a12([3, 4, 5], [0, 1, 2]) == 1.0
    assert h2h.a12([0, 1, 2], [3, 4, 5]) == 0.0
    assert h2h.a12([1, 1], [1, 1]) == 0.5
    # (1 vs 1: half) (1 vs 3: 0) (2 vs 1: 1) (2 vs 3: 0) -> 1.5 / 4
    assert h2h.a12([1, 2], [1, 3]) == pytest.approx(0.375)
    # Blocks: only runs of the same block meet. Block p: 5 beats 4; block q: 1 loses to 2.
    # Pooled, 5 would also beat 2 and 1 lose to 4 (2 of 4 again), so pick a case where the
    # answers differ: x = [5, 3] in blocks p, q and y = [4, 2] in p, q -> 1.0 within blocks,
    # 0.75 pooled (3 vs 4 is a loss).
    assert h2h.a12([5, 3], [4, 2], blocks=(["p", "q"], ["p", "q"])) == 1.0
    assert h2h.a12([5, 3], [4, 2]) == 0.75
    with pytest.raises(ValueError, match="both methods"):
        h2h.a12([1], [2], blocks=(["p"], ["q"]))


def test_bootstrap_difference_known_intervals() -> None:
    # Every run of a scores each document 0.2 above b: any resample gives exactly 0.2.
    rng = np.random.default_rng(1)
    b = rng.uniform(0, 0.8, size=(3, 50))
    a = b[[0, 0, 0]] + 0.2
    b = b[[0, 0, 0]]
    d = h2h.bootstrap_difference(a, b, iterations=500)
    assert d["diff"] == pytest.approx(0.2)
    assert d["low"] == pytest.approx(0.2) and d["high"] == pytest.approx(0.2)
    # Documents all alike, two seeds of a at 0.8 and 0.9, b at 0.5: a resampled mean is 0.8,
    # 0.85 or 0.9 (probabilities 1/4, 1/2, 1/4), so the 95 % interval is [0.3, 0.4].
    a = np.array([[0.8] * 20, [0.9] * 20])
    b = np.full((3, 20), 0.5)
    d = h2h.bootstrap_difference(a, b, iterations=4000)
    assert d["diff"] == pytest.approx(0.35)
    assert d["low"] == pytest.approx(0.3) and d["high"] == pytest.approx(0.4)
    # A real difference of 0.1 in scores of 0/1 over 2,000 documents: the interval holds it
    # and is about +-2 sd of a paired difference wide.
    rng = np.random.default_rng(2)
    base = rng.uniform(size=2000)
    a = (base[None, :] < np.array([[0.6], [0.6]])).astype(float)
    b = (base[None, :] < np.array([[0.5], [0.5]])).astype(float)
    d = h2h.bootstrap_difference(a, b, iterations=2000)
    assert d["low"] < a.mean() - b.mean() < d["high"]
    assert 0.02 < d["high"] - d["low"] < 0.05
    with pytest.raises(ValueError, match="same documents"):
        h2h.bootstrap_difference(np.zeros((2, 3)), np.zeros((2, 4)))


def test_bootstrap_difference_pairs_methods_within_blocks() -> None:
    # Two trainings of the specialists, one much easier: block p scores 0.9 / 0.8 (a ahead by
    # 0.1), block q 0.5 / 0.4 (a ahead by 0.1). Within blocks the difference is exactly 0.1
    # in every resample. Pooled, with a's runs mostly in p and b's mostly in q, the difference
    # would mix in the blocks' difficulty: (0.9 + 0.9 + 0.5) / 3 - (0.8 + 0.4 + 0.4) / 3 = 0.7 / 3.
    docs = 40
    a = np.array([[0.9] * docs, [0.9] * docs, [0.5] * docs])
    b = np.array([[0.8] * docs, [0.4] * docs, [0.4] * docs])
    blocks = (["p", "p", "q"], ["p", "q", "q"])
    d = h2h.bootstrap_difference(a, b, iterations=1000, blocks=blocks)
    assert d["blocks"] == 2
    assert d["diff"] == pytest.approx(0.1)
    assert d["low"] == pytest.approx(0.1) and d["high"] == pytest.approx(0.1)
    assert h2h.bootstrap_difference(a, b, iterations=200)["diff"] == pytest.approx(0.7 / 3)
    # Block differences of 0.0 and 0.2 (one run per method each, documents all alike): a
    # resample of the 2 blocks gives 0.0, 0.1 or 0.2 (1/4, 1/2, 1/4): interval [0.0, 0.2].
    a = np.array([[0.5] * docs, [0.7] * docs])
    b = np.array([[0.5] * docs, [0.5] * docs])
    d = h2h.bootstrap_difference(a, b, iterations=4000, blocks=(["p", "q"], ["p", "q"]))
    assert d["diff"] == pytest.approx(0.1)
    assert d["low"] == pytest.approx(0.0) and d["high"] == pytest.approx(0.2)
    # A block with one method only cannot be compared: it is left out.
    d = h2h.bootstrap_difference(a, b[:1], iterations=200, blocks=(["p", "q"], ["p"]))
    assert d["blocks"] == 1 and d["diff"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="both methods"):
        h2h.bootstrap_difference(a[:1], b[:1], blocks=(["p"], ["q"]))


def test_mean_curve_and_documents_to_reach() -> None:
    curves = [[[10, 0.5], [20, 0.7], [30, 0.9]], [[10, 0.3], [25, 0.5]]]
    grid, mean, sd = h2h.mean_curve(curves)
    assert grid.tolist() == [10, 20, 25, 30]
    # run 2 keeps 0.5 after its last point at 25
    assert mean.tolist() == pytest.approx([0.4, 0.5, 0.6, 0.7])
    assert sd[0] == pytest.approx(0.1)
    assert h2h.documents_to_reach(curves, 0.6) == 25
    assert h2h.documents_to_reach(curves, 0.71) is None
    # The grid starts once every run has a score.
    assert h2h.mean_curve([[[5, 0.1], [10, 0.2]], [[10, 0.4]]])[0].tolist() == [10]


def test_compare_reports_fractions_of_the_other_methods_documents() -> None:
    def run(curve: list, docs: list[float]) -> dict:
        return {
            "curve": curve,
            "docs": curve[-1][0],
            "heldout_scores": docs,
            "specialists_sha256": ["a", "b"],
        }

    fast = [run([[100, 0.8], [200, 0.9], [1000, 0.95]], [1.0, 1.0, 0.0, 1.0])] * 2
    slow = [run([[100, 0.5], [1000, 0.9]], [1.0, 0.0, 0.0, 1.0])] * 2
    c = h2h.compare(fast, slow)
    assert c["heldout_difference"]["diff"] == pytest.approx(0.25)
    assert c["a12"] == 1.0
    assert c["docs_to_reach_other_final"] == 200 and c["fraction_of_other_docs"] == 0.2
    assert c["other_docs_to_reach_my_final"] is None  # slow never reaches 0.95


def test_parse_runs() -> None:
    plan = h2h.parse_runs(["cma", "m2n2:paper@4,5", "m2n2"], [0, 1])
    assert plan == [
        ("cma", "default", 0),
        ("cma", "default", 1),
        ("m2n2", "paper", 4),
        ("m2n2", "paper", 5),
        ("m2n2", "default", 0),
        ("m2n2", "default", 1),
    ]
    for bad in ("ga", "m2n2:nope", "cma:paper", "m2n2@x"):
        with pytest.raises(ValueError, match="--runs"):
            h2h.parse_runs([bad], [0])


@pytest.mark.slow
def test_miniature_head_to_head(tmp_path: Path) -> None:
    """Tiny models, two tasks, 2 seeds per method: every run stops at the first trial that
    reaches the budget, the JSON has the issue's shape, and a rerun resumes (runs nothing)."""
    pytest.importorskip("cmaes")
    root = build_workspace(tmp_path / "ws")
    data = root / "tasks" / "mc.jsonl"
    (root / "tasks" / "mc2.yaml").write_text(MC_TASK.format(name="tiny_mc2", data=data, extra=""))
    budget = 70
    cmd = [
        sys.executable,
        str(H2H),
        *("--specialists", str(root / "m1"), str(root / "m2"), "--base", str(root / "m0")),
        *("--tasks", "tiny_mc", "tiny_mc2", "--include-path", str(root / "tasks")),
        *("--metric", "acc", "--fitness-docs", "5", "--heldout-docs", "4"),
        *("--budget-docs", str(budget), "--seeds", "0", "1", "--cma-granularity", "1"),
        *("--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")),
        *("--name", "mini", "--runs", "m2n2", "cma"),
    ]
    done = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((tmp_path / "results" / "mini.json").read_text())
    assert doc["pair"] == ["m1", "m2"] and doc["budget_docs"] == budget
    assert doc["heldout_ids"] == [5, 6, 7, 8]
    runs = doc["runs"]
    assert sorted((r["method"], r["search_seed"]) for r in runs) == [
        ("cma", 0),
        ("cma", 1),
        ("m2n2", 0),
        ("m2n2", 1),
    ]
    for r in runs:
        totals = [p[0] for p in r["curve"]]
        bests = [p[1] for p in r["curve"]]
        assert r["docs"] == totals[-1] >= budget > totals[-2]  # stopped at the first crossing
        assert bests == sorted(bests)  # best so far never drops
        assert set(r["heldout"]) == {"m1", "m2", "mean"}
        assert len(r["heldout_scores"]) == 8
        assert r["heldout"]["mean"] == pytest.approx(np.mean(r["heldout_scores"]))
        assert r["wall_s"] > 0
    cma = [r for r in runs if r["method"] == "cma"]
    assert all(r["curve"][0][0] == 10 for r in cma)  # every CMA-ES trial scores all 10
    studies = [
        optuna.load_study(study_name="cma", storage=f"sqlite:///{run / 'study.db'}")
        for run in sorted((tmp_path / "runs").glob("*/*/cma-default-s*"))
    ]
    assert studies[0].trials[0].params == studies[1].trials[0].params  # both start at x0
    assert studies[0].trials[1].params != studies[1].trials[1].params  # seeds differ after
    assert "M2N2 (default) - CMA-ES" in doc["comparisons"]
    assert (tmp_path / "results" / "mini.png").stat().st_size > 10_000
    assert "A12" in (tmp_path / "results" / "mini.md").read_text()
    # A finished M2N2 run keeps its best model, not its archive (disk: archive_size models).
    for run in (tmp_path / "runs").glob("*/*/m2n2-default-s*"):
        assert (run / "best" / "model.safetensors").is_file()
        assert not (run / "archive").exists() and not (run / "config_merge").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("result.json")}
    again = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "4 of 4 runs done" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # A new machine has the committed results file and no runs folder: nothing is rerun.
    shutil.rmtree(tmp_path / "runs")
    fresh = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr
    assert "4 finished runs restored" in fresh.stdout and "4 of 4 runs done" in fresh.stdout
    assert json.loads((tmp_path / "results" / "mini.json").read_text())["runs"] == runs


def test_restore_writes_back_runs_of_the_same_set_up_into_their_blocks(tmp_path: Path) -> None:
    setup = {
        "name": "p",
        "pair": ["a", "b"],
        "tasks": ["t1", "t2"],
        "fitness_docs": 5,
        "heldout_docs": [5, 6],
        "budget_docs": 70,
    }
    # The same seed on two trainings of the specialists (two machines): two blocks, two runs.
    run = {"method": "cma", "variant": "default", "search_seed": 3, "docs": 70}
    runs = [{**run, "specialists_sha256": ["a", "b"]}, {**run, "specialists_sha256": ["c", "d"]}]
    record = {k: v for k, v in setup.items() if k not in ("name", "heldout_docs")}
    record |= {"heldout_ids": [5, 6], "runs": runs}
    results = tmp_path / "results"
    results.mkdir()
    (results / "p.json").write_text(json.dumps(record))
    other = {**setup, "budget_docs": 80}
    assert h2h.restore(other, tmp_path / "runs", results) == 0
    assert not (tmp_path / "runs").exists()
    assert h2h.restore(setup, tmp_path / "runs", results) == 2
    for r in runs:
        block = h2h.block_of(r["specialists_sha256"])
        written = tmp_path / "runs" / block / "cma-default-s3" / "result.json"
        assert json.loads(written.read_text()) == r
    assert h2h.block_of(["a", "b"]) != h2h.block_of(["c", "d"])
    assert h2h.restore(setup, tmp_path / "runs", results) == 0  # present: left alone


def test_a_block_with_another_set_up_is_one_line(tmp_path: Path, capsys) -> None:
    """Runs of one block share tasks, documents and metric: a rerun that changes one of them
    in the same runs folder is refused, before anything is trained or run."""
    folders = []
    for name in ("a", "b", "base"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(name.encode())
        folders.append(str(tmp_path / name))
    args = [
        *("--specialists", folders[0], folders[1], "--base", folders[2]),
        *("--tasks", "t1", "t2", "--fitness-docs", "5", "--heldout-docs", "4"),
        *("--budget-docs", "70", "--runs-dir", str(tmp_path / "runs"), "--name", "p"),
        *("--results-dir", str(tmp_path / "results"), "--runs", "cma@0", "--metric"),
    ]
    shas = [h2h.sha256(Path(f) / "model.safetensors") for f in folders[:2]]
    here = tmp_path / "runs" / "p_f5_b70" / h2h.block_of(shas)
    here.mkdir(parents=True)
    known = {"tasks": ["t1", "t2"], "metric": "acc", "specialists_sha256": shas}
    (here / "setup.json").write_text(json.dumps(known))
    assert h2h.main([*args, "exact_match"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metric" in err and str(here) in err
    assert json.loads((here / "setup.json").read_text()) == known  # left as it was
