"""Early rejection on the built-in example: same seeded run with and without, side by side.

Builds the example of ``m2n2 example`` (cached after the first run), then runs ``m2n2 evolve``
twice with the same seed: ``early_rejection: false`` and ``true``. Prints documents evaluated,
wall time, the ratios, and whether the archive was identical after every trial.

    python benchmarks/bench_early_rejection_example.py [--trials 60] [--folder /tmp/m2n2-bench-ex]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def run_once(config: Path, out: Path, early: bool, trials: int) -> tuple[list, int, float, int]:
    from m2n2_plugin.search.config import load_config
    from m2n2_plugin.search.evolve import evolve

    cfg = load_config(config)
    cfg.search.early_rejection = early
    seen: list = []

    def record(run, frozen) -> None:  # noqa: ANN001
        arch = run.sampler.archive(run.study)
        seen.append((frozen.number, list(arch.slots), arch.slot_scores.tolist()))

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run = evolve(cfg, output_dir=out, n_trials=trials, progress=False, on_trial=record)
    wall = time.perf_counter() - t0
    docs = sum(t.user_attrs.get("m2n2.docs_evaluated", 0) for t in run.study.trials)
    pruned = sum(t.state.name == "PRUNED" for t in run.study.trials)
    return seen, docs, wall, pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/m2n2-bench-example"))
    args = parser.parse_args()
    from m2n2_plugin.example import build_example

    config = build_example(args.folder, n_trials=args.trials, quiet=True)
    full, docs_full, wall_full, _ = run_once(config, args.folder / "full", False, args.trials)
    early, docs_early, wall_early, pruned = run_once(
        config, args.folder / "early", True, args.trials
    )
    print(f"built-in example, {args.trials} trials, seed 0")
    print(
        f"  documents evaluated: full {docs_full}, early rejection {docs_early}, "
        f"ratio {docs_full / docs_early:.2f}x ({pruned} children rejected early)"
    )
    print(
        f"  wall time (incl. start-up and outputs): full {wall_full:.1f} s, "
        f"early {wall_early:.1f} s, ratio {wall_full / wall_early:.2f}x"
    )
    print(f"  archive identical after every trial: {full == early}")


if __name__ == "__main__":
    main()
