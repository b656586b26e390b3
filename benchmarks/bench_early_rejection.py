"""How many fitness documents does exact early rejection save, and is the run unchanged?

One seeded M2N2 study (InMemoryStorage, one worker) is run twice on a synthetic task: once
scoring every child on all ``--docs`` documents, once scoring children in chunks of ``--chunk``
documents and raising ``optuna.TrialPruned`` as soon as ``Archive.can_enter`` proves the child
cannot enter the archive. After every trial the two archives (member trial numbers per slot and
their score rows) must be identical; the script exits with status 1 if they are not. It prints
the documents evaluated with and without early rejection, their ratio, and the wall time.

The task. Two seed models are specialists: seed 0 solves each document of the first half with
probability 0.85 and of the second half with 0.15, seed 1 the other way round. A child of
parents A and B solves document j with probability ``0.03 + 0.9 * ((1 - t_j) A_j + t_j B_j)``,
where ``A_j``, ``B_j`` are the parents' 0/1 scores and ``t_j`` is the weight on B (``mix_ratio``
before ``split_point * N``, ``1 - mix_ratio`` after, as in split-point SLERP), drawn from a
stream fixed by the trial number. So children inherit their parents' solved documents with some
loss and some luck, the archive fills with niches, and most late children are dropped.

Chunk orders (``--order``): ``rarest`` scores first the documents the archive solves least (they
are worth the most, so failing them lowers the child's best case fastest); ``parents`` first
those that neither parent solves (where the child most likely fails), rarest first among equals.
Any order is exact; the order only changes how soon a rejection is proven.

    python benchmarks/bench_early_rejection.py                  # 600 trials, 200 docs
    python benchmarks/bench_early_rejection.py --order parents --chunk 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna

try:
    from m2n2_plugin import hub as m2n2
except ImportError:  # the plugin is not installed: load the Optuna Hub package from the tree
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import optunahub

    _root = Path(__file__).resolve().parents[1] / "hub_package"
    m2n2 = optunahub.load_local_module("samplers/m2n2", registry_root=str(_root))


TASKS = ("difficulty", "crossover", "interpolate")
ORDERS = ("rarest", "parents", "oracle")


def doc_difficulty(n_docs: int, seed: int) -> np.ndarray:
    """A fixed difficulty in [0, 1) per document (the same for every model)."""
    return np.random.default_rng([seed, 2**31]).random(n_docs)


def child_scores(
    sampler: Any, trial: optuna.Trial, args: argparse.Namespace, difficulty: np.ndarray
) -> np.ndarray:
    """The trial's 0/1 score on every document (what a full evaluation would return)."""
    n_docs = int(args.docs)
    rng = np.random.default_rng([args.seed, trial.number])
    mix_ratio = trial.suggest_float("mix_ratio", 0.0, 1.0)
    split_point = trial.suggest_float("split_point", 0.0, 1.0)
    parents = sampler.parents(trial)
    docs = np.arange(n_docs)
    own_niche = (docs < n_docs // 2) == (sampler.seed_index(trial) == 0)
    if parents is None and args.task == "difficulty":
        # A specialist: solves the documents of its niche that are not too hard.
        ability = np.where(own_niche, 0.75, 0.2)
        chance = 1.0 / (1.0 + np.exp((difficulty - ability) / 0.06))
        return (rng.random(n_docs) < chance).astype(float)
    if parents is None:
        return (rng.random(n_docs) < np.where(own_niche, 0.85, 0.15)).astype(float)
    archive = sampler.archive(trial.study)
    rows = dict(zip(archive.members, archive.scores, strict=True))
    a: np.ndarray = rows[parents[0]]
    b: np.ndarray = rows[parents[1]]
    weight_b = np.where(docs < split_point * n_docs, mix_ratio, 1.0 - mix_ratio)
    if args.task == "interpolate":
        skill = 0.03 + 0.9 * ((1.0 - weight_b) * a + weight_b * b)
        scores: np.ndarray = (rng.random(n_docs) < skill).astype(float)
        return scores
    # crossover: each document's outcome comes from B with probability weight_b, else from A.
    inherited = np.where(rng.random(n_docs) < weight_b, b, a)
    if args.task == "crossover":  # then a few bits flip, either way (2 % each)
        return np.where(rng.random(n_docs) < 0.02, 1.0 - inherited, inherited)
    # difficulty: merging loses 5 % of the inherited solves; luck solves a few more, almost
    # only among the easy documents (a hard document nobody solves stays unsolved).
    lost = rng.random(n_docs) < 0.05
    lucky = rng.random(n_docs) < 0.3 / (1.0 + np.exp((difficulty - 0.35) / 0.05))
    scores = np.where(inherited == 1.0, ~lost, lucky).astype(float)
    if rng.random() < float(args.broken):  # a broken merge keeps a fifth of its solves
        scores *= rng.random(n_docs) < 0.2
    return scores


def chunk_order(
    archive: Any, parents: tuple[int, int], how: str, scores: np.ndarray
) -> np.ndarray:
    """Document indices in the order they are scored (``scores`` only for ``oracle``)."""
    load = archive.slot_scores.sum(axis=0)
    if how == "oracle":
        return np.lexsort((load, scores))
    if how == "rarest":
        return np.argsort(load, kind="stable")
    rows = dict(zip(archive.members, archive.scores, strict=True))
    parents_solve = rows[parents[0]] + rows[parents[1]]
    return np.lexsort((load, parents_solve))  # last key first: parents' solves, then load


def make_objective(
    sampler: Any, args: argparse.Namespace, early: bool, order: str, counts: dict[str, int]
) -> Callable[[optuna.Trial], float]:
    difficulty = doc_difficulty(args.docs, args.seed)

    def objective(trial: optuna.Trial) -> float:
        scores = child_scores(sampler, trial, args, difficulty)
        parents = sampler.parents(trial)
        if not early or parents is None:  # seeds are never pruned (a pruned seed is reissued)
            counts["docs"] += args.docs
            sampler.set_scores(trial, scores)
            return float(scores.mean())
        archive = sampler.archive(trial.study)
        ranked = chunk_order(archive, parents, order, scores)
        seen = np.full(args.docs, np.nan)
        evaluated = np.zeros(args.docs, dtype=bool)
        for start in range(0, args.docs, args.chunk):
            chunk = ranked[start : start + args.chunk]
            seen[chunk] = scores[chunk]  # evaluate these documents
            evaluated[chunk] = True
            counts["docs"] += chunk.size
            if not evaluated.all() and not archive.can_enter(seen, evaluated):
                counts["pruned"] += 1
                raise optuna.TrialPruned()
        sampler.set_scores(trial, seen)
        return float(seen.mean())

    return objective


def run(args: argparse.Namespace, early: bool, order: str) -> dict[str, Any]:
    sampler = m2n2.M2N2Sampler(
        archive_size=args.archive_size, alpha=args.alpha, n_seeds=2, seed=args.seed
    )
    study = optuna.create_study(
        sampler=sampler, storage=optuna.storages.InMemoryStorage(), direction="maximize"
    )
    history: list[tuple[list[int | None], np.ndarray]] = []

    def record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        archive = sampler.archive(study)
        history.append((list(archive.slots), archive.scores.copy()))

    counts = {"docs": 0, "pruned": 0}
    start = time.perf_counter()
    study.optimize(
        make_objective(sampler, args, early, order, counts),
        n_trials=args.trials,
        callbacks=[record],
    )
    seconds = time.perf_counter() - start
    archive = sampler.archive(study)
    return {
        "history": history,
        "docs": counts["docs"],
        "pruned": counts["pruned"],
        "n_folded": archive.n_folded,
        "coverage": archive.coverage,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=600)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--archive-size", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--orders", default="rarest,parents,oracle")
    parser.add_argument("--task", choices=TASKS, default="difficulty")
    parser.add_argument("--broken", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    orders = args.orders.split(",")
    if not set(orders) <= set(ORDERS):
        parser.error(f"--orders: choose from {', '.join(ORDERS)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    full = run(args, early=False, order="")
    children = args.trials - 2
    ever_kept = {n for slots, _ in full["history"] for n in slots if n is not None}
    dropped = full["n_folded"] - len(ever_kept)
    print(
        f"{args.trials} trials ({children} children), {args.docs} documents, archive "
        f"{args.archive_size}, alpha {args.alpha}, task {args.task}, broken {args.broken}, "
        f"chunk {args.chunk}"
    )
    print(
        f"full evaluation: {full['docs']} documents, {full['seconds']:.2f} s; "
        f"{dropped} children dropped ({dropped / children:.0%}), final coverage "
        f"{full['coverage']:.3f}"
    )
    print(f"{'order':<8} {'documents':>9} {'full/early':>10} {'pruned':>7} {'time':>7}  identical")
    status = 0
    for order in orders:
        early = run(args, early=True, order=order)
        pairs = zip(full["history"], early["history"], strict=True)
        identical = all(
            slots_f == slots_e and np.array_equal(scores_f, scores_e)
            for (slots_f, scores_f), (slots_e, scores_e) in pairs
        )
        status |= not identical
        print(
            f"{order:<8} {early['docs']:>9} {full['docs'] / early['docs']:>9.2f}x "
            f"{early['pruned']:>7} {early['seconds']:>6.2f}s  {identical}"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
