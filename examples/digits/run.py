"""Reproduce the M2N2 paper's digits experiments (one command per figure).

    python examples/digits/run.py scratch --method m2n2 --seeds 42-51 --children 50000
    python examples/digits/run.py pretrained --method m2n2 --seeds 42-51 --children 10000
    python examples/digits/plot.py            # curves (PNG) + table (Markdown, CSV)

Every M2N2 variant runs the package's Optuna Hub sampler (``m2n2_plugin.hub.M2N2Sampler``)
through a plain ``study.optimize`` and crosses parents with the package's split-point SLERP
kernel (``m2n2_plugin.merge.kernel.split_slerp``) on the MLP's flat parameter vector — the
same code a user gets; this file only supplies the objective (build the child, score it per
example).

Methods (``--method``):

* ``m2n2``           alpha 1, attraction, split point, crossover (+ mutation from scratch)
* ``no_attraction``  parents A and B both drawn i.i.d. proportional to fitness
* ``no_split``       plain SLERP (split point fixed at 1: one ratio for every parameter)
* ``no_crossover``   child = mutate(parent A); from scratch only
* ``ga``             alpha 0 (raw scores, no resource competition), no attraction
* ``cmaes``          separable CMA-ES (``cmaes.SepCMA``), population 20, sigma0 0.01; from
                     scratch only. Not through Optuna: see ``run_cmaes`` for why.
* ``bruteforce``     best of N plain-SLERP ratios between the two specialists; pre-trained only

Logged, as the paper does: the test accuracy of the archive member with the best training
accuracy, against the number of children evaluated. One JSON file per (method, seed) lands in
``--out`` (default ``examples/digits/results/<dataset>_<setting>/``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MUTATION_STD  # noqa: E402
from common import Dataset  # noqa: E402
from common import Evaluator  # noqa: E402
from common import MLPLayout  # noqa: E402
from common import init_params  # noqa: E402
from common import load_digits_dataset  # noqa: E402
from common import official_cmaes_x0  # noqa: E402
from common import official_scratch_models  # noqa: E402
from common import official_specialist_inits  # noqa: E402
from common import parse_seeds  # noqa: E402
from common import train_specialist  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = ("scratch", "pretrained")
#: The paper's budgets (children evaluated).
DEFAULT_CHILDREN = {"scratch": 50_000, "pretrained": 10_000}
ARCHIVE_SIZE = 20


@dataclass(frozen=True)
class Method:
    """One row of the paper's comparison, as sampler switches plus the objective's choice."""

    alpha: float = 1.0
    use_attraction: bool = True
    use_split_point: bool = True
    crossover: bool = True
    settings: tuple[str, ...] = SETTINGS


METHODS: dict[str, Method] = {
    "m2n2": Method(),
    "no_attraction": Method(use_attraction=False),
    "no_split": Method(use_split_point=False),
    "no_crossover": Method(crossover=False, settings=("scratch",)),
    "ga": Method(alpha=0.0, use_attraction=False),
}
OTHER_METHODS = {"cmaes": ("scratch",), "bruteforce": ("pretrained",)}
ALL_METHODS = (*METHODS, *OTHER_METHODS)


@dataclass
class Timers:
    """Wall-clock accumulators (seconds) for the time-share report."""

    crossover: float = 0.0
    evaluation: float = 0.0
    logging: float = 0.0


@dataclass
class Curve:
    """The logged curve: children evaluated -> best-train member's accuracies."""

    children: list[int] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    #: Seconds since the start of the loop: shows whether the per-child cost drifts.
    elapsed_s: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter, repr=False)

    def add(self, k: int, train: float, test: float) -> None:
        self.children.append(k)
        self.train_acc.append(train)
        self.test_acc.append(test)
        self.elapsed_s.append(round(time.perf_counter() - self.start, 4))

    def as_dict(self) -> dict[str, list[Any]]:
        return {
            "children": self.children,
            "train_acc": self.train_acc,
            "test_acc": self.test_acc,
            "elapsed_s": self.elapsed_s,
        }


@dataclass
class ChildInfo:
    """What one M2N2 child was made of; handed to ``on_child`` (the tests check ablations)."""

    trial: Any  # optuna.Trial
    sampler: Any  # M2N2Sampler
    parents: tuple[int, int]
    mix_ratio: float
    split_point: float
    parent_a: torch.Tensor
    parent_b: torch.Tensor
    child: torch.Tensor
    noise: torch.Tensor | None
    scores: np.ndarray


def set_single_thread() -> None:
    """One thread for torch and for numpy's BLAS: the work items are small, runs go in parallel
    as processes, and on a busy machine idle BLAS/OpenMP threads spin and steal the core."""
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # comes with scikit-learn, which the digits data needs anyway
        return
    threadpool_limits(1)


