"""The ``m2n2`` command: ``m2n2 evolve CONFIG`` and ``m2n2 example [FOLDER]``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.example import DEFAULT_SEED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="m2n2", description="M2N2 evolutionary model merging with mergekit, lm-eval, Optuna"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evolve", help="run or resume an evolution from a config file")
    ev.add_argument("config", help="m2n2 evolve YAML config")
    ev.add_argument("-o", "--output-dir", help="output folder (default: output_dir in config)")
    ev.add_argument("-n", "--n-trials", type=int, help="total trials (overrides search.n_trials)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument(
        "--device",
        help="cpu, cuda, cuda:N or mps (overrides fitness.device: one GPU per worker)",
    )
    ex = sub.add_parser("example", help="build the tiny built-in example and evolve it")
    ex.add_argument("folder", nargs="?", default="m2n2-example", help="where to build it")
    ex.add_argument("-n", "--n-trials", type=int, help="trials (default: the example's)")
    ex.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="training seed of the specialists (default: %(default)s)",
    )
    ex.add_argument("--search-seed", type=int, default=0, help="seed of the M2N2 search")
    ex.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _summary_lines(run) -> list[str]:  # noqa: ANN001
    import json

    summary = json.loads((run.out / "summary.json").read_text())
    lines = [f"output: {run.out}"]
    if "best_trial" in summary:
        lines.append(
            f"best: trial {summary['best_trial']}  fitness {summary['best_fitness']:.4f}  "
            f"coverage {summary['coverage']:.4f}  -> {run.out / 'best'}"
        )
        heldout = summary.get("heldout", {})
        for who, scores in heldout.items():
            cells = "  ".join(f"{k}={v:.3f}" for k, v in scores.items())
            lines.append(f"held-out  {who}: {cells}")
        if heldout:
            lines.append(verdict(heldout, is_seed=summary.get("n_merges_in_lineage") == 0))
    return lines


def verdict(heldout: dict[str, dict[str, float]], is_seed: bool) -> str:
    """The last line of a run: the best model's held-out mean against each seed's."""
    best, *seeds = heldout.values()
    others = " / ".join(f"{s['mean']:.3f}" for s in seeds)
    who = "best model (a seed: no child beat it)" if is_seed else "best child"
    return f"{who}: held-out mean {best['mean']:.3f} vs seeds {others}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from m2n2_plugin.search.evolve import evolve

        if args.command == "example":
            from m2n2_plugin.example import build_example

            config = build_example(
                args.folder, seed=args.seed, search_seed=args.search_seed, n_trials=args.n_trials
            )
            print(f"example built in {config.parent}; evolving (rerun: m2n2 evolve {config})")
            run = evolve(config, n_trials=args.n_trials, progress=not args.no_progress)
        else:
            run = evolve(
                args.config,
                output_dir=args.output_dir,
                n_trials=args.n_trials,
                progress=not args.no_progress,
                device=args.device,
            )
        print("\n".join(_summary_lines(run)))
        return 0
    except M2N2Error as exc:
        if args.debug:
            raise
        print(f"m2n2: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m2n2: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: one line, --debug for the traceback
        if args.debug or os.environ.get("M2N2_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"m2n2: error: {type(exc).__name__}: {first} (--debug for a traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
