"""More seeds than slots, and unequal task sizes, on the built-in example (issue 20).

Takes the example's trained specialists (``m2n2_plugin.example.build_example``: trained once,
cached in FOLDER) and runs two variants of its search:

* **seeds compete**: the two specialists plus two "noisy" seeds -- each specialist with
  Gaussian noise on every weight (``--noise`` times the tensor's standard deviation), written
  as new model folders -- and ``archive_size: 3``, below the four seeds. Reported: which
  seeds the archive kept, when each left, and the best model's held-out scores; beside it the
  example's two seeds with the same three slots.
* **unequal tasks**: the two specialists, the example's archive (8), but 60 fitness documents
  of ``shift`` against 12 of ``reverse``; once with ``weighting: per_task`` (the default:
  equal task weights, a reverse document weighs 5x) and once with ``per_document`` (every
  document the same, the behaviour before ``fitness.weighting``). Held-out: 100 documents
  per task, the example's.

    python benchmarks/bench_seeds_compete.py /tmp/ex --search-seeds 0 1 2 --json all.json
    python benchmarks/bench_seeds_compete.py /tmp/ex --search-seeds 0 1 2 --only seeds --noise 0.5

The README's figures: benchmarks/results/bench_seeds_compete/*.json (one row per run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

SPECIALISTS = ("shift-specialist", "reverse-specialist")


def noisy_copy(source: Path, target: Path, noise: float, seed: int) -> None:
    """``source``'s model with N(0, (noise * std)^2) added to every floating tensor."""
    import torch
    from safetensors.torch import load_file
    from safetensors.torch import save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    weights = load_file(str(source / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            scale = noise * float(tensor.float().std())
            weights[name] = tensor + scale * torch.randn(tensor.shape, generator=gen)
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def search(config: Path, search_seed: int, name: str) -> dict[str, Any]:
    """One search; the archive's fate of every seed, the best model and its held-out scores."""
    import optuna

    from m2n2_plugin.search.config import load_config
    from m2n2_plugin.search.evolve import evolve

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_config(config)
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"seed": search_seed})})
    out = config.parent / f"run-{name}-s{search_seed}"
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    run = evolve(cfg, output_dir=out, progress=False)
    wall = time.perf_counter() - start
    trials = run.study.trials
    arch = run.sampler.archive(run.study)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    seeds = {}
    for t in trials:
        if "m2n2.seed" in t.user_attrs:
            entered = any(t.number in h["members"] for h in history)
            left = next(
                (
                    h["trial"]
                    for h in history
                    if h["trial"] > t.number and entered and t.number not in h["members"]
                ),
                None,
            )
            seeds[t.user_attrs["m2n2.model"]] = {
                "trial": t.number,
                "state": t.state.name,
                "mean": t.value,
                "docs": t.user_attrs.get("m2n2.docs_evaluated"),
                "entered": entered,
                "left_at_trial": left,
            }
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best_trial"]
    labels = run.study.user_attrs["m2n2.fitness_labels"]
    best_scores = arch.scores[arch.members.index(best)]
    fit_task: dict[str, list[float]] = {}
    for label, score in zip(labels, best_scores, strict=True):
        fit_task.setdefault(label.split(":")[0], []).append(float(score))
    per_task_coverage: dict[str, list[float]] = {}
    for label, score in zip(labels, arch.scores.max(axis=0), strict=True):
        per_task_coverage.setdefault(label.split(":")[0], []).append(float(score))
    plain = arch.best()  # the pick by the plain mean over documents
    plain_task: dict[str, list[float]] = {}
    for label, score in zip(labels, arch.scores[arch.members.index(plain)], strict=True):
        plain_task.setdefault(label.split(":")[0], []).append(float(score))
    return {
        "name": name,
        "plain_mean_best_trial": plain,
        "plain_mean_best_fitness_per_task": {k: sum(v) / len(v) for k, v in plain_task.items()},
        "search_seed": search_seed,
        "wall_s": round(wall, 1),
        "members": arch.members,
        "member_seeds": [trials[m].user_attrs.get("m2n2.model", "child") for m in arch.members],
        "seeds": seeds,
        "best_trial": best,
        "best_is_seed": "m2n2.seed" in trials[best].user_attrs,
        "best_fitness_per_task": {k: sum(v) / len(v) for k, v in fit_task.items()},
        "coverage_per_task": {k: sum(v) / len(v) for k, v in per_task_coverage.items()},
        "heldout": summary["heldout"],
        "pruned": sum(t.state.name == "PRUNED" for t in trials),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the example's folder (trained if missing)")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--search-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--noise", type=float, default=0.05, help="noise std / tensor std")
    parser.add_argument("--n-trials", type=int, default=None, help="default: the example's")
    parser.add_argument("--only", choices=["seeds", "tasks"], default=None)
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args()

    import torch

    from m2n2_plugin.example import N_FITNESS
    from m2n2_plugin.example import N_HELDOUT
    from m2n2_plugin.example import build_example

    torch.set_num_threads(1)
    folder = args.folder.resolve()
    from m2n2_plugin.example import N_TRIALS

    n_trials = args.n_trials or N_TRIALS
    config = build_example(folder, seed=args.train_seed, n_trials=n_trials, quiet=True)
    base = __import__("yaml").safe_load(config.read_text())
    models = folder / "models" / f"seed{args.train_seed}"
    rows = []

    if args.only in (None, "seeds"):
        noisy = folder / f"noisy{args.noise:g}"  # one folder per noise level: runs stay valid
        for i, name in enumerate(SPECIALISTS):
            noisy_copy(models / name, noisy / f"{name}-noisy", args.noise, seed=i)
        seeds = [models / n for n in SPECIALISTS] + [noisy / f"{n}-noisy" for n in SPECIALISTS]
        mk = write_yaml(
            folder / f"seeds4-noise{args.noise:g}.yml",
            {
                "merge_method": "slerp",
                "base_model": str(seeds[0]),
                "models": [{"model": str(p)} for p in seeds],
                "parameters": {"t": 0.5},
                "dtype": "float32",
            },
        )
        cfg = write_yaml(
            folder / f"evolve-seeds4-noise{args.noise:g}.yml",
            {**base, "mergekit_config": mk.name, "search": {**base["search"], "archive_size": 3}},
        )
        # The baseline: the example's two seeds, the same three slots.
        baseline = write_yaml(
            folder / "evolve-seeds2.yml",
            {**base, "search": {**base["search"], "archive_size": 3}},
        )
        for s in args.search_seeds:
            rows.append(search(cfg, s, f"seeds4-archive3-noise{args.noise:g}"))
            print(json.dumps(rows[-1]), flush=True)
            rows.append(search(baseline, s, "seeds2-archive3"))
            print(json.dumps(rows[-1]), flush=True)

    if args.only in (None, "tasks"):
        shift, reverse = base["fitness"]["tasks"]
        held = list(range(N_FITNESS, N_FITNESS + N_HELDOUT))
        fitness = {
            **base["fitness"],
            "fitness_docs": {shift: list(range(N_FITNESS)), reverse: list(range(12))},
            "heldout_docs": {shift: held, reverse: held},
        }
        for weighting in ("per_task", "per_document"):
            cfg = write_yaml(
                folder / f"evolve-60-12-{weighting}.yml",
                {**base, "fitness": {**fitness, "weighting": weighting}},
            )
            for s in args.search_seeds:
                rows.append(search(cfg, s, f"60v12-{weighting}"))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