def initial_models(
    setting: str, dataset: Dataset, layout: MLPLayout, seed: int
) -> list[torch.Tensor]:
    """The archive's two seeds, drawn as the official code draws them.

    From scratch: two N(0, 0.01^2) models from the run's seed (JAX's numbers, for digits). Pre-
    trained: the two specialists, trained from the fixed key 42 whatever the run's seed (as the
    official code); the run's seed then only drives the evolution. Other datasets (MNIST) have
    no official models: torch draws from the seed.
    """
    n = layout.n_params
    if dataset.name == "digits":
        if setting == "scratch":
            return official_scratch_models(seed, n)
        inits = official_specialist_inits(n)
    else:
        gen = torch.Generator().manual_seed(seed)
        inits = [init_params(layout, gen), init_params(layout, gen)]
        if setting == "scratch":
            return inits
    return [
        train_specialist(dataset, layout, (0, 1, 2, 3, 4), inits[0]),
        train_specialist(dataset, layout, (5, 6, 7, 8, 9), inits[1]),
    ]


def _log_points(children: int, log_every: int) -> set[int]:
    return set(range(0, children + 1, log_every)) | {children}


def run_m2n2(
    setting: str,
    method_name: str,
    seed: int,
    children: int,
    dataset: Dataset,
    log_every: int,
    on_child: Callable[[ChildInfo], None] | None = None,
) -> dict[str, Any]:
    """One run of an M2N2 variant through Optuna; returns the JSON-able record.

    ``on_child``, when given, sees every child after its evaluation (for tests; it copies
    nothing, so keep it cheap or expect the timings to include it).
    """
    import optuna
    from m2n2_plugin.hub import M2N2Sampler

    from m2n2_plugin.merge.kernel import split_index
    from m2n2_plugin.merge.kernel import split_slerp

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    method = METHODS[method_name]
    if setting not in method.settings:
        raise ValueError(f"method {method_name!r} is not defined for the {setting} setting")
    torch.manual_seed(seed)
    layout = MLPLayout(n_in=dataset.n_in)
    n_params = layout.n_params
    train_eval = Evaluator(dataset.train, layout)
    test_eval = Evaluator(dataset.test, layout)
    seeds = initial_models(setting, dataset, layout, seed)
    n_seeds = len(seeds)
    mutate = setting == "scratch"  # the paper mutates only when evolving from scratch
    sampler = M2N2Sampler(
        archive_size=ARCHIVE_SIZE,
        alpha=method.alpha,
        use_attraction=method.use_attraction,
        use_split_point=method.use_split_point,
        n_seeds=n_seeds,
        seed=seed,
    )
    study = optuna.create_study(
        direction="maximize", sampler=sampler, storage=optuna.storages.InMemoryStorage()
    )
    noise_gen = torch.Generator().manual_seed(seed + 7919)
    noise = torch.empty(n_params)
    params: dict[int, torch.Tensor] = {}  # trial number -> flat vector (archive members + new)
    test_cache: dict[int, float] = {}
    timers = Timers()
    log_at = _log_points(children, log_every)

    def objective(trial: optuna.Trial) -> float:
        idx = sampler.seed_index(trial)
        w = s = float("nan")
        parents = None
        if idx is not None:
            t1 = time.perf_counter()
            child = seeds[idx]
        else:
            parents = sampler.parents(trial)
            assert parents is not None
            a, b = parents
            w = trial.suggest_float("mix_ratio", 0.0, 1.0)
            s = trial.suggest_float("split_point", 0.0, 1.0)
            t1 = time.perf_counter()
            if method.crossover:
                child = split_slerp(params[a], params[b], w, split_index(s, n_params))
            else:
                child = params[a].clone()
            if mutate:
                torch.randn(n_params, generator=noise_gen, out=noise)
                child.add_(noise, alpha=MUTATION_STD)
        t2 = time.perf_counter()
        scores = train_eval.correct(child).numpy()
        t3 = time.perf_counter()
        timers.crossover += t2 - t1
        timers.evaluation += t3 - t2
        params[trial.number] = child
        sampler.set_scores(trial, scores)
        if on_child is not None and parents is not None:
            on_child(
                ChildInfo(
                    trial,
                    sampler,
                    parents,
                    w,
                    s,
                    params[parents[0]],
                    params[parents[1]],
                    child,
                    noise.clone() if mutate else None,
                    scores,
                )
            )
        return float(scores.mean())

    def log(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        k = trial.number - n_seeds + 1  # children evaluated so far (seeds are not children)
        if k not in log_at:
            return
        t0 = time.perf_counter()
        archive = sampler.archive(study)
        members = list(archive.members)
        keep = set(members)
        for number in [n for n in params if n not in keep]:
            del params[number]  # left the archive: can never be a parent again
        best_row = int(np.argmax(np.asarray(archive.scores).sum(axis=1)))
        best = members[best_row]
        if best not in test_cache:
            test_cache[best] = test_eval.accuracy(params[best])
        curve.add(k, float(np.mean(archive.scores[best_row])), test_cache[best])
        timers.logging += time.perf_counter() - t0

    curve = Curve()
    start, cpu = time.perf_counter(), time.process_time()
    study.optimize(objective, n_trials=n_seeds + children, callbacks=[log])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return _record(setting, method_name, seed, children, dataset, wall, cpu, timers, curve)


def run_cmaes(
    seed: int, children: int, dataset: Dataset, log_every: int, popsize: int = 20
) -> dict[str, Any]:
    """Separable CMA-ES baseline (``cmaes.SepCMA``), from scratch, fitness = -train accuracy.

    The paper runs pycma with a full covariance. On 19,210 parameters that is a 19,210^2
    covariance (~3 GB, > 9 GB RSS in pycma) and ~4.4 children/s on this machine, i.e. 6-11 h per
    50,000-child run, so the separable (diagonal) variant runs here. It is not driven through
    Optuna's ``CmaEsSampler`` either: that would make every trial suggest 19,210 parameters one
    by one and keep them all in the storage (~10^9 entries over 50,000 trials); the ``cmaes``
    package is the same library that sampler wraps. Each generation of 20 is evaluated as one
    batched matmul. Logged: the best-training-accuracy candidate seen so far.
    """
    from cmaes import SepCMA

    if log_every % popsize:
        raise ValueError(f"--log-every must be a multiple of the population size {popsize}")
    layout = MLPLayout(n_in=dataset.n_in)
    train_eval = Evaluator(dataset.train, layout)
    test_eval = Evaluator(dataset.test, layout)
    if dataset.name == "digits":
        x0 = official_cmaes_x0(seed, layout.n_params).double().numpy()
    else:
        x0 = init_params(layout, torch.Generator().manual_seed(seed)).double().numpy()
    opt = SepCMA(mean=x0, sigma=0.01, population_size=popsize, seed=seed)
    timers = Timers()
    curve = Curve()
    best_train = -1.0
    best_theta = torch.from_numpy(x0).float()
    best_test = test_eval.accuracy(best_theta)
    curve.add(0, train_eval.accuracy(best_theta), best_test)
    done = 0
    start, cpu = time.perf_counter(), time.process_time()
    while done < children:
        t0 = time.perf_counter()
        xs = np.stack([opt.ask() for _ in range(popsize)])
        t1 = time.perf_counter()
        acc = train_eval.correct_batch(torch.from_numpy(xs).float()).double().mean(dim=1)
        t2 = time.perf_counter()
        opt.tell([(xs[i], -float(acc[i])) for i in range(popsize)])
        timers.evaluation += t2 - t1
        done += popsize
        i = int(torch.argmax(acc))
        t3 = time.perf_counter()
        if float(acc[i]) > best_train:  # strictly better: ties keep the earlier candidate
            best_train = float(acc[i])
            best_theta = torch.from_numpy(xs[i]).float()
            best_test = test_eval.accuracy(best_theta)
        if done % log_every == 0 or done >= children:
            curve.add(done, best_train, best_test)
        timers.logging += time.perf_counter() - t3
        del t0
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return _record("scratch", "cmaes", seed, done, dataset, wall, cpu, timers, curve)


def run_bruteforce(
    seed: int, children: int, dataset: Dataset, log_every: int, chunk: int = 100
) -> dict[str, Any]:
    """Brute-force SLERP ratio between the two specialists (pre-trained setting).

    The ratios are the grid ``linspace(0, 1, children)`` — the official "best of 10,000 ratios" —
    visited in a seeded random order so that the curve against the number of children means
    something. Ties in training accuracy go to the lower grid index, as in the official in-order
    scan, so the end point is the official one whatever the order.
    """
    from m2n2_plugin.merge.kernel import cosine
    from m2n2_plugin.merge.kernel import split_slerp

    layout = MLPLayout(n_in=dataset.n_in)
    train_eval = Evaluator(dataset.train, layout)
    test_eval = Evaluator(dataset.test, layout)
    a, b = initial_models("pretrained", dataset, layout, seed)
    cos = cosine(a, b)
    n = layout.n_params
    grid = np.linspace(0.0, 1.0, children)
    order = np.random.default_rng(seed).permutation(children)
    timers = Timers()
    curve = Curve()
    log_at = _log_points(children, log_every)
    # Before any ratio: the better specialist (what the other methods' archives start with).
    best_train, best_test = max((train_eval.accuracy(t), test_eval.accuracy(t)) for t in (a, b))
    curve.add(0, best_train, best_test)
    best_index = children
    start, cpu = time.perf_counter(), time.process_time()
    for lo in range(0, children, chunk):
        t0 = time.perf_counter()
        idx = order[lo : lo + chunk]
        thetas = torch.stack([split_slerp(a, b, float(grid[i]), n, cos=cos) for i in idx])
        t1 = time.perf_counter()
        acc = train_eval.correct_batch(thetas).double().mean(dim=1)
        t2 = time.perf_counter()
        timers.crossover += t1 - t0
        timers.evaluation += t2 - t1
        for j, i in enumerate(idx):
            tr = float(acc[j])
            if tr > best_train or (tr == best_train and i < best_index):
                best_train, best_index = tr, int(i)
                best_test = test_eval.accuracy(thetas[j])
            if lo + j + 1 in log_at:
                curve.add(lo + j + 1, best_train, best_test)
        timers.logging += time.perf_counter() - t2
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return _record("pretrained", "bruteforce", seed, children, dataset, wall, cpu, timers, curve)


def _record(
    setting: str,
    method: str,
    seed: int,
    children: int,
    dataset: Dataset,
    wall: float,
    cpu: float,
    timers: Timers,
    curve: Curve,
) -> dict[str, Any]:
    other = wall - timers.crossover - timers.evaluation - timers.logging
    return {
        "dataset": dataset.name,
        "setting": setting,
        "method": method,
        "seed": seed,
        "children": children,
        "n_train": len(dataset.train),
        "n_test": len(dataset.test),
        "wall_s": wall,
        "children_per_s": children / wall if wall > 0 else float("nan"),
        # Process CPU time: on a shared machine it is the steadier measure of the work done.
        "cpu_s": cpu,
        "children_per_cpu_s": children / cpu if cpu > 0 else float("nan"),
        "time_s": {
            "sampler_and_optuna": other,
            **{k: v for k, v in asdict(timers).items()},
        },
        "final_test_acc": curve.test_acc[-1],
        "final_train_acc": curve.train_acc[-1],
        "curve": curve.as_dict(),
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_avg_1min_at_end": os.getloadavg()[0],
        },
    }


