"""Per-child cost of the digits loop, piece by piece, in process CPU time.

    python benchmarks/bench_digits.py [--trials 5000]

Wall-clock shares from a real run (``examples/digits/run.py`` records them) move with whatever
else the machine runs; CPU time of this process is steadier. Measured separately:

* evaluation: one child on the 1,437 training images (``Evaluator.correct``);
* crossover + mutation: the kernel's ``split_slerp`` on the flat 19,210 vector + N(0, 0.01^2);
* sampler + Optuna: ``study.optimize`` with the M2N2 sampler and an objective that does the
  sampler calls (seed_index, parents, two suggests, set_scores) on canned 0/1 score rows, no
  model — everything in a trial except crossover and evaluation;
* Optuna alone, for reference: ``RandomSampler`` and the two suggests.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))

from common import MUTATION_STD  # noqa: E402
from common import Evaluator  # noqa: E402
from common import MLPLayout  # noqa: E402
from common import init_params  # noqa: E402
from common import load_digits_dataset  # noqa: E402


def cpu_us(fn: Callable[[], object], reps: int) -> float:
    """Median over 5 blocks of the CPU microseconds per call."""
    for _ in range(min(reps, 50)):
        fn()
    blocks = []
    for _ in range(5):
        t = time.process_time()
        for _ in range(reps // 5):
            fn()
        blocks.append((time.process_time() - t) / (reps // 5) * 1e6)
    return float(np.median(blocks))


def sampler_us(trials: int, m2n2: bool) -> float:
    import optuna
    from m2n2_plugin.hub import M2N2Sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = np.random.default_rng(0)
    pool = (rng.random((64, 1437)) < rng.random((64, 1))).astype(np.float64)
    sampler = M2N2Sampler(seed=0) if m2n2 else optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        if m2n2:
            sampler.seed_index(trial)
            if sampler.parents(trial) is None:
                sampler.set_scores(trial, pool[trial.number % 64])
                return 0.0
        trial.suggest_float("mix_ratio", 0.0, 1.0)
        trial.suggest_float("split_point", 0.0, 1.0)
        scores = pool[trial.number % 64]
        if m2n2:
            sampler.set_scores(trial, scores)
        return float(scores.mean())

    study.optimize(objective, n_trials=200)
    t = time.process_time()
    study.optimize(objective, n_trials=trials)
    return (time.process_time() - t) / trials * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    from m2n2_plugin.merge.kernel import split_index
    from m2n2_plugin.merge.kernel import split_slerp

    data = load_digits_dataset()
    layout = MLPLayout()
    n = layout.n_params
    gen = torch.Generator().manual_seed(0)
    a, b = init_params(layout, gen), init_params(layout, gen)
    noise = torch.empty(n)
    evaluator = Evaluator(data.train, layout)

    def crossover() -> torch.Tensor:
        child = split_slerp(a, b, 0.3, split_index(0.6, n))
        torch.randn(n, generator=gen, out=noise)
        return child.add_(noise, alpha=MUTATION_STD)

    rows = {
        "evaluation (1,437 images)": cpu_us(lambda: evaluator.correct(a).numpy(), 2000),
        "crossover + mutation": cpu_us(crossover, 2000),
        "sampler + Optuna (M2N2Sampler)": sampler_us(args.trials, m2n2=True),
    }
    optuna_alone = sampler_us(args.trials, m2n2=False)
    total = sum(rows.values())
    print(f"{'per child, CPU time':34s} {'us':>8s} {'share':>7s}")
    for name, us in rows.items():
        print(f"{name:34s} {us:8.0f} {us / total:7.0%}")
    print(f"{'total':34s} {total:8.0f}   -> {1e6 / total:.0f} children per CPU-second")
    print(f"{'(Optuna alone, RandomSampler)':34s} {optuna_alone:8.0f}")


if __name__ == "__main__":
    main()
