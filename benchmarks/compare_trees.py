"""Run benchmarks against two source trees, interleaved, and print the ratios new / old.

A refactoring must not make the code slower, but on a shared machine two runs minutes apart
differ by more than the change. So each repetition runs the old tree and the new one back to
back (the order alternating), each tree's own benchmark script in its own process, with
``PYTHONPATH`` pointing at that tree's package: a folder of links ``m2n2_plugin/`` to the
tree's ``src/m2n2_plugin`` plus ``m2n2_plugin/hub`` to its ``hub_package/samplers/m2n2`` (the
layout the installed package has). That path comes before the installed editable copy, and
subprocesses (``mergekit-yaml``) inherit it. The figures compared, medians over repetitions:

* ``merge``: ``bench_merge.py --skip-startup``: CPU seconds of one ``m2n2`` merge of two
  ~110 M-parameter models, through ``mergekit-yaml`` and ``run_merge``, and the ratio to
  mergekit's ``slerp`` measured alongside (the same code in both trees: a load gauge);
* ``resident``: ``bench_resident.py --worker resident``: seconds per child merged into the
  resident SmolLM2-135M and the peak RSS above the baseline;
* ``sampler``: bench_sampler.py's objective on in-memory storage, both trees' samplers in this
  process with their trials interleaved in chunks of 10 (imported from each tree by path):
  the sampler's milliseconds per trial near trial 100 and at the end of a
  ``--sampler-trials`` study (separate processes minutes apart differed by 1.6x on the
  shared machine, both ways); their archives must come out the same.

    git worktree add --detach /tmp/old c2359d4
    python benchmarks/compare_trees.py /tmp/old --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
Figures = dict[str, float]


def shadow(tree: Path, folder: Path) -> Path:
    """A folder to put on PYTHONPATH that imports ``m2n2_plugin`` (and ``.hub``) from ``tree``."""
    package = folder / "m2n2_plugin"
    package.mkdir(parents=True)
    for entry in (tree / "src" / "m2n2_plugin").iterdir():
        if entry.name not in ("hub", "__pycache__"):
            (package / entry.name).symlink_to(entry)
    (package / "hub").symlink_to(tree / "hub_package" / "samplers" / "m2n2")
    return folder


def run(tree: Path, path: Path, args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(path), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"{args[0]} failed in {tree}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def merge(tree: Path, path: Path, opts: argparse.Namespace) -> Figures:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "merge.json"
        args = ["benchmarks/bench_merge.py", "--skip-startup", "--json", str(out)]
        run(tree, path, [*args, "--repeats", str(opts.merge_repeats)])
        report = json.loads(out.read_text())
    figures: Figures = {}
    for key in ("cli", "in_process"):
        cpu = report[key][1]
        m2n2, slerp = statistics.median(cpu["m2n2"]), statistics.median(cpu["slerp"])
        figures[f"{key} m2n2 CPU s"] = m2n2
        figures[f"{key} m2n2/slerp CPU"] = m2n2 / slerp
    return figures


def resident(tree: Path, path: Path, opts: argparse.Namespace) -> Figures:
    sys.path[:0] = [str(HERE), str(HERE.parent / "examples" / "skills")]
    from bench_evolve import noisy_copy
    from smollm2 import smollm2

    a = smollm2()
    b = noisy_copy(a, Path.home() / ".cache" / "m2n2" / "smollm2-135m-noisy")
    args = ["benchmarks/bench_resident.py", "--worker", "resident", "--threads", "1"]
    args += ["--children", str(opts.children), "--parents", str(a), str(b)]
    report = json.loads(run(tree, path, args).strip().splitlines()[-1])
    if not report["identical"]:
        sys.exit(f"{tree}: the resident child differs from mergekit's")
    return {
        "s per child (median)": statistics.median(report["times"]),
        "peak RSS above baseline, MB": report["peaks"]["total"] / 1e6,
    }


def load_hub(tree: Path, name: str) -> Any:
    """The tree's Optuna Hub package, imported under ``name`` (two trees in one process)."""
    folder = tree / "hub_package" / "samplers" / "m2n2"
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def timed(base: type) -> type:
    """``base`` (an M2N2Sampler class) adding up the seconds of its own work per trial."""

    class Timed(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.own: dict[int, float] = {}

        def _timed(self, number: int, method: Any, *args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.own[number] = self.own.get(number, 0.0) + time.perf_counter() - t0

        def before_trial(self, study: Any, trial: Any) -> None:
            self._timed(trial.number, super().before_trial, study, trial)

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            method = super().sample_independent
            return self._timed(trial.number, method, study, trial, name, dist)

        def set_scores(self, trial: Any, scores: Any) -> None:
            self._timed(trial.number, super().set_scores, trial, scores)

    return Timed


def sampler_pair(trees: dict[str, Path], opts: argparse.Namespace) -> dict[str, Figures]:
    """Both trees' samplers in this process, their trials interleaved in chunks of 10.

    The objective is bench_sampler.py's (random 0/1 scores over 200 examples, in-memory
    storage); timed per trial: the sampler's own work (``before_trial``, the two
    ``sample_independent`` calls, ``set_scores``) and the whole trial (ask, objective, tell).
    In one process the load of a shared machine hits both alike, trial by trial.
    """
    import numpy as np
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = {}
    for tag, tree in trees.items():
        hub = sys.modules.get(f"hub_{tag}") or load_hub(tree, f"hub_{tag}")
        sampler = timed(hub.M2N2Sampler)(archive_size=20, seed=0)

        def objective(trial: Any, sampler: Any = sampler) -> float:
            sampler.parents(trial)
            trial.suggest_float("mix_ratio", 0.0, 1.0)
            trial.suggest_float("split_point", 0.0, 1.0)
            scores = np.random.default_rng([0, trial.number]).random(200) < 0.5
            sampler.set_scores(trial, scores)
            return float(scores.mean())

        study = optuna.create_study(sampler=sampler, direction="maximize")
        runs[tag] = (study, objective, sampler.own, [])
    n = opts.sampler_trials - opts.sampler_trials % 10
    for chunk in range(n // 10):
        for tag in runs if chunk % 2 == 0 else reversed(runs):
            study, objective, _, whole = runs[tag]
            for _ in range(10):
                t0 = time.perf_counter()
                study.optimize(objective, n_trials=1)
                whole.append(time.perf_counter() - t0)
    members = {tag: run[0].sampler.archive(run[0]).members for tag, run in runs.items()}
    if len({tuple(m) for m in members.values()}) != 1:
        sys.exit(f"the samplers' archives differ: {members}")
    figures = {}
    for tag, (_, _, own, whole) in runs.items():
        sampler_ms = [own[k] * 1e3 for k in range(n)]
        figures[tag] = {
            "sampler ms, trials 100-299": statistics.median(sampler_ms[100:300]),
            "sampler ms, last 200 trials": statistics.median(sampler_ms[-200:]),
            "whole trial ms, trials 100-299": statistics.median(whole[100:300]) * 1e3,
            "whole trial ms, last 200": statistics.median(whole[-200:]) * 1e3,
        }
    return figures


BENCHES: dict[str, Callable[[Path, Path, argparse.Namespace], Figures]] = {
    "merge": merge,
    "resident": resident,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the tree before the change (a git worktree)")
    parser.add_argument("--new", type=Path, default=HERE.parent, help="default: this tree")
    parser.add_argument("--repeats", type=int, default=3, help="old/new pairs per benchmark")
    choices = [*BENCHES, "sampler"]
    parser.add_argument("--benches", nargs="+", choices=choices, default=choices)
    parser.add_argument("--merge-repeats", type=int, default=2, help="bench_merge --repeats")
    parser.add_argument("--children", type=int, default=5, help="bench_resident --children")
    parser.add_argument("--sampler-trials", type=int, default=3000)
    opts = parser.parse_args()
    trees = {"old": opts.old.resolve(), "new": opts.new.resolve()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {tag: shadow(tree, Path(tmp) / tag) for tag, tree in trees.items()}
        for bench in opts.benches:
            results: dict[str, list[Figures]] = {"old": [], "new": []}
            for rep in range(opts.repeats):
                if bench == "sampler":
                    pair = sampler_pair(trees, opts)
                else:
                    order = ("old", "new") if rep % 2 == 0 else ("new", "old")
                    pair = {tag: BENCHES[bench](trees[tag], paths[tag], opts) for tag in order}
                for tag, figures in pair.items():
                    results[tag].append(figures)
                    print(f"  {bench} {tag} #{rep}: {figures}", file=sys.stderr, flush=True)
            print(f"\n{bench} (medians of {opts.repeats} old/new pairs, interleaved)")
            for key in results["old"][0]:
                old = statistics.median(r[key] for r in results["old"])
                new = statistics.median(r[key] for r in results["new"])
                print(f"  {key:34s} old {old:10.4f}  new {new:10.4f}  new/old {new / old:6.3f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