def run_one(
    setting: str, method: str, seed: int, children: int, dataset: Dataset, log_every: int
) -> dict[str, Any]:
    """Dispatch one (method, seed) run."""
    if method == "cmaes":
        if setting != "scratch":
            raise ValueError("cmaes runs from scratch only (as in the paper)")
        return run_cmaes(seed, children, dataset, log_every)
    if method == "bruteforce":
        if setting != "pretrained":
            raise ValueError("bruteforce needs the two pre-trained specialists")
        return run_bruteforce(seed, children, dataset, log_every)
    return run_m2n2(setting, method, seed, children, dataset, log_every)


def load_dataset(name: str, fit_size: int | None) -> Dataset:
    if name == "digits":
        return load_digits_dataset()
    if name == "mnist":
        from common import load_mnist_dataset

        return load_mnist_dataset(fit_size)
    raise ValueError(f"unknown dataset {name!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("setting", choices=SETTINGS)
    parser.add_argument("--method", choices=ALL_METHODS, default="m2n2")
    parser.add_argument("--seeds", default="42", help="e.g. 42-51 or 42,43 (paper: 42-51)")
    parser.add_argument("--children", type=int, help="default: 50000 scratch, 10000 pretrained")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    parser.add_argument(
        "--fit-size", type=int, default=None, help="mnist: training images used as fitness set"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    set_single_thread()
    children = args.children or DEFAULT_CHILDREN[args.setting]
    out = args.out or RESULTS / f"{args.dataset}_{args.setting}"
    dataset = load_dataset(args.dataset, args.fit_size)
    for seed in parse_seeds(args.seeds):
        rec = run_one(args.setting, args.method, seed, children, dataset, args.log_every)
        path = out / args.method / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=1))
        shares = {k: v / rec["wall_s"] for k, v in rec["time_s"].items()}
        print(
            f"{args.dataset} {args.setting} {args.method} seed {seed}: "
            f"test {rec['final_test_acc']:.4f} train {rec['final_train_acc']:.4f} "
            f"@{rec['children']} | {rec['wall_s']:.1f} s, {rec['children_per_s']:.0f} children/s"
            f" | shares " + " ".join(f"{k} {v:.0%}" for k, v in shares.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
