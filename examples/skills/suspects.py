"""What a finished (or running) ``m2n2 evolve`` run did with its crossovers: the suspects of
issue 27, measured on the run's own records rather than guessed.

    python examples/skills/suspects.py runs/h2h/<tag>/m2n2-paper-s0 [more run folders]

For each run folder (an ``output_dir`` of ``m2n2 evolve``: ``study.db``, ``history.jsonl``):

* **wasted splits**: the share of children whose split points all fall where they change
  nothing, before the first or after the last parameter in which the seeds differ (a frozen
  embedding comes first in the order): such a child has one ratio for every parameter that
  differs, the paper's "no split point" ablation. Their admission rate against the others.
* **parents**: the share of children with a seed (a specialist or the config merge) as a
  parent, per quarter of the run, and how many seeds are still in the archive at the end.
* **admission**: the share of children the archive took in, per quarter.

Prints a Markdown table per run; ``--json`` writes the figures too.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def seed_layout(seed_paths: list[Path]) -> tuple[int, int, int]:
    """(total parameters, first differing index, end of the last differing tensor)."""
    from transformers import AutoConfig

    from m2n2_plugin.merge.checkpoint import checkpoint_shapes
    from m2n2_plugin.merge.layout import Architecture
    from m2n2_plugin.merge.layout import Parent
    from m2n2_plugin.merge.layout import plan_pair
    from m2n2_plugin.merge.models import shared_tensors

    arch = Architecture.for_config(AutoConfig.from_pretrained(seed_paths[0]))
    shapes = checkpoint_shapes(seed_paths[0])
    plan = plan_pair(arch, Parent("seed", shapes), Parent("seed", shapes))
    shared = shared_tensors(seed_paths)
    spans = [
        span
        for name, span in plan.layout.spans.items()
        if plan.sources_a.get(name) not in shared and span[1]
    ]
    first = spans[0][0]
    last = spans[-1][0] + spans[-1][1]
    return plan.layout.total, first, last


def measure(folder: Path) -> dict[str, Any]:
    import optuna

    from m2n2_plugin.report.family_tree import crossover

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="m2n2", storage=f"sqlite:///{folder / 'study.db'}")
    # A finished h2h run no longer holds the config's merge; tensors the specialists share
    # are shared by their task-arithmetic merge too, so the specialists alone say the same.
    seeds = [Path(path) for _, path in study.user_attrs["m2n2.seeds"] if Path(path).exists()]
    total, first, last = seed_layout(seeds)
    history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    members_after = {row["trial"]: set(row["members"]) for row in history}
    seed_trials = {t.number for t in study.trials if "m2n2.seed" in t.user_attrs}
    rows = []
    for t in study.trials:
        if "m2n2.parents" not in t.user_attrs or t.number not in members_after:
            continue
        _, split_points = crossover(t)
        inside = [first < math.floor(p * total) < last for p in split_points]
        a, b = t.user_attrs["m2n2.parents"]
        rows.append(
            {
                "trial": t.number,
                "wasted": not any(inside),
                "admitted": t.number in members_after[t.number],
                "seed_parent": a in seed_trials or b in seed_trials,
            }
        )
    wasted = np.array([r["wasted"] for r in rows])
    admitted = np.array([r["admitted"] for r in rows])
    seed_parent = np.array([r["seed_parent"] for r in rows])
    quarters = np.array_split(np.arange(len(rows)), 4)
    final = history[-1]["members"]
    return {
        "run": folder.name,
        "children": len(rows),
        "shared_before_first_difference": first / total,
        "wasted_share": float(wasted.mean()),
        "admitted_if_wasted": float(admitted[wasted].mean()) if wasted.any() else None,
        "admitted_otherwise": float(admitted[~wasted].mean()) if (~wasted).any() else None,
        "seed_parent_by_quarter": [float(seed_parent[q].mean()) for q in quarters if q.size],
        "admitted_by_quarter": [float(admitted[q].mean()) for q in quarters if q.size],
        "seeds_in_final_archive": sum(m in seed_trials for m in final),
        "archive_size": len(final),
    }


def table(figures: list[dict[str, Any]]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f} %"

    def quarters(xs: list[float]) -> str:
        return " / ".join(f"{100 * x:.0f}" for x in xs)

    lines = [
        "| run | children | params before the first difference | wasted splits | admitted "
        "(wasted / other) | seed parent, % by quarter | admitted, % by quarter | seeds left |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in figures:
        lines.append(
            f"| {f['run']} | {f['children']} | {pct(f['shared_before_first_difference'])} | "
            f"{pct(f['wasted_share'])} | {pct(f['admitted_if_wasted'])} / "
            f"{pct(f['admitted_otherwise'])} | {quarters(f['seed_parent_by_quarter'])} | "
            f"{quarters(f['admitted_by_quarter'])} | "
            f"{f['seeds_in_final_archive']} of {f['archive_size']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="m2n2 evolve output folders")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = [measure(folder) for folder in args.runs]
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
