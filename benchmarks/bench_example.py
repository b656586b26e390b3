"""Does the built-in example show the fusion on every training seed and every search seed?

For each training seed the example's specialists are trained (as ``m2n2 example --seed T``
does: until each solves 95 % of its development documents); for each search seed the example's
search runs on them (``--search-seed S``). Each row is one ``m2n2 example`` run: the held-out
mean of the best model against each seed's, and the margin over the better seed. The last
lines give the worst case, which the README reports.

    python benchmarks/bench_example.py                     # 5 training x 5 search seeds
    python benchmarks/bench_example.py --train-seeds 0 1 --search-seeds 0 --jobs 2

Runs are independent (one thread each); ``--jobs`` runs that many at once.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def train(folder: Path, train_seed: int, n_trials: int) -> float:
    """Train the specialists of one training seed (cached in ``folder``); seconds taken."""
    from m2n2_plugin.example import build_example

    start = time.perf_counter()
    build_example(folder, n_trials=n_trials, seed=train_seed, quiet=True)
    return time.perf_counter() - start


def search(folder: Path, train_seed: int, search_seed: int) -> dict[str, Any]:
    """One example search on trained specialists; its held-out means and wall time."""
    import optuna

    from m2n2_plugin.search.config import load_config
    from m2n2_plugin.search.evolve import evolve

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The folder's files were written once by ``train``; runs of several search seeds share
    # them (read-only) and differ only in the search seed and output folder.
    cfg = load_config(folder / "evolve.yml")
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"seed": search_seed})})
    start = time.perf_counter()
    run = evolve(cfg, output_dir=folder / f"run-search{search_seed}", progress=False)
    wall = time.perf_counter() - start
    summary = json.loads((run.out / "summary.json").read_text())
    best, *seeds = (v["mean"] for v in summary["heldout"].values())
    return {
        "train_seed": train_seed,
        "search_seed": search_seed,
        "best": best,
        "seeds": seeds,
        "best_is_seed": summary["n_merges_in_lineage"] == 0,
        "margin": best - max(seeds),
        "search_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--search-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/m2n2-bench-example"))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--n-trials", type=int, help="trials per search (default: the example's)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    from m2n2_plugin.example import N_TRIALS

    n_trials = args.n_trials or N_TRIALS
    print(f"{n_trials} trials per search", flush=True)
    folders = {t: args.folder / f"train{t}" for t in args.train_seeds}
    with ProcessPoolExecutor(args.jobs) as pool:
        train_s = dict(
            zip(
                args.train_seeds,
                pool.map(train, folders.values(), args.train_seeds, [n_trials] * len(folders)),
                strict=True,
            )
        )
        jobs = [(folders[t], t, s) for t in args.train_seeds for s in args.search_seeds]
        rows = list(pool.map(search, *zip(*jobs, strict=True)))

    print("| training seed | search seed | best | shift seed | reverse seed | margin | search s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        best = f"{r['best']:.3f}" + (" (a seed)" if r["best_is_seed"] else "")
        seeds = " | ".join(f"{v:.3f}" for v in r["seeds"])
        print(
            f"| {r['train_seed']} | {r['search_seed']} | {best} | {seeds} | "
            f"{r['margin']:+.3f} | {r['search_s']:.0f} |"
        )
    worst = min(rows, key=lambda r: r["margin"])
    wins = sum(r["margin"] > 0 and not r["best_is_seed"] for r in rows)
    print(
        f"\nbest child beats both seeds on the held-out mean in {wins}/{len(rows)} runs; worst "
        f"margin {worst['margin']:+.3f} (training seed {worst['train_seed']}, search seed "
        f"{worst['search_seed']}: {worst['best']:.3f} vs "
        + " / ".join(f"{v:.3f}" for v in worst["seeds"])
        + ")"
    )
    print(
        "training s per seed: "
        + ", ".join(f"{t}: {s:.0f}" for t, s in train_s.items())
        + f"; search s: median {sorted(r['search_s'] for r in rows)[len(rows) // 2]:.0f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "train_s": train_s}, indent=2))


if __name__ == "__main__":
    main()
